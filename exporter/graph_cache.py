"""A content-addressed store of exported stage graphs, shared between artifacts.

Exporting several schedules of one checkpoint re-traces the same SAM, [SEG]-head and decode graphs
(and often the same vision and early LLM stages). Each graph is stored under its export key
(`exporter.export.stage_key`), so a later export with the same key copies the files instead of
tracing. Entries are written to a temp dir and renamed into place: a reader sees all or nothing.
Files are copied, never hard-linked (an artifact edited in place must not change the cache), and
each entry records its files' sha256: an entry whose bytes changed is dropped, not served.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from graphs.manifest import file_sha256


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.cache-tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class GraphCache:
    """Args:
        root (path): cache directory (created on first put).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def get(self, key: str, art: Path) -> tuple[list[str], dict] | None:
        """Copy a cached entry's files into `art` (same relative paths). Returns (relpaths, parity) or None."""
        entry = self.root / key
        try:
            meta = json.loads((entry / "entry.json").read_text())
            intact = all(file_sha256(entry / rel) == digest for rel, digest in meta["files"].items())
        except (OSError, ValueError, KeyError, AttributeError):
            intact = False
        if not intact:
            shutil.rmtree(entry, ignore_errors=True)  # damaged or foreign: drop it so a fresh put can replace it
            return None
        for rel in meta["files"]:
            _copy(entry / rel, art / rel)
        return list(meta["files"]), meta.get("parity", {})

    def put(self, key: str, art: Path, files: list[str], parity: dict) -> None:
        """Store `files` (relative to `art`) under `key`; an existing entry is kept."""
        entry = self.root / key
        if (entry / "entry.json").is_file():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key[:12]}."))
        try:
            digests = {}
            for rel in files:
                _copy(art / rel, tmp / rel)
                digests[rel] = file_sha256(tmp / rel)
            (tmp / "entry.json").write_text(json.dumps({"files": digests, "parity": parity}))
            os.replace(tmp, entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent writer won the rename: theirs is as good
