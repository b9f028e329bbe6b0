"""A BOOST training step vs a uniform one on the CPU preset, side by side.

    python -m pytest benchmarks/bench_step.py -p no:cacheprovider --benchmark-columns=mean,stddev,min,max,rounds

The CPU preset (configs/cpu_preset.yaml: 4-layer width-128 Llama, word-level tokenizer, 8 rows x 768
tokens of source-mixed gridnav-compact trajectories; 1 torch thread). A *uniform* step is one inner
step with weight 1; a *BOOST* step is the inner step with the reweighting head plus an outer step
after it (head block, CG with 5 steps: a trunk forward on a validation batch and fused head passes on
the counted tokens). ``boost`` takes the default validation batch (``data.validation_token_budget=0``:
a quarter of the training budget, 2 rows x 768); ``boost-val6144`` a validation batch as large as the
training batch (the cost before issue 10's setting). All train on the same fixed batch; 15 rounds
after 3 warm-up rounds. Target: BOOST <= 1.25 x uniform.
"""

from __future__ import annotations

import pytest
import torch

from boost.config import load_config
from boost.generate import main as generate
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


def trainer_for(data, out, method, *overrides):
    threads = torch.get_num_threads()
    cfg = load_config(TrainConfig, "configs/cpu_preset.yaml",
                      [f"data.path={data}", f"out_dir={out}", f"weighting.method={method}", "eval.episodes=0",
                       *overrides])  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    return trainer, threads


ARMS = {
    "uniform": ("uniform",),
    "boost": ("boost",),
    "boost-val6144": ("boost", "data.validation_token_budget=6144"),
}


@pytest.mark.parametrize("arm", list(ARMS))
def test_step(benchmark, data, tmp_path, arm):
    method, *overrides = ARMS[arm]
    trainer, threads = trainer_for(data, tmp_path, method, *overrides)
    try:
        batch = next(_cycle(trainer.data.train))
        val = next(_cycle(trainer.data.validation))

        def step():
            _, state = trainer.inner_step(batch)
            if method == "boost":
                trainer.outer_step(batch, state, val)

        benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=3)
        benchmark.extra_info.update(
            tokens=batch.num_tokens, trajectories=batch.num_segments, validation_tokens=val.num_tokens
        )
    finally:
        torch.set_num_threads(threads)
