"""Weight-free engines: a stage graph's GEMM and embedding weights as graph inputs (`csprt build --weights-as-inputs`).

    weight_inputs(model, graph_rel) -> [WeightInput]    which initializers move, and where their bytes live
    as_weight_inputs(model, moved) -> ModelProto         the graph with those initializers as (static) inputs
    WeightReader(art_dir).read(w) -> numpy array         the bytes, mapped from the artifact's own files

    graphs/llm_2.onnx (+ llm_2.data)            the artifact's one copy of the weights
          |  build: moved initializers become inputs      |  run: each weight read once from its file
          v                                                v   (mapped, not copied), uploaded, bound by address
    engines/<flavor>/llm_2.plan  (kernels, norms, biases: no GEMM weights)  <- bound at every execution context

Why inputs and not TensorRT's weight-stripped engines (STRIP_PLAN + refit at load): every refit flag
(STRIP_PLAN, REFIT, REFIT_IDENTICAL; REFIT_INDIVIDUAL with weights marked) fails in Myelin on a build host
without a GPU (`graph_jit.cpp: CHECK(status == CUDA_SUCCESS)`, TensorRT-RTX 1.7.1), and TensorRT-RTX's null
weight placeholders cover Conv, Deconv and Scale only, not MatMul constants. Weights as inputs build anywhere,
need no refitter at load, and leave an artifact with engines holding its weights once: in the ONNX external data.

What moves: a float initializer of rank 2 and at least `MIN_BYTES` whose every consumer takes it as a MatMul or
Gemm B operand, a Gather table or a Transpose input (the Linear layers, the LM head, the token embedding).
Quantized weights stay in the engine (they feed DequantizeLinear), as do norms, biases and convolution kernels.
"""

from __future__ import annotations

import mmap
from dataclasses import asdict, dataclass
from pathlib import Path

from graphs.errors import ArtifactError

MIN_BYTES = 4096
# The input position a weight may take. Transpose: a few weights reach their MatMul through a Transpose the export
# left unfolded (LISA-7B `csp` llm_1's last layer, q_proj and k_proj: 64 MB that would otherwise stay in the engine).
_OPERAND = {"MatMul": 1, "Gemm": 1, "Gather": 0, "Transpose": 0}
_FLOAT = {1: "float32", 10: "float16", 16: "bfloat16"}   # ONNX TensorProto data types that move


@dataclass(frozen=True)
class WeightInput:
    """A weight the engine takes as an input, and where the runtime reads it.

    `file` is the artifact-relative file holding its bytes: the graph's external data (`offset`, `length`), or the
    .onnx itself for a weight stored inline (`offset` -1: read through the ONNX loader).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    length: int

    @property
    def inline(self) -> bool:
        return self.offset < 0

    def to_json(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}

    @staticmethod
    def from_json(d: dict) -> "WeightInput":
        return WeightInput(str(d["name"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]), str(d["file"]),
                           int(d["offset"]), int(d["length"]))


def _consumers(graph) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            out.setdefault(name, []).append((node.op_type, i))
    return out


def weight_inputs(model, graph_rel: str) -> list[WeightInput]:
    """The initializers of `model` (loaded without its external data) an engine takes as inputs, in graph order.

    Args:
        model (onnx.ModelProto): the stage graph, or a piece of it.
        graph_rel (str): the graph's path relative to the artifact (e.g. "graphs/llm_2.onnx"); external-data
            locations are relative to its folder.
    """
    from graphs.onnx_passes import external_placement, tensor_bytes

    uses = _consumers(model.graph)
    folder = Path(graph_rel).parent
    out = []
    for t in model.graph.initializer:
        found = uses.get(t.name)
        if (t.data_type not in _FLOAT or len(t.dims) != 2 or tensor_bytes(t) < MIN_BYTES or not found
                or any(_OPERAND.get(op) != i for op, i in found)):
            continue
        placed = external_placement(t)
        if placed:
            location, offset, length = placed
            where = (folder / location).as_posix()
        else:
            where, offset, length = graph_rel, -1, tensor_bytes(t)
        out.append(WeightInput(t.name, _FLOAT[t.data_type], tuple(int(d) for d in t.dims), where, offset, length))
    return out


def as_weight_inputs(model, moved: list[WeightInput]):
    """A copy of `model` whose `moved` initializers are graph inputs of static shape, after the graph's own inputs."""
    import onnx
    from onnx import helper

    names = {w.name for w in moved}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [t for t in out.graph.initializer if t.name not in names]
    dtypes = {t.name: t.data_type for t in out.graph.initializer if t.name in names}
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    out.graph.input.extend(helper.make_tensor_value_info(w.name, dtypes[w.name], list(w.shape)) for w in moved)
    return out


def moved_bytes(moved: list[WeightInput]) -> dict[str, int]:
    """{"inline": bytes, "external": bytes} of the weights an engine takes as inputs."""
    inline = sum(w.length for w in moved if w.inline)
    return {"inline": inline, "external": sum(w.length for w in moved) - inline}


class WeightReader:
    """Reads engine weight inputs from the artifact's own files: external data mapped read-only (the array is a
    view of the mapping: nothing is copied until it is uploaded), inline weights through the ONNX loader.

    Raises (from `read`):
        ArtifactError: a file is missing, or shorter than the tensor; the message names `csprt export`'s fix.
    """

    def __init__(self, art_dir):
        self.art = Path(art_dir)
        self._maps: dict[str, mmap.mmap] = {}
        self._inline: dict[str, dict] = {}

    def read(self, w: WeightInput):
        import numpy as np

        dtype = np.dtype(w.dtype) if w.dtype != "bfloat16" else np.dtype(np.uint16)
        if w.inline:
            found = self._inline_tensors(w.file)
            if w.name not in found:
                raise ArtifactError(f"{self.art / w.file}: has no inline weight {w.name!r}, which the engine takes as "
                                    "an input; the engine was built from another graph: rebuild with: csprt build ART "
                                    "--weights-as-inputs")
            return found[w.name]
        mm = self._map(w.file)
        if w.offset + w.length > len(mm) or w.length != int(np.prod(w.shape)) * dtype.itemsize:
            raise ArtifactError(f"{self.art / w.file}: weight {w.name!r} {list(w.shape)} {w.dtype} at "
                                f"[{w.offset}, {w.offset + w.length}) does not fit the file ({len(mm)} bytes); "
                                "the graph's external data is damaged: re-export the artifact")
        return np.frombuffer(mm, dtype=dtype, count=w.length // dtype.itemsize, offset=w.offset).reshape(w.shape)

    def _map(self, rel: str) -> mmap.mmap:
        if rel not in self._maps:
            path = self.art / rel
            try:
                with open(path, "rb") as f:
                    self._maps[rel] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise ArtifactError(f"{path}: cannot read the engine's weights from it ({exc}); the artifact is "
                                    "incomplete: re-export it") from None
        return self._maps[rel]

    def _inline_tensors(self, rel: str) -> dict:
        if rel not in self._inline:
            import onnx
            from onnx import external_data_helper as ext, numpy_helper

            try:
                model = onnx.load(str(self.art / rel), load_external_data=False)
            except Exception as exc:  # noqa: BLE001  missing or not ONNX (protobuf's DecodeError): say which file
                raise ArtifactError(f"{self.art / rel}: cannot read the engine's weights from it ({exc}); "
                                    "re-export the artifact") from None
            self._inline[rel] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                                 if not ext.uses_external_data(t)}
        return self._inline[rel]

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # an array still views it: it goes with the array
                pass
        self._maps.clear()
        self._inline.clear()
