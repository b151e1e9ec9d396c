"""A content-addressed store of exported stage graphs, shared between artifacts.

Exporting several schedules of one checkpoint re-traces the same SAM, [SEG]-head and decode graphs
(and often the same vision and early LLM stages). Each graph is stored under its export key
(`exporter.export.stage_key`), so a later export with the same key copies the files instead of
tracing. Entries are written to a temp dir and renamed into place: a reader sees all or nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.cache-tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)  # same filesystem: free, and the bytes are immutable once cached
    except OSError:
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
        meta_path = entry / "entry.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        if not all((entry / rel).is_file() for rel in meta["files"]):
            return None
        for rel in meta["files"]:
            _link_or_copy(entry / rel, art / rel)
        return meta["files"], meta.get("parity", {})

    def put(self, key: str, art: Path, files: list[str], parity: dict) -> None:
        """Store `files` (relative to `art`) under `key`; an existing entry is kept."""
        entry = self.root / key
        if (entry / "entry.json").is_file():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key[:12]}."))
        try:
            for rel in files:
                _link_or_copy(art / rel, tmp / rel)
            (tmp / "entry.json").write_text(json.dumps({"files": files, "parity": parity}))
            os.replace(tmp, entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent writer won the rename: theirs is as good
