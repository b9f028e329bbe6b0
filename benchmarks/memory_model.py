"""A memory MODEL (arithmetic, not a measurement) of the per-rank peak of a BOOST outer step under FSDP2,
for Llama-3-8B and Llama-3-70B shapes on 8 and 64 GPUs, full fine-tuning and LoRA.

    python benchmarks/memory_model.py            # prints the markdown table of benchmarks/RESULTS.md

What it counts, per rank, in GiB (2^30 bytes):

- ``model state``: what FSDP2 keeps sharded over the N ranks. Full fine-tuning: fp32 parameters,
  gradients and AdamW's two moments, 16 bytes per parameter. LoRA (``lora.r`` adapters on every
  linear layer of the decoder, ``lora.train_head=true``): the frozen base in bf16 (2 bytes per
  parameter) plus 16 bytes per trained parameter (the adapters and the head's trainable copy).
- ``outer step, gathered`` (``sharded_outer=false``): the LM head W and its pre-step copy gathered
  at full size, g, CG's x, r, p, the HVP's output and the residual's: 8 V x D fp32 vectors on every
  rank, independent of N (8.0 measured: benchmarks/sharded_outer_memory.py, 1024 MiB at V=32768,
  D=1024 on 1, 2 and 4 gloo ranks).
- ``outer step, sharded`` (``sharded_outer=true``, the FSDP2 default; boost_kernels/vocab_parallel.py):
  the same vectors but the two heads (which FSDP2 already holds as rows) as 1/N row shards, 6 V D 4 / N
  bytes (6.0, 3.1, 1.7 vectors measured on 1, 2, 4 ranks), plus every rank's counted tokens of the
  inner batch gathered on each rank, T_all x D fp32 with T_all = ``COUNTED_TOKENS_PER_RANK`` x N. That
  term grows with N: at 64 ranks it is larger than the head's share.
- ``outer step, sharded, streamed`` (``sharded_tokens=streamed``): the same rows, but each rank holds
  only its own counted tokens and one broadcast block of another rank's at a time, 2 T_rank x D fp32,
  independent of N (the gathered [T_all] labels and coefficients, 8 bytes a token, are left out:
  1 MiB at 64 ranks).
Not modelled: activations (they depend on the token budget, sequence length and activation
checkpointing and are the same with or without the outer step), the temporary all-gather buffers of
FSDP2's layer-by-layer unsharding (one or two layers at a time), and allocator fragmentation.
:func:`parameter_count` is checked against ``transformers``' own count of the same configurations
(on the meta device) in tests/test_memory_model.py.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
GATHERED_VECTORS = 8  # W and its pre-step copy gathered, g, CG's x, r, p, the HVP output, the residual's
SHARDED_VECTORS = 6  # the same without the two gathered heads, each a 1/N row shard
COUNTED_TOKENS_PER_RANK = 1024  # counted (agent) tokens of one rank's share of the inner batch


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
    gathered = GATHERED_VECTORS * head * 4
    rows = SHARDED_VECTORS * head * 4 / ranks
    tokens = COUNTED_TOKENS_PER_RANK * ranks * shape.hidden * 4
    streamed = 2 * COUNTED_TOKENS_PER_RANK * shape.hidden * 4  # its own block and one received
    return {
        "model_state": state / GIB,
        "outer_gathered": gathered / GIB,
        "outer_sharded_rows": rows / GIB,
        "outer_sharded_tokens": tokens / GIB,
        "outer_sharded": (rows + tokens) / GIB,
        "total_gathered": (state + gathered) / GIB,
        "total_sharded": (state + rows + tokens) / GIB,
        "outer_streamed_tokens": streamed / GIB,
        "total_streamed": (state + rows + streamed) / GIB,
    }


def table(shapes=(LLAMA3_8B, LLAMA3_70B), ranks=(8, 64)) -> str:
    rows = ["| model | ranks | training | model state | outer step, gathered | outer step, sharded: rows + tokens | "
            "streamed tokens | peak gathered | peak sharded | peak streamed |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for shape in shapes:
        for n in ranks:
            for lora in (False, True):
                m = per_rank(shape, n, lora)
                rows.append(
                    f"| {shape.name} | {n} | {'LoRA r=16 + head' if lora else 'full'} | {m['model_state']:.1f} | "
                    f"{m['outer_gathered']:.1f} | {m['outer_sharded_rows']:.2f} + {m['outer_sharded_tokens']:.2f} | "
                    f"{m['outer_streamed_tokens']:.2f} | {m['total_gathered']:.1f} | {m['total_sharded']:.1f} | "
                    f"{m['total_streamed']:.1f} |"
                )
    return "\n".join(rows)


if __name__ == "__main__":
    print("Memory MODEL, GiB per rank, activations not included (benchmarks/memory_model.py; "
          f"{COUNTED_TOKENS_PER_RANK} counted tokens per rank)\n")  # fmt: skip
    print(table())
