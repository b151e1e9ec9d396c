"""An export killed midway never leaves a directory that loads, and re-exports redo only what changed.

`exporter.export` writes a new generation beside the artifact (graphs/artifact_dir.py), its manifest.json
last, and swaps it in only when complete; stages whose export key and file hashes match the previous manifest
are reused (hard-linked) without loading the checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from graphs.artifact_dir import PARTIAL, generations_dir
from graphs.errors import ArtifactError
from graphs.manifest import MANIFEST_NAME, load_artifact
from tests.cli_io import call
from tools import cli

REPO = Path(__file__).resolve().parents[2]
QUERY = "Where is the cat in this picture?"
KILL_AT = "[csprt] export: [2/"  # the progress line of the 2nd exported stage
EXPORT_TIMEOUT_S = 900


@pytest.fixture(autouse=True)
def only_run_and_export(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"run": "tools.run", "export": "tools.export"})




def progress_lines(stderr: str) -> list[str]:
    return [line.strip() for line in stderr.splitlines() if line.startswith("[csprt]")]


def shared_graph_cache(tmp_path_factory) -> Path | None:
    """The graph cache conftest's `export_tiny` fills (re-exports from it copy instead of tracing), if present."""
    found = sorted(tmp_path_factory.getbasetemp().glob("graph_cache*"))
    return found[0] if found else None


def graph_mtimes(art: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((art / "graphs").iterdir())}


@pytest.fixture
def image(tmp_path) -> Path:
    from exporter.export import sample_image

    path = tmp_path / "disc.png"
    Image.fromarray(sample_image()).save(path)
    return path


def export_until_killed(ckpt: Path, out: Path) -> list[str]:
    """Run `python -m tools export` in a real process and SIGKILL it once its 2nd stage is written.

    Returns the stderr lines read up to the kill.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tools", "export", str(ckpt), "--schedule", "csp", "--mode", "both",
                             "--out", str(out)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    watchdog = threading.Timer(EXPORT_TIMEOUT_S, proc.kill)  # never hang the suite on a stuck export
    watchdog.start()
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if line.startswith(KILL_AT):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        watchdog.cancel()
        proc.kill()  # no-op when already dead
        proc.wait(timeout=60)
        proc.stderr.close()
    assert any(line.startswith(KILL_AT) for line in lines), "\n".join(lines[-30:])
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, "\n".join(lines[-30:]))
    return lines


def test_killed_export_never_loads_and_reexport_recovers(tiny_ckpt, export_tiny, tmp_path, tmp_path_factory, image,
                                                         capsys):
    export_tiny("csp", "both")  # fills the shared graph cache the recovery export copies from
    out = tmp_path / "art"
    lines = export_until_killed(tiny_ckpt, out)
    assert any("0 unchanged, 12 to export" in line for line in lines), lines

    # Killed between stages: the first graphs are on disk in the partial generation, the manifest never was, and
    # the artifact path itself was never created (graphs/artifact_dir.py).
    assert not out.exists() and not (out / MANIFEST_NAME).exists()
    written = sorted(p.name for p in generations_dir(out).glob(f"*{PARTIAL}/graphs/*.onnx"))
    assert len(written) >= 2, written
    with pytest.raises(ArtifactError, match="interrupted"):
        load_artifact(out)
    with pytest.raises(ArtifactError, match="interrupted"):
        load_artifact(out, verify=False)

    run_argv = ["run", str(out), "--image", str(image), "--query", QUERY, "--out", str(tmp_path / "result")]
    rc, stdout, stderr = call(run_argv)
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("csprt run: error:")]
    assert len(errors) == 1, stderr
    assert "no manifest.json" in errors[0] and "interrupted" in errors[0] and "re-run the export" in errors[0]
    assert stdout == "" and not (tmp_path / "result").exists()

    # Re-running the export finishes the artifact. Without a manifest nothing on disk is trusted: all 12 redone.
    capsys.readouterr()
    export_argv = ["export", str(tiny_ckpt), "--schedule", "csp", "--mode", "both", "--out", str(out)]
    cache = shared_graph_cache(tmp_path_factory)
    rc = cli.main(export_argv + (["--cache", str(cache)] if cache else []))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert any("0 unchanged, 12 to export" in line for line in progress_lines(err)), err
    assert any(line.startswith("[csprt] export: [12/12]") for line in progress_lines(err)), err
    art = load_artifact(out, verify=True)
    assert art.schedule.name == "csp" and set(art.modes) == {"single-pass", "generate"}
    assert art.rebuild_command.startswith("csprt export ") and f"--out {out}" in art.rebuild_command

    rc, stdout, stderr = call(run_argv + ["--mode", "generate", "--max-new-tokens", "4"])
    assert rc == 0, stderr
    assert sorted(p.name for p in (tmp_path / "result").iterdir()) == ["mask.png", "overlay.png", "result.json"]


def _reexport(tiny_ckpt: Path, art: Path, cache: Path | None) -> list[str]:
    """export_artifact in-process as the conftest export was made (csp, both, fp32). Returns its progress lines."""
    from exporter.export import ExportOptions, export_artifact
    from graphs.checkpoint_config import read_checkpoint_config
    from graphs.schedule import resolve

    shape = read_checkpoint_config(tiny_ckpt).shape
    lines: list[str] = []
    export_artifact(tiny_ckpt, resolve("csp", shape.llm.layers, shape.num_image_tokens), art,
                    ExportOptions(mode="both", precision="fp32", cache_dir=str(cache) if cache else None),
                    progress=lines.append)
    return lines


def test_reexport_unchanged_reuses_everything(tiny_ckpt, export_tiny, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)  # copy2: mtimes preserved
    before = graph_mtimes(art)
    time.sleep(0.01)  # any rewrite would get a later mtime
    lines = _reexport(tiny_ckpt, art, cache=None)  # no cache: a hit could only come from the artifact itself
    assert "12 unchanged, 0 to export" in lines[0], lines
    assert not any("[1/" in line or "loaded" in line for line in lines), lines  # checkpoint never loaded
    assert graph_mtimes(art) == before
    load_artifact(art, verify=True)


def test_reexport_after_modified_graph_redoes_one_stage(tiny_ckpt, export_tiny, tmp_path, tmp_path_factory):
    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    original = load_artifact(art).stage_entry("llm_1")["files"]
    with open(art / "graphs" / "llm_1.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="hash mismatch"):
        load_artifact(art)
    before = graph_mtimes(art)
    time.sleep(0.01)

    lines = _reexport(tiny_ckpt, art, shared_graph_cache(tmp_path_factory))
    assert "11 unchanged, 1 to export" in lines[0], lines
    done = [line for line in lines if line.startswith("export: [")]
    assert len(done) == 1 and done[0].startswith("export: [1/1] llm_1:"), lines
    after = graph_mtimes(art)
    assert {k: v for k, v in after.items() if k != "llm_1.onnx"} == {k: v for k, v in before.items()
                                                                     if k != "llm_1.onnx"}
    reloaded = load_artifact(art, verify=True)
    assert reloaded.stage_entry("llm_1")["files"] == original  # deterministic: the same bytes as the first export


def test_run_in_a_loop_during_reexports_never_fails(tiny_ckpt, export_tiny, tmp_path, image):
    """`csprt run` over and over while two re-exports (real processes) write new generations and swap them in:
    every run answers (the old generation runs until the new one is complete), the link moves twice, and only the
    current and the previous generations are kept."""
    out = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), out)  # a plain directory, as an older csprt left it
    _reexport(tiny_ckpt, out, cache=None)  # now a link to a generation; the plain copy is the previous one
    first = os.readlink(out)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "tools", "export", str(tiny_ckpt), "--schedule", "csp", "--mode", "both",
            "--out", str(out)]
    exports: list[subprocess.CompletedProcess] = []

    def reexport_twice():
        for _ in range(2):
            exports.append(subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                                          timeout=EXPORT_TIMEOUT_S))

    writer = threading.Thread(target=reexport_twice, daemon=True)
    writer.start()
    runs: list[tuple[int, str, bool]] = []  # (exit code, stderr, started while an export was running)
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while (writer.is_alive() or len(runs) < 2) and time.monotonic() < deadline:
        during = writer.is_alive()
        rc, _, err = call(["run", str(out), "--image", str(image), "--query", QUERY,
                           "--out", str(tmp_path / f"result_{len(runs)}")])
        runs.append((rc, err, during))
    writer.join(timeout=60)
    assert [e.returncode for e in exports] == [0, 0], [e.stderr[-2000:] for e in exports]
    failed = [err for rc, err, _ in runs if rc != 0]
    assert not failed and sum(during for *_, during in runs) >= 2, (failed[:1], len(runs))
    generations = sorted(p.name for p in generations_dir(out).iterdir())
    assert os.readlink(out) != first and len(generations) == 2, (first, os.readlink(out), generations)
    assert os.readlink(out).endswith("/" + max(generations, key=int)) and load_artifact(out).dir.name in generations
