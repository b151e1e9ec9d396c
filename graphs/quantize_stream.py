"""Weight-only int4 and dynamic int8 a tensor at a time: memory bounded by the largest weight, not the block.

ONNX Runtime's graph quantizers (MatMulNBitsQuantizer, quantize_dynamic) load a whole graph with its weights;
LISA-7B's csp `llm_2` is 15 GB in fp32. Here the graph is loaded without its weights, and each weight MatMul is
quantized as a piece of its own by ONNX Runtime's own code, its weight read from the graph's data and the result
appended to a new external-data file as it comes (untouched weights are copied byte for byte):

    graph (no weights)      for each MatMul(x, W):  W <- data file (one tensor)
        |                       int4-wo:  DefaultWeightOnlyQuantizer.quantize(node, [W's graph]): the per-node
        |                                 routine MatMulNBitsQuantizer.process runs (ort: MatMulNBits, qdq: DQ+MatMul)
        |                       int8 ort: quantize_dynamic on the one-MatMul model x -> MatMul(W) -> y
        v                       -> its nodes into the graph, its initializers -> new data file
    quantized graph + new data file  (then graphs.onnx_passes.save_with_external_data installs them)

The result equals the whole-graph quantizer's tensor for tensor (tests/graphs/test_quantize_stream.py): the same
names, the same bytes. Where readers share an input (q, k and v read one normed hidden state), the whole-graph
dynamic quantizer quantizes it once; the pieces each emit the same DynamicQuantizeLinear (same name, same
outputs), and only the first is kept.

fp16 graphs: MatMulNBits and DequantizeLinear take fp16 weights and activations (the scales are fp16), so int4-wo
quantizes fp16 weights as they are. DynamicQuantizeLinear is fp32 only, so dynamic int8's piece runs in fp32,
its weight widened one tensor at a time:  x -Cast(fp32)-> piece -Cast(fp16)-> y.
The calibrated Q/DQ methods (qdq int8, fp8) are not here: their calibration runs the whole float block.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from graphs.errors import internal_error

STREAMED = (("int4-wo", "ort"), ("int4-wo", "qdq"), ("int8", "ort"))
_ALIGN, _ALIGN_FROM = 4096, 1 << 20  # page-align tensors of 1 MiB and more (ONNX Runtime maps them in place)
_COPY_CHUNK = 64 << 20


def streamable(method: str, fmt: str) -> bool:
    """Whether (method, format) quantizes a tensor at a time (and so also takes fp16 graphs)."""
    return (method, fmt) in STREAMED


class _TensorWriter:
    """Appends tensors to one external-data file; each returned TensorProto refers to its bytes there."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")

    def close(self) -> None:
        self._f.close()

    def _place(self, size: int) -> int:
        pos = self._f.tell()
        if size >= _ALIGN_FROM and pos % _ALIGN:
            self._f.write(b"\0" * (_ALIGN - pos % _ALIGN))
        return self._f.tell()

    def _ref(self, t, offset: int, length: int):
        from onnx import TensorProto

        out = TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims))
        out.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            e = out.external_data.add()
            e.key, e.value = k, v
        return out

    def add(self, t):
        """A tensor held in memory (raw_data or typed fields)."""
        from onnx import numpy_helper

        raw = t.raw_data if t.HasField("raw_data") else numpy_helper.from_array(numpy_helper.to_array(t)).raw_data
        offset = self._place(len(raw))
        self._f.write(raw)
        return self._ref(t, offset, len(raw))

    def copy(self, t, base_dir: Path):
        """A tensor of the source graph: its external bytes copied a chunk at a time, or its inline bytes."""
        from onnx import external_data_helper as ext

        if not ext.uses_external_data(t):
            return self.add(t)
        info = ext.ExternalDataInfo(t)
        src = base_dir / info.location
        length = info.length if info.length is not None else src.stat().st_size - (info.offset or 0)
        offset = self._place(length)
        with open(src, "rb") as f:
            f.seek(info.offset or 0)
            left = length
            while left:
                chunk = f.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise internal_error(f"{src}: external data of {t.name} ends early")
                self._f.write(chunk)
                left -= len(chunk)
        return self._ref(t, offset, length)


def _int4_piece(node, w: np.ndarray, weight_name: str, opts) -> tuple[list, list]:
    """ONNX Runtime's per-node int4 routine on a graph that holds only W: (nodes, new initializers)."""
    from onnx import helper, numpy_helper
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    fmt = QuantFormat.QOperator if opts.format == "ort" else QuantFormat.QDQ
    config = DefaultWeightOnlyQuantConfig(block_size=opts.block_size, is_symmetric=True,
                                          accuracy_level=opts.accuracy_level or None, quant_format=fmt,
                                          op_types_to_quantize=("MatMul",))
    g = helper.make_graph([], "piece", [], [], initializer=[numpy_helper.from_array(w, weight_name)])
    nodes = DefaultWeightOnlyQuantizer(config).quantize(node, [g])
    return list(nodes), [t for t in g.initializer if t.name != weight_name]


def _dynamic_piece(node, w: np.ndarray, weight_name: str, opset_import, elem_type: int, tmp: Path) -> tuple[list, list]:
    """quantize_dynamic on x -> MatMul(W) -> y (in fp32; an fp16 block's piece is wrapped in Casts)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    x, y = node.input[0], node.output[0]
    widen = elem_type != TensorProto.FLOAT
    px, py = (f"{x}__fp32", f"{y}__fp32") if widen else (x, y)
    g = helper.make_graph([helper.make_node("MatMul", [px, weight_name], [py], name=node.name)], "piece",
                          [helper.make_tensor_value_info(px, TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info(py, TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w.astype(np.float32, copy=False), weight_name)])
    piece = helper.make_model(g, opset_imports=list(opset_import))
    out = tmp / "piece.onnx"
    quantize_dynamic(piece, str(out), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     nodes_to_quantize=[node.name], extra_options={"MatMulConstBOnly": True})
    q = onnx.load(str(out))
    out.unlink()
    nodes = list(q.graph.node)
    if widen:
        nodes = [helper.make_node("Cast", [x], [px], name=f"{px}_cast", to=TensorProto.FLOAT), *nodes,
                 helper.make_node("Cast", [py], [y], name=f"{y}_cast", to=elem_type)]
    return nodes, list(q.graph.initializer)


def quantize_graph_streamed(src: str | os.PathLike, data_file: str | os.PathLike, opts,
                            progress: Callable[[int, int], None] | None = None):
    """Quantize the weight MatMuls of graph `src` a tensor at a time (int4-wo ort/qdq, int8 ort).

    Args:
        src (path): the float graph (fp32 or fp16), its data inline or beside it.
        data_file (path): the new external-data file to write, named `<src.name>.data` (a temp directory beside
            `src`; `graphs.onnx_passes.save_with_external_data` installs it with the returned graph).
        opts (graphs.quantize.QuantOptions): resolved; (method, format) one of `STREAMED`.
        progress (callable | None): (done, total) after each quantized MatMul. Defaults to silent.

    Returns:
        onnx.ModelProto: the quantized graph without its data; its tensors refer to `data_file`.
    """
    import onnx

    from graphs.quantize import gemms_to_matmuls, tensor_array, weight_matmuls

    if not streamable(opts.method, opts.format):
        raise internal_error(f"quantize_graph_streamed: {opts.method}/{opts.format} is not tensor-at-a-time")
    src, data_file = Path(src), Path(data_file)
    base = src.parent
    model = onnx.load(str(src), load_external_data=False)
    del model.graph.value_info[:]  # as graphs.quantize.quantize_graph: ORT re-infers what it needs
    gemms_to_matmuls(model, base_dir=base)
    wanted = weight_matmuls(model)
    if not wanted:
        raise internal_error(f"quantize: {src} has no weight MatMul to quantize")
    wanted_set = set(wanted)
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    shared = sorted({n.input[1] for n in model.graph.node if n.name in wanted_set and readers[n.input[1]] > 1})
    if shared:  # not in a LLaMA block; the whole-graph quantizers would not handle it either
        raise internal_error(f"quantize: {src}: weights {shared[:3]} feed more than one node")
    nodes, produced, new_inits, done = [], {}, {}, 0
    writer = _TensorWriter(data_file)
    try:
        with tempfile.TemporaryDirectory(dir=data_file.parent, prefix=".piece.") as tmp:
            for node in model.graph.node:
                if node.name not in wanted_set:
                    nodes.append(node)
                    continue
                t = inits[node.input[1]]
                w = tensor_array(t, base)
                if opts.method == "int4-wo":
                    pnodes, pinits = _int4_piece(node, w, t.name, opts)
                else:
                    pnodes, pinits = _dynamic_piece(node, w, t.name, model.opset_import, t.data_type, Path(tmp))
                del w
                for n in pnodes:
                    seen = [produced[o] for o in n.output if o in produced]
                    if seen:  # a shared input's quantization, emitted by an earlier piece
                        if any(s != n for s in seen) or len(seen) != len(n.output):
                            raise internal_error(f"quantize: two pieces of {src} write {n.output[0]} differently")
                        continue
                    produced.update((o, n) for o in n.output)
                    nodes.append(n)
                for p in pinits:
                    if p.name not in new_inits:
                        new_inits[p.name] = writer.add(p)
                done += 1
                if progress:
                    progress(done, len(wanted))
            used = {i for n in nodes for i in n.input} | {o.name for o in model.graph.output}
            for t in model.graph.initializer:
                if t.name in used and t.name not in new_inits:
                    new_inits[t.name] = writer.copy(t, base)
    finally:
        writer.close()
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(new_inits.values())
    _opsets(model, opts)
    return model


def _opsets(model, opts) -> None:
    """What MatMulNBitsQuantizer.process sets on the model around its per-node work: the com.microsoft domain for
    MatMulNBits; opset 21 and IR 10 for int4 DequantizeLinear. quantize_dynamic adds nothing (MatMulInteger and
    DynamicQuantizeLinear are standard ops)."""
    from onnx import helper

    if opts.method != "int4-wo":
        return
    if opts.format == "ort":
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < 21:
            o.version = 21
    model.ir_version = max(model.ir_version, 10)
