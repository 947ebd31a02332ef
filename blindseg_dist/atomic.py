"""Atomic writes: a file is written under a temporary name beside its destination and renamed
over it when complete (``os.replace``), so a reader sees the old file or the new one, never a
half-written one, and an interrupted write leaves the old file in place.

Temporary names are ``<name>.tmp-<pid>`` in the destination's folder (the same file system, so
the rename is atomic; the pid keeps concurrent writers apart).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name of ``path`` for this process: ``<name>.tmp-<pid>`` beside it."""
    p = Path(path)
    return p.with_name(f"{p.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through; on success it replaces ``path``.

    If the block raises, the temporary file is removed and ``path`` is untouched. If the block
    removes the temporary file itself (nothing worth keeping), ``path`` is left as it was.
    The parent folder is created when missing."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(p)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if tmp.exists():
        os.replace(tmp, p)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """``json.dumps(obj, **dumps_kwargs)`` written atomically."""
    return write_text(path, json.dumps(obj, **dumps_kwargs))


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move the complete folder ``tmp`` to ``final``, replacing a folder already there.

    A folder cannot be renamed over a non-empty one, so an existing ``final`` is first renamed
    aside (``.old-<name>-<pid>`` beside it), ``tmp`` renamed into place, then the old one removed.
    A reader can find no ``final`` for a moment, never a partial one; if the second rename fails
    the old folder is put back, and a process killed between the two renames leaves the complete
    old folder under its ``.old-`` name instead of deleting it."""
    final = Path(final)
    aside = None
    if final.exists():
        aside = final.with_name(f".old-{final.name}-{os.getpid()}")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        if aside is not None:
            os.replace(aside, final)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final
