"""Atomic result files: write to a temporary file in the same folder, then rename.

A reader (or a resumed run) never sees a half-written file: a crash leaves the previous version
in place and removes the temporary file. A process killed outright (``kill -9``) cannot remove
its temporary file; :func:`remove_stale_temporaries` does that on the next start. The file gets
the permissions an ordinary ``open()`` would give (``0o666`` less the umask), not ``mkstemp``'s
``0o600``. A failed write raises :class:`AtomicWriteError` naming the file, why, and the free space.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from typing import Any


class AtomicWriteError(OSError):
    """A result file could not be written; the message names it, the cause and the free space left."""


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it and put it back
    os.umask(mask)
    return mask


def _temporary_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def _free_space(directory: str) -> str:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**20:.1f} MiB free on its file system"


def replace_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to fill a temporary file next to ``path``, then rename it to ``path``.

    Raises:
        AtomicWriteError: ``write`` or the rename failed (e.g. a full disk, where ``torch.save``
            only says "unexpected pos"); ``path`` keeps its previous content and the temporary file
            is removed. Other exceptions (e.g. ``KeyboardInterrupt``) pass through after the cleanup.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=f".tmp{suffix}", dir=directory)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        _unlink_quietly(tmp)
        raise AtomicWriteError(
            f"could not write {path}: {type(err).__name__}: {err} ({_free_space(directory)}); "
            "the previous version of the file, if any, is unchanged"
        ) from err
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_stale_temporaries(directory: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Delete the temporary files :func:`replace_atomic` left for ``directory/<name>`` (a killed writer).

    Only files named like this module's temporaries of the given ``names`` are touched. Returns the
    removed paths, sorted.
    """
    removed = []
    for name in names:
        pattern = os.path.join(
            glob.escape(os.fspath(directory)), glob.escape(_temporary_prefix(name)) + "*.tmp*"
        )
        for tmp in glob.glob(pattern):
            _unlink_quietly(tmp)
            removed.append(tmp)
    return sorted(removed)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    replace_atomic(path, write)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path``; readers never see a half-written file."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
