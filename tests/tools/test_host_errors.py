"""A full disk or a read-only output is one line and exit 2 from every command, never an OSError traceback."""

from __future__ import annotations

import errno
import tempfile

import pytest

from tests.cli_io import call, error_lines
from tools.cli import host_error_line


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "free some space"), (errno.EROFS, "writable location"),
                                       (errno.EACCES, "permissions")], ids=["disk-full", "read-only", "forbidden"])
def test_make_tiny_into_a_refusing_disk(tmp_path, monkeypatch, code, fix):
    out = tmp_path / "ckpt"

    def refuse(*a, dir=None, **k):  # every atomic write starts with a temp file beside its destination
        raise OSError(code, __import__("os").strerror(code), str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    rc, _, err = call(["make-tiny", str(out)])
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("csprt make-tiny: error: ") and fix in lines[0] and str(tmp_path) in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing left behind, not even an empty directory


def test_other_oserrors_are_not_disguised():
    assert host_error_line(OSError(errno.EIO, "Input/output error")) is None
    assert host_error_line(FileNotFoundError(errno.ENOENT, "No such file")) is None


@pytest.mark.parametrize("flag, value", [("--opset", "5"), ("--opset", "99"), ("--max-new-tokens", "0"),
                                         ("--max-seg", "0"), ("--max-text-len", "100000"), ("--max-text-len", "-3")])
def test_export_bounds_refused_before_any_work(tiny_ckpt, tmp_path, flag, value):
    """These used to fail after a whole export, deep in torch or the manifest schema, with half an artifact left."""
    out = tmp_path / "art"
    rc, _, err = call(["export", str(tiny_ckpt), "--schedule", "full", "--mode", "both", "--out", str(out),
                       flag, value])
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1, err
    assert f"{flag} {value} is out of range: choose " in lines[0]
    assert not out.exists() and "[csprt] export" not in err  # nothing traced, nothing written


def test_a_second_export_to_the_same_artifact_is_refused_at_once(tiny_ckpt, tmp_path):
    """Two exports to one --out used to interleave and fail late with 'please report'; now the second stops at
    once, naming the first (flock: released by the kernel even if the holder is killed)."""
    import os
    import time

    from graphs.atomic import exclusive_lock

    out = tmp_path / "art"
    with exclusive_lock(tmp_path / ".art.export.lock", "csprt export to art"):
        t0 = time.monotonic()
        rc, _, err = call(["export", str(tiny_ckpt), "--schedule", "full", "--out", str(out)])
        took = time.monotonic() - t0
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1, err
    assert f"is already running (pid {os.getpid()}" in lines[0] and "choose another output directory" in lines[0]
    assert not out.exists() and took < 30


def test_a_build_is_refused_while_an_export_of_its_artifact_runs(tmp_path):
    """csprt build writes engines into the artifact's current generation, which a running export is about to
    replace with one that lacks them: the two share the export lock, and the build stops at once, naming the
    export, before reading anything."""
    import os
    import time

    from graphs.artifact_dir import export_lock
    from graphs.atomic import exclusive_lock

    art = tmp_path / "art"
    art.mkdir()
    with exclusive_lock(export_lock(art), f"csprt export to {art}"):
        t0 = time.monotonic()
        rc, _, err = call(["build", str(art)])
        took = time.monotonic() - t0
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"csprt build: error: csprt build of {art}: csprt export to {art} is already "
                               f"running (pid {os.getpid()}, lock {export_lock(art)}); ")
    assert lines[0].endswith("wait for it to finish, then run the build again")
    assert list(art.iterdir()) == [] and took < 30
    rc, _, err = call(["build", str(art)])  # lock free: the build goes on to the artifact (not one here)
    assert rc == 2 and "is already running" not in err and "manifest" in err, err


def test_an_export_is_refused_while_a_build_of_its_artifact_runs(tiny_ckpt, tmp_path, monkeypatch):
    """The build holds the lock for its whole work (loading the artifact to writing its manifest): an export to
    the same --out in that time is refused, naming the build; the lock is free again once the build returns."""
    import os

    from engines import build
    from graphs.artifact_dir import export_lock
    from graphs.atomic import exclusive_lock

    art = tmp_path / "art"
    art.mkdir()
    seen = {}

    def work(art_dir, *rest):  # the build's work, under its lock
        seen["export"] = call(["export", str(tiny_ckpt), "--schedule", "full", "--out", str(art)])
        return {"artifact": str(art_dir)}

    monkeypatch.setattr(build, "_build_locked", work)
    assert build.build_engines(art) == {"artifact": str(art)}
    rc, _, err = seen["export"]
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1, err
    assert f"csprt build of {art} is already running (pid {os.getpid()}" in lines[0]
    assert "[csprt] export" not in err and list(art.iterdir()) == []
    with exclusive_lock(export_lock(art), "a later export"):  # released
        pass
