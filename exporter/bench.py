"""Torch-eager latency of the reference under each schedule, at any model shape with random weights.

Speed does not depend on weight values, so real shapes (`lisa-7b`) are measured without real
weights. The prompt is synthetic ids of the requested text length with one [SEG] answer token.
Timings use CUDA events per stage when on a GPU (host clock otherwise); ratios are taken within
one run.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import numpy as np
import torch

from exporter.checkpoint import build_random
from exporter.reference import Reference
from graphs.flops import flops_report
from graphs.preprocessing import default_clip_processor_config
from graphs.prompt import PromptIds
from graphs.schedule import resolve
from graphs.shapes import ModelShape


def synthetic_prompt(shape: ModelShape, text_tokens: int, mode: str) -> PromptIds:
    """Ids in the vocab's lower range; [SEG] is the last vocab id, answered as `[SEG] .` in single-pass."""
    seg, eos = shape.llm.vocab - 1, 2
    prefix_len = max(2, text_tokens // 3)
    suffix = list(range(100, 100 + text_tokens - prefix_len))
    if mode == "single-pass":
        suffix = suffix[:-2] + [seg, 29]  # "[SEG]" then any ordinary token
    return PromptIds(prefix=[1] + list(range(10, 9 + prefix_len)), suffix=suffix, seg_token_id=seg, eos_token_id=eos)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_schedules(shape: ModelShape, schedules: list[str], device: str = "cpu", dtype=torch.float32,
                    text_tokens: int = 40, repeat: int = 10, warmup: int = 3, mode: str = "single-pass",
                    max_new_tokens: int = 16, progress=None) -> dict:
    """Median and p90 per stage and end to end for each schedule, from one model and one run.

    Returns:
        dict: {"shape", "device", "dtype", "text_tokens", "mode", "results": {schedule: {...}}}.
    """
    say = progress or (lambda msg: print(f"[csprt bench] {msg}", file=sys.stderr, flush=True))
    say(f"building random weights ({shape.llm.layers} layers, H={shape.llm.hidden}) on {device}")
    model = build_random(shape, dtype=dtype, device=device)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)  # random pixels, never zeros
    ids = synthetic_prompt(shape, text_tokens, mode)
    results = {}
    for name in schedules:
        sched = resolve(name, shape.llm.layers, shape.num_image_tokens)
        ref = Reference(model, None, default_clip_processor_config(shape.vision.image_size), sched)
        say(f"{name}: warm-up x{warmup}, timed x{repeat}")
        for _ in range(warmup):
            ref(image, ids, mode=mode, max_new_tokens=max_new_tokens)
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        per_stage: dict[str, list[float]] = {}
        totals = []
        for _ in range(repeat):
            _sync(device)
            t0 = time.perf_counter()
            out = ref(image, ids, mode=mode, max_new_tokens=max_new_tokens)
            _sync(device)
            totals.append(1e3 * (time.perf_counter() - t0))
            for k, v in out.timings_ms.items():
                per_stage.setdefault(k, []).append(v)
        rep = flops_report(shape, sched, text_tokens=text_tokens)
        results[name] = {
            "avg_image_tokens_per_layer": sched.avg_image_tokens(),
            "image_tokens_per_layer": out.image_tokens_per_layer,
            "llm_flops_fastv": rep["flops"]["llm"]["fastv"],
            "image_token_flops_reduction_pct": rep["image_token_flops_reduction_pct"],
            "stages_ms": {k: _stats(v) for k, v in per_stage.items()},
            "end_to_end_ms": _stats(totals),
            "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30) if torch.device(device).type == "cuda" else None,
        }
        say(f"{name}: llm {results[name]['stages_ms']['llm']['median']:.2f} ms, "
            f"end-to-end {results[name]['end_to_end_ms']['median']:.2f} ms")
    base = results.get("full")
    if base:
        for r in results.values():
            r["llm_speedup_vs_full"] = base["stages_ms"]["llm"]["median"] / r["stages_ms"]["llm"]["median"]
            r["end_to_end_speedup_vs_full"] = base["end_to_end_ms"]["median"] / r["end_to_end_ms"]["median"]
    return {"shape": dataclasses.asdict(shape), "device": str(device), "dtype": str(dtype), "text_tokens": text_tokens,
            "mode": mode, "repeat": repeat, "results": results}


def _stats(values: list[float]) -> dict:
    vals = sorted(values)
    return {"median": statistics.median(vals), "p90": vals[min(len(vals) - 1, int(0.9 * len(vals)))],
            "min": vals[0]}


@torch.no_grad()
def bench_llm_graphs(shape: ModelShape, schedules: list[str], text_tokens: int = 40, reps: int = 50,
                     dtype=torch.float16) -> dict:
    """LLM-part floor on a GPU: each stage's decoder layers at its static token count, replayed as one CUDA graph.

    Selection ops are left out; what remains is what a launch-gap-free runtime (TensorRT, CUDA
    graphs) pays per schedule. Also measures the two ceilings: a device copy the size of the
    decoder weights (the weight-read floor) and an 8192^3 matmul.
    """
    from exporter.reference import causal_mask

    model = build_random(shape, dtype=dtype, device="cuda")
    layers = model.llm.model.layers

    def stage_fn(stage):
        t = text_tokens + stage.budget
        h = torch.randn(1, t, shape.llm.hidden, device="cuda", dtype=dtype)
        pos = torch.arange(t, device="cuda")[None]
        cos, sin = model.llm.model.rotary_emb(h, pos)
        mask = causal_mask(t, dtype, "cuda")

        def fn():
            x = h
            for i in stage.layers:
                x = layers[i](x, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
            return x
        return fn

    results = {}
    for name in schedules:
        sched = resolve(name, shape.llm.layers, shape.num_image_tokens)
        per = {st.name: graph_median_ms(stage_fn(st), reps) for st in sched.stages}
        total = sum(per.values())
        flops = 2 * flops_report(shape, sched, text_tokens=text_tokens)["flops"]["llm"]["fastv"]  # MACs -> FLOPs
        results[name] = {"stages_ms": per, "llm_ms": total, "achieved_tflops": flops / total / 1e9}
    for r in results.values():
        r["speedup_vs_full"] = results["full"]["llm_ms"] / r["llm_ms"] if "full" in results else None
    nbytes = sum(p.numel() * p.element_size() for p in layers.parameters())
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = graph_median_ms(lambda: dst.copy_(src), reps)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    mm_ms = graph_median_ms(lambda: a @ a, 20)
    return {"results": results, "decoder_weight_gib": nbytes / 2**30, "weight_copy_ms": copy_ms,
            "weight_read_floor_ms": copy_ms / 2, "matmul_tflops": 2 * 8192**3 / mm_ms / 1e9}


def graph_median_ms(fn, reps: int) -> float:
    """Median of `reps` replays of `fn` captured as a CUDA graph, timed with CUDA events."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside capture: allocator, cuBLAS handles
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
