"""TensorRT backend for one stage: its plan deserialized once, device buffers sized for the profile maxima.

    with TrtRunner(stage, art_dir) as r:   # engines/<flavor>/<stage>.plan, refused by `check_engine` if stale
        out = r.infer(feed)                # numpy (or torch CUDA) in, numpy out: validation
        views = r.enqueue(feed, stream)    # numpy or torch CUDA in, device views out, no sync: the Pipeline

    feed --bind_dims (engine dims)--> call_profile (a block's one-row calls: its decode profile) --> that
         profile's execution context (one per profile, set once) --> set_input_shape, copy into the input buffers
         (a block's static KV cache is not copied: its tensors' own addresses are bound, `set_tensor_address`)
         --> execute_async_v3 on the stream (a block's one-row decode calls: CUDA graph, captured on the
             second call of a shape after a plain one, replayed after; see engines.gpu_plan.GraphCache)
         --> output views [:shape] of the preallocated output buffers (valid until the next call)

`last_copied` counts one call's copies into the engine: {"inputs": bytes, "cache": bytes} (cache: 0 when
the caches are device tensors, as the Pipeline's CudaChain gives them).

A weight-free engine (`csprt build --weights-as-inputs`: sidecar "weights": "inputs") gets its weights at
activation, read from the artifact's graph files, uploaded once and bound on every context
(`engines.weight_upload`); they are never part of a call's feed. `load_report` says what activation cost:
{"deserialize_s", "plan_bytes", "weights_s", "weight_bytes"} (the Pipeline's runners: `pipeline.runners`).

`buffer_plan` is a pure function (no TensorRT, no torch): the max shape and bytes of every I/O tensor
at the engine's dims. `engine_dims` are the manifest's dims narrowed by the sidecar's (`csprt build
--shapes`), so a request outside the engine's profile fails in `bind_dims`, naming the dim and range,
before anything runs. Buffers are torch CUDA tensors; torch is imported on activation only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.engine_check import check_engine, check_pieces
from engines.trt import CaptureLogger
from engines.gpu_plan import CAPTURE, REPLAY, GraphCache, graph_key, graph_mode, unknown_dims
from engines.profiles import call_profile, profiles_from_json
from engines.split_runtime import PiecesMixin, piece_buffer_plan
from engines.trt import load_trt
from engines.weight_upload import DeviceWeights, check_weight_inputs, weights_of
from graphs import dims
from graphs.dims import DimError
from graphs.errors import ArtifactError, InputError, ToolchainError, internal_error
from graphs.manifest import load_artifact
from graphs.runner import BaseRunner, bind_dims
from graphs.stages import DimRange, StageSpec, rows_dim

ITEMSIZE = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "bool": 1, "bfloat16": 2}  # dtype names as torch's
_NUMPY_OF_TORCH = {"torch.float32": np.float32, "torch.float16": np.float16, "torch.int64": np.int64}


def eval_dim(dim: int | str, sizes: dict[str, int]) -> int:
    """The size of a shape entry: an int, a named dim, or a sum/product of them ("prefix_len + 16 + suffix_len").

    Only + and * are allowed: both grow with every dim, so dims at their maxima give the maximum size.
    """
    try:
        return dims.eval_dim(dim, sizes)
    except DimError as exc:  # the layout was checked at load: a dim that does not evaluate is a csprt bug
        raise internal_error(str(exc)) from None


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


def checkable(value, where: str = "feed"):
    """`value` as `bind_dims` can check it: numpy as is; a torch tensor as a zero-stride numpy stand-in with its
    shape and dtype (no copy, no device read).

    Raises:
        InputError: a torch dtype csprt graphs never take (names it and the valid ones).
    """
    if isinstance(value, np.ndarray) or not type(value).__module__.startswith("torch"):
        return value  # bind_dims names anything else ("expected a numpy array, got ...")
    dtype = _NUMPY_OF_TORCH.get(str(value.dtype))
    if dtype is None:
        raise InputError(f"{where}: dtype is {value.dtype}, expected one of {', '.join(_NUMPY_OF_TORCH)}")
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=tuple(value.shape), strides=(0,) * value.dim())


class TrtRunner(PiecesMixin, BaseRunner):
    """Runs one stage's TensorRT engine (or its engines, in order, when it was built in pieces:
    `engines.split_runtime`).

    Args:
        stage (StageSpec): the stage.
        art_dir (path): the artifact whose engines/<flavor>/<stage>.plan to run.
        flavor (str): "auto", "tensorrt" or "tensorrt-rtx". Defaults to "auto".
        device (str): "cuda" or "cuda:N". Defaults to "cuda".
        cuda_graphs (bool): run decode steps under CUDA graphs (`engines.gpu_plan.graph_mode`). Defaults to True.

    Raises:
        ToolchainError: TensorRT is not installed.
        ArtifactError: no engine, or one built from another graph or TensorRT (see `check_engine`).
    """

    def __init__(self, stage: StageSpec, art_dir, flavor: str = "auto", device: str = "cuda",
                 cuda_graphs: bool = True):
        artifact = load_artifact(art_dir, verify=False)
        self.trt, self.flavor, self.version = load_trt(flavor)
        self.plan_path, self.sidecar = check_engine(art_dir, stage.name, self.flavor, self.version)
        super().__init__(stage, engine_dims(artifact.layout.dims, self.sidecar))
        self.device = device
        self.profiles = profiles_from_json(self.sidecar["profiles"])
        self.art_dir = artifact.dir
        self.pieces = [p for _, p in check_pieces(artifact.dir, self.sidecar, "csprt build ART", verify=False)]
        self.weights = weights_of(self.sidecar, stage.name)  # [] unless the engine takes its weights as inputs
        self.buffers_plan = buffer_plan(stage, self.dims)
        if self.pieces:  # built in pieces: plus a buffer per interface tensor between them
            self.buffers_plan = piece_buffer_plan(self.buffers_plan, self.pieces)
        self.graph_mode = graph_mode(stage, self.flavor, cuda_graphs)
        self.graphs = GraphCache()
        self.stream = None             # infer()'s stream; enqueue() takes the caller's
        self.last_events: tuple = ()   # (start, end) CUDA events of the last enqueue
        self._engine = self._context = None  # _context: the context of the current call
        self._contexts: list = []      # one execution context per optimization profile
        self._buffers: dict = {}
        self._inputs: list[str] = []
        self._cache_inputs = {inp for inp, _ in stage.cache}
        self._staged: dict = {}        # cache inputs given as host arrays (validation): their device copies
        self._parts: list = []         # a stage built in pieces: one PieceRun each (engines.split_runtime)
        self.last_copied: dict[str, int] = {}
        self._weights: DeviceWeights | None = None  # a weight-free engine's weights, while active
        self.load_report: dict = {}    # the last activation's timings and sizes

    # -- lifecycle ------------------------------------------------------------------------------
    def _activate(self) -> None:
        import torch  # lazily: engines/ imports without torch

        if not torch.cuda.is_available():
            raise ToolchainError(f"stage {self.name!r}: running a TensorRT engine needs a CUDA GPU, and torch sees "
                                 "none; use the onnxruntime backend here")
        self.load_report = {"deserialize_s": 0.0, "plan_bytes": 0, "weights_s": 0.0, "weight_bytes": 0}
        with torch.cuda.device(self.device):
            if self.pieces:
                self.stream = torch.cuda.Stream(self.device)
                self._activate_pieces(torch, self.stream)
                return
            self._activate_engine(torch, torch.cuda.Stream(self.device))

    def _activate_engine(self, torch, stream) -> None:
        """Deserialize the stage's one engine, make its contexts, bind its buffers (and its weights, if it takes
        them as inputs) on every one."""
        engine = self._deserialize()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        where = f"stage {self.name!r}: engine {self.plan_path}"
        dynamic = check_weight_inputs(self.trt, engine, self.weights, where)
        weights = {w.name for w in self.weights}  # bound once below, never fed
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT
                        and n not in weights]
        self._check_io(names)
        contexts = self._create_contexts(engine, stream)
        self._buffers = self._allocate(torch, [n for n in self.buffers_plan if n in names])
        for n, buf in self._buffers.items():  # every profile's context runs on the same buffers
            for context in contexts:
                context.set_tensor_address(n, buf.data_ptr())
        if self.weights:
            t0 = time.perf_counter()
            self._weights = DeviceWeights.upload(torch, self.art_dir, self.weights, self.device, stream, where)
            self._weights.bind(contexts, dynamic)
            self.load_report["weights_s"] = time.perf_counter() - t0
            self.load_report["weight_bytes"] = self._weights.nbytes
        self._engine, self._contexts, self._context, self.stream = engine, contexts, contexts[0], stream

    def _deserialize(self, plan_path=None):
        """The engine of `plan_path` (default: the stage's plan); its read and deserialization time and bytes are
        added to `load_report`."""
        logger = CaptureLogger(self.trt)
        t0 = time.perf_counter()
        plan = Path(plan_path or self.plan_path).read_bytes()
        engine = self.trt.Runtime(logger).deserialize_cuda_engine(plan)
        self.load_report["deserialize_s"] = self.load_report.get("deserialize_s", 0.0) + time.perf_counter() - t0
        self.load_report["plan_bytes"] = self.load_report.get("plan_bytes", 0) + len(plan)
        if engine is None:
            errors = logger.errors()
            targets = ", ".join(self.sidecar.get("compute_capabilities", []))
            raise ArtifactError(f"stage {self.name!r}: TensorRT cannot load {self.plan_path} on this GPU (built for "
                                f"{targets}): {errors[-1] if errors else 'no error logged'}; rebuild for it with: "
                                f"csprt build ART --compute-capability current")
        return engine

    def _allocate(self, torch, names) -> dict:
        """A device buffer per name (not the KV cache: the caller's), at its plan's largest shape."""
        return {n: torch.empty(max(1, math.prod(self.buffers_plan[n].max_shape)),
                               dtype=getattr(torch, self.buffers_plan[n].dtype), device=self.device)
                for n in names if n not in self._cache_inputs}

    def _create_contexts(self, engine, stream, profiles=None, plan_path=None) -> list:
        """One execution context per optimization profile, each set to its profile once, as TensorRT wants for
        contexts that take turns (switching one context per call would cost a sync and void captured graphs).
        An engine of one profile (built before blocks had a decode profile) gets one context and still runs.
        `profiles` and `plan_path`: a piece's (default: the stage engine's).

        Raises:
            ArtifactError: the engine's profile count is not its sidecar's (names the rebuild command).
        """
        profiles, plan_path = profiles or self.profiles, plan_path or self.plan_path
        count = getattr(engine, "num_optimization_profiles", len(profiles))
        if count != len(profiles):
            raise ArtifactError(f"stage {self.name!r}: engine {plan_path} has {count} optimization profiles, "
                                f"its sidecar lists {len(profiles)}; rebuild with: csprt build ART")
        contexts = []
        for i in range(count):
            context = self._create_context(engine)
            if count > 1 and not context.set_optimization_profile_async(i, stream.cuda_stream):
                raise ToolchainError(f"stage {self.name!r}: TensorRT refused optimization profile {i} for a new "
                                     f"execution context ({plan_path})")
            contexts.append(context)
        stream.synchronize()
        return contexts

    def _create_context(self, engine):
        """An execution context; under "builtin" graphs, with TensorRT-RTX's own CUDA graph capture on."""
        if self.graph_mode == "builtin":
            try:
                config = engine.create_runtime_config()
                config.cuda_graph_strategy = self.trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
                return engine.create_execution_context(config)
            except (AttributeError, TypeError) as exc:  # an older TensorRT-RTX: run without graphs
                self.graph_mode, self.graphs.disabled = "off", f"no runtime CUDA graph strategy ({exc})"
        return engine.create_execution_context()

    def _check_io(self, names: list[str]) -> None:
        unknown = [n for n in self._inputs if n not in {t.name for t in self.stage.inputs}]
        missing = [t.name for t in self.stage.outputs if t.name not in names]
        if unknown or missing:
            raise ArtifactError(f"stage {self.name!r}: engine {self.plan_path} does not match the stage spec (inputs "
                                f"not in the spec: {unknown or 'none'}; spec outputs it lacks: {missing or 'none'}); "
                                "rebuild with: csprt build ART")

    def _deactivate(self) -> None:
        self.graphs = GraphCache()  # graphs first: they point into the context's memory
        self._context = self._engine = self.stream = None
        self._contexts = []
        self._buffers, self._staged, self._parts = {}, {}, []
        self._weights = None  # after the contexts: frees the weights' arena

    # -- running --------------------------------------------------------------------------------
    def infer(self, feed: dict) -> dict[str, np.ndarray]:
        """Run on this runner's stream and return host arrays (validation). Takes numpy or torch CUDA inputs."""
        self._check_feed(feed)
        t0 = time.perf_counter()
        out = self._infer(feed)
        self.last_ms = 1e3 * (time.perf_counter() - t0)
        return out

    def _infer(self, feed: dict) -> dict[str, np.ndarray]:
        import torch

        # Torch CUDA inputs were produced on the caller's current stream: copy them only after that work is done.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        views = self._run(feed, self.stream)
        self.stream.synchronize()
        return {name: v.cpu().numpy() for name, v in views.items()}

    def enqueue(self, feed: dict, stream) -> dict:
        """Enqueue the stage on `stream` without synchronising (the Pipeline's device path).

        Args:
            feed (dict): input name -> numpy array (copied H2D) or torch CUDA tensor (copied D2D on `stream`).
            stream (torch.cuda.Stream): where the copies and the engine run.

        Returns:
            dict[str, torch.Tensor]: output name -> view of this runner's output buffer, valid until its next
            call. `last_events` holds the (start, end) events around it, for timing once the stream is done.
        """
        import torch

        self._check_feed(feed)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        views = self._run(feed, stream)
        end.record(stream)
        self.last_events = (start, end)
        return views

    def _check_feed(self, feed: dict) -> None:
        if not self.is_active:
            raise RuntimeError(f"runner for stage {self.name!r} is not active; use it in a `with` block "
                               "or call activate() first")
        self.last_dims = bind_dims(self.stage, {n: checkable(v, f"stage {self.name!r} input {n!r}")
                                                for n, v in feed.items()}, self.dims)

    def _run(self, feed: dict, stream) -> dict:
        import torch

        if self.pieces:
            return self._run_pieces(feed, stream)
        shapes = {n: tuple(feed[n].shape) for n in self._inputs}
        profile = call_profile(self.profiles, shapes)
        ctx = self._context = self._contexts[profile]  # set to `profile` once, at activation
        copied = {"inputs": 0, "cache": 0}
        with torch.cuda.stream(stream):
            addresses = []
            for n in self._inputs:
                ctx.set_input_shape(n, shapes[n])
                if n in self._cache_inputs:
                    addresses.append(self._bind(n, feed[n], copied))
                else:
                    copied["inputs"] += self._load(n, feed[n])
            out_shapes = {t.name: tuple(ctx.get_tensor_shape(t.name)) for t in self.stage.outputs}
            self._check_output_shapes(out_shapes)
            # A captured graph holds the cache addresses: they are part of its key.
            self._execute(graph_key(profile, shapes) + tuple(addresses), stream, self._is_step())
        self.last_copied = copied
        return {n: self._buffers[n][:math.prod(s)].view(s) for n, s in out_shapes.items()}

    def _is_step(self) -> bool:
        """A one-row call of a block (a decode step): the calls CUDA graphs are for."""
        if self.stage.loop:
            return True
        if not self.stage.cache:
            return False
        return self.last_dims.get(rows_dim(self.stage)) == 1

    def _bind(self, name: str, value, copied: dict) -> int:
        """Bind a static KV cache input at its own address (no copy)."""
        address = self._cache_address(name, value, copied)
        self._context.set_tensor_address(name, address)
        return address

    def _cache_address(self, name: str, value, copied: dict) -> int:
        """The device address of a static KV cache input; a host array is staged once per call."""
        import torch

        if isinstance(value, np.ndarray):  # validation feeds: not the Pipeline's path
            staged = torch.from_numpy(np.ascontiguousarray(value)).to(self.device)
            self._staged[name] = staged
            copied["cache"] += value.nbytes
            value = staged
        if not value.is_contiguous():
            raise internal_error(f"stage {self.name!r}: KV cache input {name!r} must be contiguous to bind in place")
        return value.data_ptr()

    def _load(self, name: str, value) -> int:
        """Copy one input into its buffer: H2D from numpy, D2D (stream-ordered) from a CUDA tensor. Returns bytes."""
        import torch

        buf = self._buffers[name]
        if isinstance(value, np.ndarray):
            src = torch.from_numpy(np.ascontiguousarray(value)).reshape(-1)
            buf[:src.numel()].copy_(src)  # pageable host memory: torch waits for the copy, the array may go
            return value.nbytes
        if value.data_ptr() != buf.data_ptr():
            buf[:value.numel()].copy_(value.reshape(-1), non_blocking=True)
            return value.numel() * value.element_size()
        return 0

    def _check_output_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        unknown = unknown_dims(shapes)
        if unknown:
            raise internal_error(f"stage {self.name!r}: TensorRT cannot tell the shape of outputs {unknown} before "
                                 "running (data-dependent); csprt graphs must not have such outputs")
        for name, shape in shapes.items():
            if math.prod(shape) * ITEMSIZE[self.buffers_plan[name].dtype] > self.buffers_plan[name].nbytes:
                raise internal_error(f"stage {self.name!r} output {name!r} shape {shape} exceeds its buffer "
                                     f"{self.buffers_plan[name].max_shape}")

    def _execute(self, key: tuple, stream, graphed: bool = True, context=None, graphs=None) -> None:
        """execute_async_v3, or (manual graphs, `graphed` calls) capture once per key and replay; plain when
        capture fails. `context` and `graphs`: a piece's (default: the stage engine's)."""
        piece = context is not None
        context, graphs = context or self._context, graphs or self.graphs
        if self.graph_mode == "manual" and graphed:
            action = graphs.decide(key)
            if action == REPLAY:
                graphs.graphs[key].replay()
                return
            if action == CAPTURE:
                graph = self._capture(stream, context, graphs) if piece else self._capture(stream)
                if graph is not None:
                    graphs.store(key, graph)
                    graph.replay()
                    return
        if not context.execute_async_v3(stream.cuda_stream):
            raise ToolchainError(f"stage {self.name!r}: TensorRT execution failed ({self.plan_path})")

    def _capture(self, stream, context=None, graphs=None):
        """A torch CUDAGraph of one execute_async_v3 on `stream`, or None (capture turned off, reason kept)."""
        import torch

        ctx, graphs = context or self._context, graphs or self.graphs
        capturable = getattr(ctx, "is_stream_capturable", None)  # TensorRT-RTX 1.2+, recent TensorRT 10
        if capturable is not None and not capturable(stream.cuda_stream):
            graphs.disable("the execution context says it is not stream capturable")
            return None
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                ok = ctx.execute_async_v3(stream.cuda_stream)
            if not ok:
                raise RuntimeError("execute_async_v3 returned False while capturing")
        except Exception as exc:  # noqa: BLE001  capture is an optimisation: any failure falls back to plain runs
            graphs.disable(f"{type(exc).__name__}: {exc}")
            return None
        return graph
