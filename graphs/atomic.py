"""Atomic file writes: a reader sees the old file or the whole new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`, on failure delete it.

    Args:
        path (str or PathLike): the destination; parent directories are created.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Atomically write `obj` as indented UTF-8 JSON with a trailing newline. Returns the path."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"  # serialise first: a TypeError leaves no temp file
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
