"""graphs.quantize_modelopt: NVIDIA ModelOpt in its own environment (.venv-modelopt) on a synthetic block, the row
padding AWQ needs, and its failures as one clear error."""

from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphs.errors import ToolchainError
from graphs.quantize import QuantOptions
from graphs.quantize_modelopt import Block, quantize_graphs_modelopt, row_axes, uniform_rows
from tests.graphs.test_quantize import K, _graph

INPUTS = [{"name": "hidden", "shape": ["batch", "rows_llm_0", 8]}, {"name": "positions", "shape": ["batch",
          "rows_llm_0"]}, {"name": "row_lens", "shape": ["batch"]}, {"name": "past_key_0", "shape": ["batch", 2,
          "cache_llm_0", 4]}]


def test_row_axes_come_from_the_manifest_dims():
    assert row_axes(INPUTS) == {"hidden": [1], "positions": [1], "row_lens": [], "past_key_0": []}


def test_uniform_rows_pads_on_the_right_as_a_batch_does():
    def feed(rows):
        return {"hidden": np.ones((1, rows, 8), np.float32), "positions": np.arange(rows)[None],
                "row_lens": np.array([rows]), "past_key_0": np.zeros((1, 2, 0, 4), np.float32)}

    same = [feed(5), feed(5)]
    assert uniform_rows(same, row_axes(INPUTS)) is same  # nothing to pad: the feeds as they were
    out = uniform_rows([feed(5), feed(3)], row_axes(INPUTS))
    assert [f["hidden"].shape for f in out] == [(1, 5, 8), (1, 5, 8)]
    np.testing.assert_array_equal(out[1]["hidden"][0, 3:], 0)  # float rows: zeros
    np.testing.assert_array_equal(out[1]["positions"], [[0, 1, 2, 2, 2]])  # integer rows: the last repeated
    assert [int(f["row_lens"][0]) for f in out] == [5, 3]  # each sample keeps its real rows
    np.testing.assert_array_equal(out[0]["hidden"], feed(5)["hidden"])


def _feeds(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n):
        rows = 6 + s  # different lengths, as real requests have
        x = rng.standard_normal((1, rows, K)).astype(np.float32)
        out.append({"x": x, "xt": np.ascontiguousarray(x.transpose(0, 2, 1)), "last": x[:, -1]})
    return out


AXES = {"x": [1], "xt": [2], "last": []}


@pytest.mark.parametrize("method", ["int4-wo", "int8", "fp8"])
def test_modelopt_quantizes_the_weight_matmuls_only(tmp_path, method):
    src = _graph(tmp_path / "llm_0.onnx")
    work = tmp_path / "work"
    work.mkdir()
    opts = QuantOptions(method, "modelopt", block_size=32).resolved()
    seen = []
    made = quantize_graphs_modelopt({"llm_0": Block(src, _feeds(3), AXES)}, work, opts, "fp32",
                                    done=lambda name, report: seen.append((name, report)))
    graph = made["llm_0"]
    assert graph == work / "llm_0" / "llm_0.onnx" and graph.with_name("llm_0.onnx.data").is_file()
    assert not (work / "llm_0" / "float").exists()  # the prepared copy is gone once its graph is done
    assert [name for name, _ in seen] == ["llm_0"] and seen[0][1]["modelopt"] == "0.47.0"
    model = onnx.load(str(graph), load_external_data=False)
    assert {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"} <= \
        {"llm_0.onnx.data"}
    assert [i.name for i in model.graph.input] == ["x", "xt", "last"]  # the graph's contract is kept
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    weight_type = {"int4-wo": onnx.TensorProto.INT4, "int8": onnx.TensorProto.INT8,
                   "fp8": onnx.TensorProto.FLOAT8E4M3FN}[method]
    full = onnx.load(str(graph))
    big = [t for t in full.graph.initializer if np.prod(t.dims) >= 1000]
    # int4 AWQ: w1, w2 and the head. int8/fp8: ModelOpt's TensorRT recipe leaves a GEMV float (the head reads one
    # row, as the LM head does on the last position): Tensor Cores gain nothing there and Q/DQ would cost
    want_quantized = 3 if method == "int4-wo" else 2
    assert sum(1 for t in big if t.data_type == weight_type) == want_quantized
    assert sum(1 for t in big if t.data_type == onnx.TensorProto.FLOAT) == 3 - want_quantized  # no float copies
    act = next(n for n in model.graph.node if n.name == "act_x_act")
    assert act.input[1] == "xt"  # activation x activation MatMul not quantized (its x may share mm1's Q/DQ)
    options = ort.SessionOptions()
    if method == "fp8":
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    feed = _feeds(1, seed=7)[0]
    got = ort.InferenceSession(str(graph), options).run(None, feed)
    want = ort.InferenceSession(str(src)).run(None, feed)
    bound = {"int4-wo": 0.2, "int8": 0.05, "fp8": 0.15}[method]  # tests/graphs/test_quantize.py's, per method
    for g, w in zip(got, want):
        rel = np.linalg.norm(g - w) / np.linalg.norm(w)
        assert rel < bound, rel
    rel_y = np.linalg.norm(got[0] - want[0]) / np.linalg.norm(want[0])
    assert rel_y > 1e-4  # really quantized


def _script(path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_failing_modelopt_is_one_error_with_its_own_words(tmp_path, monkeypatch):
    monkeypatch.setenv("CSPRT_MODELOPT_PYTHON", _script(tmp_path / "python", "echo 'no cupy here, boom' >&2\nexit 3\n"))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ToolchainError, match=r"(?s)failed to quantize llm_0 \(int4-wo\).*no cupy here, boom"):
        quantize_graphs_modelopt({"llm_0": Block(_graph(tmp_path / "llm_0.onnx"), _feeds(2), AXES)}, work,
                                 QuantOptions("int4-wo", "modelopt").resolved(), "fp32")


def test_an_environment_without_modelopt_names_the_setup(tmp_path, monkeypatch):
    from graphs.quantize_modelopt import modelopt_version

    monkeypatch.setenv("CSPRT_MODELOPT_PYTHON", _script(tmp_path / "python", 'exec python3 "$@"\n'))
    env_python = os.environ["CSPRT_MODELOPT_PYTHON"]
    with pytest.raises(ToolchainError, match=rf"{env_python} has no NVIDIA ModelOpt .*bash .ci/setup-modelopt"):
        modelopt_version()


def test_only_the_workers_report_lines_count_as_progress():
    from graphs.quantize_modelopt import _report_line

    assert _report_line('{"stage": "llm_0", "modelopt": "0.47.0", "quantized_nodes": 3}\n')["stage"] == "llm_0"
    for noise in ("INFO: calibrating\n", "{not json\n", "[1, 2]\n", "{\n", "\n"):
        assert _report_line(noise) is None, noise
