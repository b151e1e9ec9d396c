"""ACCM on the graphs side: presets and their JSON, schedule checks, the splice rule, FLOPs (no torch)."""

import dataclasses
import json

import pytest

from graphs.accm import SPLICE_PREFIX, selector_text, splice_position
from graphs.errors import InputError, ScheduleError
from graphs.flops import flops_report
from graphs.schedule import PRESETS, AccmKnobs, Schedule, Stage, load_schedule, resolve
from graphs.shapes import shape_named
from tests.cli_io import call


def _layout(s):
    return [(st.start, st.end, st.op, st.budget) for st in s.stages]


@pytest.mark.parametrize("name,tokens,budget,text", [
    ("accm-36", 576, 36, 20), ("accm-18", 576, 18, 12),   # ACCM's own pairs on LLaVA's 576 tokens
    ("accm-36", 256, 16, 9), ("accm-18", 256, 8, 5),      # LISA's 256: the same fractions, rounded
])
def test_accm_presets_scale_acccm_budgets(name, tokens, budget, text):
    s = resolve(name, 32, tokens)
    assert _layout(s) == [(0, 32, "accm", budget)]
    assert s.accm == AccmKnobs(text_picks=text)
    assert (s.accm.beams, s.accm.max_caption_tokens) == (3, 67)


@pytest.mark.parametrize("name", ["accm-36", "accm-18"])
def test_accm_json_round_trip(name, tmp_path):
    s = resolve(name, 32, 256)
    assert json.loads(s.to_json())["accm"]["text_picks"] == s.accm.text_picks
    path = tmp_path / "s.json"
    path.write_text(s.to_json())
    assert load_schedule(str(path), 32, 256) == s


@pytest.mark.parametrize("name", list(PRESETS))
def test_schedules_without_accm_serialise_as_before(name):
    assert "accm" not in resolve(name, 32, 256).to_dict()


def test_accm_composes_with_llm_stage_ops(tmp_path):
    s = dataclasses.replace(resolve("accm-36", 32, 256), name="accm-36+prune",
                            stages=(Stage("llm_0", 0, 10, "accm", 16), Stage("llm_1", 10, 32, "prune", 8)))
    path = tmp_path / "s.json"
    path.write_text(s.check().to_json())
    assert load_schedule(str(path), 32, 256).tokens_per_layer() == [16] * 10 + [8] * 22


@pytest.mark.parametrize("stages,knobs,match", [
    ((Stage("llm_0", 0, 32, "accm", 16),), None, "go together"),
    ((Stage("llm_0", 0, 32, "all", 256),), AccmKnobs(9), "go together"),
    ((Stage("llm_0", 0, 2, "all", 256), Stage("llm_1", 2, 32, "accm", 16)), AccmKnobs(9), "go together"),
    ((Stage("llm_0", 0, 32, "accm", 16),), AccmKnobs(0), "text_picks must be >= 1"),
    ((Stage("llm_0", 0, 10, "accm", 16), Stage("llm_1", 10, 32, "all", 256)), AccmKnobs(9), "cannot follow"),
])
def test_bad_accm_schedules_fail_clearly(stages, knobs, match):
    with pytest.raises(ScheduleError, match=match):
        Schedule("x", 32, 256, stages, accm=knobs).check()


def test_unknown_preset_lists_accm_presets():
    with pytest.raises(ScheduleError, match="choose one of: full, csp, csp-70, evtp, fastv, accm-36, accm-18"):
        resolve("accm-99", 32, 256)


def test_selector_text_is_accms():
    assert selector_text("  Where is the cat?\nAnswer the question using a single word or phrase. ", "a cat.") == \
        "Question: Where is the cat?  Supplemental information for questions: a cat."


def _chars(ids):  # a toy tokenizer: one id per character
    return "".join(map(chr, ids))


def test_splice_position_after_the_newline():
    suffix = [ord(c) for c in "]\nWhere is it?"]
    assert splice_position(suffix, [], _chars) == 2
    assert SPLICE_PREFIX == "additional information: "


def test_splice_position_when_the_tokenizer_drops_the_newline():
    suffix = [7, 8, 9]  # decodes without a newline; head = the ids of "<im_end>\n"
    assert splice_position(suffix, [7], lambda ids: "x" * len(ids)) == 1
    with pytest.raises(InputError, match="no newline after the image"):
        splice_position(suffix, [5], lambda ids: "x" * len(ids))


def test_accm_flops_parts_and_caption_tokens():
    shape = shape_named("lisa-7b")
    r = flops_report(shape, resolve("accm-36", 32, 256))
    assert r["caption_tokens"] == 96 and r["avg_image_tokens_per_layer"] == 16
    parts = ("accm_vision", "accm_clip_text", "accm_picks", "accm_mapper", "accm_caption_prefill",
             "accm_caption_decode", "accm_selector")
    f = r["flops"]
    assert all(f[p]["fastv"] > 0 for p in parts)
    assert f["total"]["fastv"] == sum(f[k]["fastv"] for k in f if k not in ("total", "llm_image_tokens"))
    # The caption's 96 tokens are LLM text: the same schedule without them costs less in the LLM.
    plain = dataclasses.replace(resolve("accm-36", 32, 256), accm=AccmKnobs(9, caption_budget=1))
    assert flops_report(shape, plain)["flops"]["llm"]["fastv"] < f["llm"]["fastv"]
    assert flops_report(shape, resolve("accm-18", 32, 256))["flops"]["llm"]["fastv"] < f["llm"]["fastv"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_flops_of_other_presets_have_no_accm_parts(name):
    r = flops_report(shape_named("lisa-7b"), resolve(name, 32, 256))
    assert "caption_tokens" not in r
    assert list(r["flops"]) == ["vision", "projector", "llm", "llm_image_tokens", "sam_encoder", "sam_decoder", "total"]


def test_flops_cli_json_for_accm():
    rc, out, err = call(["flops", "--shape", "lisa-7b", "--schedule", "accm-36", "--json"])
    assert rc == 0, err
    r = json.loads(out)
    assert r["tokens_per_layer"] == [16] * 32 and r["caption_tokens"] == 96
    assert r["flops"]["accm_selector"]["fastv"] > 0
