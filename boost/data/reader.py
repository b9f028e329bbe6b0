"""Read trajectory files into validated :class:`Trajectory` records, counting what is skipped.

Supported inputs (``format="auto"`` picks by file extension):

- ``.jsonl``: one record per line. A record is TRL's conversational object (see
  :mod:`boost.data.format`) or an LMRL-Gym step list (see :mod:`boost.data.lmrl`).
- ``.json``: a whole-document JSON array of records (HF ``datasets`` ``to_json(lines=False)``; a
  bad element costs that element only), a single record (an object, or one LMRL-Gym step list: an
  array whose objects hold ``state``/``action`` and none holds ``messages``/``steps``), or, when the
  file is not one JSON document, JSON Lines (``to_json()``'s default).
- ``.parquet``: rows with the same columns (HF ``datasets`` ``to_parquet``); needs ``pyarrow``.
- In-memory rows (e.g. a ``datasets.Dataset``): :func:`read_records`.

Each bad record raises :class:`TrajectoryReadError` naming the file, the line (or row), the reason
and the fix. With ``strict=True`` the first one is raised; otherwise it is skipped, counted in the
:class:`ReadReport` per reason, and the report is logged at WARNING level (printed to stderr
unless logging is configured otherwise). Blank lines are counted too. A file without any record is
an error under ``strict=True`` and says so in the report otherwise. Source names are normalised
(``"Real "`` -> ``"real"``, counted), and message keys other than ``role``/``content`` are counted.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from boost.data.format import (
    KNOWN_KEYS,
    MESSAGE_KEYS,
    REASONS,
    Trajectory,
    TrajectoryFormatError,
    normalize_source,
)
from boost.data.lmrl import LMRL_KEYS, STEP_KEYS, is_lmrl_record, parse_lmrl_record

log = logging.getLogger(__name__)

BLANK = object()  # what the decoders yield for a blank line (JSON null is a record, and an invalid one)

MAX_EXAMPLES = 10  # error messages kept verbatim in a report


class TrajectoryReadError(TrajectoryFormatError):
    """A bad record in a file: ``where`` is ``"path:line"`` (or ``"path row i"``)."""

    def __init__(self, where: str, reason: str, detail: str) -> None:
        hint = REASONS.get(reason, "fix the record")
        super().__init__(f"{where}: {reason}: {detail} (fix: {hint})", reason)
        self.where = where
        self.detail = detail


@dataclass
class ReadReport:
    """What a reader saw.

    Attributes:
        origin: the file path (or the name given to in-memory rows).
        records: non-blank lines (JSONL) or rows seen.
        read: trajectories returned.
        blank_lines: blank lines skipped (they hold no record).
        skipped: reason tag -> number of records skipped for it.
        unknown_fields: top-level key outside the format -> number of records carrying it (ignored).
        defaulted_source: records without ``source`` that got ``default_source``.
        normalized_source: source as written -> records read with it normalised (``"Real"`` -> ``"real"``).
        message_keys: message key other than role/content -> messages carrying it (passed to the template).
        examples: the first :data:`MAX_EXAMPLES` error messages, verbatim.
    """

    origin: str
    records: int = 0
    read: int = 0
    blank_lines: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    unknown_fields: Counter[str] = field(default_factory=Counter)
    defaulted_source: int = 0
    normalized_source: Counter[str] = field(default_factory=Counter)
    message_keys: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def clean(self) -> bool:
        """True when nothing was skipped, ignored or defaulted."""
        return not (
            self.skipped
            or self.unknown_fields
            or self.defaulted_source
            or self.normalized_source
            or self.message_keys
            or not self.records
        )

    def summary(self) -> str:
        lines = [f"{self.origin}: read {self.read} of {self.records} records, skipped {self.num_skipped}"]
        if self.blank_lines:
            lines[0] += f" ({self.blank_lines} blank lines ignored)"
        if not self.records:
            lines.append(f"  the file holds no record (fix: {REASONS['empty_file']})")
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {n} x {reason} (fix: {REASONS.get(reason, 'fix the record')})")
        for key, n in sorted(self.unknown_fields.items()):
            lines.append(f"  ignored unknown field {key!r} in {n} records")
        if self.defaulted_source:
            lines.append(f"  {self.defaulted_source} records had no 'source' and were given the default")
        for raw, n in sorted(self.normalized_source.items()):
            lines.append(f"  source {raw!r} read as {normalize_source(raw)!r} in {n} records")
        for key, n in sorted(self.message_keys.items()):
            lines.append(
                f"  {n} messages carry {key!r}: passed to the chat template, which may ignore it; "
                "the trainer trains on 'content' only"
            )
        if self.examples:
            lines.append("  first errors:")
            lines.extend(f"    {e}" for e in self.examples)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def parse_record(obj: Any, *, default_source: str | None) -> Trajectory:
    """One decoded record (conversational object or LMRL-Gym steps) -> :class:`Trajectory`."""
    if is_lmrl_record(obj):
        return parse_lmrl_record(obj, default_source=default_source)
    return Trajectory.from_dict(obj, default_source=default_source)


def _decode_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, decoded object | TrajectoryReadError | BLANK)`` per line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                detail = f"invalid UTF-8 byte 0x{raw[err.start]:02x} at byte {err.start} of the line"
                yield where, TrajectoryReadError(where, "invalid_utf8", detail)
                continue
            if lineno == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                yield where, BLANK
                continue
            yield where, _loads(where, text)


def _loads(where: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        # some of json's messages end in "at" ("Unterminated string starting at"): no second "at"
        at = "" if err.msg.endswith(" at") else " at"
        return TrajectoryReadError(where, "malformed_json", f"{err.msg}{at} column {err.colno}")
    except RecursionError:
        return TrajectoryReadError(where, "malformed_json", "JSON nested too deeply")
    except ValueError as err:  # e.g. an integer literal longer than Python's int-to-str digit limit
        return TrajectoryReadError(where, "malformed_json", str(err))


def _decode_json_document(path: str) -> Iterator[tuple[str, Any]]:
    """A ``.json`` file: a JSON array of records, a single record, or else JSON Lines."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        yield from _decode_jsonl(path)  # not one document: JSON Lines, with per-line errors
        return
    if isinstance(doc, list) and not _is_step_list(doc):
        for i, rec in enumerate(doc):
            yield f"{path} record {i}", rec
    else:
        yield f"{path}:1", doc


def _is_step_list(doc: list) -> bool:
    """True for one LMRL-Gym step list, False for an array of records (see the module docstring)."""
    objects = [item for item in doc if isinstance(item, dict)]
    if any("messages" in item or "steps" in item for item in objects):
        return False
    return any(key in item for item in objects for key in STEP_KEYS[:2])


def _decode_parquet(path: str) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow (or datasets)") from err
    try:
        parquet_file = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and OSError subclasses
        raise TrajectoryReadError(path, "malformed_parquet", str(err)) from err
    row = 0
    for batch in parquet_file.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            yield f"{path} row {row}", rec
            row += 1


def _collect(
    decoded: Iterable[tuple[str, Any]], origin: str, *, strict: bool, default_source: str | None
) -> tuple[list[Trajectory], ReadReport]:
    report = ReadReport(origin=origin)
    trajectories: list[Trajectory] = []
    for where, obj in decoded:
        if obj is BLANK:
            report.blank_lines += 1
            continue
        report.records += 1
        err: TrajectoryReadError | None = obj if isinstance(obj, TrajectoryReadError) else None
        if err is None:
            try:
                traj = parse_record(obj, default_source=default_source)
            except TrajectoryFormatError as format_err:
                err = TrajectoryReadError(where, format_err.reason, str(format_err))
        if err is not None:
            if strict:
                raise err
            report.skipped[err.reason] += 1
            if len(report.examples) < MAX_EXAMPLES:
                report.examples.append(str(err))
            continue
        if isinstance(obj, dict):
            known = LMRL_KEYS if is_lmrl_record(obj) else KNOWN_KEYS
            report.unknown_fields.update(k for k in obj if k not in known)
        raw_source = None if isinstance(obj, list) else obj.get("source")
        if raw_source is None:
            report.defaulted_source += 1
        elif raw_source != traj.source:
            report.normalized_source[raw_source] += 1
        report.message_keys.update(k for m in traj.messages for k in m if k not in MESSAGE_KEYS)
        traj.origin = where
        trajectories.append(traj)
        report.read += 1
    if not report.records and strict:
        raise TrajectoryReadError(origin, "empty_file", f"no record in {report.blank_lines} lines")
    if report.clean:
        log.info(report.summary())
    else:
        log.warning(report.summary())
    return trajectories, report


def read_trajectories(
    path: str | os.PathLike,
    *,
    strict: bool = False,
    default_source: str | None = None,
    format: str = "auto",
) -> tuple[list[Trajectory], ReadReport]:
    """Read one file of trajectories.

    Args:
        path: a ``.jsonl``, ``.json`` or ``.parquet`` file.
        strict: raise :class:`TrajectoryReadError` at the first bad record instead of skipping it.
        default_source: the ``source`` of records that have none. ``None`` (default) makes a missing
            ``source`` an error, so that unlabeled synthetic data is never read as real data.
        format: ``"auto"`` (by extension), ``"jsonl"``, ``"json"`` or ``"parquet"``.

    Returns:
        The trajectories in file order and the :class:`ReadReport`.
    """
    path = os.fspath(path)
    if format == "auto":
        ext = os.path.splitext(path)[1].lower()
        format = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(ext, "")
        if not format:
            raise ValueError(
                f"{path}: cannot tell the format from {ext!r}; pass format='jsonl', 'json' or 'parquet'"
            )
    decoders = {"jsonl": _decode_jsonl, "json": _decode_json_document, "parquet": _decode_parquet}
    if format not in decoders:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(decoders)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such trajectory file")
    return _collect(decoders[format](path), path, strict=strict, default_source=default_source)


def read_records(
    rows: Iterable[Any], *, origin: str, strict: bool = False, default_source: str | None = None
) -> tuple[list[Trajectory], ReadReport]:
    """Validate in-memory rows (e.g. a ``datasets.Dataset``); errors name ``origin`` and the row index."""
    decoded = ((f"{origin} row {i}", row) for i, row in enumerate(rows))
    return _collect(decoded, origin, strict=strict, default_source=default_source)
