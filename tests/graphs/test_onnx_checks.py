"""Graph checks: each one passes a good graph and rejects a bad one with a message naming the graph,
the node or tensor, and what was expected."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs.onnx_checks import (GraphCheckError, check_all, check_domains, check_io, check_model, check_model_proto,
                               check_trt_ops)
from graphs.onnx_passes import infer_shapes, save_model
from graphs.stages import StageSpec, TensorSpec
from graphs.trt_ops import TRT_SUPPORTED_OPS

F32, F16, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64
SEG_HEAD = StageSpec("seg_head", "seg_head",
                     (TensorSpec("seg_hidden", "float32", ("num_seg", 16), "llm_0.seg_hidden"),),
                     (TensorSpec("seg_embeddings", "float32", ("num_seg", 8)),))


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _model(nodes, inputs, outputs, inits=(), opset=18, extra_opsets=(), functions=()):
    g = helper.make_graph(nodes, "main_graph", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(g, opset_imports=opsets, functions=list(functions), ir_version=10)


def _seg_head(in_shape=("num_seg", 16), out_shape=("num_seg", 8), in_name="seg_hidden", dtype=F32):
    w = numpy_helper.from_array(np.ones((16, 8), np.float32), "w")
    return _model([helper.make_node("MatMul", [in_name, "w"], ["seg_embeddings"], name="fc")],
                  [_vi(in_name, dtype, list(in_shape))], [_vi("seg_embeddings", dtype, list(out_shape))], [w])


def _unary(op, shape=(2, 8), domain="", dtype=F32, **attrs):
    return _model([helper.make_node(op, ["x"], ["y"], name=f"{op.lower()}_0", domain=domain, **attrs)],
                  [_vi("x", dtype, list(shape))], [_vi("y", dtype, list(shape))])


def test_good_graph_passes_everything(tmp_path):
    path = tmp_path / "seg_head.onnx"
    save_model(_seg_head(), path, external_data_threshold_bytes=0)  # checks read it without the weights
    check_all(path, SEG_HEAD)


def test_check_model_proto_runs_the_in_memory_checks():
    check_model_proto(_seg_head(), SEG_HEAD)
    with pytest.raises(GraphCheckError, match=r"graph seg_head.onnx: node 'fc' \(MatMul\) is in domain 'x'"):
        bad = _seg_head()
        bad.graph.node[0].domain = "x"
        check_model_proto(bad, SEG_HEAD)
    with pytest.raises(GraphCheckError, match="stage 'seg_head' graph I/O"):
        check_model_proto(_seg_head(dtype=F16), SEG_HEAD)


def test_check_model_rejects_an_invalid_graph(tmp_path):
    bad = _model([helper.make_node("Relu", ["missing"], ["y"], name="r")], [_vi("x", F32, [2])], [_vi("y", F32, [2])])
    save_model(bad, tmp_path / "bad.onnx")
    with pytest.raises(GraphCheckError, match=r"graph bad.onnx fails the ONNX checker: .*missing"):
        check_model(tmp_path / "bad.onnx")


def test_custom_domains_are_rejected():
    check_domains(_unary("Relu"))
    with pytest.raises(GraphCheckError, match=r"node 'fused_0' \(Fused\) is in domain 'custom'"):
        check_domains(_unary("Fused", domain="custom"))
    ms = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", F32, [2])], [_vi("y", F32, [2])],
                extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(GraphCheckError, match="imports opset domain 'com.microsoft'"):
        check_domains(ms, "llm_0.onnx")


def test_local_functions_are_rejected():
    fn = helper.make_function("pkg.torch", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 18)])
    model = _model([helper.make_node("Twice", ["x"], ["y"], domain="pkg.torch")], [_vi("x", F32, [2])],
                   [_vi("y", F32, [2])], functions=[fn])
    with pytest.raises(GraphCheckError, match=r"1 local function\(s\) \(pkg.torch::Twice\).*optimize"):
        check_domains(model)


@pytest.mark.parametrize("op", ["Unique", "MadeUpOp", "SequenceEmpty"])
def test_unsupported_ops_are_rejected(op):
    with pytest.raises(GraphCheckError, match=rf"graph main_graph: node '{op.lower()}_0' \({op}\) is not supported"):
        check_trt_ops(_unary(op))


def test_op_list_has_what_csprt_graphs_use():
    used = {"Add", "Cast", "Concat", "Gather", "GatherElements", "MatMul", "ScatterND", "Softmax", "TopK", "Where",
            "Conv", "Resize", "LayerNormalization", "Gelu", "Erf", "ReduceMean", "Pow", "Sqrt", "Reciprocal",
            "Expand", "Range", "Trilu", "CumSum", "ArgMax", "Einsum"}
    assert used <= TRT_SUPPORTED_OPS
    assert not {"Unique", "Compress", "SequenceAt", "BitShift"} & TRT_SUPPORTED_OPS


def test_softmax_rank():
    check_trt_ops(_unary("Softmax", shape=(2, 8), axis=-1))
    with pytest.raises(GraphCheckError, match=r"node 'softmax_0' \(Softmax\) takes a 1-D input 'x'"):
        check_trt_ops(_unary("Softmax", shape=(8,), axis=0))


def test_softmax_rank_found_through_shape_inference():
    # The 1-D tensor is an intermediate without value_info: only shape inference knows its rank.
    nodes = [helper.make_node("ReduceSum", ["x", "ax"], ["r"], keepdims=0, name="sum"),
             helper.make_node("Softmax", ["r"], ["y"], axis=0, name="scores_softmax")]
    ax = numpy_helper.from_array(np.array([0], np.int64), "ax")
    model = _model(nodes, [_vi("x", F32, [4, 8])], [_vi("y", F32, None)], [ax])
    with pytest.raises(GraphCheckError, match="scores_softmax.*1-D"):
        check_trt_ops(model)
    with pytest.raises(GraphCheckError, match="scores_softmax.*1-D"):
        check_trt_ops(infer_shapes(model))  # already inferred (the exporter's order): value_info is reused


def test_float64_is_rejected():
    with pytest.raises(GraphCheckError, match="casts to float64"):
        check_trt_ops(_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE, name="c")],
                             [_vi("x", F32, [2])], [_vi("y", TensorProto.DOUBLE, [2])]))
    d = numpy_helper.from_array(np.ones(2, np.float64), "d")
    model = _model([helper.make_node("Add", ["x", "d"], ["y"], name="a")], [_vi("x", TensorProto.DOUBLE, [2])],
                   [_vi("y", TensorProto.DOUBLE, [2])], [d])
    with pytest.raises(GraphCheckError, match="tensor '(x|y|d)' is float64"):
        check_trt_ops(model)


def test_topk_must_be_sorted_2d_and_opset_in_range():
    k = numpy_helper.from_array(np.array([2], np.int64), "k")
    topk = lambda s, shape: _model(  # noqa: E731
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], sorted=s, name="select")],
        [_vi("x", F32, shape)], [_vi("v", F32, shape[:-1] + [2]), _vi("i", I64, shape[:-1] + [2])], [k])
    check_trt_ops(topk(1, [1, 8]))
    with pytest.raises(GraphCheckError, match=r"node 'select' \(TopK\) has sorted=0"):
        check_trt_ops(topk(0, [1, 8]))
    with pytest.raises(GraphCheckError, match=r"node 'select' \(TopK\) takes a 1-D input 'x'; TensorRT needs rank >= 2"):
        check_trt_ops(topk(1, [8]))
    with pytest.raises(GraphCheckError, match="uses ONNX opset 8; TensorRT imports opsets 9 to 24"):
        check_trt_ops(_model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", F32, [2])], [_vi("y", F32, [2])],
                             opset=8))


@pytest.mark.parametrize("model,expected", [
    (_seg_head(in_name="hidden"), "inputs differ from the spec: missing ['seg_hidden'], unexpected ['hidden']"),
    (_seg_head(dtype=F16), "input 'seg_hidden': expected dtype float32, got float16"),
    (_seg_head(in_shape=("num_seg", 4, 16)), "input 'seg_hidden': expected rank 2 ['num_seg', 16], got rank 3"),
    (_seg_head(in_shape=("num_seg", 12)), "input 'seg_hidden': axis 1 expected static 16, got 12"),
    (_seg_head(in_shape=("num_seg", "d")), "input 'seg_hidden': axis 1 expected static 16, got 'd'"),
    (_seg_head(out_shape=("s0", 8)), "output 'seg_embeddings': axis 0 expected named dim 'num_seg', got 's0'"),
    (_seg_head(out_shape=(3, 8)), "output 'seg_embeddings': axis 0 expected named dim 'num_seg', got 3"),
], ids=["name", "dtype", "rank", "static", "static-vs-named", "dim-name", "specialised"])
def test_check_io_mismatches(model, expected):
    with pytest.raises(GraphCheckError) as exc:
        check_io(model, SEG_HEAD)
    assert str(exc.value).startswith("stage 'seg_head' graph I/O does not match its spec: ")
    assert expected in str(exc.value)


def test_check_io_expression_dims_are_checked_for_rank_only():
    spec = StageSpec("llm_0", "llm", (TensorSpec("x", "float32", (1, 2, "prefix_len + 4 + suffix_len", 8), "host.x"),),
                     (TensorSpec("y", "float32", (1, 2, "prefix_len + 4 + suffix_len", 8)),))
    shape = [1, 2, "s0 + s1 + 4", 8]
    check_io(_model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", F32, shape)], [_vi("y", F32, shape)]), spec)
    with pytest.raises(GraphCheckError, match="expected rank 4"):
        check_io(_model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", F32, shape[1:])],
                        [_vi("y", F32, shape)]), spec)


def test_nonzero_and_1d_argmax_are_rejected():
    nz = _model([helper.make_node("NonZero", ["x"], ["y"], name="find")], [_vi("x", F32, [1, 8])], [_vi("y", I64, [2, "n"])])
    with pytest.raises(GraphCheckError, match=r"node 'find' \(NonZero\) has a data-dependent output shape"):
        check_trt_ops(nz)
    am = _model([helper.make_node("ArgMax", ["x"], ["y"], axis=0, name="best")], [_vi("x", F32, [8])], [_vi("y", I64, [1])])
    with pytest.raises(GraphCheckError, match=r"node 'best' \(ArgMax\) takes a 1-D input"):
        check_trt_ops(am)
