"""GPU acceptance in one command: what csprt's GPU path must prove, within a time budget (default 420 s).

    python -m tools.gpu_check [--out DIR] [--budget S] [--tiny DIR] [--work DIR] [--parts a,b]   ($OUT by default)

    part         what it runs                                                                     needs
    machine      GPU, CC, driver, torch, CUDA, TensorRT targets, package versions, csprt imports  -
    trt_tiny     tiny artifact: build --compute-capability current, run (both modes),              GPU for tensorrt;
                 validate --backends onnxruntime,tensorrt, bench --backends onnxruntime,tensorrt  else onnxruntime only
                 then decode: tools.gpu_decode (block engines' decode profile, CUDA graph replay)  GPU
                 then weights: tools.gpu_weights (weight-free engines vs full: load, latency)       GPU
    gpu_tests    pytest -m gpu on the test files that have the marker                             GPU
    torch_bench  bench --shape lisa-7b --backends torch --device cuda: full,csp; batch 8 when      GPU
                 bench has --batch; the other presets and the CUDA-graph LLM floor if time allows
    trt_small    trt_tiny's steps on the `small` shape, when trt_tiny passed                      GPU, trt_tiny

Writes $OUT/gpu_check.json (graphs/gpu_check.schema.json) and $OUT/gpu_check.log, prints a summary.
Every part has a cap; a part, or a step, that would start with too little time left is skipped with one
line saying so, and the check stops itself before the total budget. On a machine without a GPU it runs
what it can (the onnxruntime half of trt_tiny) and skips the rest. Exit 0 when no step failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from tools.gpu_parts import PARTS, Context, part_names
from tools.gpu_steps import Clock, Log

SCHEMA = "csprt-gpu-check/1"
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "graphs" / "gpu_check.schema.json"
DEFAULT_BUDGET_S = 420.0  # 7 min: the device command also unpacks wheels, and must end before 8 min


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="where the JSON and log go. Defaults to $OUT.")
    p.add_argument("--work", type=Path, default=None,
                   help="scratch directory (artifacts, engines, step output). Defaults to a new temporary one.")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help=f"seconds in all. Defaults to "
                                                                          f"{DEFAULT_BUDGET_S:.0f}.")
    p.add_argument("--tiny", type=Path, default=None,
                   help="a directory with checkpoint/ (csprt make-tiny) and artifact/ (csprt export --schedule csp "
                        "--mode both) to use instead of making them")
    p.add_argument("--parts", default=None, help=f"comma list of {', '.join(part_names())}. Defaults to all.")
    p.add_argument("--repeat", type=int, default=10, help="timed repeats of each bench. Defaults to 10.")
    return p.parse_args(argv)


def _problem(args: argparse.Namespace) -> str | None:
    if args.out is None:
        return "no output directory: set $OUT or pass --out DIR"
    if not args.budget > 0 or args.repeat < 1:
        return f"--budget must be > 0 and --repeat >= 1 (got {args.budget}, {args.repeat})"
    if args.tiny is not None and not ((args.tiny / "checkpoint" / "config.json").is_file()
                                      and (args.tiny / "artifact" / "manifest.json").is_file()):
        return (f"--tiny {args.tiny}: expected checkpoint/config.json and artifact/manifest.json in it (csprt "
                "make-tiny DIR/checkpoint, then csprt export DIR/checkpoint --schedule csp --mode both --out "
                "DIR/artifact)")
    bad = [p for p in (args.parts or "").split(",") if p and p not in part_names()]
    if bad:
        return f"--parts: unknown {', '.join(bad)}; choose from {', '.join(part_names())}"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.out is None and os.environ.get("OUT"):
        args.out = Path(os.environ["OUT"])
    problem = _problem(args)
    if problem:
        print(f"gpu_check: error: {problem}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = None
    if args.work is None:
        import tempfile

        tmp = args.work = Path(tempfile.mkdtemp(prefix="csprt-gpu-check-"))
    try:
        report = run_check(args)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(format_summary(report))
    failed = [f"{p['name']}/{s['name']}" for p in report["parts"] for s in p["steps"]
              if s["status"] in ("failed", "timeout")]
    return 1 if failed else 0


def run_check(args: argparse.Namespace) -> dict:
    """Run the parts in order within the budget; write and return the report."""
    clock = Clock(args.budget)
    log = Log(args.out / "gpu_check.log")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    wanted = ["machine"] + [p for p in (args.parts or ",".join(part_names())).split(",") if p]  # machine: always
    ctx = Context(clock=clock, log=log, work=args.work, tiny=args.tiny, repeat=args.repeat)
    log.say(f"budget {args.budget:.0f} s; parts {', '.join(wanted)}; work {args.work}")
    parts = []
    for name, fn, cap_s, min_s, needs_gpu in PARTS:
        if name not in wanted:
            continue
        left = clock.left()
        reason = ctx.no_gpu() if needs_gpu and ctx.gpu is None else (
            f"{max(left, 0):.0f} s left of the {args.budget:g} s budget; it needs at least {min_s:g} s" if left < min_s
            else None)
        if reason:
            part = {"name": name, "status": "skipped", "reason": reason, "budget_s": 0.0, "wall_s": 0.0,
                    "steps": [], "results": {}}
            log.say(f"{name}: skipped: {reason}")
        else:
            part = fn(ctx, clock.part(name, cap_s))
        ctx.done[name] = part
        parts.append(part)
    report = {
        "schema": SCHEMA, "started": started, "wall_s": round(clock.elapsed(), 1), "budget_s": args.budget,
        "command": " ".join([Path(sys.executable).name, "-m", "tools.gpu_check", *sys.argv[1:]]),
        "machine": ctx.done.get("machine", {}).get("results", {}).get("machine"),
        "parts": parts,
        "skipped": [f"{p['name']}: {p['reason']}" for p in parts if p["status"] == "skipped"]
                   + [f"{p['name']}/{s['name']}: {s['reason']}" for p in parts for s in p["steps"]
                      if s["status"] == "skipped"],
    }
    from graphs.atomic import write_json

    write_json(report, args.out / "gpu_check.json")
    log.say(f"wrote {args.out / 'gpu_check.json'} ({clock.elapsed():.0f} s)")
    check_gpu_report(report)
    return report


def check_gpu_report(report: dict) -> None:
    """Raise if `report` does not follow gpu_check.schema.json, or a bench report in it bench.schema.json."""
    import jsonschema

    from graphs.bench_report import check_report
    from graphs.errors import internal_error

    try:
        jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))
    except jsonschema.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path)
        raise internal_error(f"gpu_check report violates {SCHEMA_PATH.name} at /{path}: {exc.message}") from None
    for part in report["parts"]:
        for bench in part["results"].get("bench", {}).values():
            check_report(bench)


def format_summary(report: dict) -> str:
    """Parts with status, time and the line that matters; then every bench table and every skip."""
    from tools.bench import format_table

    lines = [f"{'part':<12} {'status':<8} {'wall s':>7}  notes"]
    for p in report["parts"]:
        lines.append(f"{p['name']:<12} {p['status']:<8} {p['wall_s']:>7.1f}  {p.get('note') or p.get('reason') or ''}")
        for s in p["steps"]:
            if s["status"] != "passed":
                lines.append(f"{'':<12} {s['status']:<8} {s['wall_s']:>7.1f}  {s['name']}: {s['reason']}")
    for p in report["parts"]:
        for name, bench in p["results"].get("bench", {}).items():
            lines += ["", f"{p['name']} / {name}:", format_table(bench)]
    if report["skipped"]:
        lines += ["", "skipped:"] + [f"  {s}" for s in report["skipped"]]
    lines.append(f"\n{report['wall_s']:.0f} s of {report['budget_s']:.0f} s; finished "
                 f"{time.strftime('%H:%M:%S')}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
