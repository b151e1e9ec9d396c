"""bench_report: statistics, records, pairwise ratios and the JSON contract, on hand-made timings."""

from __future__ import annotations

import copy

import pytest

from exporter.tiny import tiny_shape
from graphs.bench_report import check_report, make_record, make_report, peak_tflops, ratios, span_of, stats
from graphs.flops import flops_report
from graphs.schedule import resolve

SHAPE = tiny_shape()


def _record(schedule: str, backend: str, llm_ms: float, e2e_ms: float, pipeline: bool = False) -> dict:
    sched = resolve(schedule, SHAPE.llm.layers, SHAPE.num_image_tokens)
    stages = {"vision": 1.0, "llm_0": llm_ms / 2, "llm_1": llm_ms / 2} if pipeline else {"vision": 1.0, "llm": llm_ms}
    return make_record(schedule=sched, shape=SHAPE, backend=backend, device="cpu", text_tokens=30,
                       image_tokens_per_layer=sched.tokens_per_layer(), runs=[stages, stages], e2e_ms=[e2e_ms, e2e_ms],
                       pipeline_ms=[llm_ms + 1.5, llm_ms + 1.5] if pipeline else None)


def test_stats_nearest_rank_p90():
    s = stats([float(v) for v in range(1, 11)])
    assert (s["median"], s["p90"], s["min"], s["n"]) == (5.5, 9.0, 1.0, 10)
    assert stats([7.0]) == {"median": 7.0, "p90": 7.0, "min": 7.0, "n": 1}


def test_pipeline_stages_map_onto_reference_spans():
    assert [span_of(s) for s in ("llm_0", "llm_12", "decode", "seg_gather", "vision", "sam_decoder")] == \
        ["llm", "llm", "llm_decode", "seg_head", "vision", "sam_decoder"]


def test_record_sums_llm_stages_and_measures_runtime_overhead():
    r = _record("csp", "onnxruntime", llm_ms=8.0, e2e_ms=20.0, pipeline=True)
    assert r["llm_ms"]["median"] == 8.0
    assert r["spans_ms"]["llm"]["median"] == 8.0 and "llm_0" in r["stages_ms"]
    # Pipeline.run took 9.5 ms around 1 + 4 + 4 ms of stages: 0.5 ms between them.
    assert r["overhead"]["between_stages_ms"]["median"] == pytest.approx(0.5)
    assert r["overhead"]["between_stages_pct"] == pytest.approx(100 * 0.5 / 9.5)


def test_record_flops_are_csprt_flops_and_throughput_counts_two_per_mac():
    sched = resolve("csp", SHAPE.llm.layers, SHAPE.num_image_tokens)
    r = _record("csp", "torch", llm_ms=4.0, e2e_ms=10.0)
    rep = flops_report(SHAPE, sched, text_tokens=30)
    assert r["flops"] == rep["flops"]
    assert r["flops_reduction_pct"]["llm"] == rep["llm_flops_reduction_pct"]
    assert r["achieved_tflops"]["llm"] == pytest.approx(2 * rep["flops"]["llm"]["swiglu"] / 4.0 / 1e9)
    assert r["peak_fraction"] == {"llm": None, "end_to_end": None}  # no peak for a CPU
    assert r["overhead"] is None  # the reference has no pipeline


def test_ratios_are_pairwise_within_the_run():
    recs = [_record("full", "torch", 10.0, 40.0), _record("csp", "torch", 5.0, 30.0),
            _record("full", "onnxruntime", 8.0, 20.0, pipeline=True), _record("csp", "onnxruntime", 2.0, 10.0, pipeline=True)]
    out = ratios(recs)
    assert out["schedule_vs_full"]["torch"]["csp"]["llm_speedup"] == pytest.approx(2.0)
    assert out["schedule_vs_full"]["onnxruntime"]["csp"]["llm_speedup"] == pytest.approx(4.0)
    assert out["schedule_vs_full"]["onnxruntime"]["csp"]["end_to_end_speedup"] == pytest.approx(2.0)
    assert out["schedule_vs_full"]["torch"]["full"]["llm_speedup"] == pytest.approx(1.0)
    red = recs[1]["flops_reduction_pct"]["llm"]
    assert out["schedule_vs_full"]["torch"]["csp"]["llm_flops_bound_speedup"] == pytest.approx(100 / (100 - red))
    assert out["backend_vs_torch"]["csp"]["onnxruntime"]["end_to_end_speedup"] == pytest.approx(3.0)
    assert out["backend_vs_torch"]["full"]["onnxruntime"]["llm_speedup"] == pytest.approx(1.25)
    # No `full` measured on a backend: no schedule ratio invented for it.
    assert ratios([_record("csp", "onnxruntime", 2.0, 10.0, pipeline=True)])["schedule_vs_full"] == {}


def test_report_schema_accepts_a_report_and_rejects_a_broken_one():
    config = {"source": "shape:tiny", "shape": SHAPE.to_dict(), "mode": "single-pass", "repeat": 2, "warmup": 0,
              "schedules": ["full"], "backends": ["torch"]}
    machine = {"cpu_cores": 2, "gpu": None, "versions": {}}
    report = make_report(config=config, machine=machine, records=[_record("full", "torch", 1.0, 2.0)])
    broken = copy.deepcopy(report)
    del broken["records"][0]["llm_ms"]
    with pytest.raises(AssertionError, match="llm_ms"):
        check_report(broken)
    broken = copy.deepcopy(report)
    broken["records"][0]["backend"] = "tvm"
    with pytest.raises(AssertionError, match="backend"):
        check_report(broken)


def test_peak_lookup_prefers_the_most_specific_name():
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA L40S") == 362.0  # not L4's
    assert peak_tflops("Some Future GPU") is None and peak_tflops(None) is None
