"""The commands README.md and docs/*.md give run as written.

Every ``python -m X`` entry point named in their shell blocks answers ``--help``; README's kernel
example (its ``python`` block) runs; README's main command runs end to end with a shortened budget.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SHELL = ("bash", "sh", "shell")
ENTRY_POINT = re.compile(r"(?:^|[\s;&|(])python -m ([A-Za-z_][\w.]*)")


def blocks(path: Path, languages: tuple[str, ...]) -> list[str]:
    """The bodies of the fenced blocks of ``path`` in one of ``languages``."""
    return [body for lang, body in FENCE.findall(path.read_text(encoding="utf-8")) if lang in languages]


def entry_points() -> list[str]:
    """Every module run as ``python -m X`` in a shell block of README.md or docs/*.md."""
    found = {m for doc in DOCS for body in blocks(doc, SHELL) for m in ENTRY_POINT.findall(body)}
    return sorted(found)


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def _help(module: str) -> tuple[str, subprocess.CompletedProcess]:
    run = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120, env=_env()
    )
    return module, run


def test_the_docs_name_the_entry_points_people_run():
    names = entry_points()
    for module in ("boost.train", "boost.generate", "boost.experiment", "boost.rollout.evaluate", "pytest"):
        assert module in names, module


def test_every_python_m_entry_point_in_the_docs_answers_help():
    with ThreadPoolExecutor(max_workers=2) as pool:  # each one imports torch: two at a time
        results = list(pool.map(_help, entry_points()))
    failed = {m: (r.returncode, r.stderr[-500:]) for m, r in results if r.returncode != 0 or not r.stdout}
    assert not failed, failed


def test_the_readme_kernel_example_runs_as_written():
    (example,) = blocks(ROOT / "README.md", ("python",))
    run = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=120, env=_env()
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "tensor(" in run.stdout


def _main_command() -> list[str]:
    """README's main job: the one command of its block under "## The main job"."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## The main job", 1)[1]
    language, body = FENCE.search(section).groups()
    assert language in SHELL
    (command,) = [line for line in body.splitlines() if line.strip()]
    return command.split()


@pytest.mark.slow
def test_the_readme_main_command_runs_with_a_shortened_budget(tmp_path):
    command = _main_command()
    assert command == ["python", "-m", "boost.train"]  # no settings: the CPU preset, data generated
    # the same run (--preset cpu: what no settings run) with 2 steps and 2 test tasks, in a fresh folder
    short = ["--preset", "cpu", "--quiet", "steps=2", "eval.episodes=2", "log_every=1"]
    run = subprocess.run(
        [sys.executable, *command[1:], *short],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "held-out task success: " in run.stdout and "the random policy on the same tasks" in run.stdout
    assert (tmp_path / "runs" / "data" / "gridnav-compact.jsonl").stat().st_size > 0
    assert (tmp_path / "runs" / "cpu_preset" / "report.md").exists()
    assert (tmp_path / "runs" / "cpu_preset" / "model").is_dir()


def _commands(module: str) -> list[list[str]]:
    """The arguments after ``-m module`` of every such command in the shell blocks (comments dropped)."""
    out = []
    for doc in DOCS:
        for body in blocks(doc, SHELL):
            for line in body.replace("\\\n", " ").splitlines():
                words = line.split("#", 1)[0].split()
                if f"-m {module}" in " ".join(words):
                    out.append(words[words.index(module) + 1 :])
    return out


def test_the_trainer_settings_in_the_docs_are_valid_settings():
    from boost.config import load_config
    from boost.train.config import TrainConfig
    from boost.train.preset import preset_overrides

    commands = _commands("boost.train")
    assert len(commands) >= 5
    for args in commands:
        config = args[args.index("--config") + 1] if "--config" in args else None
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        preset = preset_overrides() if "--preset" in args else []
        load_config(TrainConfig, config and ROOT / config, [*preset, *overrides])  # raises on a bad setting


def test_the_generate_commands_in_the_docs_name_known_environments_and_sources():
    from boost.envs.registry import env_names
    from boost.generators import parse_sources

    commands = _commands("boost.generate")
    assert len(commands) >= 3
    for args in commands:
        assert args[args.index("--env") + 1] in env_names()
        parse_sources(args[args.index("--sources") + 1])  # raises on an unknown source
