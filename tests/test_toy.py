"""The toy end to end: its sources are what the docs say (corrupt labels the loss cannot flag, a
shifted source), BOOST trained by look-ahead hypergradients downweights the plausible-wrong
trajectories of unseen batches and beats uniform weighting, the arms keep their contracts (frozen
mass, matched oracle), and the CLIs write their reports."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from boost import toy, toy_study
from tests.kernels.cases import fresh_seed

# Fixed seeds for the two statistical claims (seeds 0 and 1, not chosen by outcome): a fresh random
# seed each run made CI fail by chance. Measured (2026-12-07): the downweighting claim holds for seeds
# 0-9 (mean clean/corrupt weight over the last 20 rounds 0.83-1.44 vs 0.00-0.09) and fails on seed
# 293124776 (0.398 vs 0.334; BOOST still beat uniform there), the seed one run drew. The contracts
# below hold for any seed and keep a fresh one.
LOSS_SEED, BOOST_SEED = 0, 1


@pytest.fixture(autouse=True)
def one_thread():
    """The toy's tensors are tiny: one thread is ~4x faster than two on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_loss_of_a_trained_student_separates_corrupt_trajectories_poorly():
    """What a loss filter sees: after uniform training, the chance that a corrupt trajectory has a
    higher loss than a clean one (the AUC of a loss threshold) is far from 1 (measured over 8 seeds:
    0.56 to 0.76)."""
    seed = LOSS_SEED
    cfg = toy.ToyConfig(seed=seed)
    task = toy.ToyTask(cfg, torch.Generator().manual_seed(seed))
    weight = torch.nn.Parameter(torch.zeros(cfg.vocab, cfg.dim))
    opt = torch.optim.SGD([weight], lr=1.0)
    for _ in range(cfg.rounds):
        batch, _ = task.batch(cfg.per_batch)
        opt.zero_grad()
        toy._loss(batch, weight).loss.backward()
        opt.step()
    losses = {}
    for name in ("clean", "corrupt", "shifted"):
        batch, _ = task.batch(tuple(200 if s == name else 0 for s in toy.SOURCES))
        losses[name] = toy._loss(batch, weight.detach()).per_trajectory
    auc = float((losses["corrupt"][:, None] > losses["clean"][None, :]).float().mean())
    assert 0.4 < auc < 0.85, f"AUC {auc:.3f}: seed={seed}"


def test_boost_downweights_plausible_wrong_trajectories_of_unseen_batches_and_beats_uniform():
    seed = BOOST_SEED
    cfg = toy.ToyConfig(seed=seed)
    boost, uniform = toy.run_arm(cfg, "boost"), toy.run_arm(cfg, "uniform")
    # each round's weights are the head's output on that round's fresh batch, before its outer step
    first, tail = boost["history"][0], boost["history"][-20:]
    assert first["weight_clean"] == first["weight_corrupt"] == pytest.approx(1.0)
    clean = sum(h["weight_clean"] for h in tail) / len(tail)
    corrupt = sum(h["weight_corrupt"] for h in tail) / len(tail)
    assert clean > 2.0 * corrupt, f"clean {clean:.3f} corrupt {corrupt:.3f}: seed={seed}"
    assert boost["test_loss"] < uniform["test_loss"], f"seed={seed}"


def test_the_arms_keep_their_contracts():
    cfg = toy.ToyConfig(seed=fresh_seed(), rounds=6)
    frozen = toy.run_arm(cfg, "boost_frozen")
    assert all(h["mass"] == 1.0 for h in frozen["history"])
    with pytest.raises(ValueError, match="oracle_matched needs mass_schedule"):
        toy.run_arm(cfg, "oracle_matched")
    matched = toy.run_arm(cfg, "oracle_matched", mass_schedule=[3.0] * 6)
    assert all(
        h["synthetic_total"] == pytest.approx(3.0) and h["weight_corrupt"] == 0 for h in matched["history"]
    )
    real_only = toy.run_arm(cfg, "real_only")
    assert all(h["synthetic_total"] == 0 for h in real_only["history"])
    with pytest.raises(ValueError, match="arm must be one of"):
        toy.run_arm(cfg, "judge")


def test_cli_writes_the_report_history_and_plot(tmp_path):
    assert toy.main(["--out", str(tmp_path), "--rounds", "3", "--arms", "boost", "uniform"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| boost |" in report and "| uniform |" in report and "weights.png" in report
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["arm"] for r in history["results"]] == ["boost", "uniform"]
    assert len(history["results"][0]["history"]) == 3
    assert (tmp_path / "weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_the_study_tunes_on_the_tuning_split_and_writes_table_and_plot(tmp_path, monkeypatch):
    runs = []
    real_run_arm = toy_study.run_arm

    def spy(cfg, arm, lr=None, mass_schedule=None):
        runs.append((arm, lr))
        return real_run_arm(cfg, arm, lr, mass_schedule)

    monkeypatch.setattr(toy_study, "run_arm", spy)
    argv = ["--out", str(tmp_path), "--seeds", "2", "--rounds", "3", "--lrs", "0.5", "1",
            "--conc", "0", "0.01", "--shift", "0"]  # fmt: skip
    assert toy_study.main(argv) == 0
    study = json.loads((tmp_path / "results.json").read_text())
    assert set(study["arms"]) == {*toy.ARMS, "boost_cg"}
    for entry in study["arms"].values():  # each arm's lr is the one with the lowest mean tuning loss
        assert entry["lr"] in (0.5, 1.0) and len(entry["runs"]) == 2
    assert len(study["sweep"]) == 2 and ("boost", 0.5) in runs and ("uniform", 1.0) in runs
    table = (tmp_path / "table.md").read_text()
    assert "| boost |" in table and "±" in table and "seeds" in table
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_a_bad_study_argument_is_refused():
    with pytest.raises(SystemExit):
        toy_study.main(["--seeds", "1"])
    cfg = replace(toy.ToyConfig(), rounds=2)
    assert toy.run_arm(cfg, "uniform", lr=0.1)["lr"] == 0.1
