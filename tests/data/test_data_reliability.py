"""Data defects that lost or mislabelled records (issue 13): JSON arrays, oversized records, source
spellings, tool calls, empty files, truncation flags, and the result files' permissions and errors."""

from __future__ import annotations

import json
import os
import stat

import pytest

from boost.atomic import replace_atomic, write_text_atomic
from boost.config import load_config
from boost.data import (
    PackingConfig,
    TokenizeConfig,
    Trajectory,
    TrajectoryFormatError,
    TrajectoryPacker,
    TrajectoryReadError,
    read_trajectories,
    tokenize_trajectories,
)
from boost.data.tokenize import TurnTokenizer
from boost.train import TrainConfig

USER = {"role": "user", "content": "you are in a dark room"}
ASSISTANT = {"role": "assistant", "content": "go north"}


def record(**changes):
    return {"messages": [USER, ASSISTANT], "source": "real", "task_id": "t", **changes}


def steps(n=2):
    return [{"state": f"room {k}", "action": "go north", "reward": 0.5, "done": k == n - 1} for k in range(n)]


def test_one_bad_element_of_a_json_array_costs_one_record(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([record(task_id="a"), record(messages=[]), record(task_id="b"), "oops"]))
    read, report = read_trajectories(path)
    assert [t.task_id for t in read] == ["a", "b"]
    assert report.records == 4 and dict(report.skipped) == {"bad_messages": 1, "not_an_object": 1}
    assert f"{path} record 1" in report.examples[0]


def test_json_arrays_of_lmrl_records_and_a_bare_step_list_load(tmp_path):
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"steps": steps(), "source": "gen", "task_id": "x"}, record()]))
    read, report = read_trajectories(records)
    assert [t.source for t in read] == ["gen", "real"] and report.clean
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(steps(3)))
    read, report = read_trajectories(bare, default_source="real")
    assert len(read) == 1 and read[0].reward == 1.5 and len(read[0].messages) == 6


def test_the_training_config_can_give_bare_step_lists_a_source(tmp_path):
    cfg = load_config(TrainConfig, None, ["data.default_source=real", "data.format=json", "data.strict=true"])
    assert (cfg.data.default_source, cfg.data.format, cfg.data.strict) == ("real", "json", True)
    with pytest.raises(ValueError, match="data.format must be"):
        load_config(TrainConfig, None, ["data.format=csv"])


def test_source_spellings_of_real_are_normalised_and_counted(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [record(source="Real"), record(source="real "), record(source=" eps0.3 "), record()]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    read, report = read_trajectories(path)
    assert [t.source for t in read] == ["real", "real", "eps0.3", "real"]
    assert dict(report.normalized_source) == {"Real": 1, "real ": 1, " eps0.3 ": 1}
    assert "source 'Real' read as 'real' in 1 records" in report.summary()
    with pytest.raises(TrajectoryFormatError, match="differs from 'real' only in case"):
        Trajectory(messages=[ASSISTANT], source="Real")


def test_tool_calls_are_refused_and_other_message_keys_reported(tmp_path):
    path = tmp_path / "data.jsonl"
    call = {"role": "assistant", "content": "calling", "tool_calls": [{"function": {"name": "go"}}]}
    named = {"role": "user", "content": "hi", "name": "alice"}
    path.write_text(
        json.dumps(record(messages=[USER, call]))
        + "\n"
        + json.dumps(record(messages=[named, ASSISTANT]))
        + "\n"
    )
    read, report = read_trajectories(path)
    assert len(read) == 1 and dict(report.skipped) == {"unsupported_message_key": 1}
    assert f"{path}:1: unsupported_message_key" in report.examples[0]
    assert dict(report.message_keys) == {"name": 1} and "1 messages carry 'name'" in report.summary()


def test_an_empty_file_fails_strict_and_says_it_is_empty(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(TrajectoryReadError, match="empty_file"):
        read_trajectories(path, strict=True)
    read, report = read_trajectories(path)
    assert read == [] and "the file holds no record" in report.summary()


def _counting(monkeypatch):
    seen = {"encoded": 0, "rendered": 0}
    encode, render = TurnTokenizer._encode, TurnTokenizer.render

    def counting_encode(self, texts, as_text=False):
        seen["encoded"] = max([seen["encoded"], *map(len, texts)])
        return encode(self, texts, as_text)

    def counting_render(self, messages, generation_prompt=False):
        seen["rendered"] = max([seen["rendered"], *(len(m["content"]) for m in messages)])
        return render(self, messages, generation_prompt)

    monkeypatch.setattr(TurnTokenizer, "_encode", counting_encode)
    monkeypatch.setattr(TurnTokenizer, "render", counting_render)
    return seen


def test_oversized_records_are_cut_before_tokenising_and_named(tmp_path, bpe_tokenizer, monkeypatch):
    huge = "go north " * 150_000  # 1.35 MB of text, ~300k tokens
    path = tmp_path / "data.jsonl"
    rows = [
        record(messages=[USER, ASSISTANT, {"role": "user", "content": huge}, ASSISTANT]),  # truncated
        record(messages=[{"role": "user", "content": huge}, ASSISTANT]),  # nothing fits: dropped
        record(),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trajectories, _ = read_trajectories(path)
    seen = _counting(monkeypatch)
    items, report = tokenize_trajectories(trajectories, bpe_tokenizer, TokenizeConfig(max_length=256))
    assert seen["encoded"] < 10_000 and seen["rendered"] < 10_000  # the huge text never went through BPE
    assert [t.index for t in items] == [0, 2] and items[0].truncated and items[0].num_messages == 2
    assert dict(report.dropped) == {"first_assistant_turn_too_long": 1}
    assert report.dropped_examples == [
        f"{path}:2 (source 'real'): first_assistant_turn_too_long: the text up to the first assistant turn "
        "alone exceeds max_length=256 tokens (not tokenised)"
    ]
    assert f"{path}:2" in report.summary() and "truncated per source: real 1" in report.summary()
    # the same records tokenised in full give the same ids: the bound never cuts what would fit
    small = [t for t in trajectories if len(json.dumps(t.messages)) < 1000]
    again, _ = tokenize_trajectories(small, bpe_tokenizer, TokenizeConfig(max_length=256))
    assert [a.input_ids.tolist() for a in again] == [items[1].input_ids.tolist()]


def test_the_length_bound_is_a_lower_bound(bpe_tokenizer):
    turns = TurnTokenizer(bpe_tokenizer)
    for text in ["go north", "the answer is forty two " * 50, "ünïcödé ✓ " * 30, "x" * 500]:
        assert turns.min_tokens(text) <= len(bpe_tokenizer(text, add_special_tokens=False)["input_ids"])


def test_truncated_trajectories_are_marked_in_the_batch(bpe_tokenizer):
    long = [USER, ASSISTANT, {"role": "user", "content": "look " * 400}, ASSISTANT]
    data = [
        Trajectory(messages=long, source="eps0.3", reward=1.0),
        Trajectory(messages=[USER, ASSISTANT], reward=0.0),
    ]
    items, report = tokenize_trajectories(data, bpe_tokenizer, TokenizeConfig(max_length=128))
    batch = TrajectoryPacker(items, PackingConfig(token_budget=256)).collate([0, 1])
    assert batch.truncated.tolist() == [True, False] and batch.rewards.tolist() == [1.0, 0.0]
    assert dict(report.truncated_by_source) == {"eps0.3": 1}


def test_result_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o644


def test_a_full_disk_names_the_file(tmp_path):
    from boost.atomic import AtomicWriteError

    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous")

    def full(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1024 vs 960")

    with pytest.raises(
        AtomicWriteError, match=rf"could not write {target}: RuntimeError: .*unexpected pos.*MiB free"
    ):
        replace_atomic(target, full)
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_stale_temporaries_of_run_files_are_removed_and_nothing_else(tmp_path):
    from boost.atomic import remove_stale_temporaries

    stale = tmp_path / ".checkpoint.pt.abc123.tmp.pt"
    stale.write_bytes(b"x" * 10)
    other = tmp_path / ".other.abc.tmp.pt"
    other.write_bytes(b"y")
    assert remove_stale_temporaries(tmp_path, ["checkpoint.pt", "final.json"]) == [str(stale)]
    assert not stale.exists() and other.exists()


@pytest.mark.parametrize("word", ["no", "off", "yes", "On"])
def test_yaml_11_boolean_words_are_refused_for_booleans(word):
    with pytest.raises(
        ValueError, match=rf"data.strict: expected true or false, got '{word}' \(yes/no/on/off"
    ):
        load_config(TrainConfig, None, [f"data.strict={word}"])
    assert load_config(TrainConfig, None, [f"model.name={word}"]).model.name == word
