"""graphs.quantize_stream: a tensor at a time, the same tensors as ONNX Runtime's whole-graph quantizers, fp16
graphs, and memory bounded by one weight rather than the block."""

from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs.onnx_passes import save_with_external_data
from graphs.quantize import QuantOptions, quantize_graph
from graphs.quantize_stream import STREAMED, quantize_graph_streamed

K, V = 64, 40
IDS = [f"{m}-{f}" for m, f in STREAMED]


def _block(path, dtype=np.float32, k: int = K, layers: int = 1, seed: int = 0):
    """A LLaMA block's weight MatMuls in miniature, its weights in `path`.data: per layer q, k and v read one
    normed input (a shared input), o reads their sum; a Gemm(transB) head reads the last row."""
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits, h = [], [], "x"
    for i in range(layers):
        for n in ("q", "k", "v"):
            nodes.append(helper.make_node("MatMul", [f"{h}", f"w{n}{i}"], [f"{n}{i}"], name=f"mm_{n}{i}"))
        nodes += [helper.make_node("Add", [f"q{i}", f"k{i}"], [f"qk{i}"]),
                  helper.make_node("Add", [f"qk{i}", f"v{i}"], [f"s{i}"]),
                  helper.make_node("MatMul", [f"s{i}", f"wo{i}"], [f"h{i}"], name=f"mm_o{i}")]
        inits += [numpy_helper.from_array((rng.standard_normal((k, k)) * 0.1).astype(dtype), f"w{n}{i}")
                  for n in ("q", "k", "v", "o")]
        h = f"h{i}"
    nodes.append(helper.make_node("Gemm", ["last", "w_head"], ["logits"], name="head", transB=1))
    inits.append(numpy_helper.from_array((rng.standard_normal((V, k)) * 0.1).astype(dtype), "w_head"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", elem, [1, "S", k]),
                     helper.make_tensor_value_info("last", elem, [1, k])],
        [helper.make_tensor_value_info(h, elem, [1, "S", k]), helper.make_tensor_value_info("logits", elem, [1, V])],
        inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path),
              save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


def _streamed(src, out_dir, opts):
    """quantize_graph_streamed, installed as the pass installs it: (graph path, loaded model with its data)."""
    out_dir.mkdir()
    dst = out_dir / src.name
    model = quantize_graph_streamed(src, out_dir / (src.name + ".data"), opts)
    save_with_external_data(model, dst, out_dir / (src.name + ".data"), inline_threshold_bytes=0)
    return dst, onnx.load(str(dst))


def _tensors(model) -> dict:
    return {t.name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer}


def _same_as_whole_graph(src, tmp_path, opts):
    whole = tmp_path / "whole" / src.name
    whole.parent.mkdir()
    quantize_graph(src, whole, opts)
    dst, streamed = _streamed(src, tmp_path / "streamed", opts)
    reference = onnx.load(str(whole))
    assert _tensors(streamed) == _tensors(reference)  # the same names, types, shapes and bytes
    assert sorted(n.SerializeToString() for n in streamed.graph.node) == \
        sorted(n.SerializeToString() for n in reference.graph.node)
    opsets = [{(o.domain, o.version) for o in m.opset_import} for m in (streamed, reference)]
    assert opsets[0] == opsets[1]
    return dst, whole


def _run(path, feed):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _feed(dtype=np.float32, k: int = K, s: int = 5):
    x = np.random.default_rng(7).standard_normal((1, s, k)).astype(dtype)
    return {"x": x, "last": x[:, -1]}


@pytest.mark.parametrize("method,fmt", STREAMED, ids=IDS)
def test_equals_the_whole_graph_quantizer_tensor_for_tensor(tmp_path, method, fmt):
    opts = QuantOptions(method, fmt).resolved()
    src = _block(tmp_path / "g.onnx", layers=2)
    dst, whole = _same_as_whole_graph(src, tmp_path, opts)
    for a, b in zip(_run(dst, _feed()), _run(whole, _feed())):
        np.testing.assert_array_equal(a, b)
    if method == "int8":  # q, k and v share one DynamicQuantizeLinear (as the whole graph's): 2 per layer, 1 head
        assert sum(n.op_type == "DynamicQuantizeLinear" for n in onnx.load(str(dst)).graph.node) == 2 * 2 + 1


def test_equals_the_whole_graph_quantizer_on_the_tiny_artifact(export_tiny, tmp_path):
    """The last block (decoder layers, norm, the lm_head Gemm) of the tiny csp artifact, each streamed method."""
    from graphs.manifest import load_artifact

    art = load_artifact(export_tiny("csp", "both"))
    entry = next(e for e in art.manifest["stages"] if e["name"] == "llm_2")
    for method, fmt in STREAMED:
        out = tmp_path / f"{method}-{fmt}"
        out.mkdir()
        _same_as_whole_graph(art.dir / entry["graph"], out, QuantOptions(method, fmt).resolved())


@pytest.mark.parametrize("method,fmt", STREAMED, ids=IDS)
def test_fp16_graphs_quantize_and_stay_fp16(tmp_path, method, fmt):
    opts = QuantOptions(method, fmt).resolved()
    src16 = _block(tmp_path / "g16.onnx", np.float16)
    src32 = _block(tmp_path / "g32.onnx", np.float32)
    dst16, q16 = _streamed(src16, tmp_path / "s16", opts)
    dst32, _ = _streamed(src32, tmp_path / "s32", opts)
    sess = ort.InferenceSession(str(dst16), providers=["CPUExecutionProvider"])
    assert {o.type for o in sess.get_outputs()} == {"tensor(float16)"}
    got = sess.run(None, _feed(np.float16))
    want = _run(dst32, _feed(np.float32))
    exact = _run(src32, _feed(np.float32))
    for g, w, e in zip(got, want, exact):
        err16, err32 = np.abs(g.astype(np.float32) - e).max(), np.abs(w - e).max()
        assert err16 < 2 * err32 + 0.05 * np.abs(e).max()  # fp16 adds its rounding to the quantization error
    if method == "int8":  # DynamicQuantizeLinear runs in fp32: the piece is widened and narrowed
        casts = [n for n in q16.graph.node if n.op_type == "Cast"]
        assert casts and {helper.get_attribute_value(n.attribute[0]) for n in casts} == {TensorProto.FLOAT,
                                                                                         TensorProto.FLOAT16}
    else:
        scales = [t for t in q16.graph.initializer if t.name.endswith("scales")]
        assert scales and all(t.data_type == TensorProto.FLOAT16 for t in scales)


def test_reads_an_artifact_copied_with_hard_links(tmp_path):
    """`cp -al` copies of a big artifact share its data files; onnx's own reader refuses hard-linked data."""
    import os

    (tmp_path / "a").mkdir()
    src = _block(tmp_path / "a" / "g.onnx")
    (tmp_path / "b").mkdir()
    for name in ("g.onnx", "g.onnx.data"):
        os.link(tmp_path / "a" / name, tmp_path / "b" / name)
    dst, _ = _streamed(tmp_path / "b" / "g.onnx", tmp_path / "out", QuantOptions("int4-wo", "ort").resolved())
    assert _run(dst, _feed())[0].shape == (1, 5, K)
    assert os.stat(src.with_name("g.onnx.data")).st_nlink == 2  # the shared data is read, never written
    whole = tmp_path / "whole" / "g.onnx"  # the whole-graph quantizers (calibrated Q/DQ) read it the same way
    whole.parent.mkdir()
    quantize_graph(tmp_path / "b" / "g.onnx", whole, QuantOptions("int8", "ort").resolved())
    assert _run(whole, _feed())[0].shape == (1, 5, K)


_MEMORY_PROBE = """
import sys, threading, time
from pathlib import Path
import psutil
from graphs.quantize import QuantOptions, quantize_graph
from graphs.quantize_stream import quantize_graph_streamed
import onnxruntime.quantization.matmul_nbits_quantizer
src, out = Path(sys.argv[1]), Path(sys.argv[2])
opts = QuantOptions("int4-wo", "ort").resolved()
proc = psutil.Process()

def growth(fn):  # peak RSS while fn runs (sampled every 2 ms) less the RSS before it
    base, peak, done = proc.memory_info().rss, [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)
    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], proc.memory_info().rss) - base

print(growth(lambda: quantize_graph_streamed(src, out / "s" / "g.onnx.data", opts)),
      growth(lambda: quantize_graph(src, out / "w" / "g.onnx", opts)))
"""


def test_memory_is_bounded_by_one_weight_not_the_block(tmp_path):
    """Peak RSS growth (a fresh process: imports first, then the streamed pass, then ONNX Runtime's whole-graph
    quantizer on the same graph): the streamed pass holds about one weight, the whole-graph one every weight."""
    import os
    import subprocess
    import sys

    k, layers = 1024, 8  # 32 weights of 4 MiB in fp32, 128 MiB in all
    src = _block(tmp_path / "g.onnx", k=k, layers=layers)
    one, total = k * k * 4, 4 * layers * k * k * 4
    for d in ("s", "w"):
        (tmp_path / d).mkdir()
    # glibc returns freed large blocks to the system at once (no dynamic mmap threshold), so RSS follows the live data
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(src), str(tmp_path)], capture_output=True,
                         text=True, check=True, env=env).stdout.split()
    streamed, whole = map(int, out)
    assert streamed < 8 * one, (streamed, one)  # a few copies of one weight (read, quantized), whatever the block
    assert whole > total, (whole, total)  # what it avoids: the whole-graph quantizer holds the block and more
