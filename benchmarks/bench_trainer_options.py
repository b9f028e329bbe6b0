"""Step time of full fine-tuning vs LoRA (both hypergradient blocks) and checkpoint size / save time,
on the tiny chat model of the trainer tests (CPU, float32).

    python -m pytest benchmarks/bench_trainer_options.py -s -p no:cacheprovider --benchmark-columns=mean,stddev,rounds

One timed round: an inner step and its outer step (CG, 5 HVPs for ``block=head``; the AdamW response,
``identity``, for ``block=trainable``) on one packed batch of gridnav trajectories
(``data.token_budget=1024``). The checkpoint rows time ``Trainer.save_checkpoint`` after one inner
step (a new folder each round) and print the folder's size.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.kill_resume import make_assets
from boost.config import load_config
from boost.train import TrainConfig, Trainer
from boost.train.loop import _cycle

RUNS = {
    "full, block=head": (),
    "lora r=16 + head, block=head": ("lora.enabled=true", "lora.train_head=true"),
    "full, block=trainable": ("block=trainable", "solver.method=identity"),
    "lora r=16, block=trainable": ("lora.enabled=true", "block=trainable", "solver.method=identity"),
}
SIZES: dict[str, str] = {}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("bench_trainer_options"))


def _trainer(assets, out: Path, overrides) -> Trainer:
    model, data = assets
    base = [f"data.path={data}", f"model.name={model}", f"out_dir={out}", "data.token_budget=1024",
            "data.max_length=512", "keep_checkpoints=1000"]  # fmt: skip
    return Trainer(load_config(TrainConfig, None, [*base, *overrides]), progress=False)


@pytest.mark.parametrize("name", list(RUNS))
def test_inner_and_outer_step(benchmark, assets, tmp_path, name):
    trainer = _trainer(assets, tmp_path, RUNS[name])
    batches, val_batches = _cycle(trainer.data.train), _cycle(trainer.data.validation)

    def step():
        batch, val = next(batches), next(val_batches)
        record, state = trainer.inner_step(batch)
        trainer.step += 1
        trainer.outer_step(batch, state, val)

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("name", ["full, block=head", "lora r=16 + head, block=head"])
def test_checkpoint_save(benchmark, assets, tmp_path, name):
    trainer = _trainer(assets, tmp_path, RUNS[name])
    trainer.inner_step(next(_cycle(trainer.data.train)))  # AdamW's moments exist after a step

    def save():
        trainer.step += 1
        return trainer.save_checkpoint()

    folder = benchmark.pedantic(save, rounds=10, warmup_rounds=1)
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    SIZES[name] = f"{sum(files.values()) / 2**20:.2f} MiB: " + ", ".join(
        f"{k} {v / 2**10:.0f} KiB" for k, v in sorted(files.items())
    )
    print(f"\ncheckpoint folder, {name}: {SIZES[name]}")
