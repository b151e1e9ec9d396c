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


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str,
                   fix: str = "wait for it to finish, or choose another output directory") -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) on `path` for the block; refuse at once if another process holds it.

    The lock file keeps the holder's pid and work for the message and is left in place (removing it would race a
    waiter); the kernel releases the lock when the holder exits, even on kill -9.

    Args:
        path (str or PathLike): the lock file (created, with its parent).
        what (str): the work it guards, for the message, e.g. "csprt export to out/art".
        fix (str): what a refused caller should do. Defaults to waiting or another output directory.

    Raises:
        ToolchainError: another process holds the lock (the message names its work and pid).
    """
    import fcntl

    from graphs.errors import ToolchainError

    lock = Path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, holder = os.pread(fd, 4096, 0).decode(errors="replace").strip().partition(" ")
            holder = holder.splitlines()[0] if holder else "another csprt process"  # a holder between its two writes
            raise ToolchainError(f"{what}: {holder} is already running (pid {pid or '?'}, lock {lock}); "
                                 f"{fix}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Atomically write `obj` as indented UTF-8 JSON with a trailing newline. Returns the path."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"  # serialise first: a TypeError leaves no temp file
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
