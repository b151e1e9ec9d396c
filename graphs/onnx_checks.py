"""Checks on an exported stage graph before it enters an artifact: ONNX validity, default domain only,
TensorRT-importable ops and dtypes, and I/O that matches the stage's spec in graphs/stages.py.

Each check raises GraphCheckError naming the graph, the node (name and op type) or tensor, and what
was expected. `check_all` runs them all on a saved graph without loading its weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from graphs.dims import is_named
from graphs.errors import ToolchainError
from graphs.onnx_passes import infer_shapes, iter_nodes, iter_tensors, value_types
from graphs.stages import StageSpec, TensorSpec
from graphs.trt_ops import TRT_OPSET_RANGE, TRT_SUPPORTED_OPS

DEFAULT_DOMAINS = ("", "ai.onnx")
ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
               "int64": onnx.TensorProto.INT64}


class GraphCheckError(ToolchainError):
    """An exported graph that a host or TensorRT cannot use as the stage spec promises."""


def _dtype_name(elem_type: int) -> str:
    names = {v: k for k, v in ONNX_DTYPES.items()}
    return names.get(elem_type) or onnx.TensorProto.DataType.Name(elem_type).lower()


def _node(node: onnx.NodeProto) -> str:
    return f"node {node.name!r} ({node.op_type})"


def check_model(path: str | os.PathLike) -> None:
    """`onnx.checker.check_model(path, full_check=True)`: path-based, so graphs over 2 GB work."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphCheckError(f"graph {Path(path).name} fails the ONNX checker: {first}") from None


def check_domains(model: onnx.ModelProto, name: str | None = None) -> None:
    """Only the default ONNX domain: no custom or com.microsoft ops, no local functions.

    Args:
        model (onnx.ModelProto): the graph.
        name (str): the graph's name in messages. Defaults to model.graph.name.
    """
    name = name or model.graph.name
    if model.functions:
        fns = ", ".join(f"{f.domain}::{f.name}" for f in model.functions[:5])
        raise GraphCheckError(f"graph {name} has {len(model.functions)} local function(s) ({fns}); TensorRT needs "
                              "them inlined: run graphs.onnx_passes.optimize on it")
    for op in model.opset_import:
        if op.domain not in DEFAULT_DOMAINS:
            raise GraphCheckError(f"graph {name} imports opset domain {op.domain!r}; only the default ONNX "
                                  "domain is allowed (no custom or com.microsoft ops)")
    for node in iter_nodes(model):
        if node.domain not in DEFAULT_DOMAINS:
            raise GraphCheckError(f"graph {name}: {_node(node)} is in domain {node.domain!r}; only the default "
                                  "ONNX domain is allowed (no custom or com.microsoft ops)")


def check_trt_ops(model: onnx.ModelProto, name: str | None = None) -> None:
    """Every op is one TensorRT's ONNX parser imports (graphs/trt_ops.py), within its restrictions that
    csprt graphs can hit: no 1-D Softmax (TensorRT-RTX rejects it), TopK sorted, LayerNormalization
    with one output, ScatterND without reduction, and no float64 anywhere (TensorRT has none).

    Args:
        model (onnx.ModelProto): the graph; its weights need not be loaded. Shape inference runs here
            unless the graph already has value_info (an `infer_shapes` result).
        name (str): the graph's name in messages. Defaults to model.graph.name.
    """
    name = name or model.graph.name
    opset = next((op.version for op in model.opset_import if op.domain in DEFAULT_DOMAINS), None)
    lo, hi = TRT_OPSET_RANGE
    if opset is not None and not lo <= opset <= hi:
        raise GraphCheckError(f"graph {name} uses ONNX opset {opset}; TensorRT imports opsets {lo} to {hi}")
    unsupported = [n for n in iter_nodes(model) if n.op_type not in TRT_SUPPORTED_OPS]
    if unsupported:
        ops = sorted({n.op_type for n in unsupported})
        raise GraphCheckError(f"graph {name}: {_node(unsupported[0])} is not supported by TensorRT's ONNX parser "
                              f"(unsupported ops: {', '.join(ops)}); rewrite it from supported ops in the export wrapper")
    types = value_types(model if model.graph.value_info else infer_shapes(model))
    for node in iter_nodes(model):
        problem = _trt_restriction(node, types)
        if problem:
            raise GraphCheckError(f"graph {name}: {_node(node)} {problem}")
    doubles = [n for n, (t, _) in types.items() if t == onnx.TensorProto.DOUBLE]
    doubles += [t.name for t in iter_tensors(model) if t.data_type == onnx.TensorProto.DOUBLE]
    if doubles:
        raise GraphCheckError(f"graph {name}: tensor {doubles[0]!r} is float64, which TensorRT does not support; "
                              "export it as float32")


def _trt_restriction(node: onnx.NodeProto, types: dict) -> str:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Softmax" and types.get(node.input[0], (0, None))[1] == 1:
        return f"takes a 1-D input {node.input[0]!r}; TensorRT-RTX rejects a 1-D Softmax (unsqueeze it to 2-D)"
    if node.op_type in ("TopK", "ArgMax", "ArgMin") and types.get(node.input[0], (0, None))[1] == 1:
        return f"takes a 1-D input {node.input[0]!r}; TensorRT needs rank >= 2 (unsqueeze it first)"
    if node.op_type == "NonZero":
        return ("has a data-dependent output shape that TensorRT-RTX imports only through a plugin it does not ship; "
                "pass the count as an input dim instead")
    if node.op_type == "TopK" and attrs.get("sorted", 1) == 0:
        return "has sorted=0; TensorRT needs sorted=1 (sort the selected indices afterwards instead)"
    if node.op_type == "LayerNormalization" and any(node.output[1:]):
        return "uses its Mean/InvStdDev outputs; TensorRT imports only the first output"
    if node.op_type == "ScatterND" and attrs.get("reduction", b"none") not in (b"none", "none"):
        return f"has reduction={attrs['reduction']!r}; TensorRT supports only reduction='none'"
    if node.op_type == "Cast" and attrs.get("to") == onnx.TensorProto.DOUBLE:
        return "casts to float64, which TensorRT does not support"
    return ""


def check_io(model: onnx.ModelProto, stage: StageSpec) -> None:
    """Graph inputs/outputs agree with the stage spec: names, dtypes, ranks, static sizes and plain dim
    names (e.g. "prefix_len"). Expression dims ("prefix_len + 64 + suffix_len") are checked for rank only.

    Args:
        model (onnx.ModelProto): the stage graph.
        stage (StageSpec): its spec from the layout.
    """
    inits = {t.name for t in model.graph.initializer}
    problems = []
    for kind, specs, values in (("input", stage.inputs, [v for v in model.graph.input if v.name not in inits]),
                                ("output", stage.outputs, list(model.graph.output))):
        got = {v.name: v for v in values}
        want = {t.name for t in specs}
        missing, extra = [t.name for t in specs if t.name not in got], [n for n in got if n not in want]
        if missing or extra:
            problems.append(f"{kind}s differ from the spec: missing {missing}, unexpected {extra}")
        problems += [f"{kind} {t.name!r}: {p}" for t in specs if t.name in got for p in _tensor_problems(t, got[t.name])]
    if problems:
        raise GraphCheckError(f"stage {stage.name!r} graph I/O does not match its spec: {'; '.join(problems[:6])}")


def _tensor_problems(spec: TensorSpec, value: onnx.ValueInfoProto) -> list[str]:
    tt = value.type.tensor_type
    if tt.elem_type != ONNX_DTYPES[spec.dtype]:
        return [f"expected dtype {spec.dtype}, got {_dtype_name(tt.elem_type)}"]
    dims = list(tt.shape.dim)
    if not tt.HasField("shape") or len(dims) != len(spec.shape):
        got = len(dims) if tt.HasField("shape") else "unknown"
        return [f"expected rank {len(spec.shape)} {list(spec.shape)}, got rank {got}"]
    out = []
    for axis, (want, d) in enumerate(zip(spec.shape, dims)):
        got = d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
        if isinstance(want, int) and not (d.HasField("dim_value") and d.dim_value == want):
            out.append(f"axis {axis} expected static {want}, got {got!r}")
        elif is_named(want) and d.dim_param != want:
            out.append(f"axis {axis} expected named dim {want!r}, got {got!r}")
    return out


def check_model_proto(model: onnx.ModelProto, stage: StageSpec, name: str | None = None) -> None:
    """`check_domains`, `check_trt_ops` and `check_io` on an in-memory graph (before it is saved).

    Args:
        model (onnx.ModelProto): the stage graph; its weights need not be loaded.
        stage (StageSpec): its spec from the layout.
        name (str): the graph's name in messages. Defaults to "<stage>.onnx".
    """
    name = name or f"{stage.name}.onnx"
    check_domains(model, name)
    check_trt_ops(model, name)
    check_io(model, stage)


def check_all(path: str | os.PathLike, stage: StageSpec) -> None:
    """All checks on a saved stage graph; its weights are not loaded (graphs over 2 GB stay cheap).

    Args:
        path (str or PathLike): graphs/<stage>.onnx.
        stage (StageSpec): its spec from the layout.
    """
    check_model(path)
    check_model_proto(onnx.load(str(path), load_external_data=False), stage, Path(path).name)


# --- a graph's I/O without its weights -------------------------------------------------------------
# Protobuf field numbers (onnx.proto): ModelProto.graph = 7; GraphProto.initializer = 5, input = 11,
# output = 12; TensorProto.name = 8.
_MODEL_GRAPH, _GRAPH_INIT, _GRAPH_INPUT, _GRAPH_OUTPUT, _TENSOR_NAME = 7, 5, 11, 12, 8


def _varint(f) -> int:
    value = shift = 0
    while True:
        b = f.read(1)
        if not b:
            raise EOFError("truncated varint")
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(f, end: int):
    """(field number, offset, length) of each length-delimited field of the message that ends at `end`; other
    wire types are skipped. The file position is moved past each field whatever the caller reads meanwhile."""
    while f.tell() < end:
        tag = _varint(f)
        wire = tag & 7
        if wire == 0:
            _varint(f)
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
        elif wire == 2:
            n = _varint(f)
            start = f.tell()
            if start + n > end:
                raise EOFError("field runs past its message")
            yield tag >> 3, start, n
            f.seek(start + n)
        else:
            raise ValueError(f"wire type {wire}")


def graph_io(path: str | os.PathLike) -> onnx.ModelProto:
    """A ModelProto holding only the graph's inputs, outputs and initializer names of the ONNX file `path`.

    The file's protobuf fields are walked and every node and weight is seeked past, so reading a multi-GB graph
    with inline weights costs a few kB of reads (onnx.load would read all of it). Enough for `check_io`.

    Raises:
        GraphCheckError: the file is not a readable ONNX model.
    """
    from google.protobuf.message import DecodeError

    out = onnx.ModelProto()
    try:
        with open(path, "rb") as f:
            for field, start, n in _fields(f, os.fstat(f.fileno()).st_size):
                if field != _MODEL_GRAPH:
                    continue
                for gfield, gstart, gn in _fields(f, start + n):
                    if gfield in (_GRAPH_INPUT, _GRAPH_OUTPUT):
                        f.seek(gstart)
                        dest = out.graph.input if gfield == _GRAPH_INPUT else out.graph.output
                        dest.append(onnx.ValueInfoProto.FromString(f.read(gn)))
                    elif gfield == _GRAPH_INIT:
                        for tfield, tstart, tn in _fields(f, gstart + gn):
                            if tfield == _TENSOR_NAME:
                                f.seek(tstart)
                                out.graph.initializer.add(name=f.read(tn).decode("utf-8"))
    except (OSError, EOFError, ValueError, DecodeError) as exc:
        raise GraphCheckError(f"graph {Path(path).name} is not a readable ONNX model ({exc})") from None
    return out
