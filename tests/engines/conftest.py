"""Toy stage graphs (onnx.helper) and a hand-built Layout wiring them, for the runner and Pipeline tests.

    host.a, host.b --> s1 (Add) --sum--> s2 (Identity; source by mode) --y
    host.ids [1, len], host.row_lens --> prefill (a block: static cache; a batch of one) --(next_token, last_hidden)-->
                 decode loop: step_prefill runs the same graph on the token; each call writes its ids as cache rows
                 at past_len
    host.seg_rows (single-pass) | loop.seg_hidden (generate) --> head --seg_embeddings--> dec2 <-- s1.sum

Toy semantics: a call's next_token = max(ids) + 1, last_hidden = [token, past_len + len(ids)] (the cache length
after it), and its new cache rows are its ids: each decode step emits token + 1 and appends the fed token.
"""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from graphs.stages import DimRange, Layout, Loop, StageSpec, TensorSpec

_ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64}


def _vi(t: TensorSpec):
    shape = [d if isinstance(d, int) else d.replace(" ", "") for d in t.shape]
    return helper.make_tensor_value_info(t.name, _ONNX_TYPES[t.dtype], shape)


def save_graph(path, stage: StageSpec, nodes, initializers=(), external_data: bool = False):
    """Write `nodes` as a graph with the stage's I/O names, dtypes and (named) shapes."""
    graph = helper.make_graph(nodes, stage.name, [_vi(t) for t in stage.inputs], [_vi(t) for t in stage.outputs],
                              initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def _ints(name, values):
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], list(values))


F = "float32"
A = TensorSpec("a", F, (1, "n"))
B = TensorSpec("b", F, (1, "n"))
IDS = TensorSpec("ids", "int64", (1, "len"))
ROW_LENS = TensorSpec("row_lens", "int64", (1,))
SEG_ROWS = TensorSpec("seg_rows", F, ("num_seg", 2))

S1 = StageSpec("s1", "vision", (TensorSpec("a", F, (1, "n"), "host.a"), TensorSpec("b", F, (1, "n"), "host.b")),
               (TensorSpec("sum", F, (1, "n")),))
S2 = StageSpec("s2", "vision", (TensorSpec("x", F, (1, "n"), {"single-pass": "s1.sum", "generate": "host.a"}),),
               (TensorSpec("y", F, (1, "n")),))
PREFILL = StageSpec("prefill", "llm", (TensorSpec("ids", "int64", (1, "len"), "host.ids"),
                                       TensorSpec("row_lens", "int64", (1,), "host.row_lens"),
                                       TensorSpec("past_len", "int64", (1,), "cache"),
                                       TensorSpec("past", F, (1, 1, "cache", 1), "cache")),
                    (TensorSpec("next_token", "int64", (1,)), TensorSpec("last_hidden", F, (1, 2)),
                     TensorSpec("rows", F, (1, 1, "len", 1))), cache=(("past", "rows"),))
STEP = StageSpec("step_prefill", "llm", (TensorSpec("ids", "int64", (1, "len"), "loop.token"),
                                         TensorSpec("row_lens", "int64", (1,), "loop.row_lens")) + PREFILL.inputs[2:],
                 PREFILL.outputs, cache=PREFILL.cache, graph="prefill", loop=True, modes=("generate",))
HEAD = StageSpec("head", "seg_head",
                 (TensorSpec("seg_hidden", F, ("num_seg", 2), {"single-pass": "host.seg_rows",
                                                               "generate": "loop.seg_hidden"}),),
                 (TensorSpec("seg_embeddings", F, ("num_seg", 3)),), skip_if_empty="seg_hidden")
DEC2 = StageSpec("dec2", "sam_decoder",
                 (TensorSpec("seg_embeddings", F, ("num_seg", 3), "head.seg_embeddings"),
                  TensorSpec("img", F, (1, "n"), "s1.sum")),
                 (TensorSpec("masks", F, ("num_seg", "n")),), skip_if_empty="seg_embeddings")
STAGES = (S1, S2, PREFILL, HEAD, DEC2)
DIMS = {"n": DimRange(1, 4, 8), "len": DimRange(1, 3, 16), "num_seg": DimRange(1, 1, 4), "cache": DimRange(1, 8, 32)}


def toy_layout(seg: int = 7, eos: int = 9, max_new_tokens: int = 10, dims: dict | None = None) -> Layout:
    loop = Loop(steps=(STEP,), after="prefill", token="prefill.next_token", hidden="prefill.last_hidden",
                position="prefill.next_token", token_output="step_prefill.next_token",
                hidden_output="step_prefill.last_hidden", max_new_tokens=max_new_tokens, stop_token_ids=(eos,),
                seg_token_id=seg)
    outputs = {"masks": "dec2.masks", "emb": "head.seg_embeddings", "y": "s2.y",
               "generated_ids": {"generate": "loop.generated_ids"}}
    return Layout(host_inputs=(A, B, IDS, ROW_LENS, SEG_ROWS), stages=STAGES, dims=dict(dims or DIMS),
                  modes=("single-pass", "generate"), outputs=outputs, loop=loop)


def write_toy_graphs(out_dir):
    """One .onnx per toy stage in `out_dir`; returns {stage name: path}."""
    mk = helper.make_node
    one_f = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    graphs = {
        "s1": (S1, [mk("Add", ["a", "b"], ["sum"])], []),
        "s2": (S2, [mk("Identity", ["x"], ["y"])], []),
        "prefill": (PREFILL, [
            mk("ReduceMax", ["ids"], ["mx"], axes=[1], keepdims=0),
            mk("Add", ["mx", "one"], ["next_token"]),
            mk("Cast", ["next_token"], ["tok_f"], to=TensorProto.FLOAT),
            mk("Shape", ["ids"], ["len_i"], start=1),
            mk("Add", ["len_i", "past_len"], ["tot"]),
            mk("Cast", ["tot"], ["len_f"], to=TensorProto.FLOAT),
            mk("Concat", ["tok_f", "len_f"], ["hid1"], axis=0),
            mk("Unsqueeze", ["hid1", "ax0"], ["last_hidden"]),
            mk("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
            mk("Reshape", ["ids_f", "rows_shape"], ["rows"]),
        ], [one_f, _ints("ax0", [0]), _ints("rows_shape", [1, 1, -1, 1])]),
        "head": (HEAD, [
            mk("ReduceSum", ["seg_hidden", "one"], ["rsum"], keepdims=1),
            mk("Concat", ["seg_hidden", "rsum"], ["seg_embeddings"], axis=1),
        ], [one_f]),
        "dec2": (DEC2, [
            mk("ReduceSum", ["seg_embeddings", "one"], ["esum"], keepdims=1),
            mk("Add", ["esum", "img"], ["masks"]),
        ], [one_f]),
    }
    return {name: save_graph(out_dir / f"{name}.onnx", stage, nodes, inits)
            for name, (stage, nodes, inits) in graphs.items()}


@pytest.fixture(scope="session")
def toy_graphs(tmp_path_factory):
    return write_toy_graphs(tmp_path_factory.mktemp("toy_graphs"))


@pytest.fixture(scope="session")
def make_toy_layout():
    """The `toy_layout(seg=7, eos=9, max_new_tokens=10, dims=None)` factory."""
    return toy_layout


@pytest.fixture(scope="session")
def save_onnx():
    """The `save_graph(path, stage, nodes, initializers=(), external_data=False)` helper."""
    return save_graph
