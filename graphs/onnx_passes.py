"""Passes on exported stage graphs: shape inference, optimisation, dim names, atomic save (external data
over 2 GB), and the fp16 report. No torch here.

The exporter runs, per stage (torch.onnx.export optimises the graph itself):

    torch.onnx.export(dynamo=True) -> rename_dims(stage_dim_names(spec)) -> infer_shapes
        -> upcast_sensitive_ops (fp16) -> onnx_checks.check_model_proto -> save -> onnx_checks.check_model

with the weights kept out of the passes (they copy a model several times, and a ModelProto over 2 GB
cannot be serialised at all): the exporter writes the weights to a data file first, and the passes
run on the graph alone:

    ONNXProgram.save(external data) -> load_graph -> rename_dims ... check_model_proto
        -> save_with_external_data (inline .onnx up to the threshold, else .onnx + .onnx.data)
        -> onnx_checks.check_model (path based)

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
PROTOBUF_LIMIT = onnx.checker.MAXIMUM_PROTOBUF  # the largest ModelProto the in-memory ONNX APIs take (tests lower it)
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


def iter_tensors(model: onnx.ModelProto, main_initializers: bool = True) -> Iterator[onnx.TensorProto]:
    """Every initializer and attribute tensor (Constant values), subgraphs included.

    Args:
        main_initializers (bool): include the main graph's initializers. Defaults to True.
    """
    for g in iter_graphs(model.graph):
        if main_initializers or g is not model.graph:
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


def external_placement(t: onnx.TensorProto) -> tuple[str, int, int] | None:
    """(location, offset, length) of a tensor stored as external data (length from its dims when not recorded),
    else None."""
    if not ext.uses_external_data(t):
        return None
    info = ext.ExternalDataInfo(t)
    length = int(info.length) if info.length is not None else _dims_bytes(t)
    return info.location, int(info.offset or 0), length


def tensor_bytes(t: onnx.TensorProto) -> int:
    """A tensor's data bytes, whether inline or external, without reading them."""
    placed = external_placement(t)
    return placed[2] if placed else _dims_bytes(t)


def _dims_bytes(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


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
    A graph loaded without its external data (`load_graph`) is small and stays in memory: inference needs
    only the initializers' dims, which the graph keeps.
    """
    kw = {"check_type": False, "strict_mode": False, "data_prop": True}
    if model.ByteSize() < PROTOBUF_LIMIT:
        return onnx.shape_inference.infer_shapes(model, **kw)
    graph_only = any(ext.uses_external_data(t) for t in iter_tensors(model))
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "model.onnx"), Path(tmp, "inferred.onnx")
        if graph_only:  # its weights are elsewhere already; the graph alone is small enough to write
            src.write_bytes(model.SerializeToString())
        else:
            save_model(model, src, external_data_threshold_bytes=0)
        onnx.shape_inference.infer_shapes_path(str(src), str(dst), **kw)
        return onnx.load(str(dst), load_external_data=not graph_only)  # data loaded while the temp dir exists


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


def load_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """A saved graph without its external data: nodes, I/O, value_info and initializer dims (cheap for any size)."""
    return onnx.load(str(path), load_external_data=False)


def save_with_external_data(model: onnx.ModelProto, path: str | os.PathLike, data_file: str | os.PathLike,
                            inline_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Install a graph whose weights are already written to `data_file` (its tensors refer to
    `<path.name>.data`, relative, as `ONNXProgram.save(external_data=True)` writes them).

    Up to `inline_threshold_bytes` (the inline file's size) one .onnx is written with the weights inline,
    streamed a tensor at a time (`_Inliner`: byte for byte what `model.SerializeToString()` gives once the
    data is loaded, without holding it); over it, `data_file` is renamed to `<path>.data` and then the
    graph is written, both atomically and in that order (as `save_model`), so an interrupted save never
    leaves a .onnx that points at missing data.

    Args:
        model (onnx.ModelProto): the graph, loaded without its external data (`load_graph`).
        path (str or PathLike): e.g. out/graphs/llm_0.onnx.
        data_file (str or PathLike): the written weights, named `<path.name>.data`, on the same filesystem:
            renamed into place when kept external, left for the caller to delete when inlined.
        inline_threshold_bytes (int): largest graph kept as one file. Defaults to 2 GiB - 1 MiB (protobuf's limit).

    Returns:
        list[Path]: the files written, as `save_model`.
    """
    path, data_file = Path(path), Path(data_file)
    data = path.with_name(path.name + ".data")
    wrong = sorted({loc for loc in external_data_locations(model) if loc != data.name})
    if wrong:
        raise internal_error(f"save_with_external_data({path}): tensors refer to {wrong}, not {data.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if data_file.name != data.name:
        raise internal_error(f"save_with_external_data({path}): data file {data_file.name!r} is not {data.name!r}")
    inline = _Inliner(model, data_file.parent)
    if inline.size <= inline_threshold_bytes:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            inline.write(f)
        data.unlink(missing_ok=True)  # left by an earlier, larger export; nothing references it now
        return [path]
    with open(data_file, "rb") as f:
        os.fsync(f.fileno())
    os.replace(data_file, data)
    with atomic_path(path) as tmp:
        tmp.write_bytes(model.SerializeToString())
    return [data, path]


# Protobuf wire format: a field is a varint key (number << 3 | wire type) and its payload; ONNX's
# ModelProto.graph is field 7 and GraphProto.initializer field 5, both length-delimited (wire type 2).
_LEN = 2
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        byte = buf[pos]
        n |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return n, pos


def _split_before(buf: bytes, number: int) -> int:
    """Offset of the first field numbered above `number` in a serialized message (protobuf writes fields
    in number order, so a field `number` spliced in here lands where serialising it with the rest would)."""
    pos = 0
    while pos < len(buf):
        key, p = _read_varint(buf, pos)
        if key >> 3 > number:
            return pos
        wire = key & 7
        if wire == 0:
            p = _read_varint(buf, p)[1]
        elif wire == 1:
            p += 8
        elif wire == _LEN:
            n, p = _read_varint(buf, p)
            p += n
        elif wire == 5:
            p += 4
        else:
            raise internal_error(f"protobuf wire type {wire} in an ONNX message")
        pos = p
    return len(buf)


class _Inliner:
    """Writes a graph whose initializers live in an external file as one inline ModelProto, streaming the
    initializers one at a time, so a 2 GB graph never sits in memory (nor its ~5x serialisation buffers).

        model (graph field 7 cleared) = M_head | M_tail        split at field 7
        graph (initializers cleared)  = G_head | G_tail        split at field 5
        file = M_head, key 7, len, G_head, (key 5, len, tensor with raw_data) per initializer, G_tail, M_tail

    Args:
        model (onnx.ModelProto): loaded without external data; initializers may refer to files in `data_dir`.
        data_dir (Path): directory the external locations are relative to.
    """

    def __init__(self, model: onnx.ModelProto, data_dir: Path):
        self.data_dir = data_dir
        self.inits = list(model.graph.initializer)
        for t in iter_tensors(model, main_initializers=False):  # Constant values, subgraphs: rare and small, load them
            if ext.uses_external_data(t):
                ext.load_external_data_for_tensor(t, str(data_dir))
                t.ClearField("data_location")
        shell, graph = onnx.ModelProto(), onnx.GraphProto()
        shell.CopyFrom(model)
        shell.ClearField("graph")
        graph.CopyFrom(model.graph)
        graph.ClearField("initializer")
        m, g = shell.SerializeToString(), graph.SerializeToString()
        self.m_split, self.g_split = _split_before(m, _MODEL_GRAPH), _split_before(g, _GRAPH_INITIALIZER)
        self.m, self.g = m, g
        self.sizes = [self._size(t) for t in self.inits]
        self.graph_size = len(g) + sum(1 + len(_varint(n)) + n for n in self.sizes)
        self.size = len(m) + 1 + len(_varint(self.graph_size)) + self.graph_size

    @staticmethod
    def _shell(t: onnx.TensorProto) -> onnx.TensorProto:
        out = onnx.TensorProto()
        out.CopyFrom(t)
        out.ClearField("external_data")
        out.ClearField("data_location")
        return out

    def _size(self, t: onnx.TensorProto) -> int:
        if not ext.uses_external_data(t):
            return t.ByteSize()
        n = ext.ExternalDataInfo(t).length
        if n is None:
            raise internal_error(f"external tensor {t.name!r} has no length")
        return self._shell(t).ByteSize() + len(_varint(_TENSOR_RAW_DATA << 3 | _LEN)) + len(_varint(n)) + n

    def _tensor_bytes(self, t: onnx.TensorProto) -> bytes:
        if not ext.uses_external_data(t):
            return t.SerializeToString()
        info = ext.ExternalDataInfo(t)
        shell = self._shell(t)
        with open(self.data_dir / info.location, "rb") as f:
            f.seek(info.offset or 0)
            shell.raw_data = f.read(info.length)
        return shell.SerializeToString()

    def write(self, f) -> None:
        m, g = self.m, self.g
        f.write(m[:self.m_split] + _varint(_MODEL_GRAPH << 3 | _LEN) + _varint(self.graph_size) + g[:self.g_split])
        key = _varint(_GRAPH_INITIALIZER << 3 | _LEN)
        for t, n in zip(self.inits, self.sizes):
            data = self._tensor_bytes(t)
            if len(data) != n:
                raise internal_error(f"inlining {t.name!r}: {len(data)} bytes, expected {n}")
            f.write(key + _varint(n))
            f.write(data)
            del data
        f.write(g[self.g_split:] + m[self.m_split:])


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
