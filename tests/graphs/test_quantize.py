"""graphs.quantize on small synthetic graphs: each method's ops and numbers, the Gemm rewrite, calibration sets."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs.errors import InputError
from graphs.quantize import (QuantOptions, builtin_calibration, gemms_to_matmuls, load_calibration, quantize_graph,
                             weight_bytes, weight_matmuls)

K, N, V = 64, 96, 40


def _graph(path, seed: int = 0):
    """x [1, S, K] -> MatMul(W1 [K, N]) -> SiLU -> MatMul(W2 [N, K]) -> y, x x^T (activations only), and
    Gemm(x_last [1, K], W3 [V, K], transB=1): a LLaMA block's kinds of MatMul in miniature."""
    rng = np.random.default_rng(seed)
    w1, w2, w3 = (rng.standard_normal(s).astype(np.float32) * 0.1 for s in ((K, N), (N, K), (V, K)))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Sigmoid", ["h"], ["sg"]),
             helper.make_node("Mul", ["h", "sg"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
             helper.make_node("MatMul", ["x", "xt"], ["att"], name="act_x_act"),  # activation x activation: stays
             helper.make_node("Gemm", ["last", "w3"], ["logits"], name="head", transB=1)]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", K]),
         helper.make_tensor_value_info("xt", TensorProto.FLOAT, [1, K, "S"]),
         helper.make_tensor_value_info("last", TensorProto.FLOAT, [1, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", K]),
         helper.make_tensor_value_info("att", TensorProto.FLOAT, [1, "S", "S"]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, V])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    return path


def _feed(seed: int, s: int = 5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, s, K)).astype(np.float32)
    return {"x": x, "xt": np.ascontiguousarray(x.transpose(0, 2, 1)), "last": x[:, -1]}


def _run(path, feed, config=None):
    opts = ort.SessionOptions()
    for k, v in (config or {}).items():
        opts.add_session_config_entry(k, v)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def test_gemm_of_a_weight_becomes_matmul_with_the_same_numbers(tmp_path):
    src = _graph(tmp_path / "g.onnx")
    model = onnx.load(str(src))
    assert gemms_to_matmuls(model) == 1
    assert weight_matmuls(model) == ["mm1", "mm2", "head"]  # not the activation x activation MatMul
    onnx.save(model, str(tmp_path / "m.onnx"))
    feed = _feed(1)
    np.testing.assert_allclose(_run(tmp_path / "m.onnx", feed)["logits"], _run(src, feed)["logits"], rtol=1e-5,
                               atol=1e-6)


# (method, format) -> the op that carries the quantized weights, and a relative error bound on y
VARIANTS = {("int8", "ort"): ("MatMulInteger", 0.03), ("int8", "qdq"): ("DequantizeLinear", 0.05),
            ("int4-wo", "ort"): ("MatMulNBits", 0.2), ("int4-wo", "qdq"): ("DequantizeLinear", 0.2),
            ("fp8", "qdq"): ("DequantizeLinear", 0.15)}


@pytest.mark.parametrize("method,fmt", list(VARIANTS), ids=[f"{m}-{f}" for m, f in VARIANTS])
def test_each_method_quantizes_only_weight_matmuls_and_stays_close(tmp_path, method, fmt):
    src = _graph(tmp_path / "g.onnx")
    dst = tmp_path / "q.onnx"
    opts = QuantOptions(method, fmt, block_size=32).resolved()
    feeds = [_feed(i, s) for i, s in enumerate((3, 5, 7))]  # text lengths differ, as real prompts do
    quantize_graph(src, dst, opts, feeds if opts.needs_calibration else None)
    model = onnx.load(str(dst))
    ops = {n.op_type for n in model.graph.node}
    op, bound = VARIANTS[(method, fmt)]
    assert op in ops
    assert "act_x_act" in {n.name for n in model.graph.node if n.op_type == "MatMul"}  # left alone
    if (method, fmt) == ("int4-wo", "qdq"):
        types = {t.data_type for t in model.graph.initializer}
        assert TensorProto.INT4 in types  # blocked int4 weights for TensorRT
    if method == "fp8":
        assert TensorProto.FLOAT8E4M3FN in {t.data_type for t in model.graph.initializer}
    config = {"session.disable_quant_qdq": "1"} if method == "fp8" else None
    feed = _feed(9)
    want, got = _run(src, feed), _run(dst, feed, config)
    for name in ("y", "logits"):
        rel = np.linalg.norm(got[name] - want[name]) / np.linalg.norm(want[name])
        assert rel < bound, (name, rel)
    np.testing.assert_array_equal(got["att"], want["att"])
    assert weight_bytes(dst) < weight_bytes(src) * (0.35 if method == "int4-wo" else 0.4)


def test_options_are_checked_with_the_fix_named():
    assert QuantOptions("int8").resolved().format == "ort"
    assert QuantOptions("fp8").resolved().format == "qdq"
    with pytest.raises(InputError, match="fp8 is for TensorRT"):
        QuantOptions("fp8", "ort").resolved()
    with pytest.raises(InputError, match="choose one of none, int8, int4-wo, fp8"):
        QuantOptions("int3").resolved()
    with pytest.raises(InputError, match="--quantize-block-size 48"):
        QuantOptions("int4-wo", block_size=48).resolved()


def test_builtin_calibration_set_is_fixed_and_hashed():
    a, b = builtin_calibration(), builtin_calibration()
    assert a.sha256 == b.sha256 and len(a.samples) == 6
    assert len({img.tobytes() for img, _ in a.samples}) == 4  # four distinct images


@pytest.mark.parametrize("content,expected", [
    (None, "does not exist"),
    ("{not json", "not JSON"),
    ('{"format": "csprt.calibration", "samples": []}', r"is empty \(no samples\)"),
    ('{"format": "other", "samples": [{"image": "a.png", "query": "q"}]}', "not a csprt calibration set"),
    ('{"format": "csprt.calibration", "samples": [{"image": "a.png", "query": " "}]}', "needs a non-empty"),
    ('{"format": "csprt.calibration", "samples": [{"image": "missing.png", "query": "where?"}]}', "sample 0"),
], ids=["missing", "corrupt", "empty", "format", "empty-query", "missing-image"])
def test_a_bad_calibration_set_is_one_clear_line(tmp_path, content, expected):
    path = tmp_path / "calib.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=expected) as info:
        load_calibration(path)
    assert "\n" not in str(info.value) and "csprt.calibration" in str(info.value) or "sample 0" in str(info.value)


def test_a_calibration_file_loads_and_its_hash_follows_the_pixels(tmp_path):
    from PIL import Image

    img = np.zeros((20, 30, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    doc = {"format": "csprt.calibration", "samples": [{"image": "a.png", "query": "Where is it?"}]}
    (tmp_path / "c.json").write_text(json.dumps(doc), encoding="utf-8")
    first = load_calibration(tmp_path / "c.json")
    img[0, 0] = 1
    Image.fromarray(img).save(tmp_path / "a.png")
    assert len(first.samples) == 1 and load_calibration(tmp_path / "c.json").sha256 != first.sha256


def test_bench_ratios_set_each_quantization_against_the_float_artifact_of_its_schedule():
    from exporter.tiny import tiny_shape
    from graphs.bench_report import make_record, make_report
    from graphs.schedule import resolve

    shape = tiny_shape()
    sched = resolve("csp", shape.llm.layers, shape.num_image_tokens)

    def record(quant, llm_ms, llm_bytes):
        runs = [{"vision": 1.0, "llm_0": llm_ms}] * 2
        weights = {"stages": {"vision": 100, "llm_0": llm_bytes}, "llm": llm_bytes, "total": 100 + llm_bytes}
        return make_record(schedule=sched, shape=shape, backend="onnxruntime", device="cpu", text_tokens=30,
                           image_tokens_per_layer=sched.tokens_per_layer(), runs=runs, e2e_ms=[llm_ms + 2] * 2,
                           pipeline_ms=[llm_ms + 1] * 2, quantization=quant, weights=weights)

    report = make_report(config={"source": "x", "shape": {}, "mode": "single-pass", "repeat": 2, "warmup": 0,
                                 "schedules": ["csp"], "backends": ["onnxruntime"]}, machine={
        "cpu_cores": 2, "gpu": None, "versions": {}},
        records=[record("none", 8.0, 1000), record("int4-wo/ort", 4.0, 160)])
    q = report["ratios"]["quantized_vs_float"]["onnxruntime int4-wo/ort"]["csp"]
    assert q["llm_speedup"] == 2.0 and q["end_to_end_speedup"] == 10.0 / 6.0 and q["llm_weight_ratio"] == 0.16
    assert set(report["ratios"]["schedule_vs_full"]) <= {"onnxruntime", "onnxruntime int4-wo/ort"}
