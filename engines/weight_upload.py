"""Running a weight-free engine (`csprt build --weights-as-inputs`): its GEMM and embedding weights, read from the
artifact's own graph files, uploaded once and bound by address to every execution context.

    sidecar "weight_inputs" --weights_of--> [WeightInput]  (each read from one of the graph files the build hashed)
    engine I/O --check_weight_inputs--> each one an engine input of that shape and dtype, else refused
    WeightReader (read-only mmap of the .data; inline ones through the ONNX loader)
          |  one pageable copy per weight, no host copy first (the array is a view of the mapping)
          v
    DeviceWeights: one device arena, each weight at a 256-byte aligned offset
          |  bind(contexts): set_tensor_address(name, arena + offset) on every profile's context, once
          v
    execute_async_v3 ... (every call, and every captured CUDA graph, reads the same addresses)

One arena, not a tensor per weight: one allocation of the weights' total (plus alignment) holds what the engine
would have held inside, one release frees it, and hundreds of block weights do not each go through the caching
allocator's segment rounding. No pinned staging: each weight is copied once, straight from the mapped file pages
(CUDA stages pageable memory itself); a pinned bounce buffer would add a host copy to a one-time load.
"""

from __future__ import annotations

import math
import warnings

from graphs.errors import ArtifactError
from graphs.weight_inputs import WeightInput, WeightReader

ALIGN = 256  # bytes: TensorRT wants I/O addresses aligned at least to their type; 256 suits every kernel
_TRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16"}  # WeightInput dtype -> trt.DataType
REBUILD = "csprt build ART --weights-as-inputs"


def weights_of(sidecar: dict, stage: str) -> list[WeightInput]:
    """The weights a stage's engine takes as inputs, from its sidecar; [] for an engine that holds its weights.

    Raises:
        ArtifactError: an unknown "weights" mode, a weight-input engine in pieces, an unreadable "weight_inputs"
            list, a weight read from a file the build did not hash (not one of the stage's graph files), or a
            total that is not "weight_input_bytes"; each names the rebuild command.
    """
    mode = sidecar.get("weights", "engine")
    if mode == "engine":
        return []
    where = f"stage {stage!r}: engine sidecar of {sidecar.get('plan')}"
    if mode != "inputs":
        raise ArtifactError(f"{where}: weights {mode!r}, expected 'engine' or 'inputs'; rebuild with: csprt build ART")
    if sidecar.get("pieces"):
        raise ArtifactError(f"{where}: an engine built in pieces never takes its weights as inputs; rebuild with: "
                            f"{REBUILD}")
    try:
        weights = [WeightInput.from_json(d) for d in sidecar["weight_inputs"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{where}: its weight_inputs are unreadable ({type(exc).__name__}: {exc}); rebuild "
                            f"with: {REBUILD}") from None
    hashed = sidecar.get("graph_files") or {}
    outside = [w for w in weights if w.file not in hashed]
    if outside:
        raise ArtifactError(f"{where}: weight {outside[0].name!r} is read from {outside[0].file}, which is not one "
                            f"of the graph files the engine was built from ({', '.join(hashed) or 'none'}); "
                            f"rebuild with: {REBUILD}")
    total = sum(w.length for w in weights)
    if sidecar.get("weight_input_bytes", total) != total:
        raise ArtifactError(f"{where}: weight_input_bytes {sidecar.get('weight_input_bytes')} but its "
                            f"{len(weights)} weight_inputs hold {total} bytes; rebuild with: {REBUILD}")
    return weights


def check_weight_inputs(trt, engine, weights: list[WeightInput], where: str) -> set[str]:
    """Refuse an engine that does not take every weight as an input of the sidecar's shape and dtype.

    Args:
        trt: the TensorRT module (`engines.trt.load_trt`).
        engine: the ICudaEngine.
        weights (list[WeightInput]): `weights_of` the sidecar.
        where (str): "stage 'x': engine <plan>", the message's start.

    Returns:
        set[str]: the weights whose engine shape has dynamic (-1) dims: their shape is set once per context.

    Raises:
        ArtifactError: the first mismatch, and how many there are; names the rebuild command.
    """
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    problems, dynamic = [], set()
    for w in weights:
        if w.name not in names or engine.get_tensor_mode(w.name) != trt.TensorIOMode.INPUT:
            problems.append(f"weight {w.name!r} is not one of its inputs")
            continue
        shape = tuple(int(d) for d in engine.get_tensor_shape(w.name))
        if len(shape) != len(w.shape) or any(d not in (-1, s) for d, s in zip(shape, w.shape)):
            problems.append(f"weight {w.name!r} has shape {list(shape)} in the engine, {list(w.shape)} in the sidecar")
        elif engine.get_tensor_dtype(w.name) != getattr(trt.DataType, _TRT_DTYPES[w.dtype]):
            problems.append(f"weight {w.name!r} is {engine.get_tensor_dtype(w.name)} in the engine, {w.dtype} in the "
                            "sidecar")
        elif -1 in shape:
            dynamic.add(w.name)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ArtifactError(f"{where} does not match its sidecar's weight inputs: {problems[0]}{more}; rebuild with: "
                            f"{REBUILD}")
    return dynamic


def arena_offsets(weights: list[WeightInput]) -> tuple[dict[str, int], int]:
    """Each weight's byte offset in one arena (in sidecar order, each aligned to `ALIGN`), and the arena's size."""
    offsets, end = {}, 0
    for w in weights:
        offsets[w.name] = end
        end += math.ceil(w.length / ALIGN) * ALIGN
    return offsets, end


class DeviceWeights:
    """A weight-free engine's weights on the device: one arena, held as long as the runner is active.

    Args:
        arena (torch.Tensor): uint8, on the device, `arena_offsets`'s size.
        weights (list[WeightInput]): what it holds.
        offsets (dict[str, int]): name -> byte offset in the arena.
    """

    def __init__(self, arena, weights: list[WeightInput], offsets: dict[str, int]):
        self.arena, self.weights, self.offsets = arena, weights, offsets
        self.nbytes = sum(w.length for w in weights)

    @classmethod
    def upload(cls, torch, art_dir, weights: list[WeightInput], device, stream, where: str) -> "DeviceWeights":
        """Read every weight from the artifact and copy it into a new arena on `device`; returns once the copies are
        done (`stream` synchronized).

        Raises:
            ArtifactError: a weight missing from its file, or not the sidecar's shape or dtype (names the rebuild
                command); a missing or short file (`WeightReader`'s, naming re-export).
        """
        import numpy as np

        offsets, size = arena_offsets(weights)
        arena = torch.empty(max(1, size), dtype=torch.uint8, device=device)
        reader = WeightReader(art_dir)
        try:
            with torch.cuda.stream(stream):
                for w in weights:
                    array = reader.read(w)  # refuses a missing file, a short one, a weight the .onnx lacks
                    dtype_ok = array.dtype.name == w.dtype or w.dtype == "bfloat16" and array.dtype == np.uint16
                    if array.shape != w.shape or not dtype_ok or array.nbytes != w.length:  # bf16: raw or ml_dtypes
                        raise ArtifactError(f"{where}: weight {w.name!r} in {w.file} is {array.dtype} "
                                            f"{list(array.shape)}, its sidecar says {w.dtype} {list(w.shape)}; "
                                            f"rebuild with: {REBUILD}")
                    raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # a view of the mapping: no copy
                    with warnings.catch_warnings():  # read-only mapping: torch warns, and we only read it
                        warnings.simplefilter("ignore", UserWarning)
                        src = torch.from_numpy(raw)
                    arena[offsets[w.name]:offsets[w.name] + w.length].copy_(src)  # pageable: done when it returns
                    del array, raw, src  # let the reader unmap its file
            stream.synchronize()
        finally:
            reader.close()
        return cls(arena, weights, offsets)

    def address(self, name: str) -> int:
        return self.arena.data_ptr() + self.offsets[name]

    def bind(self, contexts, dynamic: set[str] = frozenset()) -> None:
        """Bind every weight at its address on every context (and set the shape of those with dynamic dims), once:
        contexts keep their addresses and shapes, so the calls never touch them again."""
        for context in contexts:
            for w in self.weights:
                if w.name in dynamic:
                    context.set_input_shape(w.name, w.shape)
                context.set_tensor_address(w.name, self.address(w.name))

