"""Broken or mismatched artifacts and bad `csprt run` / `csprt export` input: one line on stderr, exit 2.

Each case asserts what the line says (the dim and its range, the file, the rebuild command, the
valid choices), that no traceback is printed, and where it matters that nothing ran or was written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from graphs.errors import ArtifactError
from graphs.manifest import MANIFEST_NAME, check_stage_names, load_artifact, sealed
from tests.cli_io import call, error_lines
from tools import cli

QUERY = "Where is the cat?"


@pytest.fixture(autouse=True)
def only_run_and_export(monkeypatch):
    # Register only the subcommands used here, so these tests do not depend on the other tools' imports.
    monkeypatch.setattr(cli, "COMMANDS", {"run": "tools.run", "export": "tools.export", "validate": "tools.validate"})






def assert_one_line_error(command: str, rc: int, stderr: str, needles: list[str]) -> str:
    assert rc == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    line = lines[0]
    prefix = f"csprt {command}: error: "
    assert line.startswith(prefix) and len(line) > len(prefix) + 10, line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.fixture
def image(tmp_path) -> Path:
    from exporter.export import sample_image

    path = tmp_path / "disc.png"
    Image.fromarray(sample_image()).save(path)
    return path


@pytest.fixture
def art_copy(export_tiny, tmp_path) -> Path:
    """A writable copy of the session's csp/both artifact."""
    dst = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), dst)
    return dst


def rebuild_command(art: Path) -> str:
    return json.loads((art / MANIFEST_NAME).read_text())["export"]["command"]


def run_argv(target: Path, image: Path, tmp_path: Path, *extra: str, query: str = QUERY) -> list[str]:
    return ["run", str(target), "--image", str(image), "--query", query, "--out", str(tmp_path / "out"), *extra]


def assert_no_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


# --- request input beyond the exported bounds ------------------------------------------------------------------


def test_query_over_max_text_len(export_tiny, image, tmp_path, monkeypatch):
    from engines.pipeline import Pipeline

    art = export_tiny("csp", "both")
    dims = json.loads((art / MANIFEST_NAME).read_text())["dims"]["suffix_len"]
    started = []
    real_runner = Pipeline.runner
    monkeypatch.setattr(Pipeline, "runner", lambda self, stage: started.append(stage.name) or real_runner(self, stage))
    long_query = "Where is the small grey cat " + "next to the cat " * 60 + "?"  # ~300 suffix tokens, < 2048 in all
    rc, stdout, stderr = call(run_argv(art, image, tmp_path, query=long_query))
    line = assert_one_line_error("run", rc, stderr, ["suffix_len", f"[{dims['min']}, {dims['max']}]", "outside",
                                                     "--max-text-len"])
    assert "[1, 256]" in line  # the default --max-text-len
    assert started == []  # rejected before any stage's runner was even created
    assert stdout == ""
    assert_no_results(tmp_path)


# --- damaged artifacts -----------------------------------------------------------------------------------------


def test_missing_graph(art_copy, image, tmp_path):
    (art_copy / "graphs" / "llm_1.onnx").unlink()
    rc, _, stderr = call(run_argv(art_copy, image, tmp_path))
    assert_one_line_error("run", rc, stderr, ["graphs/llm_1.onnx", "missing", "llm_1",
                                              f"re-export with: {rebuild_command(art_copy)}"])
    assert_no_results(tmp_path)


def test_modified_graph(art_copy, image, tmp_path):
    with open(art_copy / "graphs" / "llm_1.onnx", "ab") as f:
        f.write(b"\0")
    rc, _, stderr = call(run_argv(art_copy, image, tmp_path))
    assert_one_line_error("run", rc, stderr, ["graphs/llm_1.onnx", "hash mismatch",
                                              f"re-export with: {rebuild_command(art_copy)}"])
    assert_no_results(tmp_path)
    with pytest.raises(ArtifactError, match="hash mismatch"):
        load_artifact(art_copy)
    load_artifact(art_copy, verify=False)  # the manifest itself is fine; only verification catches it


def test_modified_graph_validate(art_copy):
    with open(art_copy / "graphs" / "embed.onnx", "ab") as f:
        f.write(b"\0")
    rc, stdout, stderr = call(["validate", str(art_copy)])
    assert_one_line_error("validate", rc, stderr, ["graphs/embed.onnx", "hash mismatch",
                                                   rebuild_command(art_copy)])
    assert stdout == ""


# schema 1: the layout before weights-once (llm_<i> with entry ops inside, a separate decode graph);
# schema 2: graphs with a static batch of 1
@pytest.mark.parametrize("version, needles", [(1, ["older csprt", "schema 1", "this csprt reads 3", "re-export with: "]),
                                              (2, ["older csprt", "schema 2", "this csprt reads 3", "re-export with: "]),
                                              (4, ["newer", "upgrade csprt", "re-export with: "])],
                         ids=["schema-1", "schema-2", "newer"])
def test_schema_version(art_copy, image, tmp_path, version, needles):
    path = art_copy / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = version
    path.write_text(json.dumps(manifest))
    rc, _, stderr = call(run_argv(art_copy, image, tmp_path))
    assert_one_line_error("run", rc, stderr, [*needles, manifest["export"]["command"]])
    with pytest.raises(ArtifactError, match="schema"):
        load_artifact(art_copy, verify=False)


def test_interrupted_export_dir(art_copy, image, tmp_path):
    (art_copy / MANIFEST_NAME).unlink()  # graphs/ and tokenizer/ written, manifest never was
    rc, _, stderr = call(run_argv(art_copy, image, tmp_path))
    assert_one_line_error("run", rc, stderr, [str(art_copy), "no manifest.json", "interrupted",
                                              "re-run the export: csprt export", f"--out {art_copy}"])
    assert_no_results(tmp_path)
    with pytest.raises(ArtifactError, match="interrupted"):
        load_artifact(art_copy)


def test_corrupt_manifest(art_copy, image, tmp_path):
    path = art_copy / MANIFEST_NAME
    path.write_text(path.read_text()[:200])
    rc, _, stderr = call(run_argv(art_copy, image, tmp_path))
    assert_one_line_error("run", rc, stderr, [str(path), "not valid JSON", "re-export with: csprt export"])


# --- names and options that do not fit the artifact ------------------------------------------------------------


def test_unknown_stage(export_tiny):
    art = load_artifact(export_tiny("csp", "both"))
    stages = [s.name for s in art.layout.stages]
    with pytest.raises(ArtifactError) as exc:
        check_stage_names(art, ["llm_0", "llm_9"])
    msg = str(exc.value)
    assert "'llm_9'" in msg and all(name in msg for name in stages), msg
    with pytest.raises(ArtifactError, match="unknown stage 'llm_9'"):
        art.stage_entry("llm_9")
    with pytest.raises(ArtifactError, match="unknown stage 'llm_9'"):
        art.graph_path("llm_9")
    check_stage_names(art, stages)  # every real stage is accepted


def test_checkpoint_with_onnxruntime_backend(tiny_ckpt, image, tmp_path):
    rc, _, stderr = call(run_argv(tiny_ckpt, image, tmp_path, "--backend", "onnxruntime"))
    assert_one_line_error("run", rc, stderr, ["--backend onnxruntime", str(tiny_ckpt), "not one", "no manifest.json",
                                              f"csprt export {tiny_ckpt}"])
    assert_no_results(tmp_path)


def test_artifact_with_torch_backend(export_tiny, image, tmp_path):
    art = export_tiny("csp", "both")
    rc, _, stderr = call(run_argv(art, image, tmp_path, "--backend", "torch"))
    assert_one_line_error("run", rc, stderr, [str(art), "exported artifact", "--backend torch",
                                              "--backend onnxruntime"])
    assert_no_results(tmp_path)


def test_schedule_other_than_exported(export_tiny, image, tmp_path):
    art = export_tiny("csp", "both")
    rc, _, stderr = call(run_argv(art, image, tmp_path, "--schedule", "full"))
    assert_one_line_error("run", rc, stderr, ["schedule 'csp'", "not 'full'", "--schedule full", "drop --schedule"])
    assert_no_results(tmp_path)


def test_generate_on_single_pass_artifact(export_tiny, image, tmp_path):
    art = export_tiny("full", "single-pass")
    rc, _, stderr = call(run_argv(art, image, tmp_path, "--mode", "generate"))
    assert_one_line_error("run", rc, stderr, ["mode 'generate'", "single-pass", "--mode both",
                                              rebuild_command(art)])
    assert_no_results(tmp_path)


# --- csprt export ----------------------------------------------------------------------------------------------


def test_export_missing_checkpoint(tmp_path):
    out = tmp_path / "art"
    rc, stdout, stderr = call(["export", str(tmp_path / "no-such-ckpt"), "--schedule", "csp", "--out", str(out)])
    assert_one_line_error("export", rc, stderr, ["checkpoint directory not found", "no-such-ckpt"])
    assert stdout == ""
    assert not (out / MANIFEST_NAME).exists()
    with pytest.raises(ArtifactError):
        load_artifact(out)


def test_export_unknown_schedule(tiny_ckpt, tmp_path):
    out = tmp_path / "art"
    rc, stdout, stderr = call(["export", str(tiny_ckpt), "--schedule", "nope", "--out", str(out)])
    assert_one_line_error("export", rc, stderr, ["'nope'", "full", "csp", "fastv"])
    assert stdout == ""
    assert not (out / MANIFEST_NAME).exists()
    with pytest.raises(ArtifactError):
        load_artifact(out)


def test_failed_export_keeps_existing_artifact(art_copy, tiny_ckpt):
    # Bad options are rejected before the existing manifest is invalidated: the artifact still loads.
    before = {p.name: p.stat().st_mtime_ns for p in (art_copy / "graphs").iterdir()}
    rc, _, stderr = call(["export", str(tiny_ckpt), "--schedule", "nope", "--out", str(art_copy)])
    assert_one_line_error("export", rc, stderr, ["'nope'"])
    load_artifact(art_copy, verify=True)
    assert {p.name: p.stat().st_mtime_ns for p in (art_copy / "graphs").iterdir()} == before


def test_export_out_is_a_file(tiny_ckpt, tmp_path):
    out = tmp_path / "art.txt"
    out.write_text("not a directory\n")
    rc, _, stderr = call(["export", str(tiny_ckpt), "--schedule", "csp", "--out", str(out)])
    assert_one_line_error("export", rc, stderr, [str(out), "not a directory"])
    assert out.read_text() == "not a directory\n"


def test_no_traceback_in_real_process(art_copy, image, tmp_path):
    """The same one-line contract through `python -m tools` (exit status and stderr of a real process)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    (art_copy / "graphs" / "llm_1.onnx").unlink()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-m", "tools", *run_argv(art_copy, image, tmp_path)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert_one_line_error("run", proc.returncode, proc.stderr, ["graphs/llm_1.onnx", "missing"])
    assert proc.stdout == ""
    assert_no_results(tmp_path)


# --- a sealed artifact: no manifest path leads outside it (issue 15) -------------------------------------------

def _edit_manifest(art: Path, edit) -> None:
    m = json.loads((art / MANIFEST_NAME).read_text())
    edit(m)
    (art / MANIFEST_NAME).write_text(json.dumps(sealed(m)))


@pytest.mark.parametrize("case", ["tokenizer-dir-up", "tokenizer-dir-absolute", "graph-file-up", "link-out"])
def test_manifest_paths_outside_the_artifact_are_refused_before_reading(art_copy, image, tmp_path, case):
    outside = tmp_path / "elsewhere"
    shutil.copytree(art_copy / "tokenizer", outside)
    if case == "tokenizer-dir-up":
        _edit_manifest(art_copy, lambda m: m["tokenizer"].__setitem__("dir", "../elsewhere"))
    elif case == "tokenizer-dir-absolute":
        _edit_manifest(art_copy, lambda m: m["tokenizer"].__setitem__("dir", str(outside)))
    elif case == "graph-file-up":
        def up(m):
            e = next(e for e in m["stages"] if e["name"] == "llm_1")
            e["files"]["../../etc/passwd"] = "0" * 64
        _edit_manifest(art_copy, up)
    else:  # the tokenizer directory replaced by a link to a copy outside: resolved, it is elsewhere
        shutil.rmtree(art_copy / "tokenizer")
        (art_copy / "tokenizer").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ArtifactError, match="leads outside the artifact directory"):
        load_artifact(art_copy, verify=False)
    rc, _, stderr = call(run_argv(art_copy, image, tmp_path))
    assert_one_line_error("run", rc, stderr, ["leads outside the artifact directory", "re-export with:"])
    assert_no_results(tmp_path)


@pytest.mark.parametrize("dim_range, says", [({"min": 1, "opt": 8, "max": 10**9}, "beyond the model's"),
                                             ({"min": 5, "opt": 2, "max": 9}, "expected 1 <= min <= opt <= max")])
def test_absurd_dim_ranges_are_refused(art_copy, dim_range, says):
    _edit_manifest(art_copy, lambda m: m["dims"].__setitem__("suffix_len", dim_range))
    with pytest.raises(ArtifactError, match=says):
        load_artifact(art_copy, verify=False)
