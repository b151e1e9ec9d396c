"""`csprt bench` on the tiny shape and a tiny artifact: the JSON contract, tokens per layer, FLOPs, ratios, errors.

No test here asserts a speed: timings are only checked to exist and be consistent with each other.
"""

from __future__ import annotations

import json

import pytest

from exporter.tiny import tiny_shape
from graphs.bench_report import check_report
from graphs.schedule import resolve
from tests.cli_io import call, error_lines

SHAPE = tiny_shape()


@pytest.fixture(scope="module")
def shape_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    plot = out.with_suffix(".png")
    rc, stdout, stderr = call(["bench", "--shape", "tiny", "--schedules", "full,csp,fastv", "--backends", "torch",
                               "--repeat", "2", "--warmup", "0", "--text-len", "30", "--json", str(out),
                               "--plot", str(plot)])
    assert rc == 0, stderr
    return json.loads(out.read_text()), stdout, stderr, plot


@pytest.fixture(scope="module")
def artifact_report(export_tiny, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_art") / "art.json"
    rc, stdout, stderr = call(["bench", str(export_tiny()), "--checkpoint", str(tiny_ckpt), "--backends",
                               "onnxruntime,torch", "--repeat", "2", "--warmup", "1", "--scaling", "text",
                               "--json", str(out)])
    assert rc == 0, stderr
    return json.loads(out.read_text())


def test_report_follows_the_schema_and_tokens_per_layer_follow_the_schedule(shape_report):
    report, stdout, stderr, _ = shape_report
    check_report(report)
    assert [(r["schedule"], r["backend"]) for r in report["records"]] == [("full", "torch"), ("csp", "torch"),
                                                                           ("fastv", "torch")]
    for r in report["records"]:
        sched = resolve(r["schedule"], SHAPE.llm.layers, SHAPE.num_image_tokens)
        assert r["image_tokens_per_layer"] == sched.tokens_per_layer()  # counted from the reference's tensors
        assert r["end_to_end_ms"]["n"] == 2 and r["llm_ms"]["median"] > 0
        assert r["end_to_end_ms"]["median"] >= r["llm_ms"]["median"]
    assert "[csprt bench] csp on torch/cpu" in stderr and "csp" in stdout  # progress per run, a table at the end


def test_flops_equal_csprt_flops(shape_report, tiny_ckpt):
    report = shape_report[0]
    for r in report["records"]:
        rc, out, err = call(["flops", "--checkpoint", str(tiny_ckpt), "--schedule", r["schedule"],
                             "--text-tokens", str(r["text_tokens"]), "--json"])
        assert rc == 0, err
        flops = json.loads(out)
        assert r["flops"] == flops["flops"]
        assert r["flops_reduction_pct"]["llm"] == flops["llm_flops_reduction_pct"]
        assert r["avg_image_tokens_per_layer"] == pytest.approx(flops["avg_image_tokens_per_layer"])


def test_ratios_are_computed_pairwise_from_the_records(shape_report):
    report = shape_report[0]
    med = {r["schedule"]: r for r in report["records"]}
    for name, ratio in report["ratios"]["schedule_vs_full"]["torch"].items():
        assert ratio["llm_speedup"] == pytest.approx(med["full"]["llm_ms"]["median"] / med[name]["llm_ms"]["median"])
        assert ratio["end_to_end_speedup"] == pytest.approx(
            med["full"]["end_to_end_ms"]["median"] / med[name]["end_to_end_ms"]["median"])
    assert report["ratios"]["schedule_vs_full"]["torch"]["full"]["llm_speedup"] == 1.0


def test_plot_is_a_png(shape_report):
    plot = shape_report[3]
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_artifact_backends_agree_on_tokens_and_report_runtime_overhead(artifact_report, export_tiny):
    from graphs.manifest import load_artifact

    sched = load_artifact(export_tiny()).schedule
    recs = {r["backend"]: r for r in artifact_report["records"]}
    assert set(recs) == {"onnxruntime", "torch"}
    for r in recs.values():
        assert r["image_tokens_per_layer"] == sched.tokens_per_layer()
    assert recs["onnxruntime"]["text_tokens"] == recs["torch"]["text_tokens"]  # the same query, same tokenizer
    ort = recs["onnxruntime"]
    assert {"vision", "sam_encoder", "seg_head", "sam_decoder"} <= set(ort["stages_ms"])
    assert any(name.startswith("llm_") for name in ort["stages_ms"])
    over = ort["overhead"]
    assert over["pipeline_ms"]["median"] >= over["between_stages_ms"]["median"] >= 0
    assert recs["torch"]["overhead"] is None
    vs_torch = artifact_report["ratios"]["backend_vs_torch"][sched.name]
    assert vs_torch["onnxruntime"]["end_to_end_speedup"] == pytest.approx(
        recs["torch"]["end_to_end_ms"]["median"] / ort["end_to_end_ms"]["median"])


def test_text_scaling_drives_every_backend_at_each_length(artifact_report):
    points = [p for p in artifact_report["scaling"] if p["axis"] == "text_tokens"]
    base = {r["backend"]: r["text_tokens"] for r in artifact_report["records"]}
    for backend in ("onnxruntime", "torch"):
        values = [p["value"] for p in points if p["backend"] == backend]
        assert all(p["value"] == p["text_tokens"] for p in points)
        # --text-len's prompt plus 0/32/64/128 query tokens; a padded query lands at or just past each length.
        for got, extra in zip(values, (0, 32, 64, 128)):
            assert base[backend] + extra <= got <= base[backend] + extra + 8
    assert [p["value"] for p in points if p["backend"] == "torch"] == \
        [p["value"] for p in points if p["backend"] == "onnxruntime"]


def test_batch_sizes_give_images_per_s_and_schedule_ratios_per_batch(export_tiny, tmp_path):
    out = tmp_path / "batch.json"
    rc, stdout, stderr = call(["bench", "--shape", "tiny", "--schedules", "full,csp", "--backends", "torch",
                               "--batch", "1,3", "--repeat", "2", "--warmup", "0", "--json", str(out)])
    assert rc == 0, stderr
    report = json.loads(out.read_text())
    check_report(report)
    got = [(r["schedule"], r["batch"]) for r in report["records"]]
    assert got == [("full", 1), ("csp", 1), ("full", 3), ("csp", 3)] and report["config"]["batch"] == [1, 3]
    by = {(r["schedule"], r["batch"]): r for r in report["records"]}
    for (sched, batch), r in by.items():
        assert r["images_per_s"] == pytest.approx(1e3 * batch / r["end_to_end_ms"]["median"])
        ratio = report["ratios"]["schedule_vs_full_by_batch"]["torch"][str(batch)][sched]
        assert ratio["end_to_end_speedup"] == pytest.approx(
            by[("full", batch)]["end_to_end_ms"]["median"] / r["end_to_end_ms"]["median"])
        assert ratio["images_per_s"] == r["images_per_s"]
    assert "batch 3" in stderr and "img/s" in stdout
    # an artifact on ONNX Runtime: the same request batched
    rc, stdout, stderr = call(["bench", str(export_tiny()), "--backends", "onnxruntime", "--batch", "2",
                               "--repeat", "1", "--warmup", "0", "--json", str(out)])
    assert rc == 0, stderr
    (r,) = json.loads(out.read_text())["records"]
    assert r["batch"] == 2 and r["images_per_s"] > 0 and r["stages_ms"]["llm_0"]["median"] > 0



def test_torch_batches_generate_mode(tmp_path):
    """The torch reference batches generate mode too (Reference.batch): a record per batch size, decode timed."""
    out = tmp_path / "gen.json"
    rc, stdout, stderr = call(["bench", "--shape", "tiny", "--schedules", "csp", "--backends", "torch", "--mode",
                               "generate", "--max-new-tokens", "4", "--batch", "3", "--repeat", "1", "--warmup", "0",
                               "--json", str(out)])
    assert rc == 0, stderr
    report = json.loads(out.read_text())
    check_report(report)
    (r,) = report["records"]
    assert report["config"]["mode"] == "generate" and r["batch"] == 3 and 0 <= r["decode_steps"] <= 3
    assert r["stages_ms"]["llm_decode"]["median"] >= 0

@pytest.mark.parametrize("argv, needle", [
    (["bench", "--shape", "tiny", "--batch", "1,x"], "--batch '1,x'"),
    (["bench", "--shape", "tiny", "--batch", "0"], "--batch '0'"),
    (["bench"], "give an artifact directory or --shape"),
    (["bench", "--shape", "tiny", "--schedules", "full,nope"], "--schedules: unknown 'nope'"),
    (["bench", "--shape", "tiny", "--backends", "tvm"], "--backends: unknown 'tvm'"),
    (["bench", "--shape", "tiny", "--repeat", "0"], "--repeat must be >= 1"),
    (["bench", "--shape", "tiny", "--threads", "0"], "--threads must be >= 1"),
    (["bench", "--shape", "tiny", "--scaling", "batch"], "--scaling: unknown 'batch'"),
    (["bench", "--shape", "tiny", "--device", "tpu"], "--device 'tpu'"),
    (["bench", "--shape", "small", "--schedules", "full,accm-36", "--backends", "torch,onnxruntime"],
     "ACCM schedules are benched on their exported artifacts"),
])
def test_bad_arguments_exit_2_with_one_line(argv, needle):
    rc, _, err = call(argv)
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err


def test_artifact_errors_name_the_fix(export_tiny, tmp_path):
    art = str(export_tiny())
    rc, _, err = call(["bench", art, "--schedules", "full"])
    assert rc == 2 and "--schedules goes with --shape" in err
    rc, _, err = call(["bench", art, "--precision", "fp16"])
    assert rc == 2 and "re-export it with --precision fp16" in err
    rc, _, err = call(["bench", str(tmp_path)])
    assert rc == 2 and "manifest" in err
