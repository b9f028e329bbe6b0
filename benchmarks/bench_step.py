"""A BOOST training step vs a uniform one on the CPU preset, side by side.

    python -m pytest benchmarks/bench_step.py -s --benchmark-columns=mean,stddev,min,rounds

The CPU preset (configs/cpu_preset.yaml: 4-layer width-128 Llama, word-level tokenizer, 8 rows x 512
tokens of source-mixed gridnav-compact trajectories; 1 torch thread). A *uniform* step is one inner
step with weight 1; a *BOOST* step is the inner step with the reweighting head plus an outer step
after it (head block, CG with 5 steps: a trunk forward on a validation batch and fused head passes).
Both train on the same fixed batch; 15 rounds after 3 warm-up rounds. Target: BOOST <= 1.25 x uniform.
"""

from __future__ import annotations

import pytest
import torch

from boost.config import load_config
from boost.data.generate import main as generate
from boost.train import TrainConfig, Trainer
from boost.train.loop import _cycle


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("step") / "gridnav.jsonl"
    sources = "real:200,eps0.1:100,eps0.3:100,random:100,corrupt:100,expert_shifted:100"
    assert (
        generate(["--env", "gridnav-compact", "--out", str(path), "--sources", sources, "--no-progress"]) == 0
    )
    return path


def trainer_for(data, out, method):
    threads = torch.get_num_threads()
    cfg = load_config(TrainConfig, "configs/cpu_preset.yaml",
                      [f"data.path={data}", f"out_dir={out}", f"weighting.method={method}", "eval.episodes=0"])  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    return trainer, threads


@pytest.mark.parametrize("method", ["uniform", "boost"])
def test_step(benchmark, data, tmp_path, method):
    trainer, threads = trainer_for(data, tmp_path, method)
    try:
        batch = next(_cycle(trainer.data.train))
        val = next(_cycle(trainer.data.validation))

        def step():
            _, state = trainer.inner_step(batch)
            if method == "boost":
                trainer.outer_step(batch, state, val)

        benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=3)
        benchmark.extra_info.update(tokens=batch.num_tokens, trajectories=batch.num_segments)
    finally:
        torch.set_num_threads(threads)
