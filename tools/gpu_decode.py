"""Decode steps of a built artifact's block engines on TensorRT: the decode profile and CUDA graphs, timed.

    python -m tools.gpu_decode ART [--steps 32] [--json PATH]     (a CUDA GPU and engines from csprt build)

For every block a decode loop runs (`Layout.decodes`), one generate run on ONNX Runtime records the first
decode step's feed; then `--steps` one-row calls of the block's TensorRT engine run over a fresh static cache of
the request's capacity (bound in place, past_len advancing), three ways, each in a runner of its own:

    decode   the runner as the Pipeline has it: the decode profile (profile 1), CUDA graphs on
    plain    the decode profile, CUDA graphs off (the reference the other two are compared with)
    shared   profile 0 only, CUDA graphs on: how an engine built with one profile for prefill and decode runs
             its steps (the runner keeps only profile 0's context; the same plan)

Prints (and writes with --json) {"artifact", "flavor", "trt_version", "steps", "blocks": {block: {"profiles",
"profile_names", "capacity", "ways": {way: {"profile_used", "graph_mode", "engine_hidden_profiles",
"activation_bytes", "context_memory_bytes", "median_ms", "first_ms", "replays", "capture_disabled",
"max_abs_diff"}}}}}: median_ms over the steps after the first two (a plain call and the
capture), GPU time between the runner's own events; max_abs_diff against `plain`, over every output of every step.
`tools.gpu_check` runs it after each TensorRT build (parts trt_tiny and trt_small).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

WAYS = {"decode": (True, False), "plain": (False, False), "shared": (True, True)}  # way -> (graphs, profile 0 only)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_decode", description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path, help="a generate-mode artifact with TensorRT engines (csprt build)")
    p.add_argument("--steps", type=int, default=32, help="decode steps per way. Defaults to 32.")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here. Defaults to stdout only.")
    return p.parse_args(argv)


def recorded_step_feeds(art: Path) -> dict:
    """Each decode step's first feed (host arrays) from one generate run on ONNX Runtime."""
    from engines.session import ArtifactSession
    from exporter.export import sample_image
    from exporter.tiny import SEG_QUERY

    with ArtifactSession(art) as ort:
        result = ort.segment(sample_image(), SEG_QUERY, mode="generate", max_new_tokens=8, record=True)
    return result.pipeline.feeds


def step_feed(stage, recorded: dict, steps: int, cache_max: int):
    """The recorded feed on the device with a zero cache of capacity past_len + steps (at most the dim's max)."""
    import torch

    feed = {k: torch.from_numpy(v).cuda() for k, v in recorded.items()}
    valid = int(recorded["past_len"].max())
    capacity = min(valid + steps, cache_max)
    for name, _ in stage.cache:
        b, kv, _, hd = feed[name].shape
        feed[name] = torch.zeros((b, kv, capacity, hd), dtype=feed[name].dtype, device="cuda")
    return feed, valid, capacity


def run_way(art: Path, stage, feed: dict, valid: int, steps: int, graphs: bool, shared: bool) -> tuple[dict, list]:
    """`steps` one-row calls of `stage`'s engine; (record, outputs per step as host arrays)."""
    import torch

    from engines.trt_runner import TrtRunner

    outs, ms, used = [], [], set()
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    with TrtRunner(stage, art, cuda_graphs=graphs) as r:
        # device memory the activation took: weights, one context per profile (each with its own scratch memory
        # unless they share it) and the I/O buffers; the cache is the caller's
        activation_bytes = free_before - torch.cuda.mem_get_info()[0]
        if shared:  # what a one-profile engine does: every call on profile 0 (a measurement, not a runtime option)
            r.profiles, r._contexts = r.profiles[:1], r._contexts[:1]
        stream = torch.cuda.Stream()
        batch = feed["past_len"].shape[0]
        for i in range(steps):
            feed["past_len"] = torch.full((batch,), valid + i, dtype=torch.int64, device="cuda")
            views = r.enqueue(feed, stream)
            stream.synchronize()
            start, end = r.last_events
            ms.append(float(start.elapsed_time(end)))
            used.add(r._contexts.index(r._context))
            outs.append({n: v.float().cpu().numpy() for n, v in views.items()})
        engine = r._engine  # what the plan itself says of its profiles: (min, opt, max) of `hidden` per profile
        shapes = [[list(s) for s in engine.get_tensor_profile_shape("hidden", i)]
                  for i in range(engine.num_optimization_profiles)]
        record = {"profile_used": sorted(used), "graph_mode": r.graph_mode, "engine_hidden_profiles": shapes,
                  "activation_bytes": int(activation_bytes),
                  "context_memory_bytes": getattr(engine, "device_memory_size_v2", None),
                  "median_ms": round(statistics.median(ms[2:] or ms), 4), "first_ms": round(ms[0], 4),
                  "replays": r.graphs.replays, "capture_disabled": r.graphs.disabled or None}
    return record, outs


def _max_diff(outs: list, ref: list) -> float:
    import numpy as np

    return max((float(np.abs(a[n] - b[n]).max()) for a, b in zip(outs, ref) for n in b if b[n].size), default=0.0)


def measure(art: Path, steps: int) -> dict:
    """The report (see the module doc)."""
    import torch

    from engines.engine_check import check_engine
    from engines.trt import load_trt
    from graphs.errors import ToolchainError
    from graphs.manifest import load_artifact

    if not torch.cuda.is_available():
        raise ToolchainError("needs a CUDA GPU (torch sees none); run it on the GPU machine")
    layout = load_artifact(art).layout
    if layout.loop is None:
        raise ToolchainError(f"{art} has no generate mode; export it with --mode both (or generate)")
    _, flavor, version = load_trt("auto")
    feeds = recorded_step_feeds(art)
    report = {"artifact": str(art), "flavor": flavor, "trt_version": version, "steps": steps, "blocks": {}}
    for step in layout.loop.steps:
        if not step.cache:
            continue
        stage = layout.stage(step.graph_name)
        _, sidecar = check_engine(art, stage.name, flavor, version)
        block = report["blocks"][stage.name] = {"profiles": len(sidecar["profiles"]),
                                                "profile_names": sidecar.get("profile_names", ["all"])}
        if step.name not in feeds:
            block["skipped"] = "no decode step ran in the recorded generate run (it stopped at its first token)"
            continue
        cache_dim = stage.input(stage.cache[0][0]).shape[2]
        feed, valid, capacity = step_feed(stage, feeds[step.name], steps, layout.dims[cache_dim].max)
        block["capacity"] = capacity
        n = max(1, min(steps, capacity - valid))
        ways, outs = {}, {}
        for way in ("plain", "decode", "shared"):
            graphs, shared = WAYS[way]
            ways[way], outs[way] = run_way(art, stage, feed, valid, n, graphs, shared)
        for way in ways:
            ways[way]["max_abs_diff"] = _max_diff(outs[way], outs["plain"])
        block["ways"] = ways
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.steps < 3:
        print(f"gpu_decode: error: --steps {args.steps}: need at least 3 (a plain call, the capture, a replay)",
              file=sys.stderr)
        return 2
    from tools.gpu_steps import print_report

    return print_report("gpu_decode", lambda: measure(args.artifact, args.steps), args.json)


if __name__ == "__main__":
    sys.exit(main())
