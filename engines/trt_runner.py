"""TensorRT backend for one stage: its plan deserialized once, device buffers sized for the profile maxima.

    with TrtRunner(stage, art_dir) as r:   # engines/<flavor>/<stage>.plan, refused by `check_engine` if stale
        out = r.infer(feed)                # numpy in, numpy out (validation)

    feed --bind_dims (engine dims)--> set_input_shape --copy H2D--> execute_async_v3 (own stream) --D2H--> outputs

`buffer_plan` is a pure function (no TensorRT, no torch): the max shape and bytes of every I/O tensor
at the engine's dims. `engine_dims` are the manifest's dims narrowed by the sidecar's (`csprt build
--shapes`), so a request outside the engine's profile fails in `bind_dims`, naming the dim and range,
before anything runs. Buffers are torch CUDA tensors; torch is imported on activation only.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.build import CaptureLogger, check_engine
from engines.profiles import InputShapes, Profile, profiles_from_json
from engines.trt import load_trt
from graphs.errors import ArtifactError, InputError, ToolchainError, internal_error
from graphs.manifest import load_artifact
from graphs.runner import BaseRunner
from graphs.stages import DimRange, StageSpec

ITEMSIZE = {"float32": 4, "float16": 2, "int64": 8}


def eval_dim(dim: int | str, sizes: dict[str, int]) -> int:
    """The size of a shape entry: an int, a named dim, or a sum/product of them ("prefix_len + 16 + suffix_len").

    Only + and * are allowed: both grow with every dim, so dims at their maxima give the maximum size.
    """
    if isinstance(dim, int):
        return dim

    def walk(node) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in sizes:
                raise internal_error(f"dim {dim!r} names {node.id!r}, which has no size")
            return sizes[node.id]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = walk(node.left), walk(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise internal_error(f"dim expression {dim!r}: only ints, named dims, + and * are allowed")

    try:
        tree = ast.parse(dim, mode="eval")
    except SyntaxError:
        raise internal_error(f"dim expression {dim!r} does not parse") from None
    return walk(tree)


@dataclass(frozen=True)
class BufferSpec:
    name: str
    io: str                       # "input" | "output"
    dtype: str                    # "float32" | "float16" | "int64"
    max_shape: tuple[int, ...]
    nbytes: int


def buffer_plan(stage: StageSpec, dims: dict[str, DimRange]) -> dict[str, BufferSpec]:
    """Device buffer of every input and output of `stage` at the maxima of `dims`.

    Args:
        stage (StageSpec): the stage.
        dims (dict[str, DimRange]): the engine's named dims (`engine_dims`).

    Returns:
        dict[str, BufferSpec]: tensor name -> max shape and bytes, inputs first.
    """
    sizes = {name: r.max for name, r in dims.items()}
    plan = {}
    for io, tensors in (("input", stage.inputs), ("output", stage.outputs)):
        for t in tensors:
            shape = tuple(eval_dim(d, sizes) for d in t.shape)
            plan[t.name] = BufferSpec(t.name, io, t.dtype, shape, math.prod(shape) * ITEMSIZE[t.dtype])
    return plan


def engine_dims(dims: dict[str, DimRange], sidecar: dict) -> dict[str, DimRange]:
    """The manifest's named dims with the engine's own (`csprt build --shapes` narrows them) on top."""
    own = {k: DimRange(r["min"], r["opt"], r["max"]) for k, r in sidecar.get("dims", {}).items()}
    return {**dims, **own}


def select_profile(profiles: list[Profile], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first profile whose min/max hold every input shape.

    Raises:
        InputError: no profile fits; names the first input outside each.
    """
    misses = []
    for i, profile in enumerate(profiles):
        bad = [(n, s, profile[n]) for n, s in shapes.items() if n in profile and not _fits(s, profile[n])]
        if not bad:
            return i
        n, s, p = bad[0]
        misses.append(f"profile {i}: input {n!r} shape {tuple(s)} is outside [{p.min}, {p.max}]")
    raise InputError("no optimization profile fits the feed (" + "; ".join(misses) + ")")


def _fits(shape, p: InputShapes) -> bool:
    return len(shape) == len(p.min) and all(lo <= s <= hi for s, lo, hi in zip(shape, p.min, p.max))


class TrtRunner(BaseRunner):
    """Runs one stage's TensorRT engine.

    Args:
        stage (StageSpec): the stage.
        art_dir (path): the artifact whose engines/<flavor>/<stage>.plan to run.
        flavor (str): "auto", "tensorrt" or "tensorrt-rtx". Defaults to "auto".

    Raises:
        ToolchainError: TensorRT is not installed.
        ArtifactError: no engine, or one built from another graph or TensorRT (see `check_engine`).
    """

    def __init__(self, stage: StageSpec, art_dir, flavor: str = "auto"):
        artifact = load_artifact(art_dir, verify=False)
        self.trt, self.flavor, self.version = load_trt(flavor)
        self.plan_path, self.sidecar = check_engine(art_dir, stage.name, self.flavor, self.version)
        super().__init__(stage, engine_dims(artifact.layout.dims, self.sidecar))
        self.profiles = profiles_from_json(self.sidecar["profiles"])
        self.buffers_plan = buffer_plan(stage, self.dims)
        self._engine = self._context = self._stream = None
        self._buffers: dict = {}
        self._inputs: list[str] = []

    def _activate(self) -> None:
        import torch  # lazily: engines/ imports without torch

        if not torch.cuda.is_available():
            raise ToolchainError(f"stage {self.name!r}: running a TensorRT engine needs a CUDA GPU, and torch sees "
                                 "none; use the onnxruntime backend here")
        trt, logger = self.trt, CaptureLogger(self.trt)
        engine = trt.Runtime(logger).deserialize_cuda_engine(Path(self.plan_path).read_bytes())
        if engine is None:
            errors = logger.errors()
            targets = ", ".join(self.sidecar.get("compute_capabilities", []))
            raise ArtifactError(f"stage {self.name!r}: TensorRT cannot load {self.plan_path} on this GPU (built for "
                                f"{targets}): {errors[-1] if errors else 'no error logged'}; rebuild for it with: "
                                f"csprt build ART --compute-capability current")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._check_io(names)
        context = engine.create_execution_context()
        dtypes = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
        self._buffers = {n: torch.empty(max(1, math.prod(b.max_shape)), dtype=dtypes[b.dtype], device="cuda")
                         for n, b in self.buffers_plan.items() if n in names}
        for n, buf in self._buffers.items():
            context.set_tensor_address(n, buf.data_ptr())
        self._engine, self._context, self._stream = engine, context, torch.cuda.Stream()

    def _check_io(self, names: list[str]) -> None:
        unknown = [n for n in self._inputs if n not in {t.name for t in self.stage.inputs}]
        missing = [t.name for t in self.stage.outputs if t.name not in names]
        if unknown or missing:
            raise ArtifactError(f"stage {self.name!r}: engine {self.plan_path} does not match the stage spec (inputs "
                                f"not in the spec: {unknown or 'none'}; spec outputs it lacks: {missing or 'none'}); "
                                "rebuild with: csprt build ART")

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        select_profile(self.profiles, {n: feed[n].shape for n in self._inputs})  # one profile: index 0
        ctx = self._context
        with torch.cuda.stream(self._stream):
            for n in self._inputs:
                arr = np.ascontiguousarray(feed[n])
                ctx.set_input_shape(n, arr.shape)
                self._buffers[n][:arr.size].copy_(torch.from_numpy(arr).reshape(-1), non_blocking=False)
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise ToolchainError(f"stage {self.name!r}: TensorRT execution failed ({self.plan_path})")
        self._stream.synchronize()  # output shapes are final (data-dependent ones too) once the stream is done
        out = {}
        for t in self.stage.outputs:
            shape = tuple(ctx.get_tensor_shape(t.name))
            if math.prod(shape) * ITEMSIZE[t.dtype] > self.buffers_plan[t.name].nbytes:
                raise internal_error(f"stage {self.name!r} output {t.name!r} shape {shape} exceeds its buffer "
                                     f"{self.buffers_plan[t.name].max_shape}")
            out[t.name] = self._buffers[t.name][:math.prod(shape)].view(shape).cpu().numpy()
        return out

    def _deactivate(self) -> None:
        self._context = self._engine = self._stream = None
        self._buffers = {}
