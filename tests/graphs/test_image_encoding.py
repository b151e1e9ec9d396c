"""Image-only stages come from the wiring: a query-reading entry stage drops out, instance masks stay in."""

from __future__ import annotations

import dataclasses

import pytest

from graphs.image_encoding import IMAGE_HOST_INPUTS, image_only_stages, image_plan
from graphs.schedule import resolve
from graphs.shapes import shape_named
from graphs.stages import LayoutOptions, TensorSpec, build_layout

SHAPE = shape_named("lisa-7b")


def _layout(schedule: str = "csp", mode: str = "both", **knobs):
    sched = resolve(schedule, SHAPE.llm.layers, SHAPE.num_image_tokens)
    return build_layout(dataclasses.replace(sched, **knobs), SHAPE, LayoutOptions(mode=mode), 5, (2,))


@pytest.mark.parametrize("schedule", ["full", "csp", "evtp", "fastv"])
@pytest.mark.parametrize("mode", ["single-pass", "generate", "both"])
def test_vision_and_sam_encoder_read_only_the_image(schedule, mode):
    layout = _layout(schedule, mode)
    plan = image_plan(layout)
    assert plan.stages == ("vision", "sam_encoder")
    # what the query stages read from them, and nothing they do not read
    read = {t.source_for(m) for s in layout.stages if s.name not in plan.stages for t in s.inputs
            for m in layout.modes if m in s.modes}
    assert set(plan.keep) == {r for r in read if r.split(".")[0] in plan.stages}
    assert "sam_encoder.image_embeddings" in plan.keep and plan.image_inputs == ("clip_pixels", "sam_pixels")


def test_seg_first_instance_masks_are_part_of_the_image():
    layout = _layout("csp", cluster_method="seg_first")
    assert "host.instance_masks" in {t.source for t in layout.stage("vision").inputs}
    assert image_only_stages(layout) == ("vision", "sam_encoder")
    assert image_plan(layout).image_inputs == ("clip_pixels", "sam_pixels", "instance_masks")


def test_an_entry_stage_reading_the_query_is_not_image_only():
    """A vision graph that also reads the prompt (e.g. text-conditioned picks): it and everything after it run per
    question, and the encoding keeps its image input instead."""
    layout = _layout("csp")
    vision = layout.stage("vision")
    vision = dataclasses.replace(vision, inputs=(*vision.inputs,
                                                 TensorSpec("prefix_ids", "int64", ("prefix_len",), "host.prefix_ids")))
    layout = dataclasses.replace(layout, stages=tuple(vision if s.name == "vision" else s for s in layout.stages))
    plan = image_plan(layout)
    assert plan.stages == ("sam_encoder",)
    assert set(plan.keep) == {"sam_encoder.image_embeddings", "host.clip_pixels"}
    assert set(plan.image_inputs) <= IMAGE_HOST_INPUTS

