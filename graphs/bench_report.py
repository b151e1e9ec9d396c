"""`csprt bench` results: one record per (schedule, backend), ratios between them, the JSON contract.

No torch and no runtime here: measurement lives in `exporter/bench.py` (torch) and `engines/bench.py`
(artifact pipelines); this module turns their raw timings into the report `--json` writes, checked
against `bench.schema.json`.

Conventions:
- Latencies are milliseconds; each is summarised as {median, p90, min, n} over the timed repeats.
- "llm" is the LLM prefill: the reference's `llm` span, or the sum of a pipeline's `embed`, `entry_<i>` and `llm_<i>`
  stages.
- FLOPs are `graphs.flops.flops_report` (what `csprt flops` prints): multiply-accumulates. Achieved
  TFLOP/s counts 2 FLOPs per MAC in the SwiGLU convention (LLaMA's real FFN), so it is comparable
  with a device's datasheet peak.
- Ratios come from records of the same run only: schedule vs `full` on one backend, backend vs
  `torch` on one schedule.
"""

from __future__ import annotations

import json
import statistics
from functools import lru_cache
from pathlib import Path

import numpy as np

from graphs.errors import internal_error
from graphs.flops import flops_report
from graphs.schedule import Schedule
from graphs.shapes import ModelShape

SCHEMA = "csprt-bench/1"
SCHEMA_PATH = Path(__file__).with_name("bench.schema.json")

# Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's datasheets, by device-name substring.
# Used only for "fraction of peak"; an unknown device reports None rather than a guess.
GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0,
}

HOST_SPANS = ("preprocess", "postprocess")  # host work around the pipeline, not between its stages


def span_of(stage: str) -> str:
    """The reference span a pipeline stage belongs to, so backends compare stage by stage."""
    if stage.startswith(("llm_", "entry_")) or stage == "embed":  # the prefill: blocks, entry ops, embedding
        return "llm"
    if stage == "decode":
        return "llm_decode"
    if stage == "seg_gather":
        return "seg_head"
    return stage


def stats(values: list[float]) -> dict:
    """{median, p90, min, n} of a non-empty list of milliseconds (p90: nearest rank)."""
    if not values:
        raise internal_error("stats() of no values")
    vals = sorted(float(v) for v in values)
    rank = max(0, min(len(vals) - 1, -(-9 * len(vals) // 10) - 1))
    return {"median": statistics.median(vals), "p90": vals[rank], "min": vals[0], "n": len(vals)}


def peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in sorted(GPU_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in device_name:
            return value
    return None


def make_record(*, schedule: Schedule, shape: ModelShape, backend: str, device: str, text_tokens: int,
                image_tokens_per_layer: list[int], runs: list[dict[str, float]], e2e_ms: list[float],
                pipeline_ms: list[float] | None = None, peak_memory_mib: float | None = None,
                device_name: str | None = None, decode_steps: int | None = None, batch: int = 1,
                quantization: str = "none", weights: dict | None = None) -> dict:
    """One (schedule, backend, batch) record from per-repeat timings.

    Args:
        runs: one dict per timed repeat, stage (or span) name -> ms.
        e2e_ms: wall time of each repeat, image in to masks out.
        pipeline_ms: pipeline backends: the wall time of `Pipeline.run` per repeat, so the runtime's own
            cost between stages is `pipeline - sum(stages)`. None for the torch reference.
        batch: requests per run (every timing is the whole batch's). Defaults to 1.
        quantization: how the LLM blocks are quantized ("int8/ort", ...; `graphs.quantize`), "none" for float.
        weights: the artifact's weight bytes ({"stages": {name: bytes}, "llm", "total"}), None for torch.
    """
    names = sorted({k for r in runs for k in r})
    stages = {k: stats([r.get(k, 0.0) for r in runs]) for k in names}
    spans: dict[str, list[float]] = {}
    for r in runs:
        per: dict[str, float] = {}
        for k, v in r.items():
            per[span_of(k)] = per.get(span_of(k), 0.0) + v
        for k, v in per.items():
            spans.setdefault(k, []).append(v)
    report = flops_report(shape, schedule, text_tokens=text_tokens)
    llm = stats(spans["llm"]) if "llm" in spans else None
    e2e = stats(e2e_ms)
    flops2 = {k: 2 * batch * v["swiglu"] for k, v in report["flops"].items()}  # the batch's
    achieved = {"llm": flops2["llm"] / llm["median"] / 1e9 if llm else None,
                "end_to_end": flops2["total"] / e2e["median"] / 1e9}
    peak = peak_tflops(device_name) if device.startswith("cuda") else None
    record = {
        "schedule": schedule.name, "backend": backend, "device": device, "device_name": device_name,
        "batch": batch, "images_per_s": 1e3 * batch / e2e["median"] if e2e["median"] else None,
        "text_tokens": text_tokens,
        "image_tokens_per_layer": [int(n) for n in image_tokens_per_layer],
        "avg_image_tokens_per_layer": sum(image_tokens_per_layer) / max(1, len(image_tokens_per_layer)),
        "stages_ms": stages,
        "spans_ms": {k: stats(v) for k, v in spans.items()},
        "llm_ms": llm,
        "end_to_end_ms": e2e,
        "overhead": None,
        "flops": report["flops"],
        "flops_reduction_pct": {"image_tokens": report["image_token_flops_reduction_pct"],
                                "llm": report["llm_flops_reduction_pct"],
                                "total": report["total_flops_reduction_pct"]},
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "peak_fraction": {k: (v / peak if (peak and v) else None) for k, v in achieved.items()},
        "peak_memory_mib": peak_memory_mib,
        "decode_steps": decode_steps,
        "quantization": quantization,
        "weights": weights,
    }
    if pipeline_ms is not None:
        between = [p - sum(v for k, v in r.items() if k not in HOST_SPANS) for p, r in zip(pipeline_ms, runs)]
        med = statistics.median(pipeline_ms)
        record["overhead"] = {"pipeline_ms": stats(pipeline_ms), "between_stages_ms": stats([max(0.0, b) for b in between]),
                              "between_stages_pct": 100.0 * max(0.0, statistics.median(between)) / med if med else 0.0}
    return record


def ratios(records: list[dict]) -> dict:
    """Pairwise ratios within one run.

    Returns:
        {"schedule_vs_full": {backend: {schedule: {...}}}, "backend_vs_torch": {schedule: {backend: {...}}},
         "schedule_vs_full_by_batch": {backend: {batch: {schedule: {...}}}}}: the first two at the smallest batch
        measured, the last at every batch (with images/s); with quantized records also "quantized_vs_float":
        {backend: {schedule: {llm_speedup, end_to_end_speedup, llm_weight_ratio}}} against the float record of the
        same schedule and backend at the smallest batch. Backends are `label`s (the backend, with its
        quantization). A speedup is baseline median / this median (>1 is faster). Pairs whose baseline was not
        measured are absent.
    """
    by_batch: dict[str, dict] = {}
    for r in records:
        base = next((b for b in records if (b["schedule"], label(b), b.get("batch", 1)) ==
                     ("full", label(r), r.get("batch", 1))), None)
        if base is not None:
            by_batch.setdefault(label(r), {}).setdefault(str(r.get("batch", 1)), {})[r["schedule"]] = {
                "llm_speedup": _speedup(base["llm_ms"], r["llm_ms"]),
                "end_to_end_speedup": _speedup(base["end_to_end_ms"], r["end_to_end_ms"]),
                "images_per_s": r.get("images_per_s"),
                "llm_flops_bound_speedup": _bound(r["flops_reduction_pct"]["llm"]),
            }
    least = min((r.get("batch", 1) for r in records), default=1)
    by = {(r["schedule"], label(r)): r for r in records if r.get("batch", 1) == least}
    vs_full: dict[str, dict] = {}
    vs_torch: dict[str, dict] = {}
    vs_float: dict[str, dict] = {}
    for (sched, backend), r in by.items():
        base = by.get(("full", backend))
        if base is not None:
            red = r["flops_reduction_pct"]["llm"]
            vs_full.setdefault(backend, {})[sched] = {
                "llm_speedup": _speedup(base["llm_ms"], r["llm_ms"]),
                "end_to_end_speedup": _speedup(base["end_to_end_ms"], r["end_to_end_ms"]),
                "llm_flops_reduction_pct": red,
                "llm_flops_bound_speedup": _bound(red),
            }
        ref = by.get((sched, "torch"))
        if ref is not None:
            vs_torch.setdefault(sched, {})[backend] = {
                "llm_speedup": _speedup(ref["llm_ms"], r["llm_ms"]),
                "end_to_end_speedup": _speedup(ref["end_to_end_ms"], r["end_to_end_ms"]),
            }
        fp = by.get((sched, r["backend"]))
        if r.get("quantization", "none") != "none" and fp is not None:
            w, fw = r.get("weights"), fp.get("weights")
            vs_float.setdefault(backend, {})[sched] = {
                "llm_speedup": _speedup(fp["llm_ms"], r["llm_ms"]),
                "end_to_end_speedup": _speedup(fp["end_to_end_ms"], r["end_to_end_ms"]),
                "llm_weight_ratio": w["llm"] / fw["llm"] if w and fw and fw["llm"] else None,
            }
    out = {"schedule_vs_full": vs_full, "backend_vs_torch": vs_torch, "schedule_vs_full_by_batch": by_batch}
    if vs_float:
        out["quantized_vs_float"] = vs_float
    return out


def label(record: dict) -> str:
    """The backend of a record, with its quantization when the graphs are quantized: "onnxruntime int8/ort"."""
    q = record.get("quantization", "none")
    return record["backend"] if q == "none" else f"{record['backend']} {q}"


def _bound(llm_reduction_pct: float) -> float | None:
    return 100.0 / (100.0 - llm_reduction_pct) if llm_reduction_pct < 100 else None


def _speedup(base: dict | None, this: dict | None) -> float | None:
    if not base or not this or not this["median"]:
        return None
    return base["median"] / this["median"]


def make_report(*, config: dict, machine: dict, records: list[dict], scaling: list[dict] | None = None) -> dict:
    report = {"schema": SCHEMA, "config": config, "machine": machine, "records": records,
              "ratios": ratios(records), "scaling": scaling or []}
    check_report(report)
    return report


@lru_cache(maxsize=1)
def _schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def check_report(report: dict) -> None:
    """Raise if `report` does not follow bench.schema.json (a bug here, never user input)."""
    import jsonschema

    try:
        jsonschema.validate(report, _schema())
    except jsonschema.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path)
        raise internal_error(f"bench report violates {SCHEMA_PATH.name} at /{path}: {exc.message}") from None


def bench_image(h: int = 480, w: int = 640) -> np.ndarray:
    """A fixed random photo-sized image (random pixels: no stage can short-cut on constant input)."""
    return np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
