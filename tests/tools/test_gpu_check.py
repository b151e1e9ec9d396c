"""`python -m tools.gpu_check` on a CPU machine (what CI runs, so the GPU script never rots), its budget logic,
its steps and its JSON contract. The real GPU run is the script itself on a lent GPU (`tools.gpu_prep`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import has_cuda
from tools import gpu_check, gpu_parts
from tools.gpu_steps import RESERVE_S, Clock, Log, error_line, run_step

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tiny_ckpt, export_tiny, tmp_path_factory):
    """The CPU dry run on the session's tiny checkpoint and csp artifact (nothing exported again)."""
    if has_cuda():
        pytest.skip("a GPU is present: run python -m tools.gpu_check itself")
    base = tmp_path_factory.mktemp("gpu_check")
    tiny = base / "tiny"
    shutil.copytree(tiny_ckpt, tiny / "checkpoint")
    shutil.copytree(export_tiny("csp", "both"), tiny / "artifact")
    out = base / "out"
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--out", str(out), "--work", str(base / "work"),
                           "--budget", "240", "--repeat", "1", "--tiny", str(tiny)], capture_output=True, text=True,
                          cwd=ROOT, timeout=400)
    return proc, json.loads((out / "gpu_check.json").read_text()), out


def test_cpu_dry_run_runs_what_it_can_and_skips_the_rest_with_one_line_each(dry_run):
    proc, report, out = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    gpu_check.check_gpu_report(report)  # the schema, and the bench report inside against bench.schema.json
    parts = {p["name"]: p for p in report["parts"]}
    assert list(parts) == ["machine", "trt_tiny", "gpu_tests", "torch_bench", "trt_small"]
    machine = report["machine"]
    assert parts["machine"]["status"] == "passed" and machine["gpu"] is None
    assert machine["packages"]["onnxruntime"]["installed"] and machine["csprt_imports"]["failed"] == {}
    assert machine["tensorrt"]["flavor"] == "tensorrt-rtx" and "SM86" in machine["tensorrt"]["targets"]
    tiny = parts["trt_tiny"]
    steps = {s["name"]: s for s in tiny["steps"]}
    assert tiny["status"] == "partial" and steps["build_current"]["status"] == "skipped"
    assert steps["build_current"]["reason"].startswith("needs a CUDA GPU")
    assert steps["decode"]["status"] == "skipped" and steps["decode"]["reason"].startswith("needs a CUDA GPU")
    assert steps["decode"]["command"][1:3] == ["-m", "tools.gpu_decode"]  # the decode profile and CUDA graphs, timed
    assert steps["decode"]["command"][3].endswith("trt_tiny/artifact")
    assert steps["weights"]["status"] == "skipped" and steps["weights"]["command"][1:3] == ["-m", "tools.gpu_weights"]
    assert {n: s["status"] for n, s in steps.items() if n not in ("build_current", "decode", "weights")} == {
        "run_single-pass": "passed", "validate": "passed", "bench": "passed"}
    assert tiny["results"]["validate"]["passed"] is True
    assert list(tiny["results"]["validate"]["backends"]) == ["onnxruntime"]
    assert tiny["results"]["run"]["single-pass"]["image_tokens_per_layer"]
    assert [r["backend"] for r in tiny["results"]["bench"]["tiny-onnxruntime"]["records"]] == ["onnxruntime"]
    for name in ("gpu_tests", "torch_bench", "trt_small"):
        assert parts[name]["status"] == "skipped" and parts[name]["reason"].startswith("needs a CUDA GPU")
    skipped = [p["name"] for p in report["parts"] if p["status"] == "skipped"] + ["trt_tiny/build_current",
                                                                                  "trt_tiny/decode", "trt_tiny/weights"]
    assert [s.split(":")[0] for s in report["skipped"]] == skipped  # one line each
    assert report["wall_s"] < report["budget_s"]
    assert "skipped:" in proc.stdout and "tiny-onnxruntime" in proc.stdout  # the summary and the bench table
    log = (out / "gpu_check.log").read_text()
    assert "trt_tiny/validate: passed" in log and "--- trt_tiny/bench stderr (tail) ---" in log
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log"]  # $OUT: few, small files


def test_a_part_that_would_start_too_late_is_skipped_and_the_report_says_so(tmp_path, monkeypatch):
    def machine(ctx, pc):  # no GPU, instantly
        return gpu_parts._part("machine", pc, [gpu_parts.Step("record", [], "passed")], {})

    monkeypatch.setattr(gpu_check, "PARTS", (("machine", machine, 60.0, 0.0, False),
                                             ("trt_tiny", gpu_parts.PARTS[1][1], 150.0, 30.0, False),
                                             ("gpu_tests", gpu_parts.gpu_tests, 150.0, 40.0, True)))
    args = gpu_check.parse_args(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"), "--budget",
                                 str(RESERVE_S + 12)])
    report = gpu_check.run_check(args)
    gpu_check.check_gpu_report(report)
    assert [(p["name"], p["status"]) for p in report["parts"]] == [
        ("machine", "passed"), ("trt_tiny", "skipped"), ("gpu_tests", "skipped")]
    assert re.fullmatch(r"trt_tiny: 1[12] s left of the 22 s budget; it needs at least 30 s", report["skipped"][0])
    assert report["skipped"][1] == "gpu_tests: needs a CUDA GPU (none seen)"
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == report


def test_no_output_directory_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    assert gpu_check.main(["--budget", "5"]) == 2
    assert capsys.readouterr().err == "gpu_check: error: no output directory: set $OUT or pass --out DIR\n"
    assert gpu_check.main(["--out", "x", "--parts", "machine,bogus"]) == 2
    assert "--parts: unknown bogus; choose from machine, trt_tiny" in capsys.readouterr().err


def test_clock_gives_each_part_its_cap_or_what_is_left():
    t = [0.0]
    clock = Clock(100.0, now=lambda: t[0])
    first = clock.part("a", cap_s=30)
    assert first.budget_s == 30 and first.left() == 30
    t[0] = 80.0
    assert first.left() == -50  # over its cap
    second = clock.part("b", cap_s=60)
    assert second.budget_s == 100 - RESERVE_S - 80 and second.left() == second.budget_s
    t[0] = 200.0
    assert clock.part("c", cap_s=60).budget_s == 0


def test_steps_stop_at_their_deadline_and_name_what_failed(tmp_path):
    log = Log(tmp_path / "log")
    part = Clock(RESERVE_S + 2.0).part("p", cap_s=2.0)
    t0 = time.monotonic()
    slow = run_step("sleep", [sys.executable, "-c", "import time; time.sleep(60)"], part, log, tmp_path, min_s=0.5)
    assert slow.status == "timeout" and time.monotonic() - t0 < 15 and "stopped after" in slow.reason
    late = run_step("late", [sys.executable, "-c", "pass"], part, log, tmp_path, min_s=0.5)
    assert late.status == "skipped" and re.fullmatch(r"0 s left in part 'p', needs at least 0.5 s", late.reason)
    part = Clock(60).part("q", cap_s=30)
    bad = run_step("bad", [sys.executable, "-c", "import sys; print('x'); sys.exit('csprt run: error: no such image')"],
                   part, log, tmp_path)
    assert (bad.status, bad.rc, bad.reason) == ("failed", 1, "csprt run: error: no such image")
    assert "p/sleep: timeout" in log.path.read_text() and "q/bad: failed" in log.path.read_text()


def test_error_line_prefers_the_last_error():
    assert error_line("[csprt] loading\ncsprt build: error: stage x failed\n  done\n") == \
        "csprt build: error: stage x failed"
    assert error_line("a\nb\n") == "b" and error_line("") is None


def test_junit_outcomes(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t.a" name="ok"/>'
                   '<testcase classname="t.a" name="sk"><skipped message="needs a CUDA GPU"/></testcase>'
                   '<testcase classname="t.b" name="bad"><failure message="assert 1 == 2">trace</failure></testcase>'
                   '</testsuite></testsuites>')
    assert gpu_parts.junit_outcomes(xml) == [
        {"id": "t.a::ok", "outcome": "passed", "message": None},
        {"id": "t.a::sk", "outcome": "skipped", "message": "needs a CUDA GPU"},
        {"id": "t.b::bad", "outcome": "failed", "message": "assert 1 == 2"}]
    assert gpu_parts.junit_outcomes(tmp_path / "absent.xml") == []


def test_bench_runs_tensorrt_on_cuda_beside_onnxruntime_on_the_cpu(export_tiny):
    """gpu_check benches `--backends onnxruntime,tensorrt` without --device: tensorrt goes to cuda, not to cpu."""
    from tests.cli_io import call, error_lines
    from tools.bench import backend_device

    assert [backend_device(b, "cpu") for b in ("torch", "onnxruntime", "tensorrt")] == ["cpu", "cpu", "cuda"]
    assert backend_device("tensorrt", "cuda:1") == "cuda:1" and backend_device("onnxruntime", "cuda") == "cuda"
    if has_cuda():
        pytest.skip("a GPU is present")
    rc, _, err = call(["bench", str(export_tiny()), "--backends", "tensorrt", "--repeat", "1", "--warmup", "0"])
    assert rc == 2 and error_lines(err) == [error_lines(err)[0]]
    assert error_lines(err)[0].startswith("csprt bench: error: --backend tensorrt runs engines on an NVIDIA GPU; "
                                          "none is visible")


def test_gpu_decode_without_a_gpu_is_one_line_and_exit_2(export_tiny, capsys):
    """tools.gpu_decode (gpu_check's decode step) refuses in one line where it cannot measure."""
    if has_cuda():
        pytest.skip("a GPU is present: gpu_check runs tools.gpu_decode itself")
    from tools import gpu_decode

    art = export_tiny("csp", "both")
    assert gpu_decode.main([str(art), "--steps", "2"]) == 2
    assert capsys.readouterr().err.strip() == ("gpu_decode: error: --steps 2: need at least 3 (a plain call, the "
                                               "capture, a replay)")
    assert gpu_decode.main([str(art)]) == 2
    assert capsys.readouterr().err.strip() == ("gpu_decode: error: needs a CUDA GPU (torch sees none); run it on the "
                                               "GPU machine")


def test_gpu_weights_without_a_gpu_is_one_line_and_exit_2(export_tiny, capsys):
    """tools.gpu_weights (gpu_check's weights step) refuses in one line where it cannot measure."""
    if has_cuda():
        pytest.skip("a GPU is present: gpu_check runs tools.gpu_weights itself")
    from tools import gpu_weights

    art = export_tiny("csp", "both")
    assert gpu_weights.main([str(art), "--repeat", "1"]) == 2
    assert capsys.readouterr().err.strip() == ("gpu_weights: error: --repeat 1: need at least 2 (the first call is "
                                               "not timed)")
    assert gpu_weights.main([str(art)]) == 2
    assert capsys.readouterr().err.strip() == ("gpu_weights: error: needs a CUDA GPU (torch sees none); run it on "
                                               "the GPU machine")


@pytest.mark.trt
def test_gpu_weights_builds_its_weight_free_copy_beside_the_artifact_without_touching_it(export_tiny, tmp_path):
    """The copy shares the graphs (hard links, no second copy of the weights), gets weight-free engines, and the
    artifact's own full engines and manifest are left as they were; one single-pass run records the feeds."""
    from engines.build import build_engines
    from graphs.manifest import MANIFEST_NAME, file_sha256
    from tools.gpu_weights import recorded_feeds, weight_free_copy

    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    stages = ["embed", "llm_2"]
    build_engines(art, stages=stages, flavor="tensorrt-rtx", compute_capabilities=["SM89"])
    before = {p: file_sha256(p) for p in [art / MANIFEST_NAME, *sorted((art / "engines").rglob("*.*"))]}
    free = weight_free_copy(art, "tensorrt-rtx", ["SM89"])
    assert free == tmp_path / "art.weight-free"
    assert {p: file_sha256(p) for p in before} == before  # the full engines and the manifest untouched
    assert (free / "graphs/llm_2.onnx").stat().st_ino == (art / "graphs/llm_2.onnx").stat().st_ino
    for stage in stages:
        side = json.loads((free / f"engines/tensorrt-rtx/{stage}.json").read_text(encoding="utf-8"))
        full = json.loads((art / f"engines/tensorrt-rtx/{stage}.json").read_text(encoding="utf-8"))
        assert side["weights"] == "inputs" and side["weight_input_bytes"] > 0 and "weights" not in full
    feeds = recorded_feeds(art)
    assert set(stages) <= set(feeds) and set(feeds["llm_2"]) >= {"hidden", "positions"}
