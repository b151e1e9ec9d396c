"""Benchmarking an artifact's pipeline (ONNX Runtime or TensorRT): timings per stage, the runtime's own cost.

One timed repeat = host preprocessing, `Pipeline.run`, host postprocessing, as `ArtifactSession.segment`
does, with `Pipeline.run`'s wall time kept apart so the cost between stages (wiring, checks, copies)
is `pipeline - sum(stage runner times)`. Peak memory is the process RSS sampled during the timed
repeats (CPU) or the device's high-water mark (CUDA, when torch is present).
"""

from __future__ import annotations

import time

import numpy as np

from engines.host import HostMeta
from engines.session import ArtifactSession
from graphs.bench_report import bench_image
from graphs.host_memory import PeakRss
from graphs.prompt import query_of_length


def bench_session(session: ArtifactSession, text_tokens: int, mode: str = "single-pass", repeat: int = 10,
                  warmup: int = 2, max_new_tokens: int | None = None, image: np.ndarray | None = None,
                  batch: int = 1) -> dict:
    """Time `repeat` segmentations (after `warmup`) of one artifact session, `batch` requests per run.

    Returns:
        dict with runs (stage -> ms per repeat), e2e_ms, pipeline_ms, image_tokens_per_layer,
        text_tokens (as tokenised), peak_memory_mib and decode_steps: `graphs.bench_report.make_record`'s inputs.
    """
    image = bench_image() if image is None else image
    shape = session.host.shape
    query = query_of_length(session.host.tokenizer, text_tokens, mode, shape.num_image_tokens, shape.llm.max_positions)
    session.check_mode(mode)
    if mode == "generate" and max_new_tokens is None:
        max_new_tokens = min(16, session.artifact.layout.loop.max_new_tokens)
    session.check_batch(batch)

    def once():
        t0 = time.perf_counter()
        query_feed, _ = session.host.query_batch([query] * batch, mode)
        image_feed, original_hw, resized_hw = session.host.image_batch([image] * batch)
        feed = {**query_feed, **image_feed}
        t1 = time.perf_counter()
        result = session.pipeline.run(feed, mode, max_new_tokens=max_new_tokens, context={"queries": [query] * batch})
        t2 = time.perf_counter()
        owner = result.outputs.get("seg_batch")
        masks = result.outputs.get("masks")
        for b in range(batch):  # each request's masks at its image size, as segment_batch does
            meta = HostMeta(original_hw[b], resized_hw[b], mode, None)
            session.host.masks(None if masks is None else np.asarray(masks)[np.asarray(owner) == b], meta)
        t3 = time.perf_counter()
        timings = {k: float(v) for k, v in result.timings_ms.items() if k != "decode_steps"}
        timings["preprocess"], timings["postprocess"] = 1e3 * (t1 - t0), 1e3 * (t3 - t2)
        return result, feed, timings, 1e3 * (t2 - t1), 1e3 * (t3 - t0)

    for _ in range(warmup):
        once()
    runs, e2e, pipe = [], [], []
    with PeakRss(every=0.005) as rss:
        for _ in range(repeat):
            result, feed, timings, pipeline_ms, total_ms = once()
            runs.append(timings)
            pipe.append(pipeline_ms)
            e2e.append(total_ms)
    return {
        "runs": runs, "e2e_ms": e2e, "pipeline_ms": pipe,
        "image_tokens_per_layer": session.image_tokens_per_layer(result),
        "text_tokens": int(feed["prefix_ids"].shape[-1] + feed["suffix_lens"][0]),  # request 0's
        "peak_memory_mib": rss.peak_mib,
        "decode_steps": int(result.timings_ms.get("decode_steps", 0)) if mode == "generate" else None,
    }
