"""ONNX Runtime backend: the embedded default that runs anywhere (CPU EP; CUDA EP with onnxruntime-gpu).

    OrtRunner(stage, dims, "graphs/llm_0.onnx", device="cpu")  # external data (llm_0.onnx.data) is found beside it

A block with a static KV cache (`StageSpec.cache`) runs through IO binding: each cache buffer is bound
as an OrtValue over the buffer's own memory (created once per buffer, reused every step), so the cache
never passes through a copy; only the small per-call inputs are bound by value. `last_copied` counts
what one call copied into the session: {"inputs": bytes of by-value inputs, "cache": bytes of cache
inputs that were copied (0 on CPU: bound in place)}.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from graphs.errors import ArtifactError, ToolchainError
from graphs.runner import BaseRunner
from graphs.stages import DimRange, StageSpec

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class OrtRunner(BaseRunner):
    """Runs one stage graph with onnxruntime.

    Args:
        stage (StageSpec): the stage the graph implements.
        dims (dict[str, DimRange]): the artifact's named-dim profiles.
        onnx_path (str | Path): the stage's .onnx file; its external data file must sit beside it.
        device (str): "cpu" (CPUExecutionProvider) or "cuda" (CUDAExecutionProvider, needs onnxruntime-gpu).
            Defaults to "cpu".
        intra_op_threads (int | None): onnxruntime's intra-op thread count. Defaults to None (onnxruntime's
            own default: one per physical core).
        session_config (dict[str, str] | None): ONNX Runtime session config entries, e.g. the quantized graphs'
            (`graphs.quantize.ort_session_config`). Defaults to None.
    """

    def __init__(self, stage: StageSpec, dims: dict[str, DimRange], onnx_path: str | Path, device: str = "cpu",
                 intra_op_threads: int | None = None, session_config: dict[str, str] | None = None):
        super().__init__(stage, dims)
        self.session_config = dict(session_config or {})
        if device not in PROVIDERS:
            raise ToolchainError(f"unknown onnxruntime device {device!r}; choose one of: {', '.join(PROVIDERS)}")
        self.path = Path(onnx_path)
        self.device = device
        self.intra_op_threads = intra_op_threads
        self.session = None
        self._graph_inputs: list[str] = []
        self._cache_inputs = {inp for inp, _ in stage.cache}
        self._bound: dict[tuple, tuple] = {}  # (data pointer, shape, dtype) -> (buffer, OrtValue over it)
        self.cache_bindings = 0               # OrtValues made over cache buffers (once per buffer, not per step)
        self.last_copied: dict[str, int] = {}

    def _activate(self) -> None:
        import onnxruntime as ort

        provider = PROVIDERS[self.device]
        if provider not in ort.get_available_providers():
            raise ToolchainError(
                f"stage {self.name!r}: device 'cuda' needs onnxruntime-gpu (this onnxruntime {ort.__version__} has "
                f"{', '.join(ort.get_available_providers())}); pip install onnxruntime-gpu, or use device 'cpu'")
        if not self.path.is_file():
            raise ArtifactError(f"stage {self.name!r}: graph {self.path} does not exist; re-run csprt export")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.intra_op_threads is not None:
            opts.intra_op_num_threads = int(self.intra_op_threads)
        opts.log_severity_level = 3  # errors only: ORT's warnings (e.g. unused initializers) are not ours to act on
        for key, value in self.session_config.items():
            opts.add_session_config_entry(key, value)
        try:
            session = ort.InferenceSession(str(self.path), sess_options=opts, providers=[provider])
        except Exception as exc:  # onnxruntime raises its own pybind classes (InvalidProtobuf, Fail, NoSuchFile ...)
            raise ArtifactError(f"stage {self.name!r}: onnxruntime cannot load {self.path}: {_first_line(exc)}; "
                                "the file is corrupt or incomplete, re-run csprt export") from None
        if provider not in session.get_providers():  # ORT falls back to CPU when CUDA fails to initialise
            raise ToolchainError(f"stage {self.name!r}: onnxruntime could not start {provider} (CUDA or cuDNN "
                                 f"libraries missing?); it offered {', '.join(session.get_providers())}")
        self._check_graph(session)
        self.session = session

    def _check_graph(self, session) -> None:
        """The graph must produce every spec output and take no input the spec lacks.

        A spec input the graph lacks is allowed: exporters drop inputs a graph never reads.
        """
        graph_in = [i.name for i in session.get_inputs()]
        graph_out = {o.name for o in session.get_outputs()}
        unknown = [n for n in graph_in if n not in {t.name for t in self.stage.inputs}]
        missing = [t.name for t in self.stage.outputs if t.name not in graph_out]
        if unknown or missing:
            raise ArtifactError(
                f"stage {self.name!r}: graph {self.path} does not match the stage spec "
                f"(inputs not in the spec: {unknown or 'none'}; spec outputs it lacks: {missing or 'none'}); "
                "the graph and manifest come from different exports, re-run csprt export")
        self._graph_inputs = graph_in

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [t.name for t in self.stage.outputs]
        try:
            if self._cache_inputs and self.device == "cpu":
                values = self._run_bound(feed, names)
            else:
                self.last_copied = {"inputs": sum(feed[n].nbytes for n in self._graph_inputs
                                                  if n not in self._cache_inputs),
                                    "cache": sum(feed[n].nbytes for n in self._graph_inputs if n in self._cache_inputs)}
                values = self.session.run(names, {n: feed[n] for n in self._graph_inputs})
        except Exception as exc:
            raise ToolchainError(f"stage {self.name!r}: onnxruntime failed running {self.path}: "
                                 f"{_first_line(exc)}") from exc
        return dict(zip(names, values))

    def _run_bound(self, feed: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        """IO binding: cache buffers bound in place (OrtValues over their memory), the rest by value."""
        binding = self.session.io_binding()
        copied = {"inputs": 0, "cache": 0}
        for n in self._graph_inputs:
            if n in self._cache_inputs and feed[n].flags.c_contiguous:
                binding.bind_ortvalue_input(n, self._ortvalue(feed[n]))
            else:  # by value (a cache view that is not contiguous, e.g. a hand-cut feed, is copied: counted)
                binding.bind_cpu_input(n, np.ascontiguousarray(feed[n]))
                copied["cache" if n in self._cache_inputs else "inputs"] += feed[n].nbytes
        for n in names:
            binding.bind_output(n, "cpu")
        self.session.run_with_iobinding(binding)
        self.last_copied = copied
        return binding.copy_outputs_to_cpu()

    def _ortvalue(self, buffer: np.ndarray):
        """The OrtValue over `buffer`'s memory (no copy on CPU), made once per buffer."""
        import onnxruntime as ort

        key = (buffer.ctypes.data, buffer.shape, buffer.dtype.str)
        if key not in self._bound:
            if len(self._bound) >= 4 * len(self._cache_inputs):  # bounded: buffers of older request shapes go
                self._bound.clear()
            self._bound[key] = (buffer, ort.OrtValue.ortvalue_from_numpy(buffer))
            self.cache_bindings += 1
        return self._bound[key][1]

    def _deactivate(self) -> None:
        self.session = None
        self._bound.clear()
