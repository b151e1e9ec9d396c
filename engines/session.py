"""One artifact, ready to segment: manifest + host I/O + a Pipeline on a backend.

This is what `csprt run`, `csprt validate` and servers use. Everything model-specific stays on
the host side (tokenizer, image preprocessing, mask postprocessing, all described by the
manifest); the stages in between are only wired.

    backend       runners     chain (engines.pipeline)       device
    onnxruntime   OrtRunner   HostChain: numpy via the host  cpu (default) | cuda (onnxruntime-gpu)
    tensorrt      TrtRunner   CudaChain: stays on the GPU    cuda (default) | cuda:N

`--backend tensorrt` is checked before anything loads (`check_backend`): a visible CUDA GPU, built
engines, TensorRT installed, and every stage's engine matching its graph and this TensorRT.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engines.host import HostIO, HostMeta, check_host_feed
from engines.pipeline import Pipeline, PipelineResult
from graphs.errors import ArtifactError, InputError, ToolchainError
from graphs.manifest import Artifact, load_artifact
from graphs.runner import BaseRunner
from graphs.stages import StageSpec

BACKENDS = ("onnxruntime", "tensorrt")
DEFAULT_DEVICE = {"onnxruntime": "cpu", "tensorrt": "cuda"}


@dataclass
class Segmentation:
    mask_logits: np.ndarray          # [K, H, W] float32 at the input image's size
    masks: np.ndarray                # [K, H, W] bool
    answer: str
    generated_ids: list[int]
    image_tokens_per_layer: list[int]  # counted from the stage outputs' image rows
    timings_ms: dict[str, float]
    pipeline: PipelineResult = field(repr=False)
    meta: HostMeta | None = field(default=None, repr=False)


def cuda_problem() -> str:
    """Why no CUDA GPU is usable here ("" when one is). torch is imported here only (CUDA buffers need it)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed; the TensorRT backend keeps tensors in torch CUDA buffers"
    if torch.cuda.is_available():
        return ""
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return f"torch {torch.__version__}, {build}, sees no CUDA device"


_cuda_problem = cuda_problem  # tests replace this to simulate a GPU host


def resolve_device(backend: str, device: str | None) -> str:
    """`device`, or the backend's default ("cpu" for onnxruntime, "cuda" for tensorrt).

    Raises:
        ToolchainError: an unknown backend, or tensorrt on a device that is not CUDA.
    """
    if backend not in BACKENDS:
        raise ToolchainError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    device = device or DEFAULT_DEVICE[backend]
    if backend == "tensorrt" and device.split(":")[0] != "cuda":
        raise InputError(f"--backend tensorrt runs on a CUDA device, not {device!r}; pass --device cuda (or cuda:N), "
                         "or use --backend onnxruntime")
    return device


def check_backend(artifact: Artifact, backend: str, device: str | None = None) -> str:
    """Check that `backend` can run `artifact` here, before anything loads; returns the device.

    tensorrt, in this order: a CUDA GPU is visible; the artifact has engines; TensorRT is installed; every
    stage's engine matches its graph and this TensorRT flavor and version (`check_engine`).

    Raises:
        InputError: no GPU, or a device that is not CUDA (names --backend onnxruntime).
        ArtifactError: no engines, or a stale or foreign one (names `csprt build ART`).
        ToolchainError: an unknown backend, or TensorRT not installed (names the package).
    """
    device = resolve_device(backend, device)
    if backend != "tensorrt":
        return device
    why = _cuda_problem()
    if why:
        raise InputError(f"--backend tensorrt runs engines on an NVIDIA GPU; none is visible ({why}); "
                         "use --backend onnxruntime")
    fix = f"csprt build {shlex.quote(str(artifact.dir))}"
    if not any(entry.get("engines") for entry in artifact.manifest["stages"]):
        raise ArtifactError(f"artifact {artifact.dir} has no TensorRT engines; build them with: {fix}")
    from engines.build import check_engine
    from engines.trt import load_trt

    _, flavor, version = load_trt()
    for stage in artifact.layout.stages:
        check_engine(artifact.dir, stage.name, flavor, version)
    return device


def runner_factory(artifact: Artifact, backend: str = "onnxruntime", device: str | None = None,
                   threads: int | None = None):
    """A `runner_for(stage)` callable for `Pipeline` on `backend`; tensorrt is checked first (`check_backend`).

    Args:
        artifact (Artifact): the loaded artifact.
        backend (str): one of BACKENDS. Defaults to "onnxruntime".
        device (str | None): "cpu", "cuda" or "cuda:N". Defaults to None (the backend's `DEFAULT_DEVICE`).
        threads (int | None): onnxruntime's intra-op threads per stage. Defaults to None (its own choice:
            every core, which oversubscribes a CPU shared by several sessions).
    """
    device = check_backend(artifact, backend, device)
    if backend == "tensorrt":
        from engines.trt import load_trt

        flavor = load_trt()[1]

        def trt_runner_for(stage: StageSpec) -> BaseRunner:
            from engines.trt_runner import TrtRunner

            return TrtRunner(stage, artifact.dir, flavor=flavor, device=device)

        return trt_runner_for

    def runner_for(stage: StageSpec) -> BaseRunner:
        from engines.ort_runner import OrtRunner

        return OrtRunner(stage, artifact.layout.dims, artifact.graph_path(stage.name), device=device,
                         intra_op_threads=threads)

    return runner_for


def chain_for(artifact: Artifact, backend: str, device: str):
    """The Pipeline chain of `backend`: None (host, numpy) for onnxruntime, a CudaChain for tensorrt."""
    if backend != "tensorrt":
        return None
    from engines.cuda_chain import CudaChain

    return CudaChain(artifact.layout, device)


class ArtifactSession:
    """Args:
        art_dir (path): an exported artifact.
        backend (str): "onnxruntime" or "tensorrt". Defaults to "onnxruntime".
        device (str | None): "cpu", "cuda" or "cuda:N". Defaults to None ("cpu" for onnxruntime, "cuda" for
            tensorrt).
        verify (bool): check every file's hash on load. Defaults to True.
        threads (int | None): onnxruntime intra-op threads per stage. Defaults to None (onnxruntime's choice).
    """

    def __init__(self, art_dir: str | Path, backend: str = "onnxruntime", device: str | None = None,
                 verify: bool = True, threads: int | None = None):
        self.artifact = load_artifact(art_dir, verify=verify)
        self.backend, self.device = backend, resolve_device(backend, device)
        runner_for = runner_factory(self.artifact, backend, self.device, threads=threads)  # tensorrt: checked before anything loads
        self.host = HostIO(self.artifact.manifest, self.artifact.dir)
        self.pipeline = Pipeline(self.artifact.layout, runner_for, chain=chain_for(self.artifact, backend, self.device))

    def close(self) -> None:
        self.pipeline.close()

    def __enter__(self) -> "ArtifactSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_mode(self, mode: str) -> None:
        if mode not in self.artifact.modes:
            raise InputError(f"mode {mode!r} is not in this artifact (exported for {', '.join(self.artifact.modes)}); "
                             f"re-export it with --mode both (or --mode {mode}): {self.artifact.rebuild_command}")

    def segment(self, image: np.ndarray, query: str, mode: str = "single-pass", max_new_tokens: int | None = None,
                instance_masks=None, record: bool = False) -> Segmentation:
        """Segment `image` ([H, W, 3] uint8 RGB) for `query`."""
        self.check_mode(mode)
        feed, meta = self.host.inputs(image, query, mode, instance_masks=instance_masks)
        # Before any stage runs: a text over the exported range fails here, naming the dim and the range.
        check_host_feed(self.artifact.layout, feed)
        result = self.pipeline.run(feed, mode, record=record, max_new_tokens=max_new_tokens)
        logits, masks = self.host.masks(result.outputs.get("masks"), meta)
        return Segmentation(
            mask_logits=logits, masks=masks, answer=self.host.answer(result.generated_ids, mode),
            generated_ids=result.generated_ids, image_tokens_per_layer=self.image_tokens_per_layer(result),
            timings_ms=result.timings_ms, pipeline=result, meta=meta)

    def image_tokens_per_layer(self, result: PipelineResult) -> list[int]:
        counts = []
        blocks = [s for s in self.artifact.layout.stages if s.kind == "llm"]
        for i, stage in enumerate(blocks):  # entry_i gives block i its image rows
            rows = result.tensors[f"entry_{i}.image_indices_out"].shape[0]
            counts += [int(rows)] * len(stage.layers)
        return counts
