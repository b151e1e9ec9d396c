"""Passes on exported stage graphs: shape inference, optimisation, dim names, atomic save (external data
over 2 GB), and the fp16 report. No torch here.

The exporter runs, per stage:

    torch.onnx.export(dynamo=True).model_proto -> optimize -> rename_dims(stage_dim_names(spec))
        -> save_model(graphs/<stage>.onnx) -> onnx_checks.check_all

Functions that take a ModelProto whose tensors live in external files expect them loaded
(`onnx.load(path)`), except where the docstring says otherwise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import onnx
from onnx import external_data_helper as ext
from onnx import numpy_helper

from graphs.atomic import atomic_path
from graphs.errors import internal_error
from graphs.stages import StageSpec

EXTERNAL_DATA_THRESHOLD = 2**31 - 2**20  # protobuf's 2 GiB limit, less 1 MiB of headroom for the graph itself
MIN_EXTERNAL_TENSOR_BYTES = 1024  # smaller tensors (shape constants) stay inline, as onnx.save does
FP16_SENSITIVE_OPS = ("Softmax", "ReduceMean", "LayerNormalization", "Pow")


# --- walking --------------------------------------------------------------------------------------

def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            for g in attr.graphs:
                yield from iter_graphs(g)


def iter_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node of the main graph and its subgraphs."""
    for g in iter_graphs(model.graph):
        yield from g.node


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every initializer and attribute tensor (Constant values), subgraphs included."""
    for g in iter_graphs(model.graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def external_data_locations(model: onnx.ModelProto) -> list[str]:
    """Relative paths of the external-data files `model` references, in first-use order.

    Args:
        model (onnx.ModelProto): loaded with `load_external_data=False`.
    """
    locations: dict[str, None] = {}
    for t in iter_tensors(model):
        if ext.uses_external_data(t):
            locations.setdefault(ext.ExternalDataInfo(t).location, None)
    return list(locations)


def value_types(model: onnx.ModelProto) -> dict[str, tuple[int, int | None]]:
    """name -> (elem_type, rank or None) of every typed value: graph inputs/outputs, value_info and
    initializers, subgraphs included. Run `infer_shapes` first to cover intermediates."""
    types: dict[str, tuple[int, int | None]] = {}
    for g in iter_graphs(model.graph):
        for vi in (*g.input, *g.value_info, *g.output):
            tt = vi.type.tensor_type
            if vi.type.HasField("tensor_type"):
                types[vi.name] = (tt.elem_type, len(tt.shape.dim) if tt.HasField("shape") else None)
        for t in g.initializer:
            types[t.name] = (t.data_type, len(t.dims))
    return types


# --- passes ---------------------------------------------------------------------------------------

def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference (non-strict, with data propagation); returns a new model.

    Models over 2 GB go through a temp file (`infer_shapes_path`), as the in-memory API cannot serialise them.
    """
    kw = {"check_type": False, "strict_mode": False, "data_prop": True}
    if model.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF:
        return onnx.shape_inference.infer_shapes(model, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "model.onnx"), Path(tmp, "inferred.onnx")
        save_model(model, src, external_data_threshold_bytes=0)
        onnx.shape_inference.infer_shapes_path(str(src), str(dst), **kw)
        return onnx.load(str(dst))  # loads the external data while the temp dir exists


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxscript's optimizer: inlines local functions, folds constants, removes dead nodes and unused
    opsets, deduplicates initializers. Graph input/output names, order and dim names are kept.

    Args:
        model (onnx.ModelProto): e.g. `torch.onnx.export(..., dynamo=True).model_proto`.
    """
    import onnxscript.optimizer

    before = _io_signature(model)
    out = onnxscript.optimizer.optimize(model)
    if _io_signature(out)[:2] != before[:2]:
        raise internal_error(f"optimizer changed graph I/O names: {before[:2]} -> {_io_signature(out)[:2]}")
    # Folding can refine an output's dim name to a static size or an inferred name; restore the exporter's.
    rename_dims(out, {name: {i: d for i, d in enumerate(dims) if isinstance(d, str)}
                      for name, dims in before[2].items()})
    return out


def _io_signature(model: onnx.ModelProto):
    ins = [v.name for v in model.graph.input]
    outs = [v.name for v in model.graph.output]
    dims = {v.name: [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                     for d in v.type.tensor_type.shape.dim]
            for v in (*model.graph.input, *model.graph.output)}
    return ins, outs, dims


def rename_dims(model: onnx.ModelProto, names: dict[str, dict[int, str]] | StageSpec) -> onnx.ModelProto:
    """Set `dim_param` of graph inputs/outputs, in place; returns `model`.

    Args:
        model (onnx.ModelProto): the graph.
        names (dict[str, dict[int, str]] or StageSpec): tensor name -> {axis: dim name}, e.g.
            {"prefix_ids": {0: "prefix_len"}}; a StageSpec means every str dim of its I/O (`stage_dim_names`).
    """
    if isinstance(names, StageSpec):
        names = stage_dim_names(names)
    values = {v.name: v for v in (*model.graph.input, *model.graph.output)}
    for tensor, axes in names.items():
        if tensor not in values:
            raise internal_error(f"rename_dims: graph has no input/output {tensor!r}; it has {sorted(values)}")
        dims = values[tensor].type.tensor_type.shape.dim
        for axis, name in axes.items():
            if not -len(dims) <= axis < len(dims):
                raise internal_error(f"rename_dims: {tensor!r} has rank {len(dims)}, no axis {axis}")
            dims[axis].dim_param = name  # a oneof with dim_value: clears it
    return model


def stage_dim_names(stage: StageSpec) -> dict[str, dict[int, str]]:
    """{tensor: {axis: dim name}} of every named or expression dim of a stage's inputs and outputs
    (the argument of `rename_dims` that makes a graph carry the manifest's names)."""
    return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            for t in (*stage.inputs, *stage.outputs) if any(isinstance(d, str) for d in t.shape)}


def save_model(model: onnx.ModelProto, path: str | os.PathLike,
               external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Write `model` to `path` atomically; returns the files written.

    Over the threshold, every tensor of >= 1 KiB goes to one `<name>.onnx.data` beside it (relative
    location). The data file is renamed into place first and the .onnx last, so an interrupted save
    never leaves a .onnx that points at missing data. `model` keeps its values (large tensors stored in
    typed fields such as float_data come back as raw_data).

    Args:
        model (onnx.ModelProto): with all tensor data loaded.
        path (str or PathLike): e.g. out/graphs/llm_0.onnx; parent directories are created.
        external_data_threshold_bytes (int): serialized size above which data goes external. Defaults to
            2 GiB - 1 MiB (protobuf's limit).
    """
    path = Path(path)
    data = path.with_name(path.name + ".data")
    if any(ext.uses_external_data(t) for t in iter_tensors(model)):
        raise internal_error(f"save_model({path}): model references external data that is not loaded")
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() <= external_data_threshold_bytes:
        with atomic_path(path) as tmp:
            tmp.write_bytes(model.SerializeToString())
        data.unlink(missing_ok=True)  # left by an earlier, larger export; nothing references it now
        return [path]
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        moved = [t for t in iter_tensors(model)
                 if t.data_type != onnx.TensorProto.STRING and t.ByteSize() >= MIN_EXTERNAL_TENSOR_BYTES]
        for t in moved:
            if not t.HasField("raw_data"):  # float_data etc.: same values, stored as raw bytes
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
            ext.set_external_data(t, data.name)
        if not moved:
            return save_model(model, path, external_data_threshold_bytes=model.ByteSize())
        try:
            ext.write_external_data_tensors(model, str(tmpdir))  # moves raw_data into tmpdir/<name>.data
            graph_bytes = model.SerializeToString()
        finally:
            ext.load_external_data_for_model(model, str(tmpdir))  # puts it back: the caller's model keeps its data
            for t in moved:
                t.ClearField("data_location")  # set to DEFAULT by the reload; unset is the same, byte for byte
        with open(tmpdir / data.name, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmpdir / data.name, data)
        with atomic_path(path) as tmp:
            tmp.write_bytes(graph_bytes)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return [data, path]


UPCAST_OPS = ("Softmax", "ReduceMean")  # reductions whose fp16 accumulation loses masks and attention ranks


def upcast_sensitive_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """Compute Softmax and ReduceMean of an fp16 graph in fp32, in place; returns the model.

    torch's `softmax(x, dtype=float32)` on a half tensor exports as an fp16 Softmax, and SAM's channel
    LayerNorm is two fp16 ReduceMeans. Each such node gets a Cast to fp32 before and back after:

        x(fp16) -> Softmax -> y(fp16)    becomes    x -> Cast(fp32) -> Softmax -> Cast(fp16) -> y

    Args:
        model (onnx.ModelProto): shape-inferred (value_info present), so input types are known.
    """
    types = value_types(model)
    half, full = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    for g in iter_graphs(model.graph):
        nodes = []
        for node in g.node:
            if node.op_type in UPCAST_OPS and node.input and types.get(node.input[0], (0,))[0] == half:
                src, dst = node.input[0], node.output[0]
                up, down = f"{src}__fp32_{node.name}", f"{dst}__fp32"
                nodes.append(onnx.helper.make_node("Cast", [src], [up], to=full, name=f"{node.name}__to_fp32"))
                node.input[0], node.output[0] = up, down
                nodes.append(node)
                nodes.append(onnx.helper.make_node("Cast", [down], [dst], to=half, name=f"{node.name}__to_fp16"))
            else:
                nodes.append(node)
        del g.node[:]
        g.node.extend(nodes)
    return model


# --- reports --------------------------------------------------------------------------------------

def fp16_sensitive_ops_report(model: onnx.ModelProto) -> list[str]:
    """Numerically sensitive nodes (Softmax, ReduceMean, LayerNormalization, Pow) whose input is float16.

    csprt exports fp16 graphs from a torch fp16 model whose RMSNorm and softmax upcast to fp32, so an
    LLM stage should report nothing here; each line names a node that computes in half precision.

    Args:
        model (onnx.ModelProto): any graph; shape inference runs here unless it already has value_info.
    """
    types = value_types(model if model.graph.value_info else infer_shapes(model))
    lines = []
    for node in iter_nodes(model):
        if node.op_type in FP16_SENSITIVE_OPS and node.input and types.get(node.input[0], (0,))[0] == onnx.TensorProto.FLOAT16:
            lines.append(f"node {node.name!r} ({node.op_type}) computes on float16 input {node.input[0]!r}")
    return lines
