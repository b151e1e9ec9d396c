"""ONNX passes on small hand-built graphs: atomic save with external data, dim names, the optimizer,
shape inference and the fp16 report. Results are checked by running the graphs in onnxruntime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs.manifest import graph_files
from graphs.onnx_passes import (external_data_locations, fp16_sensitive_ops_report, infer_shapes, optimize,
                                rename_dims, save_model, stage_dim_names, value_types)
from graphs.schedule import resolve
from graphs.shapes import ModelShape
from graphs.stages import LayoutOptions, StageSpec, TensorSpec, build_layout

OPSET = [helper.make_opsetid("", 18)]


def _model(nodes, inputs, outputs, inits=(), functions=(), opset=OPSET):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=opset, functions=list(functions), ir_version=10)


def _linear(d=32):
    """y[S, D] = x[S, D] @ w[D, D] + b[D]; w is 4 KB at d=32, so it goes external when forced."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(d).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"), helper.make_node("Add", ["xw", "b"], ["y"], name="add")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", d])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["seq", d])], [w, b])


def _run(model_or_path, feed):
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feed)


def test_save_small_model_is_one_file(tmp_path):
    path = tmp_path / "graphs" / "s.onnx"
    (tmp_path / "graphs").mkdir()
    (tmp_path / "graphs" / "s.onnx.data").write_bytes(b"stale")  # from an earlier, larger export
    assert save_model(_linear(), path) == [path]
    assert not (tmp_path / "graphs" / "s.onnx.data").exists()
    assert onnx.load(str(path)) == _linear()
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.onnx"]  # no temp files left


def test_external_data_round_trip(tmp_path):
    model = _linear()
    before = model.SerializeToString()
    path = tmp_path / "llm_0.onnx"
    written = save_model(model, path, external_data_threshold_bytes=0)
    assert written == [tmp_path / "llm_0.onnx.data", path]
    assert model.SerializeToString() == before  # the caller's model is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm_0.onnx", "llm_0.onnx.data"]
    assert path.stat().st_size < 1024 <= (tmp_path / "llm_0.onnx.data").stat().st_size
    lazy = onnx.load(str(path), load_external_data=False)
    assert external_data_locations(lazy) == ["llm_0.onnx.data"]
    assert sorted(graph_files(tmp_path, "llm_0.onnx")) == ["llm_0.onnx", "llm_0.onnx.data"]
    x = np.random.default_rng(1).standard_normal((5, 32)).astype(np.float32)
    np.testing.assert_array_equal(_run(str(path), {"x": x})[0], _run(model, {"x": x})[0])
    # Saving again over it (smaller threshold path) replaces both files consistently.
    assert save_model(model, path) == [path]
    assert not (tmp_path / "llm_0.onnx.data").exists()
    np.testing.assert_array_equal(_run(str(path), {"x": x})[0], _run(model, {"x": x})[0])


def test_save_rejects_unloaded_external_data(tmp_path):
    save_model(_linear(), tmp_path / "a.onnx", external_data_threshold_bytes=0)
    lazy = onnx.load(str(tmp_path / "a.onnx"), load_external_data=False)
    with pytest.raises(AssertionError, match="external data that is not loaded"):
        save_model(lazy, tmp_path / "b.onnx")


def test_rename_dims():
    model = _linear()
    rename_dims(model, {"x": {0: "prefix_len"}, "y": {0: "prefix_len", 1: "hidden"}})
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(model.graph.input[0]) == ["prefix_len", 32]
    assert dims(model.graph.output[0]) == ["prefix_len", "hidden"]
    spec = StageSpec("s", "llm", (TensorSpec("x", "float32", ("seq", 32), "host.x"),),
                     (TensorSpec("y", "float32", ("seq + 1", 32)),))
    rename_dims(model, spec)  # a StageSpec names every str dim of its I/O
    assert dims(model.graph.input[0]) == ["seq", 32] and dims(model.graph.output[0]) == ["seq + 1", "hidden"]
    with pytest.raises(AssertionError, match="no input/output 'z'"):
        rename_dims(model, {"z": {0: "a"}})
    with pytest.raises(AssertionError, match="rank 2, no axis 2"):
        rename_dims(model, {"x": {2: "a"}})


def test_stage_dim_names_cover_named_and_expression_dims():
    shape = ModelShape()
    sched = resolve("csp", shape.llm.layers, shape.num_image_tokens)
    layout = build_layout(sched, shape, LayoutOptions(mode="generate"), seg_token_id=1, stop_token_ids=(2,))
    names = stage_dim_names(layout.stage("llm_2"))
    assert names["hidden"] == {0: "batch", 1: "rows_llm_2"} and names["past_len"] == {0: "batch"}
    assert names["key_31"] == {0: "batch", 2: "rows_llm_2"} and names["past_key_31"] == {0: "batch", 2: "cache_llm_2"}
    assert stage_dim_names(layout.stage("entry_2"))["block_hidden"] == {0: "batch", 1: "rows_llm_1"}


def test_optimize_folds_constants_and_keeps_io():
    # y = x * (c1 + c2) where c1 + c2 is a constant subgraph: folded to one initializer
    c1 = helper.make_node("Constant", [], ["c1"], value=numpy_helper.from_array(np.full(4, 2.0, np.float32)))
    c2 = helper.make_node("Constant", [], ["c2"], value=numpy_helper.from_array(np.full(4, 3.0, np.float32)))
    nodes = [c1, c2, helper.make_node("Add", ["c1", "c2"], ["c"]), helper.make_node("Mul", ["x", "c"], ["y"]),
             helper.make_node("Neg", ["x"], ["unused"])]  # dead node
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    out = optimize(model)
    assert [n.op_type for n in out.graph.node] == ["Mul"]
    assert [v.name for v in out.graph.input] == ["x"] and [v.name for v in out.graph.output] == ["y"]
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert out.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(_run(out, {"x": x})[0], x * 5)


def test_optimize_inlines_local_functions():
    fn = helper.make_function("local", "Double", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                              OPSET)
    model = _model([helper.make_node("Double", ["x"], ["y"], domain="local")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                   functions=[fn], opset=OPSET + [helper.make_opsetid("local", 1)])
    out = optimize(model)
    assert not out.functions and [n.op_type for n in out.graph.node] == ["Add"]
    assert {o.domain for o in out.opset_import} == {""}


def _softmax_model(dtype, upcast):
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT, name="up")] if upcast else []
    nodes += [helper.make_node("Softmax", ["xf" if upcast else "x"], ["p"], axis=-1, name="attn_softmax"),
              helper.make_node("Cast", ["p"], ["y"], to=dtype, name="down")]
    return _model(nodes, [helper.make_tensor_value_info("x", dtype, [2, 8])],
                  [helper.make_tensor_value_info("y", dtype, [2, 8])])


def test_infer_shapes_types_intermediates():
    types = value_types(infer_shapes(_softmax_model(TensorProto.FLOAT16, upcast=True)))
    assert types["xf"] == (TensorProto.FLOAT, 2) and types["p"] == (TensorProto.FLOAT, 2)


def test_fp16_report():
    lines = fp16_sensitive_ops_report(_softmax_model(TensorProto.FLOAT16, upcast=False))
    assert lines == ["node 'attn_softmax' (Softmax) computes on float16 input 'x'"]
    assert fp16_sensitive_ops_report(_softmax_model(TensorProto.FLOAT16, upcast=True)) == []
    assert fp16_sensitive_ops_report(_softmax_model(TensorProto.FLOAT, upcast=False)) == []
