"""The parts of `tools.gpu_check`, in the order they run (`PARTS`).

Each part function takes the check's `Context` and its `PartClock`, runs csprt's own commands as
subprocesses (`python -m tools ...`, so the device needs no installed csprt), and returns
{"name", "status", "reason", "note", "budget_s", "wall_s", "steps", "results"}:

    status   passed: every step ran and passed     partial: what ran passed, some steps were skipped
             failed: a step failed or timed out    skipped: nothing ran (reason says why)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from tools.gpu_steps import Clock, Log, PartClock, Step, run_step

ROOT = Path(__file__).resolve().parent.parent
CSPRT = [sys.executable, "-m", "tools"]
TORCH_SCHEDULES, MORE_SCHEDULES = "full,csp", "full,csp-70,evtp,fastv"  # ratios need `full` in the same run


@dataclass
class Context:
    clock: Clock
    log: Log
    work: Path
    tiny: Path | None = None
    repeat: int = 10
    done: dict = field(default_factory=dict)  # part name -> its result

    @property
    def gpu(self) -> dict | None:
        return (self.done.get("machine", {}).get("results", {}).get("machine") or {}).get("gpu")

    def no_gpu(self) -> str:
        machine = self.done.get("machine", {}).get("results", {}).get("machine") or {}
        return f"needs a CUDA GPU ({(machine.get('torch') or {}).get('problem') or 'none seen'})"


def _part(name: str, pc: PartClock, steps: list[Step], results: dict, note: str = "", reason: str | None = None):
    ran = [s for s in steps if s.status != "skipped"]
    if any(s.status in ("failed", "timeout") for s in steps):
        status = "failed"
    elif not ran:
        status = "skipped"
    else:
        status = "partial" if len(ran) < len(steps) else "passed"
    if status == "skipped" and reason is None:
        reason = steps[0].reason if steps else "nothing to run"
    return {"name": name, "status": status, "reason": reason, "note": note, "budget_s": round(pc.budget_s, 1),
            "wall_s": round(pc.elapsed(), 1), "steps": [s.to_json() for s in steps], "results": results}


def _skip(ctx: Context, pc: PartClock, name: str, command: list[str], reason: str) -> Step:
    ctx.log.say(f"{pc.name}/{name}: skipped: {reason}")
    return Step(name, command, "skipped", reason=reason)


def _json_file(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --- parts ------------------------------------------------------------------------------------------

def machine(ctx: Context, pc: PartClock) -> dict:
    from tools.gpu_machine import machine_record

    rec = machine_record()
    gpu, trt = rec["gpu"], rec["tensorrt"]
    where = f"{gpu['name']} {gpu['compute_capability']}, driver {gpu['driver']}" if gpu else "no GPU"
    listed = "" if trt["gpu_listed"] is None else ("; this GPU is a listed target" if trt["gpu_listed"]
                                                   else "; this GPU is NOT a listed target")
    note = (f"{where}; torch {rec['torch']['version']} (CUDA {rec['torch']['cuda']}); {trt['flavor'] or 'no TensorRT'} "
            f"{trt['version'] or ''}{listed}; {len(rec['csprt_imports']['failed'])} of "
            f"{rec['csprt_imports']['modules']} csprt modules fail to import")
    ctx.log.say(f"machine: {note}")
    for mod, err in rec["csprt_imports"]["failed"].items():
        ctx.log.say(f"machine: import {mod}: {err}")
    step = Step("record", [], "passed")
    return _part("machine", pc, [step], {"machine": rec}, note)


def trt(ctx: Context, pc: PartClock, shape: str) -> dict:
    """A tiny (or `small`) csp artifact on TensorRT-RTX built for this GPU, against ONNX Runtime and torch."""
    name, work = pc.name, ctx.work / pc.name
    steps, results = [], {"bench": {}}
    gpu = ctx.gpu is not None
    backends = "onnxruntime,tensorrt" if gpu else "onnxruntime"
    ckpt, art = work / "checkpoint", work / "artifact"
    if ctx.tiny is not None and shape == "tiny":
        shutil.rmtree(art, ignore_errors=True)
        shutil.copytree(ctx.tiny / "artifact", art)  # engines are written into it
        ckpt = ctx.tiny / "checkpoint"
    else:
        made = ["make-tiny", str(ckpt)] + (["--shape", shape] if shape != "tiny" else [])
        steps.append(run_step("make_tiny", CSPRT + made, pc, ctx.log, work))
        if steps[-1].status == "passed":
            steps.append(run_step("export", CSPRT + ["export", str(ckpt), "--schedule", "csp", "--mode", "both",
                                                     "--out", str(art)], pc, ctx.log, work, min_s=20))
        if steps[-1].status != "passed":
            return _part(name, pc, steps, results, f"no {shape} artifact")
    build = CSPRT + ["build", str(art), "--compute-capability", "current"]
    if gpu:
        built = run_step("build_current", build, pc, ctx.log, work, min_s=20)
        steps.append(built)
        results["build"] = _build_result(built, art)
        if built.status != "passed":
            for what in ("run", "validate", "bench"):
                steps.append(_skip(ctx, pc, what, [], "the engines did not build"))
            return _part(name, pc, steps, results, f"build --compute-capability current {built.status}: "
                                                    f"{built.reason}")
    else:
        steps.append(_skip(ctx, pc, "build_current", build, ctx.no_gpu()))
    image = work / "image.png"
    _write_sample_image(image)
    query = "Where is the cat in this picture?"
    results["run"] = {}
    for mode in ("single-pass", "generate") if gpu else ("single-pass",):  # generate: decode under CUDA graphs
        out = work / f"run-{mode}"
        steps.append(run_step(f"run_{mode}", CSPRT + ["run", str(art), "--image", str(image), "--query", query,
                                                      "--backend", backends.split(",")[-1], "--mode", mode,
                                                      "--out", str(out)], pc, ctx.log, work))
        results["run"][mode] = _json_file(out / "result.json")
    modes = [] if gpu else ["--mode", "single-pass"]  # a CPU checks the command lines; a GPU both modes
    steps.append(run_step("validate", CSPRT + ["validate", str(art), "--checkpoint", str(ckpt), "--backends",
                                               backends, *modes, "--json"], pc, ctx.log, work, min_s=15))
    results["validate"] = _validate_summary(steps[-1])
    bench = work / "bench.json"
    steps.append(run_step("bench", CSPRT + ["bench", str(art), "--checkpoint", str(ckpt), "--backends", backends,
                                            "--repeat", str(ctx.repeat), "--warmup", "2", "--json", str(bench)],
                          pc, ctx.log, work, min_s=15))
    if steps[-1].status == "passed" and _json_file(bench) is not None:
        results["bench"][f"{shape}-{backends}"] = _json_file(bench)
    # last, so the older steps keep their time: the block engines' decode profile and CUDA graphs, timed
    steps.append(_decode(ctx, pc, art, results) if gpu else
                 _skip(ctx, pc, "decode", CSPRT_DECODE + [str(art)], ctx.no_gpu()))
    steps.append(_weights(ctx, pc, art, results) if gpu else
                 _skip(ctx, pc, "weights", CSPRT_WEIGHTS + [str(art)], ctx.no_gpu()))
    v = results["validate"]
    note = f"{backends}: " + ", ".join(f"{s.name} {s.status}" for s in steps)
    if v is not None:
        note += f"; validate {'PASSED' if v['passed'] else 'FAILED'}"
    return _part(name, pc, steps, results, note)


def gpu_tests(ctx: Context, pc: PartClock) -> dict:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                   if "mark.gpu" in p.read_text(encoding="utf-8"))
    xml = ctx.work / "gpu-tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider",
               f"--junitxml={xml}", *files]
    if ctx.gpu is None:
        return _part(pc.name, pc, [_skip(ctx, pc, "pytest", command, ctx.no_gpu())], {})
    step = run_step("pytest", command, pc, ctx.log, ctx.work, min_s=30, cwd=ROOT)
    if step.status == "failed" and step.rc == 5:  # pytest: no tests collected
        step.status, step.reason = "passed", "no gpu-marked test collected"
    tests = junit_outcomes(xml)
    counts = {k: sum(1 for t in tests if t["outcome"] == k) for k in ("passed", "failed", "skipped")}
    note = ", ".join(f"{v} {k}" for k, v in counts.items())
    return _part(pc.name, pc, [step], {"tests": tests, **counts}, note)


def junit_outcomes(path: Path) -> list[dict]:
    """[{"id", "outcome": passed|failed|skipped, "message"}] from pytest's --junitxml file (empty if absent)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    out = []
    for case in root.iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                message = (child.get("message") or child.text or "").strip().splitlines()[0][:500] \
                    if (child.get("message") or child.text) else None
        out.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "message": message})
    return out


def torch_bench(ctx: Context, pc: PartClock) -> dict:
    from tools.gpu_machine import bench_options

    opts = bench_options()
    base = CSPRT + ["bench", "--shape", "lisa-7b", "--backends", "torch", "--device", "cuda", "--repeat",
                    str(ctx.repeat), "--warmup", "3", "--work", str(ctx.work / "bench-work")]
    steps, results = [], {"bench": {}, "bench_options": opts}
    if ctx.gpu is None:
        return _part(pc.name, pc, [_skip(ctx, pc, "batch1", base, ctx.no_gpu())], results)

    def bench(label: str, extra: list[str], min_s: float) -> Step:
        path = ctx.work / f"bench-{label}.json"
        step = run_step(label, base + extra + ["--json", str(path)], pc, ctx.log, ctx.work, min_s=min_s)
        if step.status == "passed" and _json_file(path) is not None:
            results["bench"][label] = _json_file(path)
        steps.append(step)
        return step

    first = bench("batch1", ["--schedules", TORCH_SCHEDULES], 60)
    if opts["batch"]:
        bench("batch8", ["--schedules", TORCH_SCHEDULES, "--batch", "8"], first.wall_s * 1.2)
    else:
        steps.append(_skip(ctx, pc, "batch8", [], "csprt bench has no --batch yet"))
    if not opts["cuda_graphs"]:
        steps.append(_llm_graphs(ctx, pc, results))
    bench("presets", ["--schedules", MORE_SCHEDULES], max(60.0, first.wall_s * 1.5))
    return _part(pc.name, pc, steps, results, ", ".join(f"{s.name} {s.status}" for s in steps))


LLM_GRAPHS = ("import json, sys; from exporter.bench import bench_llm_graphs; from graphs.shapes import SHAPES; "
              "print(json.dumps(bench_llm_graphs(SHAPES['lisa-7b'], sys.argv[1].split(','))))")


def _llm_graphs(ctx: Context, pc: PartClock, results: dict) -> Step:
    """csprt bench has no CUDA-graph option: the LLM part under CUDA graphs (exporter.bench.bench_llm_graphs)."""
    step = run_step("llm_cuda_graphs", [sys.executable, "-c", LLM_GRAPHS, TORCH_SCHEDULES], pc, ctx.log, ctx.work,
                    min_s=45, cwd=ROOT)
    if step.status == "passed":
        try:
            results["llm_cuda_graphs"] = json.loads(step.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            step.status, step.reason = "failed", "no JSON on stdout"
    return step


CSPRT_DECODE = [sys.executable, "-m", "tools.gpu_decode"]


def _decode(ctx: Context, pc: PartClock, art: Path, results: dict) -> Step:
    """Block engines' decode steps: decode profile + CUDA graphs vs plain vs one shared profile (tools.gpu_decode)."""
    return _json_step(ctx, pc, "decode", CSPRT_DECODE + [str(art), "--steps", "32"], results)


def _json_step(ctx: Context, pc: PartClock, name: str, command: list[str], results: dict) -> Step:
    """A measuring tool run with `--json PATH`: results[name] is its report, None when it failed."""
    path = ctx.work / pc.name / f"{name}.json"
    step = run_step(name, command + ["--json", str(path)], pc, ctx.log, ctx.work, min_s=20, cwd=ROOT)
    results[name] = _json_file(path) if step.status == "passed" else None
    return step


CSPRT_WEIGHTS = [sys.executable, "-m", "tools.gpu_weights"]


def _weights(ctx: Context, pc: PartClock, art: Path, results: dict) -> Step:
    """Weight-free engines against the full ones: load time, latency, outputs (tools.gpu_weights)."""
    return _json_step(ctx, pc, "weights", CSPRT_WEIGHTS + [str(art), "--repeat", "10"], results)


def trt_small(ctx: Context, pc: PartClock) -> dict:
    tiny = ctx.done.get("trt_tiny", {}).get("status")
    if ctx.gpu is None or tiny != "passed":
        why = ctx.no_gpu() if ctx.gpu is None else f"runs when trt_tiny passed (it {tiny or 'did not run'})"
        return _part(pc.name, pc, [_skip(ctx, pc, "all", [], why)], {})
    return trt(ctx, pc, "small")


# --- helpers ----------------------------------------------------------------------------------------

def _build_result(step: Step, art: Path) -> dict:
    """The build's outcome: status, the exact error line, and each engine's targets and size."""
    engines = {}
    for sidecar in sorted((art / "engines").glob("*/*.json")):
        s = _json_file(sidecar) or {}
        engines[s.get("stage", sidecar.stem)] = {"compute_capabilities": s.get("compute_capabilities"),
                                                 "plan_bytes": s.get("plan_bytes"), "build_s": s.get("build_seconds")}
    return {"status": step.status, "error": step.reason, "engines": engines}


def _validate_summary(step: Step) -> dict | None:
    """{"passed", "backends": {name: {"passed", "worst_stage_max_abs", "mask_iou"}}, "report"} from --json."""
    try:
        report = json.loads(step.stdout)
    except ValueError:
        return None
    out = {"passed": bool(report.get("passed")), "backends": {}, "report": report}
    for name, r in report.get("backends", {}).items():
        errs = [s.get("max_abs") for s in r.get("stages", []) if isinstance(s.get("max_abs"), (int, float))]
        out["backends"][name] = {"passed": bool(r.get("passed")), "worst_stage_max_abs": max(errs, default=None),
                                 "mask_iou": r.get("mask_iou")}
    return out


def _write_sample_image(path: Path) -> None:
    """exporter.export.sample_image as a PNG (a subprocess: the check's own process stays free of torch)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    code = ("import sys; from PIL import Image; from exporter.export import sample_image; "
            "Image.fromarray(sample_image()).save(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(path)], check=False, cwd=ROOT, timeout=120,
                   capture_output=True)


# (name, function, cap s, minimum s to start, needs a GPU)
PARTS = (
    ("machine", machine, 60.0, 0.0, False),
    ("trt_tiny", lambda ctx, pc: trt(ctx, pc, "tiny"), 150.0, 30.0, False),
    ("gpu_tests", gpu_tests, 150.0, 40.0, True),
    ("torch_bench", torch_bench, 200.0, 60.0, True),
    ("trt_small", trt_small, 150.0, 60.0, True),
)


def part_names() -> list[str]:
    return [p[0] for p in PARTS]
