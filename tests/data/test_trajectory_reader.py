"""Reading trajectory files: every bad record is named by file, line and reason, and counted."""

from __future__ import annotations

import json
import logging
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boost.data import (
    REASONS,
    Trajectory,
    TrajectoryFormatError,
    TrajectoryReadError,
    read_records,
    read_trajectories,
    write_jsonl,
)
from boost.data.format import normalize_source

GOOD = {
    "messages": [
        {"role": "system", "content": "You play a text game."},
        {"role": "user", "content": "You are in a room."},
        {"role": "assistant", "content": "go north"},
    ],
    "source": "real",
    "reward": 1.0,
    "task_id": "room-1",
    "meta": {"success": True},
}


def line(**changes) -> str:
    record = {**GOOD, **changes}
    return json.dumps({k: v for k, v in record.items() if v is not ...})


def with_messages(*messages) -> str:
    return line(messages=list(messages))


USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}

# (raw line, expected reason tag)
BAD_LINES = [
    ('{"messages": [', "malformed_json"),
    ("[1, 2", "malformed_json"),
    ('"just a string"', "not_an_object"),
    (line(messages=...), "missing_messages"),
    (line(messages=[]), "bad_messages"),
    (line(messages="hello"), "bad_messages"),
    (with_messages({"content": "hi"}, ASSISTANT), "missing_role"),
    (with_messages({"role": "narrator", "content": "hi"}, ASSISTANT), "unknown_role"),
    (with_messages({"role": "user", "content": ""}, ASSISTANT), "empty_content"),
    (with_messages({"role": "user", "content": "  \n"}, ASSISTANT), "empty_content"),
    (with_messages({"role": "user", "content": 3}, ASSISTANT), "bad_content"),
    (with_messages({"role": "user", "content": None}, ASSISTANT), "bad_content"),
    (with_messages({"role": "user", "content": ["a"]}, ASSISTANT), "bad_content"),
    (with_messages(USER), "no_assistant_turn"),
    (line(reward="high"), "bad_reward"),
    (line(reward=True), "bad_reward"),
    (line(reward=...)[:-1] + ', "reward": NaN}', "bad_reward"),
    (line(reward=...)[:-1] + ', "reward": Infinity}', "bad_reward"),
    (line(reward=...)[:-1] + ', "reward": -Infinity}', "bad_reward"),
    (line(reward=...)[:-1] + ', "reward": 1e400}', "bad_reward"),
    (line(reward=10**400), "bad_reward"),
    (line(reward=1.0, **{"return": 2.0}), "bad_reward"),
    (line(source=""), "bad_source"),
    (line(source=7), "bad_source"),
    (line(task_id=[1]), "bad_task_id"),
    (line(meta=[1]), "bad_meta"),
    (
        r'{"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "x"}], '
        r'"source": "real"}',
        "invalid_unicode",
    ),
]


def write_lines(tmp_path, lines: list[str | bytes], name: str = "data.jsonl"):
    path = tmp_path / name
    with open(path, "wb") as f:
        for raw in lines:
            f.write((raw.encode("utf-8") if isinstance(raw, str) else raw) + b"\n")
    return path


def test_good_file_round_trips(tmp_path):
    trajectories = [Trajectory.from_dict(json.loads(line(task_id=f"t{i}"))) for i in range(5)]
    path = tmp_path / "out.jsonl"
    assert write_jsonl(path, trajectories) == 5
    read, report = read_trajectories(path)
    assert [t.to_dict() for t in read] == [t.to_dict() for t in trajectories]
    assert (report.records, report.read, report.num_skipped, report.clean) == (5, 5, 0, True)


@pytest.mark.parametrize(("raw", "reason"), BAD_LINES)
def test_each_bad_line_names_file_line_reason_and_fix(tmp_path, raw, reason):
    path = write_lines(tmp_path, [line(), raw, line()])
    with pytest.raises(TrajectoryReadError) as info:
        read_trajectories(path, strict=True)
    err = info.value
    assert err.reason == reason, str(err)
    assert err.where == f"{path}:2"
    message = str(err)
    assert message.startswith(f"{path}:2: {reason}: ")
    assert f"(fix: {REASONS[reason]})" in message

    read, report = read_trajectories(path)  # lenient: skipped, counted, the rest kept
    assert len(read) == 2 and report.read == 2 and report.records == 3
    assert dict(report.skipped) == {reason: 1}
    assert report.examples == [message]


def test_invalid_utf8_is_reported_with_the_byte(tmp_path):
    path = write_lines(tmp_path, [line(), b'{"messages": "caf\xe9"}'])
    with pytest.raises(TrajectoryReadError, match=r":2: invalid_utf8: invalid UTF-8 byte 0xe9 at byte 17"):
        read_trajectories(path, strict=True)
    read, report = read_trajectories(path)
    assert len(read) == 1 and report.skipped == {"invalid_utf8": 1}


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        ('{"messages": "unterminated', "Unterminated string starting at column 14"),
        ('{"messages" 1}', "Expecting ':' delimiter at column 13"),
    ],
)
def test_malformed_json_says_the_column_once(tmp_path, raw, detail):
    path = tmp_path / "data.jsonl"
    path.write_text(raw, encoding="utf-8")  # the last line, cut short: no newline ends the string
    with pytest.raises(TrajectoryReadError) as info:
        read_trajectories(path, strict=True)
    assert info.value.detail == detail and " at at " not in str(info.value)


def test_strict_stops_at_the_first_bad_line(tmp_path):
    path = write_lines(tmp_path, [line(), with_messages(USER), "{", line()])
    with pytest.raises(TrajectoryReadError, match=r"data\.jsonl:2: no_assistant_turn"):
        read_trajectories(path, strict=True)


def test_counts_are_printed_and_sum_up(tmp_path, caplog):
    lines = [line(), "{", "", with_messages(USER), line(), "   ", with_messages(USER), "[]"]
    path = write_lines(tmp_path, lines)
    with caplog.at_level(logging.WARNING, logger="boost.data.reader"):
        read, report = read_trajectories(path)
    assert len(read) == 2
    assert report.blank_lines == 2 and report.records == 6
    assert dict(report.skipped) == {"malformed_json": 1, "no_assistant_turn": 2, "missing_source": 1}
    assert report.read + report.num_skipped == report.records
    printed = caplog.text
    assert f"{path}: read 2 of 6 records, skipped 4 (2 blank lines ignored)" in printed
    assert "skipped 2 x no_assistant_turn" in printed and "skipped 1 x malformed_json" in printed


def test_missing_source_is_an_error_unless_a_default_is_given(tmp_path):
    path = write_lines(tmp_path, [line(source=...), line(source=None)])
    with pytest.raises(TrajectoryReadError, match=r":1: missing_source"):
        read_trajectories(path, strict=True)
    read, report = read_trajectories(path, default_source="real")
    assert [t.source for t in read] == ["real", "real"] and report.defaulted_source == 2


def test_unknown_top_level_fields_are_counted_not_silently_dropped(tmp_path):
    path = write_lines(tmp_path, [line(rewards=[1.0]), line(rewards=[2.0], extra=1), line()])
    read, report = read_trajectories(path)
    assert len(read) == 3
    assert dict(report.unknown_fields) == {"rewards": 2, "extra": 1}
    assert "ignored unknown field 'rewards' in 2 records" in report.summary()


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + line().encode() + b"\r\n" + line().encode() + b"\r\n")
    read, report = read_trajectories(path, strict=True)
    assert len(read) == 2 and report.clean


def test_reward_alias_and_nulls(tmp_path):
    path = write_lines(
        tmp_path, [line(reward=..., **{"return": 3}), line(reward=None), line(reward=2, **{"return": 2.0})]
    )
    read, _ = read_trajectories(path, strict=True)
    assert [t.reward for t in read] == [3.0, None, 2.0]


# -- LMRL-Gym steps ---------------------------------------------------------------------------------

STEPS = [
    {"state": "You see a door.", "action": "open door", "reward": 0.0, "done": False},
    {"state": "", "action": "go north", "reward": 0.5, "done": False},
    {"state": "You found the key.", "action": "take key", "reward": 1, "done": True},
]


def test_lmrl_steps_become_a_conversation(tmp_path):
    obj = {"steps": STEPS, "source": "lmrl", "task_id": 4, "system": "Play.", "meta": {"seed": 1}}
    path = write_lines(tmp_path, [json.dumps(STEPS), json.dumps(obj)])
    read, report = read_trajectories(path, strict=True, default_source="real")
    bare, full = read
    assert [m["role"] for m in bare.messages] == ["user", "assistant", "assistant", "user", "assistant"]
    assert [m["content"] for m in bare.messages][1:3] == ["open door", "go north"]
    assert bare.reward == 1.5 and bare.source == "real" and report.defaulted_source == 1
    assert bare.meta["lmrl"] == {"step_rewards": [0.0, 0.5, 1.0], "done": True}
    assert full.messages[0] == {"role": "system", "content": "Play."}
    assert (full.source, full.task_id, full.meta["seed"]) == ("lmrl", "4", 1)


@pytest.mark.parametrize(
    ("steps", "reason", "detail"),
    [
        (
            [{**STEPS[0], "done": True}, STEPS[2]],
            "bad_lmrl_step",
            "steps[0].done is true but steps follow it",
        ),
        ([{**STEPS[0], "reward": float("nan")}], "bad_reward", "steps[0].reward must be finite"),
        ([{**STEPS[0], "reward": "1"}], "bad_reward", "steps[0].reward must be a number"),
        ([{"state": "x", "action": "y"}], "bad_lmrl_step", "steps[0] lacks reward, done"),
        ([{**STEPS[0], "done": 1}], "bad_lmrl_step", "steps[0].done is int"),
        ([{**STEPS[0], "action": ""}], "empty_content", "has empty content"),
        ([{**STEPS[0], "state": 5}], "bad_content", "steps[0].state is int"),
        ([3], "bad_lmrl_step", "steps[0] is int"),
        ([], "bad_lmrl_step", "non-empty list"),
    ],
)
def test_bad_lmrl_steps(tmp_path, steps, reason, detail):
    path = write_lines(tmp_path, [json.dumps({"steps": steps, "source": "x"})])
    with pytest.raises(TrajectoryReadError) as info:
        read_trajectories(path, strict=True)
    assert info.value.reason == reason and detail in str(info.value) and ":1:" in str(info.value)


def test_lmrl_top_level_reward_is_ambiguous(tmp_path):
    path = write_lines(tmp_path, [json.dumps({"steps": STEPS, "source": "x", "reward": 1.0})])
    with pytest.raises(TrajectoryReadError, match="bad_reward"):
        read_trajectories(path, strict=True)


# -- HF datasets JSON / Parquet ---------------------------------------------------------------------


def hf_records() -> list[dict]:
    first = json.loads(line(task_id="a"))
    second = json.loads(line(task_id="b", reward=None))
    second["messages"][1]["name"] = "env"  # a key the other records lack: columnar files fill nulls
    return [first, second]


def test_hf_datasets_parquet_and_json(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets (a dev dependency) writes the HF files")
    dataset = datasets.Dataset.from_list(hf_records())
    expected = [Trajectory.from_dict(r).to_dict() for r in hf_records()]
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    dataset.to_json(str(tmp_path / "lines.json"))  # JSON Lines, datasets' default
    dataset.to_json(str(tmp_path / "array.json"), lines=False)
    for name in ("d.parquet", "lines.json", "array.json"):
        read, report = read_trajectories(tmp_path / name, strict=True)
        assert [t.to_dict() for t in read] == expected, name
        assert report.read == 2 and report.skipped == {}
    read, _ = read_records(dataset, origin="in-memory", strict=True)
    assert [t.to_dict() for t in read] == expected
    assert "name" not in read[0].messages[1] and read[1].messages[1]["name"] == "env"


def test_parquet_errors_name_the_row(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets (a dev dependency) writes the HF files")
    rows = hf_records()
    rows[1]["messages"] = [{"role": "user", "content": "no reply"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(TrajectoryReadError, match=r"bad\.parquet row 1: no_assistant_turn"):
        read_trajectories(tmp_path / "bad.parquet", strict=True)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(TrajectoryReadError, match="malformed_parquet"):
        read_trajectories(tmp_path / "junk.parquet")


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_trajectories(tmp_path / "data.txt")
    with pytest.raises(FileNotFoundError, match="no such trajectory file"):
        read_trajectories(tmp_path / "absent.jsonl")


# -- fuzzing ------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant", "tool", "narrator", None, 1])
messages = st.lists(
    st.fixed_dictionaries({"role": roles, "content": st.text(max_size=6) | json_values}), max_size=4
)
record_like = st.fixed_dictionaries(
    {"messages": messages},
    optional={"source": st.text(max_size=4) | json_values, "reward": json_values, "task_id": json_values},
)
step = st.fixed_dictionaries(
    {
        "state": st.text(max_size=4),
        "action": st.text(max_size=4),
        "reward": st.floats(),
        "done": st.booleans(),
    }
)
fuzz_lines = st.lists(
    st.binary(max_size=40)
    | json_values.map(lambda v: json.dumps(v).encode())
    | record_like.map(lambda v: json.dumps(v).encode())
    | st.lists(step, max_size=3).map(lambda v: json.dumps(v).encode()),
    max_size=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=fuzz_lines)
def test_fuzz_reader_never_crashes_and_accounts_for_every_line(tmp_path, lines):
    clean = [raw.replace(b"\n", b" ").replace(b"\r", b" ") for raw in lines]
    path = write_lines(tmp_path, clean)
    read, report = read_trajectories(path, default_source="real")
    texts = [raw.decode("utf-8", "replace") for raw in clean]
    if texts:
        texts[0] = texts[0].removeprefix("\ufeff")  # the reader drops a UTF-8 byte-order mark on line 1
    non_blank = [text for text in texts if text.strip()]
    assert report.records == len(non_blank)
    assert report.read + report.num_skipped == report.records == len(read) + report.num_skipped
    assert set(report.skipped) <= set(REASONS)
    for traj in read:  # everything returned is valid and survives a write/read round trip
        traj.validate()
        assert any(m["role"] == "assistant" for m in traj.messages)
        assert traj.reward is None or math.isfinite(traj.reward)
    if report.num_skipped or not report.records:  # strict refuses a bad record and an empty file
        with pytest.raises(TrajectoryReadError):
            read_trajectories(path, strict=True, default_source="real")
    else:
        assert len(read_trajectories(path, strict=True, default_source="real")[0]) == len(read)


trajectories = st.builds(
    Trajectory,
    messages=st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["system", "user", "tool"]),
                "content": st.text(min_size=1).filter(str.strip),
            }
        ),
        max_size=3,
    ).map(lambda ms: [*ms, {"role": "assistant", "content": "ok"}]),
    source=st.text(min_size=1, max_size=5).filter(lambda s: normalize_source(s) == s),
    reward=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    task_id=st.none() | st.text(max_size=5),
    meta=st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(trajectories, min_size=1, max_size=4))
def test_fuzz_valid_trajectories_round_trip(tmp_path, items):
    path = tmp_path / "round.jsonl"
    write_jsonl(path, items)
    read, report = read_trajectories(path, strict=True)
    assert [t.to_dict() for t in read] == [t.to_dict() for t in items] and report.clean


def test_trajectory_constructor_reasons():
    with pytest.raises(TrajectoryFormatError) as info:
        Trajectory(messages=[{"role": "user", "content": "x"}])
    assert info.value.reason == "no_assistant_turn"
    assert Trajectory(messages=[ASSISTANT], task_id=3).task_id == "3"
