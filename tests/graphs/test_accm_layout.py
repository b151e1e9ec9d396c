"""The ACCM part of the layout (graphs/accm_layout.py): stages, host steps, wiring, JSON; no torch, no export."""

from __future__ import annotations

import dataclasses

import pytest

from graphs.accm import AccmShape
from graphs.accm_layout import AccmLayoutInfo
from graphs.manifest import layout_from_dict, layout_problems, layout_to_dict
from graphs.schedule import resolve
from graphs.shapes import SHAPES
from graphs.stages import LayoutOptions, build_layout

SHAPE = SHAPES["small"]
INFO = AccmLayoutInfo(shape=AccmShape(), stop_id=13)


def _layout(mode="both", name="accm-36", accm=INFO):
    sched = resolve(name, SHAPE.llm.layers, SHAPE.num_image_tokens)
    return build_layout(sched, SHAPE, LayoutOptions(mode=mode, max_batch=1), seg_token_id=5, stop_token_ids=(2,),
                        accm=accm)


@pytest.mark.parametrize("mode", ["single-pass", "generate", "both"])
def test_accm_layout_is_consistent_and_round_trips(mode):
    lay = _layout(mode)
    assert layout_problems(lay) == []
    assert layout_from_dict(layout_to_dict(lay)) == lay
    names = [s.name for s in lay.stages]
    assert "vision" not in names and names[0] == "accm_vision"
    for m in lay.modes:  # the beam loop's graphs are run by their host step, never as a stage of a mode
        seq = [s.name for s in lay.sequence(m)]
        assert "accm_gpt2" not in seq and "accm_beam_step" not in seq and "accm_selector" in seq
    assert [h.before for h in lay.host_steps] == ["accm_clip_text", "accm_selector", "accm_selector", "embed"]
    embed = lay.stage("embed")
    assert embed.input("suffix_ids").source == "accm_splice.suffix_ids"
    if "single-pass" in lay.modes:
        assert lay.stage("seg_gather").input("seg_rows").source == "accm_splice.seg_rows"
    else:
        assert all(t.name != "seg_rows" for t in lay.host_steps[-1].outputs)


def test_plain_layouts_have_no_host_steps_key():
    sched = resolve("csp", SHAPE.llm.layers, SHAPE.num_image_tokens)
    lay = build_layout(sched, SHAPE, LayoutOptions(mode="both"), seg_token_id=5, stop_token_ids=(2,))
    assert lay.host_steps == () and "host_steps" not in layout_to_dict(lay)
    assert lay.stage("embed").input("suffix_ids").source == "host.suffix_ids"


def test_layout_problems_name_bad_host_step_wiring():
    lay = _layout("single-pass")
    bad = dataclasses.replace(lay.host_steps[-1], before="nowhere")
    gpt2 = lay.stage("accm_gpt2")
    rewired = dataclasses.replace(gpt2, inputs=(dataclasses.replace(gpt2.inputs[0], source="accm_mapper.token_ids"),
                                                *gpt2.inputs[1:]))
    lay2 = dataclasses.replace(lay, host_steps=(*lay.host_steps[:-1], bad),
                               stages=tuple(rewired if s.name == "accm_gpt2" else s for s in lay.stages))
    problems = layout_problems(lay2)
    assert "host step 'accm_splice' runs before 'nowhere', which is no stage" in problems
    assert any("stage 'accm_gpt2' input 'token_ids'" in p and "'accm_captions'" in p for p in problems)


def test_accm_schedule_and_info_go_together():
    with pytest.raises(AssertionError, match="AccmLayoutInfo"):
        _layout(accm=None)
    with pytest.raises(AssertionError, match="AccmLayoutInfo"):
        _layout(name="csp")
