"""Which stages read only the image: derived from a Layout's wiring, never from stage names.

    host.clip_pixels ----> vision ----------+                       image-only: every input comes from an
    host.instance_masks -/                  +--> llm_0 ... (query)  image host input or from an image-only
    host.sam_pixels -----> sam_encoder -----+--> sam_decoder        stage, in every mode the stage runs in

An image encoding (SAM's `set_image`) is the outputs of the image-only stages that a later stage (or a
layout output) reads, plus any image host input a query stage reads directly. With those tensors given,
a question about the same image runs only the remaining stages. A schedule whose entry op reads the
query (e.g. a text-conditioned pick in the vision graph) makes that stage, and everything after it,
query-dependent: it simply drops out of the image-only set.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphs.stages import Layout, StageSpec

# Host inputs computed from the image alone (engines.host.HostIO.image_inputs makes exactly these; the
# instance masks come from the host's instance segmenter, per image). Every other host input reads the query.
IMAGE_HOST_INPUTS = frozenset({"clip_pixels", "sam_pixels", "instance_masks"})


@dataclass(frozen=True)
class ImagePlan:
    """What encoding an image runs and keeps.

    stages: the image-only stages, in layout order.
    keep: sources ("<stage>.<output>" or "host.<input>") a query run reads from the encoding.
    image_inputs: the image host inputs the image-only stages or `keep` need.
    """

    stages: tuple[str, ...]
    keep: tuple[str, ...]
    image_inputs: tuple[str, ...]


def _sources(stage: StageSpec, layout: Layout) -> set[str]:
    modes = [m for m in layout.modes if m in stage.modes]
    return {t.source_for(m) for t in stage.inputs for m in modes}


def image_only_stages(layout: Layout) -> tuple[str, ...]:
    """Stages whose every input, in every mode they run in, derives from image host inputs alone.

    Loop stages are never image-only (the decode loop reads the prompt). Layout order is a topological
    order (a stage reads only host inputs and earlier stages), so one pass suffices.
    """
    image_only: set[str] = set()
    for stage in layout.stages:
        if stage.loop or not stage.inputs:
            continue
        if all(_image_derived(src, image_only) for src in _sources(stage, layout)):
            image_only.add(stage.name)
    return tuple(s.name for s in layout.stages if s.name in image_only)


def _image_derived(source: str, image_only: set[str]) -> bool:
    kind, _, name = source.partition(".")
    if kind == "host":
        return name in IMAGE_HOST_INPUTS
    return kind in image_only  # "loop.*" is never image-derived


def image_plan(layout: Layout) -> ImagePlan:
    """The image-only stages and the tensors a query run needs from them (see module doc)."""
    stages = image_only_stages(layout)
    only = set(stages)
    read: set[str] = set()
    for stage in layout.stages:
        if stage.name not in only:
            read |= _sources(stage, layout)
    for src in layout.outputs.values():
        read |= set(src.values()) if isinstance(src, dict) else {src}
    keep = sorted(s for s in read if _image_derived(s, only))
    needed = {s.split(".", 1)[1] for s in keep if s.startswith("host.")}
    for stage in layout.stages:
        if stage.name in only:
            needed |= {s.split(".", 1)[1] for s in _sources(stage, layout) if s.startswith("host.")}
    host_names = [t.name for t in layout.host_inputs]
    return ImagePlan(stages=stages, keep=tuple(keep), image_inputs=tuple(n for n in host_names if n in needed))
