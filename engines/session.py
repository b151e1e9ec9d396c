"""One artifact, ready to segment: manifest + host I/O + a Pipeline on a backend.

This is what `csprt run`, `csprt validate` and servers use. Everything model-specific stays on
the host side (tokenizer, image preprocessing, mask postprocessing, all described by the
manifest); the stages in between are only wired.

    backend       runners     chain (engines.pipeline)       device
    onnxruntime   OrtRunner   HostChain: numpy via the host  cpu (default) | cuda (onnxruntime-gpu)
    tensorrt      TrtRunner   CudaChain: stays on the GPU    cuda (default) | cuda:N

`--backend tensorrt` is checked before anything loads (`check_backend`): a visible CUDA GPU, built
engines, TensorRT installed, and every stage's engine matching its graph and this TensorRT.

Many questions about one image (as SAM's predictor: `set_image` once, prompt many times):

    enc = session.encode_image(image)              # the image-only stages (graphs.image_encoding), once
    session.segment(enc, "the cup")                # the other stages, with enc's tensors given
    session.segment(image, q, keep_encoding=True)  # one full run (SAM encoder concurrent with the LLM) + enc

An encoding's tensors stay where the chain keeps them: numpy on the host (onnxruntime), torch CUDA
tensors on the GPU (tensorrt; cloned out of the engines' reused output buffers).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engines.host import HostIO, HostMeta, check_host_feed
from engines.host_steps import HostSteps
from engines.pipeline import DecodeIds, Pipeline, PipelineResult
from graphs.errors import ArtifactError, InputError, ToolchainError
from graphs.image_encoding import image_plan
from graphs.manifest import Artifact, load_artifact
from graphs.prompt import PromptIds
from graphs.quantize import ort_session_config
from graphs.runner import BaseRunner
from graphs.stages import StageSpec

BACKENDS = ("onnxruntime", "tensorrt")
DEFAULT_DEVICE = {"onnxruntime": "cpu", "tensorrt": "cuda"}


def tensor_nbytes(value) -> int:
    """Bytes a numpy array or torch tensor holds (host or device), without importing torch."""
    if hasattr(value, "nbytes") and not hasattr(value, "element_size"):
        return int(value.nbytes)
    return int(value.numel() * value.element_size())


@dataclass
class ImageEncoding:
    """One image, encoded: what a question about it needs from the stages that read only the image.

    tensors: source ("<stage>.<output>", "host.<input>") -> tensor (numpy; torch CUDA on the TensorRT chain).
    original_hw / resized_hw: the image's (H, W) and the unpadded (h', w') of its SAM input (postprocessing).
    settings: the fingerprint of the artifact's image stages and preprocessing it was made with
        (`ArtifactSession.image_settings`); a session refuses an encoding with other settings.
    timings_ms: the image-only stages' times when it was made.
    """

    tensors: dict
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    settings: str
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(v) for v in self.tensors.values())


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
    encoding: ImageEncoding | None = field(default=None, repr=False)  # keep_encoding=True, or the one given
    host_steps: dict = field(default_factory=dict)  # what the host steps report, e.g. {"accm": {candidates, ...}}


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
    fix = f"csprt build {shlex.quote(str(artifact.path))}"
    if not any(entry.get("engines") for entry in artifact.manifest["stages"]):
        raise ArtifactError(f"artifact {artifact.path} has no TensorRT engines; build them with: {fix}")
    from engines.engine_check import check_engine
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
                         intra_op_threads=threads,
                         session_config=ort_session_config(artifact.manifest, stage.graph_name))

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
        runner_for (Callable[[StageSpec], BaseRunner] | None): makes each stage's runner instead of `backend`
            (Triton's BLS orchestrator: a BLS request per stage). Defaults to None (`runner_factory`).
    """

    def __init__(self, art_dir: str | Path, backend: str = "onnxruntime", device: str | None = None,
                 verify: bool = True, threads: int | None = None, runner_for=None):
        self.artifact = load_artifact(art_dir, verify=verify)
        self.backend, self.device = backend, resolve_device(backend, device)
        if runner_for is None:  # tensorrt: checked before anything loads
            runner_for = runner_factory(self.artifact, backend, self.device, threads=threads)
        self.host = HostIO(self.artifact.manifest, self.artifact.dir)
        self.host_steps = HostSteps(self.artifact.layout, self.artifact.dir, lambda: self.host.tokenizer)
        self.pipeline = Pipeline(self.artifact.layout, runner_for, chain=chain_for(self.artifact, backend, self.device),
                                 host_steps=self.host_steps)
        self._image_plan = None
        self._image_settings: str | None = None

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

    @property
    def image_plan(self):
        """The image-only stages and what an encoding keeps (graphs.image_encoding.image_plan)."""
        if self._image_plan is None:
            self._image_plan = image_plan(self.artifact.layout)
        return self._image_plan

    @property
    def image_settings(self) -> str:
        """A fingerprint of everything an encoding depends on besides the image: the preprocessing config, the
        image host inputs, the image-only stages' files, backend and device (a cache key part)."""
        if self._image_settings is None:
            m, plan = self.artifact.manifest, self.image_plan
            entries = {e["name"]: e.get("files", {}) for e in m["stages"]}
            facts = {"preprocessing": m.get("preprocessing"), "precision": self.artifact.precision,
                     "host_inputs": [t for t in m["host_inputs"] if t["name"] in plan.image_inputs],
                     "stages": {name: entries.get(name) for name in plan.stages},
                     "backend": self.backend, "device": self.device}
            self._image_settings = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()
        return self._image_settings

    @property
    def max_batch(self) -> int:
        """The most requests one call takes (the `batch` dim's exported max, `csprt export --max-batch`)."""
        return self.artifact.layout.dims["batch"].max

    def check_batch(self, n: int) -> None:
        if n < 1:
            raise InputError("an empty batch: pass at least one image and one query")
        if n > self.max_batch and self.artifact.layout.host_steps:
            raise InputError(f"a batch of {n} requests: this artifact's host steps (ACCM's caption) run one request "
                             "at a time; send one image and one query per call")
        if n > self.max_batch:
            raise InputError(f"a batch of {n} requests is more than this artifact's maximum of {self.max_batch}; "
                             f"run at most {self.max_batch} at a time, or re-export with --max-batch {n} "
                             f"({self.artifact.rebuild_command} --max-batch {n})")

    def encode_image(self, image: np.ndarray, instance_masks=None) -> ImageEncoding:
        """Run the stages that read only the image (SAM's `set_image`); `segment(encoding, query)` runs the rest.

        Args:
            image (np.ndarray): uint8 RGB, shape [H, W, 3].
            instance_masks (np.ndarray | None): [M, grid, grid], for seg_first artifacts. Defaults to None.

        Returns:
            ImageEncoding: the tensors a question needs, where the chain keeps them (host or GPU).
        """
        return self.encode_images([image], None if instance_masks is None else [instance_masks])[0]

    def encode_images(self, images: list[np.ndarray], instance_masks: list | None = None) -> list[ImageEncoding]:
        """`encode_image` of several images in one batched run of the image-only stages (at most `max_batch`)."""
        self.check_batch(len(images))
        plan, layout = self.image_plan, self.artifact.layout
        feed, original_hw, resized_hw = self.host.image_batch(images, instance_masks)
        tensors = {f"host.{k}": v for k, v in feed.items()}
        timings: dict[str, float] = {}
        done: set[str] = set()
        for mode in self.artifact.modes:  # an image-only stage of one mode only still gets encoded
            todo = [s.name for s in layout.sequence(mode) if s.name in plan.stages and s.name not in done]
            if todo:
                result = self.pipeline.run({}, mode, given=tensors, stages=todo)
                tensors.update(result.tensors)
                timings.update(result.timings_ms)
                done |= set(todo)
        return [self._encoding(tensors, b, original_hw[b], resized_hw[b], timings) for b in range(len(images))]

    def _encoding(self, tensors: dict, b: int, original_hw, resized_hw, timings: dict) -> ImageEncoding:
        """Request b's encoding out of a batched run's tensors (every kept source has the batch axis first)."""
        chain = self.pipeline.chain  # keep(): a device tensor is cloned out of the engine's reused buffer
        kept = {src: _own(chain.keep(tensors[src][b:b + 1])) for src in self.image_plan.keep}
        _settle(kept)
        stage_ms = {k: v for k, v in timings.items() if k in self.image_plan.stages}
        return ImageEncoding(kept, original_hw, resized_hw, self.image_settings, stage_ms)

    def segment(self, image, query: str, mode: str = "single-pass", max_new_tokens: int | None = None,
                instance_masks=None, record: bool = False, keep_encoding: bool = False,
                decode_ids: DecodeIds | None = None) -> Segmentation:
        """Segment an image for `query` (`segment_batch` of one request).

        Args:
            image (np.ndarray | ImageEncoding): uint8 RGB [H, W, 3] (every stage runs), or what `encode_image`
                returned for it (only the stages that read the query run).
            query (str): the question.
            mode (str): "single-pass" or "generate". Defaults to "single-pass".
            max_new_tokens (int | None): generate mode's limit. Defaults to None (the exported one).
            instance_masks (np.ndarray | None): seg_first artifacts, with an image (an encoding has them).
            record (bool): keep each stage's feed (validation). Defaults to False.
            keep_encoding (bool): with an image: also return its encoding (`Segmentation.encoding`), taken from
                this run's tensors. Defaults to False.
            decode_ids (DecodeIds | None): generate mode's stop and [SEG] ids. Defaults to None (the artifact's).
        """
        return self.segment_batch([image], [query], mode, max_new_tokens,
                                  None if instance_masks is None else [instance_masks], record, keep_encoding,
                                  decode_ids=decode_ids)[0]

    def segment_batch(self, images: list, queries: list[str], mode: str = "single-pass",
                      max_new_tokens: int | None = None, instance_masks: list | None = None, record: bool = False,
                      keep_encoding: bool = False, decode_ids: DecodeIds | None = None,
                      prompts: list[PromptIds] | None = None) -> list[Segmentation]:
        """Segment a batch: request b is `images[b]` with `queries[b]`, all in one run of each stage graph.

        Each request's result equals what `segment` gives it alone (its masks, its generated ids); the
        batch shares one `PipelineResult` and its timings. Images may be arrays or encodings (`encode_image`);
        arrays among encodings are encoded first, in one batched run.

        Args:
            images (list[np.ndarray | ImageEncoding]): one per request.
            queries (list[str]): one per request.
            mode (str): "single-pass" or "generate". Defaults to "single-pass".
            max_new_tokens (int | None): generate mode's limit, for every request. Defaults to None (the exported one).
            instance_masks (list | None): per image (arrays only), for seg_first artifacts. Defaults to None.
            record (bool): keep each stage's feed (validation). Defaults to False.
            keep_encoding (bool): also return each array image's encoding. Defaults to False.
            decode_ids (DecodeIds | None): generate mode's stop and [SEG] ids (engines.pipeline.DecodeIds), for this
                call only. Defaults to None (the artifact's).
            prompts (list[PromptIds] | None): each query's ids as `host.prompt_ids` made them for this `mode`, when
                the caller has them already (csprt serve's per-request check): the queries are not tokenised again.
                Defaults to None (tokenised here).

        Raises:
            InputError: more requests than `max_batch` (naming `--max-batch`), or images and queries that do not
                pair up.
        """
        images, queries = list(images), list(queries)
        if len(images) != len(queries):
            raise InputError(f"{len(images)} images but {len(queries)} queries; pass one query per image")
        self.check_batch(len(images))
        self.check_mode(mode)
        encoded = [isinstance(im, ImageEncoding) for im in images]
        if prompts is not None and len(prompts) != len(queries):
            raise InputError(f"{len(prompts)} tokenised prompts for {len(queries)} queries; pass one per query")
        ids = list(prompts) if prompts is not None else self.host.prompt_ids(queries, mode)
        query_feed = self.host.query_feed(ids, mode)
        if not any(encoded):
            image_feed, original_hw, resized_hw = self.host.image_batch(images, instance_masks)
            merged = {**query_feed, **image_feed}
            feed = {name: merged[name] for name in self.host.host_inputs if name in merged}  # manifest order
            # Before any stage runs: a text over the exported range fails here, naming the dim and the range.
            check_host_feed(self.artifact.layout, feed)
            result = self.pipeline.run(feed, mode, record=record, max_new_tokens=max_new_tokens,
                                       context={"queries": queries}, decode_ids=decode_ids)
            encodings = [None] * len(images)
            if keep_encoding:
                tensors = {**result.tensors, **{f"host.{k}": v for k, v in feed.items()}}
                encodings = [self._encoding(tensors, b, original_hw[b], resized_hw[b], result.timings_ms)
                             for b in range(len(images))]
        else:
            encodings = self._encodings(images, instance_masks)
            original_hw = [e.original_hw for e in encodings]
            resized_hw = [e.resized_hw for e in encodings]
            check_host_feed(self.artifact.layout, query_feed)
            chain = self.pipeline.chain
            given = {src: chain.cat([e.tensors[src] for e in encodings]) for src in self.image_plan.keep}
            rest = [s.name for s in self.artifact.layout.stages if s.name not in self.image_plan.stages]
            result = self.pipeline.run(query_feed, mode, record=record, max_new_tokens=max_new_tokens, given=given,
                                       stages=rest, context={"queries": queries}, decode_ids=decode_ids)
        metas = [HostMeta(original_hw=o, resized_hw=r, mode=mode, prompt=i)
                 for o, r, i in zip(original_hw, resized_hw, ids)]
        return self._segmentations(result, metas, mode, encodings)

    def _encodings(self, images: list, instance_masks) -> list[ImageEncoding]:
        """Every image as an encoding: the given ones checked, the arrays encoded together in one run."""
        for im in images:
            if isinstance(im, ImageEncoding) and im.settings != self.image_settings:
                raise InputError("this image encoding was made by another artifact, backend, device or preprocessing "
                                 "setting; encode the image with this session (encode_image)")
        masks = list(instance_masks) if instance_masks is not None else [None] * len(images)
        if any(m is not None for im, m in zip(images, masks) if isinstance(im, ImageEncoding)):
            raise InputError("instance masks belong to the image: pass them to encode_image, not with an encoding")
        raw = [b for b, im in enumerate(images) if not isinstance(im, ImageEncoding)]
        out = list(images)
        if raw:
            made = self.encode_images([images[b] for b in raw],
                                      None if instance_masks is None else [masks[b] for b in raw])
            for b, enc in zip(raw, made):
                out[b] = enc
        return out

    def _segmentations(self, result: PipelineResult, metas: list[HostMeta], mode: str,
                       encodings: list) -> list[Segmentation]:
        """One Segmentation per request: its masks (`seg_batch` says whose each is) and generated ids."""
        masks = result.outputs.get("masks")
        owner = result.outputs.get("seg_batch")
        owner = np.asarray(owner).reshape(-1) if owner is not None else np.zeros(0, np.int64)
        tokens = self.image_tokens_per_layer(result)
        extra = self.host_steps.report(result.outputs)  # host steps run one request (ACCM): the batch's only one
        out = []
        for b, meta in enumerate(metas):
            mine = None if masks is None else np.asarray(masks)[owner == b]
            logits, binary = self.host.masks(mine, meta)
            ids = list(result.generated_ids[b]) if result.generated_ids else []
            out.append(Segmentation(
                mask_logits=logits, masks=binary, answer=self.host.answer(ids, mode), generated_ids=ids,
                image_tokens_per_layer=tokens, timings_ms=result.timings_ms, pipeline=result, meta=meta,
                encoding=encodings[b], host_steps=extra))
        return out

    def image_tokens_per_layer(self, result: PipelineResult) -> list[int]:
        counts = []
        blocks = [s for s in self.artifact.layout.stages if s.kind == "llm"]
        for i, stage in enumerate(blocks):  # entry_i gives block i its image rows
            rows = result.tensors[f"entry_{i}.image_indices_out"].shape[1]
            counts += [int(rows)] * len(stage.layers)
        return counts


def _own(value):
    """A host slice as its own array (an encoding must not keep its whole batch alive); device tensors are
    already clones (`CudaChain.keep`)."""
    return value.copy() if isinstance(value, np.ndarray) else value


def _settle(tensors: dict) -> None:
    """Wait until device copies (CudaChain.keep's clones, on the current stream) are done, so the encoding can
    be read from any stream or thread; host arrays need nothing."""
    for value in tensors.values():
        if hasattr(value, "is_cuda") and value.is_cuda:
            import torch

            torch.cuda.current_stream(value.device).synchronize()
            return
