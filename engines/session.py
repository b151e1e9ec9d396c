"""One artifact, ready to segment: manifest + host I/O + a Pipeline on a backend.

This is what `csprt run`, `csprt validate` and servers use. Everything model-specific stays on
the host side (tokenizer, image preprocessing, mask postprocessing, all described by the
manifest); the stages in between are only wired.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engines.host import HostIO, HostMeta
from engines.pipeline import Pipeline, PipelineResult
from graphs.errors import InputError, ToolchainError
from graphs.manifest import Artifact, load_artifact
from graphs.runner import BaseRunner, bind_dims
from graphs.stages import StageSpec

BACKENDS = ("onnxruntime",)


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


def runner_factory(artifact: Artifact, backend: str = "onnxruntime", device: str = "cpu"):
    """A `runner_for(stage)` callable for `Pipeline` on `backend`."""
    if backend not in BACKENDS:
        raise ToolchainError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")

    def runner_for(stage: StageSpec) -> BaseRunner:
        from engines.ort_runner import OrtRunner

        return OrtRunner(stage, artifact.layout.dims, artifact.graph_path(stage.name), device=device)

    return runner_for


class ArtifactSession:
    """Args:
        art_dir (path): an exported artifact.
        backend (str): "onnxruntime". Defaults to "onnxruntime".
        device (str): "cpu" or "cuda". Defaults to "cpu".
        verify (bool): check every file's hash on load. Defaults to True.
    """

    def __init__(self, art_dir: str | Path, backend: str = "onnxruntime", device: str = "cpu", verify: bool = True):
        self.artifact = load_artifact(art_dir, verify=verify)
        self.host = HostIO(self.artifact.manifest, self.artifact.dir)
        self.backend, self.device = backend, device
        self.pipeline = Pipeline(self.artifact.layout, runner_factory(self.artifact, backend, device))

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
        present = tuple(t for t in self.artifact.layout.host_inputs if t.name in feed)
        bind_dims(StageSpec("host inputs", "host", present, ()), {t.name: feed[t.name] for t in present},
                  self.artifact.layout.dims)
        result = self.pipeline.run(feed, mode, record=record, max_new_tokens=max_new_tokens)
        padded = result.outputs.get("masks")
        if padded is None or padded.shape[0] == 0:
            h, w = meta.original_hw
            logits, masks = np.zeros((0, h, w), np.float32), np.zeros((0, h, w), bool)
        else:
            logits, masks = self.host.masks(padded, meta)
        return Segmentation(
            mask_logits=logits, masks=masks, answer=self.host.answer(result.generated_ids, mode),
            generated_ids=result.generated_ids, image_tokens_per_layer=self.image_tokens_per_layer(result),
            timings_ms=result.timings_ms, pipeline=result, meta=meta)

    def image_tokens_per_layer(self, result: PipelineResult) -> list[int]:
        counts = []
        for stage in self.artifact.layout.stages:
            if stage.kind == "llm":
                rows = result.tensors[f"{stage.name}.image_hidden_out"].shape[1]
                counts += [int(rows)] * len(stage.layers)
        return counts
