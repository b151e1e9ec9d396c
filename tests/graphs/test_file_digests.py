"""graphs.manifest.file_sha256: each file version is read once per process (an artifact's graphs and plans are
checked by several loaders), and a file that just changed is never trusted to its mtime."""

from __future__ import annotations

import hashlib
import os

import pytest

from graphs import manifest


@pytest.fixture
def opens(monkeypatch):
    """Paths file_sha256 opened, in order."""
    seen, real = [], open

    def counting_open(path, *args, **kwargs):
        seen.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(manifest, "open", counting_open, raising=False)  # the module's `open`, not builtins'
    return seen


def test_a_settled_file_is_read_once(tmp_path, opens, monkeypatch):
    monkeypatch.setattr(manifest, "_RACY_NS", -1)  # as if the file were written long ago
    path = tmp_path / "engine.plan"
    path.write_bytes(b"plan-1")
    assert manifest.file_sha256(path) == manifest.file_sha256(path) == hashlib.sha256(b"plan-1").hexdigest()
    assert opens == [str(path)]
    path.write_bytes(b"plan-2")  # same size, new content: a new version (mtime, ctime)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    assert manifest.file_sha256(path) == hashlib.sha256(b"plan-2").hexdigest() and len(opens) == 2


def test_a_file_changed_just_now_is_read_every_time(tmp_path, opens):
    path = tmp_path / "graph.onnx"
    path.write_bytes(b"graph-a")
    assert manifest.file_sha256(path) == hashlib.sha256(b"graph-a").hexdigest()
    stamp = path.stat().st_mtime_ns
    path.write_bytes(b"graph-b")  # a same-size rewrite within one clock tick may keep the mtime
    os.utime(path, ns=(stamp, stamp))
    assert manifest.file_sha256(path) == hashlib.sha256(b"graph-b").hexdigest() and len(opens) == 2
