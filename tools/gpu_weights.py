"""Weight-free engines against full ones on a GPU: load time, stage latency, outputs (issue 19's GPU figures).

    python -m tools.gpu_weights ART [--repeat 20] [--json PATH]     (a CUDA GPU and ART's engines from csprt build)

ART's engines are the full ones. A hard-link copy of ART (`ART.weight-free`, graphs shared, not copied) gets
`csprt build --weights-as-inputs` for the same targets; one single-pass run on ONNX Runtime records every stage's
feed; then, for every stage whose weight-free engine takes weights as inputs, each engine in turn is loaded in a
fresh `TrtRunner` and called `--repeat` times on that feed:

    full         TrtRunner(stage, ART): deserialize the plan (weights inside)
    weight_free  TrtRunner(stage, ART.weight-free): deserialize the small plan, read + upload + bind the weights

Prints (and writes with --json) {"artifact", "flavor", "trt_version", "repeat", "stages": {stage: {"weight_bytes",
"full": {...}, "weight_free": {...}, "max_abs_diff"}}, "totals": {"full": {...}, "weight_free": {...}}}; each
engine's record: "plan_bytes", "load_s" (the whole activation, wall clock, synchronized), "deserialize_s",
"weights_s" (`TrtRunner.load_report`), "activation_bytes" (device memory the activation took), "median_ms" and
"first_ms" (GPU time between the runner's events; the median over the calls after the first). max_abs_diff:
weight-free outputs against full ones, every output, same feed. The first stage loaded also pays CUDA's and
TensorRT's own start-up: both engines of a stage load in the same order (full first), so compare stage by stage.
`tools.gpu_check` runs it after each TensorRT build (parts trt_tiny and trt_small).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_weights", description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path, help="an artifact with full TensorRT engines (csprt build)")
    p.add_argument("--repeat", type=int, default=20, help="timed calls per engine. Defaults to 20.")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here. Defaults to stdout only.")
    return p.parse_args(argv)


def weight_free_copy(art: Path, flavor: str, targets: list[str] | None) -> Path:
    """`ART.weight-free`: ART's files hard-linked (engines left out), built with --weights-as-inputs for `targets`
    (TensorRT-RTX compute capabilities; None for TensorRT)."""
    from engines.build import build_engines

    src = art.resolve()
    dst = art.parent / f"{art.name}.weight-free"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=os.link, ignore=shutil.ignore_patterns("engines"))
    build_engines(dst, flavor=flavor, compute_capabilities=targets, weights_as_inputs=True,
                  progress=lambda m: print(f"[gpu_weights] {m}", file=sys.stderr, flush=True))
    return dst


def recorded_feeds(art: Path) -> dict:
    """Every stage's feed (host arrays) from one single-pass run on ONNX Runtime."""
    from engines.session import ArtifactSession
    from exporter.export import sample_image
    from exporter.tiny import SEG_QUERY

    with ArtifactSession(art) as ort:
        result = ort.segment(sample_image(), SEG_QUERY, mode="single-pass", record=True)
    return result.pipeline.feeds


def load_and_run(art: Path, stage, feed: dict, repeat: int) -> tuple[dict, dict]:
    """(record, outputs as host arrays) of one engine: a fresh runner loaded, then `repeat` calls on `feed`."""
    import torch

    from engines.trt_runner import TrtRunner

    device_feed = {k: torch.from_numpy(v).cuda() for k, v in feed.items()}
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    runner = TrtRunner(stage, art)
    t0 = time.perf_counter()
    runner.activate()
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    try:
        activation_bytes = free_before - torch.cuda.mem_get_info()[0]
        stream, ms = torch.cuda.Stream(), []
        for _ in range(repeat):
            views = runner.enqueue(device_feed, stream)
            stream.synchronize()
            start, end = runner.last_events
            ms.append(float(start.elapsed_time(end)))
        outs = {n: v.float().cpu().numpy() for n, v in views.items()}
        record = {**runner.load_report, "load_s": round(load_s, 4), "activation_bytes": int(activation_bytes),
                  "median_ms": round(statistics.median(ms[1:] or ms), 4), "first_ms": round(ms[0], 4)}
    finally:
        runner.deactivate()
    return record, outs


def measure(art: Path, repeat: int) -> dict:
    """The report (see the module doc)."""
    import numpy as np
    import torch

    from engines.engine_check import check_engine
    from engines.trt import load_trt
    from graphs.errors import ToolchainError
    from graphs.manifest import load_artifact

    if not torch.cuda.is_available():
        raise ToolchainError("needs a CUDA GPU (torch sees none); run it on the GPU machine")
    layout = load_artifact(art).layout
    _, flavor, version = load_trt("auto")
    for stage in layout.stages:
        check_engine(art, stage.name, flavor, version)  # full engines first: refused in one line if missing
    free_art = weight_free_copy(art, flavor, ["current"] if flavor == "tensorrt-rtx" else None)
    feeds = recorded_feeds(art)
    report = {"artifact": str(art), "flavor": flavor, "trt_version": version, "repeat": repeat, "stages": {}}
    totals = {way: {"plan_bytes": 0, "load_s": 0.0, "median_ms": 0.0} for way in ("full", "weight_free")}
    for stage in layout.stages:
        _, sidecar = check_engine(free_art, stage.name, flavor, version)
        if not sidecar.get("weight_input_bytes") or stage.name not in feeds:
            continue
        row = report["stages"][stage.name] = {"weight_bytes": sidecar["weight_input_bytes"]}
        outs = {}
        for way, where in (("full", art), ("weight_free", free_art)):
            row[way], outs[way] = load_and_run(where, stage, feeds[stage.name], repeat)
            for k in totals[way]:
                totals[way][k] = round(totals[way][k] + row[way][k], 4)
        row["max_abs_diff"] = max((float(np.abs(outs["full"][n] - outs["weight_free"][n]).max())
                                   for n in outs["full"] if outs["full"][n].size), default=0.0)
    report["totals"] = totals
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.repeat < 2:
        print(f"gpu_weights: error: --repeat {args.repeat}: need at least 2 (the first call is not timed)",
              file=sys.stderr)
        return 2
    from tools.gpu_steps import print_report

    return print_report("gpu_weights", lambda: measure(args.artifact, args.repeat), args.json)


if __name__ == "__main__":
    sys.exit(main())
