"""The settings list of ``python -m boost.train --help``, generated from the config dataclasses.

Each line is ``key=default`` and the field's one-line meaning: the comment at the end of its line in
the dataclass source, else the first sentence of the comment block just above it. Nested dataclass
configs are listed field by field under their dotted keys, so a new setting shows up by itself.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
from typing import Any

_FIELD = re.compile(r"^\s+(\w+)\s*:")
MAX_MEANING = 120


def field_meanings(cls: type) -> dict[str, str]:
    """``{field: meaning}`` from the comments in the source of the dataclass ``cls``."""
    source = inspect.getsource(cls)
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (token.start[1], token.string.lstrip("#").strip())
    meanings, block = {}, []
    for number, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(comments[number][1])
            continue
        match = _FIELD.match(line)
        if match and match.group(1) in {f.name for f in dataclasses.fields(cls)}:
            trailing = comments.get(number)
            meanings[match.group(1)] = trailing[1] if trailing else _first_sentence(" ".join(block))
        block = []
    return meanings


def _first_sentence(text: str) -> str:
    sentence = re.split(r"(?<=[.;])\s", text, maxsplit=1)[0].rstrip(";")
    return sentence if len(sentence) <= MAX_MEANING else sentence[: MAX_MEANING - 1] + "…"


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(map(str, value)) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def settings_lines(config: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(key=default, meaning)`` for every setting of the dataclass instance ``config``, nested ones
    under dotted keys."""
    meanings = field_meanings(type(config))
    rows = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(settings_lines(value, f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}={_show(value)}", meanings.get(f.name, "")))
    return rows


def settings_help(config: Any) -> str:
    """The ``settings:`` section of ``--help``: one aligned line per setting."""
    rows = settings_lines(config)
    width = min(max(len(key) for key, _ in rows), 36)
    lines = [f"  {key:<{width}}  {meaning}".rstrip() for key, meaning in rows]
    return "settings (key=value after the options; shown with their defaults):\n" + "\n".join(lines)
