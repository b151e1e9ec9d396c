"""Torch side of `csprt bench`: the eager reference's latency per stage, and the LLM-part floor on a GPU.

Speed does not depend on weight values, so real shapes (`lisa-7b`) are measured with random weights.
Stage spans synchronise the device (CUDA) before reading the host clock; ratios are taken within one run.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from exporter.checkpoint import build_random
from exporter.reference import Reference
from graphs.flops import flops_report
from graphs.preprocessing import default_clip_processor_config
from graphs.prompt import query_of_length
from graphs.schedule import resolve
from graphs.shapes import ModelShape


def random_model(shape: ModelShape, dtype=torch.float32, device: str = "cpu"):
    """Random weights of `shape` plus an offline tokenizer of its vocab: what `--shape` benchmarks run."""
    from exporter.tokenizer import build_tokenizer

    return build_random(shape, dtype=dtype, device=device), build_tokenizer(shape.llm.vocab)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def bench_torch(model, tokenizer, schedule, text_tokens: int, mode: str = "single-pass", repeat: int = 10,
                warmup: int = 2, max_new_tokens: int = 16, image: np.ndarray | None = None, batch: int = 1) -> dict:
    """Time the PyTorch reference (eager, stage by stage) under `schedule`; `batch` > 1 runs `Reference.batch`
    (either mode).

    Returns the same raw dict as `engines.bench.bench_session` (runs, e2e_ms, image_tokens_per_layer,
    text_tokens, peak_memory_mib, decode_steps; pipeline_ms None: the reference has no pipeline).
    """
    from graphs.bench_report import bench_image
    from graphs.host_memory import PeakRss

    image = bench_image() if image is None else image
    shape = model.shape
    ref = Reference(model, tokenizer, default_clip_processor_config(shape.vision.image_size), schedule)
    device = ref.device
    query = query_of_length(tokenizer, text_tokens, mode, shape.num_image_tokens, shape.llm.max_positions)
    ids = ref.prompt(query, mode)

    def once():
        if batch > 1:
            return ref.batch([image] * batch, [ids] * batch, mode=mode, max_new_tokens=max_new_tokens)[0]
        return ref(image, ids, mode=mode, max_new_tokens=max_new_tokens)

    for _ in range(warmup):
        once()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs, e2e = [], []
    with PeakRss(every=0.005) as rss:
        for _ in range(repeat):
            _sync(device)
            t0 = time.perf_counter()
            out = once()
            _sync(device)
            e2e.append(1e3 * (time.perf_counter() - t0))
            runs.append(dict(out.timings_ms))
    return {
        "runs": runs, "e2e_ms": e2e, "pipeline_ms": None,
        "image_tokens_per_layer": out.image_tokens_per_layer,
        "text_tokens": len(ids.prefix) + len(ids.suffix),
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else rss.peak_mib,
        "decode_steps": max(0, len(out.generated_ids) - 1) if mode == "generate" else None,
        "device_name": torch.cuda.get_device_name(device) if cuda else None,
    }


@torch.no_grad()
def bench_llm_graphs(shape: ModelShape, schedules: list[str], text_tokens: int = 40, reps: int = 50,
                     dtype=torch.float16, batch: int = 1) -> dict:
    """LLM-part floor on a GPU: each stage's decoder layers at its static token count, replayed as one CUDA graph.

    Selection ops are left out; what remains is what a launch-gap-free runtime (TensorRT, CUDA
    graphs) pays per schedule. Also measures the two ceilings: a device copy the size of the
    decoder weights (the weight-read floor) and an 8192^3 matmul. `batch` requests run together (static
    schedules keep a batch rectangular): where batch 1 is bound by reading the weights, batch 8 shows
    what a schedule's FLOPs cut buys once the LLM is compute-bound.
    """
    from exporter.reference import causal_mask

    model = build_random(shape, dtype=dtype, device="cuda")
    layers = model.llm.model.layers

    def stage_fn(stage):
        t = text_tokens + stage.budget
        h = torch.randn(batch, t, shape.llm.hidden, device="cuda", dtype=dtype)
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
        flops = 2 * batch * flops_report(shape, sched, text_tokens=text_tokens)["flops"]["llm"]["fastv"]  # MACs -> FLOPs
        results[name] = {"stages_ms": per, "llm_ms": total, "achieved_tflops": flops / total / 1e9,
                         "images_per_s": 1e3 * batch / total}
    for r in results.values():
        r["speedup_vs_full"] = results["full"]["llm_ms"] / r["llm_ms"] if "full" in results else None
    nbytes = sum(p.numel() * p.element_size() for p in layers.parameters())
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = graph_median_ms(lambda: dst.copy_(src), reps)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    mm_ms = graph_median_ms(lambda: a @ a, 20)
    return {"results": results, "batch": batch, "decoder_weight_gib": nbytes / 2**30, "weight_copy_ms": copy_ms,
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
