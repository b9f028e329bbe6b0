"""Atomic result files: write to a temporary file in the same folder, then rename.

A reader (or a resumed run) never sees a half-written file: a crash leaves the previous version
in place and removes the temporary file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any


def replace_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to fill a temporary file next to ``path``, then rename it to ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    replace_atomic(path, write)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path``; readers never see a half-written file."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
