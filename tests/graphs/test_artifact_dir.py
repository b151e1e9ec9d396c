"""graphs/artifact_dir.py without an export: generations, the link swap, what is kept, relative paths, and the
refusals. Files stand in for an artifact's."""

import os
from pathlib import Path

import pytest

from graphs.artifact_dir import PARTIAL, begin_generation, generations_dir, interrupted, publish
from graphs.errors import ArtifactError


def _export(out: Path, content: str, is_artifact: bool = True) -> Path:
    gen = begin_generation(out, is_artifact)
    (gen / "graphs").mkdir(exist_ok=True)
    tmp = gen / "graphs" / ".x.tmp"  # an export writes a temp file and renames it over the linked one
    tmp.write_text(content)
    os.replace(tmp, gen / "graphs" / "x.onnx")
    (gen / "manifest.json").write_text(content)
    return publish(out, gen)


def test_generations_swap_and_keep_the_previous_one(tmp_path):
    out = tmp_path / "art"
    first = _export(out, "v1", is_artifact=False)
    assert out.is_symlink() and os.readlink(out) == ".art.csprt/1" and (out / "graphs/x.onnx").read_text() == "v1"
    held = out.resolve()  # a reader that resolved the link before the next swap
    second = _export(out, "v2")
    assert (out / "graphs/x.onnx").read_text() == "v2" and (held / "graphs/x.onnx").read_text() == "v1"
    assert sorted(p.name for p in generations_dir(out).iterdir()) == [first.name, second.name]
    third = begin_generation(out, True)  # the next export begins at once: the held generation is still there
    assert (held / "graphs/x.onnx").read_text() == "v1" and (third / "graphs/x.onnx").read_text() == "v2"
    (third / "manifest.json").unlink()
    (third / "manifest.json").write_text("v3")
    publish(out, third)
    assert sorted(p.name for p in generations_dir(out).iterdir()) == ["2", "3"]  # current and previous


def test_a_killed_export_leaves_the_artifact_and_is_cleaned_up(tmp_path):
    out = tmp_path / "art"
    assert not interrupted(out)
    gen = begin_generation(out, False)
    (gen / "graphs").mkdir()
    assert interrupted(out) and not out.exists()  # a first export killed: nothing at `out` yet
    _export(out, "v1")
    gen = begin_generation(out, True)  # killed after cloning: the artifact is untouched
    (gen / "graphs" / "x.onnx").unlink()
    assert (out / "graphs/x.onnx").read_text() == "v1" and not interrupted(out)
    _export(out, "v2")
    assert not any(p.name.endswith(PARTIAL) for p in generations_dir(out).iterdir())


def test_a_plain_directory_becomes_the_previous_generation(tmp_path):
    out = tmp_path / "art"
    (out / "graphs").mkdir(parents=True)
    (out / "graphs" / "x.onnx").write_text("old")
    (out / "manifest.json").write_text("old")
    _export(out, "new")
    assert out.is_symlink() and (out / "graphs/x.onnx").read_text() == "new"
    assert (generations_dir(out) / "1.before" / "graphs/x.onnx").read_text() == "old"


def test_relative_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _export(Path("art"), "v1", is_artifact=False)
    _export(Path("art"), "v2")
    assert os.readlink("art") == ".art.csprt/2" and Path("art/graphs/x.onnx").read_text() == "v2"
    assert sorted(p.name for p in generations_dir(Path("art")).iterdir()) == ["1", "2"]


def test_refusals(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="exists and is not a directory"):
        begin_generation(tmp_path / "file", False)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_text("mine")
    with pytest.raises(ArtifactError, match="other content than a csprt artifact"):
        begin_generation(tmp_path / "photos", False)
    assert (tmp_path / "photos" / "a.jpg").read_text() == "mine"
