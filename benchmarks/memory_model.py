"""A memory MODEL (arithmetic, not a measurement) of the per-rank peak of a BOOST outer step under FSDP2,
for Llama-3-8B and Llama-3-70B shapes on 8 and 64 GPUs, full fine-tuning and LoRA.

    python benchmarks/memory_model.py            # prints the markdown table of benchmarks/RESULTS.md

What it counts, per rank, in GiB (2^30 bytes):

- ``model state``: what FSDP2 keeps sharded over the N ranks. Full fine-tuning: fp32 parameters,
  gradients and AdamW's two moments, 16 bytes per parameter. LoRA (``lora.r`` adapters on every
  linear layer of the decoder, ``lora.train_head=true``): the frozen base in bf16 (2 bytes per
  parameter) plus 16 bytes per trained parameter (the adapters and the head's trainable copy).
- ``outer step, gathered`` (what ``parallel=fsdp2`` does today, boost/train/distributed.py): the LM
  head W gathered at full size, its pre-step copy, g, and the solver's vectors (CG: four), each
  V x D in fp32 on every rank: 7 V D 4 bytes, independent of N.
- ``outer step, sharded`` (issue 25's design, not built yet): the same seven vectors kept as 1/N row
  shards of the vocabulary, with the fused ops reading the local shard and all-reducing per-token
  softmax statistics ([T] floats, not counted): 7 V D 4 / N bytes.

Not modelled: activations (they depend on the token budget, sequence length and activation
checkpointing and are the same with or without the outer step), the temporary all-gather buffers of
FSDP2's layer-by-layer unsharding (one or two layers at a time), and allocator fragmentation.
:func:`parameter_count` is checked against ``transformers``' own count of the same configurations
(on the meta device) in tests/test_memory_model.py.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
SOLVER_VECTORS = 4  # CG: r, p, Hp and x (Neumann: three)
OUTER_VECTORS = 3 + SOLVER_VECTORS  # gathered W, its pre-step copy, g


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer of the decoder (the LM head excluded)."""
        kv = self.kv_heads * self.head_dim
        d, f = self.hidden, self.intermediate
        per_layer = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]  # q k v o gate up down
        return per_layer * self.layers


LLAMA3_8B = Shape("Llama-3-8B", 128256, 4096, 14336, 32, 32, 8)
LLAMA3_70B = Shape("Llama-3-70B", 128256, 8192, 28672, 80, 64, 8)


def parameter_count(shape: Shape) -> int:
    """Every parameter of the causal LM: embedding, decoder linears, RMSNorms, final norm, untied head."""
    linears = sum(i * o for i, o in shape.linears())
    norms = shape.layers * 2 * shape.hidden + shape.hidden
    return 2 * shape.vocab * shape.hidden + linears + norms


def lora_count(shape: Shape, r: int) -> int:
    """LoRA adapter parameters, rank ``r`` on every decoder linear: r (in + out) each."""
    return sum(r * (i + o) for i, o in shape.linears())


def per_rank(shape: Shape, ranks: int, lora: bool, r: int = 16) -> dict[str, float]:
    """The modelled per-rank GiB of one configuration (see the module docstring)."""
    total, head = parameter_count(shape), shape.vocab * shape.hidden
    if lora:
        trained = lora_count(shape, r) + head  # adapters and the head's trainable copy
        state = (2 * total + 16 * trained) / ranks
    else:
        state = 16 * total / ranks
    gathered = OUTER_VECTORS * head * 4
    return {
        "model_state": state / GIB,
        "outer_gathered": gathered / GIB,
        "outer_sharded": gathered / ranks / GIB,
        "total_gathered": (state + gathered) / GIB,
        "total_sharded": (state + gathered / ranks) / GIB,
    }


def table(shapes=(LLAMA3_8B, LLAMA3_70B), ranks=(8, 64)) -> str:
    rows = ["| model | ranks | training | model state | outer step, gathered (today) | outer step, sharded | "
            "peak today | peak sharded |", "|---|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for shape in shapes:
        for n in ranks:
            for lora in (False, True):
                m = per_rank(shape, n, lora)
                rows.append(
                    f"| {shape.name} | {n} | {'LoRA r=16 + head' if lora else 'full'} | {m['model_state']:.1f} | "
                    f"{m['outer_gathered']:.1f} | {m['outer_sharded']:.2f} | {m['total_gathered']:.1f} | "
                    f"{m['total_sharded']:.1f} |"
                )
    return "\n".join(rows)


if __name__ == "__main__":
    print("Memory MODEL, GiB per rank, activations not included (benchmarks/memory_model.py)\n")
    print(table())
