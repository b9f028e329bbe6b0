"""Share of gradient tiles a Cut-Cross-Entropy-style filter would skip, on real hidden states.

The filter (CCE's ``filter_eps``) skips a (token block, vocabulary block) tile of the backward when
every |p - e_y| in it is below eps = finfo(dtype).eps / 32 (2^-12 for bf16). Whether that pays
depends on how peaked real next-token distributions are, so this measures it on SmolLM2-135M-Instruct
(the packaged GGUF) run over real English text (this repository's README.md and DEVELOPERS.md), for
the tile shapes of our kernels, in natural vocabulary order and with CCE's reordering of the
vocabulary by mean logit. boost's gradient kernels filter on request (``grad_filter=True``, off by
default; natural vocabulary order, no reordering): this measures what that can skip.

    python benchmarks/grad_filter_share.py [--max-tokens 4096]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ("README.md", "DEVELOPERS.md")
TILES = ((64, 128), (128, 128))


def model_logits(max_tokens: int):
    """(logits [T, V] float32 = the model's own LM head on its final hidden states, next-token labels [T])."""
    from boost.rollout.generation import load_model

    model, tokenizer = load_model("smollm2")
    text = "\n\n".join((ROOT / name).read_text() for name in TEXTS)
    ids = tokenizer(text, return_tensors="pt").input_ids[0][: max_tokens + 1]
    logits = []
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, 1024):  # windows the model's context holds
            window = ids[start : start + 1025]
            logits.append(model(window[None, :-1]).logits[0].float())
    return torch.cat(logits), ids[1:]


def skipped_share(logits, labels, eps: float, block_t: int, block_v: int, order=None) -> float:
    """Fraction of [block_t, block_v] tiles whose every |p - e_y| is below eps."""
    V = logits.shape[1]
    y = labels if order is None else torch.argsort(order)[labels]  # label ids in the new order
    skipped = total = 0
    for t0 in range(0, logits.shape[0] - block_t + 1, block_t):  # whole token blocks only
        z = logits[t0 : t0 + block_t]
        p = torch.softmax(z if order is None else z[:, order], dim=1)
        p[torch.arange(block_t), y[t0 : t0 + block_t]] -= 1.0
        big = p.abs().amax(dim=0)  # [V]: max over the block's tokens
        pad = (-V) % block_v
        per_tile = torch.cat([big, big.new_zeros(pad)]).view(-1, block_v).amax(dim=1)
        skipped += int((per_tile < eps).sum())
        total += per_tile.numel()
    return skipped / total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=4096)
    args = parser.parse_args(argv)
    logits, labels = model_logits(args.max_tokens)
    eps = torch.finfo(torch.bfloat16).eps / 32
    by_mean_logit = torch.argsort(logits.mean(0), descending=True)
    print(
        f"SmolLM2-135M-Instruct, {logits.shape[0]} tokens of {', '.join(TEXTS)}, V={logits.shape[1]}, eps={eps:g}"
    )
    print("| tile (tokens x vocab) | vocabulary order | tiles skipped |")
    print("|---|---|---|")
    for bt, bv in TILES:
        for name, order in (("natural", None), ("by mean logit (CCE)", by_mean_logit)):
            share = skipped_share(logits, labels, eps, bt, bv, order)
            print(f"| {bt}x{bv} | {name} | {100 * share:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
