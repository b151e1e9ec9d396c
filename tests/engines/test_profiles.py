"""engines.profiles: optimization profiles from the manifest's named dims, and `--shapes` overrides. No TensorRT."""

from __future__ import annotations

import pytest

from engines.profiles import (PROFILES_NOTE, InputShapes, apply_overrides, call_profile, parse_shapes, profile_names,
                              profiles_from_json, profiles_note, profiles_to_json, stage_dims, stage_profiles)
from graphs.errors import ArtifactError, InputError, ToolchainError
from graphs.schedule import resolve
from graphs.shapes import shape_named
from graphs.stages import DimRange, LayoutOptions, StageSpec, TensorSpec, build_layout

DIMS = {"prefix_len": DimRange(1, 9, 256), "suffix_len": DimRange(1, 28, 256), "num_seg": DimRange(1, 1, 8),
        "past_llm_0": DimRange(1, 185, 592)}
LLM = StageSpec("llm_1", "llm",
                (TensorSpec("prefix_hidden", "float16", (1, "prefix_len", 64), "llm_0.prefix_hidden_out"),
                 TensorSpec("suffix_ids", "int64", ("suffix_len",), "host.suffix_ids"),
                 TensorSpec("image_hidden", "float16", (1, 16, 64), "llm_0.image_hidden_out")),
                (TensorSpec("present_key_3", "float16", (1, 2, "prefix_len + 16 + suffix_len", 16)),))


def _layout(schedule: str, mode: str = "both"):
    shape = shape_named("small")
    sched = resolve(schedule, shape.llm.layers, shape.num_image_tokens)
    return build_layout(sched, shape, LayoutOptions(mode=mode), seg_token_id=5, stop_token_ids=(2,))


def _substitute(shape, dims, key):
    return tuple(d if isinstance(d, int) else getattr(dims[d], key) for d in shape)


def test_static_dims_fixed_named_dims_from_dims():
    (profile,) = stage_profiles(LLM, DIMS)
    assert profile == {
        "prefix_hidden": InputShapes((1, 1, 64), (1, 9, 64), (1, 256, 64)),
        "suffix_ids": InputShapes((1,), (28,), (256,)),
        "image_hidden": InputShapes((1, 16, 64), (1, 16, 64), (1, 16, 64)),
    }


@pytest.mark.parametrize("schedule", ["full", "csp", "evtp"])
def test_every_stage_of_a_real_layout_gets_one_profile_matching_its_dims(schedule):
    layout = _layout(schedule)
    for stage in layout.stages:
        profiles = stage_profiles(stage, layout.dims)
        assert len(profiles) == 1, stage.name
        for t in stage.inputs:
            got = profiles[0][t.name]
            assert got == InputShapes(*(_substitute(t.shape, layout.dims, k) for k in ("min", "opt", "max"))), t.name
            assert all(lo <= o <= hi for lo, o, hi in zip(got.min, got.opt, got.max))


def test_data_dependent_num_seg_is_bounded_by_dims():
    layout = _layout("csp")
    (profile,) = stage_profiles(layout.stage("sam_decoder"), layout.dims)
    assert profile["seg_embeddings"].min[0] == 1 and profile["seg_embeddings"].max[0] == layout.dims["num_seg"].max


def test_block_profile_spans_prefill_and_decode_rows_and_the_cache():
    layout = _layout("csp", "generate")
    block = layout.stage("llm_0")
    (profile,) = stage_profiles(block, layout.dims)
    assert profile["hidden"].min[1] == 1 and profile["hidden"].max[1] == layout.dims["rows_llm_0"].max  # decode .. prompt
    key = profile["past_key_0"]
    assert key.max[2] == layout.dims["cache_llm_0"].max and key.min[2] == 1
    assert set(stage_dims(block, layout.dims)) == {"batch", "rows_llm_0", "cache_llm_0"}
    b = layout.dims["batch"]  # every input's leading dim: min 1, opt --opt-batch, max --max-batch
    assert (key.min[0], key.opt[0], key.max[0]) == (1, b.opt, b.max) == (1, 4, 8)
    assert profile["past_len"].max == (b.max,) and profile["row_lens"].min == (1,)


@pytest.mark.parametrize("schedule", ["full", "csp"])
def test_decoded_block_gets_a_prefill_and_a_decode_profile(schedule):
    """A block a decode loop runs: profile 0 is the one-profile engine's (prefill), profile 1 the same with rows 1."""
    layout = _layout(schedule, "both")
    blocks = [s for s in layout.stages if s.cache]
    assert blocks and all(layout.decodes(b.name) for b in blocks)
    assert not any(layout.decodes(s.name) for s in layout.stages if not s.cache)  # embed runs a step, no cache
    for block in blocks:
        rows = f"rows_{block.name}"
        prefill, decode = stage_profiles(block, layout.dims, decode=True)
        assert prefill == stage_profiles(block, layout.dims)[0]
        for t in block.inputs:
            step = {**layout.dims, rows: DimRange(1, 1, 1)}
            assert decode[t.name] == InputShapes(*(_substitute(t.shape, step, k) for k in ("min", "opt", "max")))
        assert decode["hidden"].min[1] == decode["hidden"].max[1] == 1 and prefill["hidden"].max[1] > 1
        for cache_in, _ in block.cache:
            assert decode[cache_in] == prefill[cache_in]  # the same cache range (and batch range) in both
        assert profile_names(block, True) == ["prefill", "decode"] and "two profiles" in profiles_note(block, True)
    single = _layout(schedule, "single-pass")
    assert not any(single.decodes(s.name) for s in single.stages)  # a single-pass block never decodes: one profile


def test_shapes_override_narrows_both_profiles():
    layout = _layout("csp", "both")
    block = layout.stage("llm_0")
    dims = apply_overrides(layout.dims, parse_shapes(["cache_llm_0=1:64:128", "rows_llm_0=1:32:64"], layout.dims))
    prefill, decode = stage_profiles(block, dims, decode=True)
    assert prefill["past_key_0"].max[2] == decode["past_key_0"].max[2] == 128
    assert prefill["hidden"].max[1] == 64 and decode["hidden"].max[1] == 1
    narrow = apply_overrides(layout.dims, parse_shapes(["rows_llm_0=2:32:64"], layout.dims))
    assert len(stage_profiles(block, narrow)) == 1  # a single-pass block may leave out one-row calls
    with pytest.raises(ToolchainError, match=r"^--shapes rows_llm_0=2:32:64: min 2 leaves out the one-row decode "
                                             r"steps of block 'llm_0' \(generate mode\); keep its min at 1$"):
        stage_profiles(block, narrow, decode=True)


def test_call_profile_takes_the_tightest_fitting_profile():
    prefill = {"x": InputShapes((1, 1), (4, 8), (8, 64)), "c": InputShapes((1, 1), (4, 9), (8, 96))}
    decode = {"x": InputShapes((1, 1), (4, 1), (8, 1)), "c": InputShapes((1, 1), (4, 9), (8, 96))}
    assert call_profile([prefill, decode], {"x": (2, 30), "c": (2, 40)}) == 0  # a prefill: only profile 0 fits
    assert call_profile([prefill, decode], {"x": (2, 1), "c": (2, 40)}) == 1   # one row: the decode profile
    assert call_profile([prefill], {"x": (2, 1), "c": (2, 40)}) == 0           # an engine of one profile
    disjoint = [{"x": InputShapes((1, 4), (8, 4), (16, 4))}, {"x": InputShapes((17, 4), (32, 4), (64, 4))}]
    assert call_profile(disjoint, {"x": (3, 4)}) == 0 and call_profile(disjoint, {"x": (40, 4)}) == 1
    with pytest.raises(InputError, match=r"^no optimization profile fits the feed \(profile 0: input 'x' shape "
                                         r"\(65, 4\) is outside \[\(1, 4\), \(16, 4\)\]; profile 1: "):
        call_profile(disjoint, {"x": (65, 4)})


def test_profiles_note_says_why_one_profile_suffices():
    layout = _layout("csp")
    notes = {s.kind: profiles_note(s) for s in layout.stages}
    assert notes["llm"] == PROFILES_NOTE["llm"] and "prefill and decode" in notes["llm"]
    assert "one profile" in notes["vision"]
    assert profiles_note(layout.stage("vision"), decode=True) == notes["vision"]  # only blocks get two
    assert profile_names(layout.stage("vision"), True) == ["all"]


def test_only_graph_inputs_get_shapes():
    (profile,) = stage_profiles(LLM, DIMS, inputs=["suffix_ids"])
    assert list(profile) == ["suffix_ids"]


def test_expression_dim_on_an_input_is_an_artifact_error():
    bad = StageSpec("decode", "decode", (TensorSpec("past", "float16", (1, "past_llm_0 + 1"), "host.x"),), ())
    with pytest.raises(ArtifactError, match=r"stage 'decode' input 'past' has an expression dim \('past_llm_0 \+ 1'\)"):
        stage_profiles(bad, DIMS)


def test_json_round_trip():
    profiles = stage_profiles(LLM, DIMS)
    data = profiles_to_json(profiles)
    assert data[0]["suffix_ids"] == {"min": [1], "opt": [28], "max": [256]}
    assert profiles_from_json(data) == profiles


# --- --shapes ---------------------------------------------------------------------------------------

def test_parse_shapes_narrows_dims():
    overrides = parse_shapes(["suffix_len=1:64:128", " num_seg = 1:2:4"], DIMS)
    assert overrides == {"suffix_len": DimRange(1, 64, 128), "num_seg": DimRange(1, 2, 4)}
    dims = apply_overrides(DIMS, overrides)
    assert dims["suffix_len"] == DimRange(1, 64, 128) and dims["prefix_len"] == DIMS["prefix_len"]
    (profile,) = stage_profiles(LLM, dims)
    assert profile["suffix_ids"] == InputShapes((1,), (64,), (128,))


def test_parse_shapes_none_or_empty():
    assert parse_shapes(None, DIMS) == {} and parse_shapes([], DIMS) == {}


@pytest.mark.parametrize("item, message", [
    ("suffix_len=1:64:512", r"^--shapes suffix_len=1:64:512: max 512 is above the exported max 256 of 'suffix_len' "
                            r"\(exported range \[1, 256\]\); re-export with a larger --max-text-len$"),
    ("num_seg=1:1:9", r"max 9 is above the exported max 8 of 'num_seg' .*re-export with a larger --max-seg"),
    ("past_llm_0=1:8:999", r"re-export with a larger --max-text-len or --max-new-tokens"),
    ("suffix_len=0:1:8", r"^--shapes suffix_len=0:1:8: min 0 is below the exported min 1 of 'suffix_len'"),
    ("suffix_len=8:4:16", r"^--shapes suffix_len=8:4:16: needs 0 <= min <= opt <= max, got min 8, opt 4, max 16$"),
    ("suffix_len=1:64", r"^--shapes suffix_len=1:64: expected three integers min:opt:max, got '1:64'$"),
    ("suffix_len=1:x:8", r"expected three integers min:opt:max, got '1:x:8'"),
    ("suffix_len", r"^--shapes suffix_len: expected NAME=min:opt:max, e\.g\. suffix_len=1:32:128$"),
    ("=1:2:3", r"expected NAME=min:opt:max"),
    ("text_len=1:2:3", r"^--shapes text_len=1:2:3: 'text_len' is not a named dim of this artifact; it has: "
                       r"prefix_len, suffix_len, num_seg, past_llm_0$"),
], ids=["above-max", "num_seg-above-max", "past-above-max", "below-min", "unordered", "two-numbers", "not-int",
        "no-equals", "no-name", "unknown-dim"])
def test_parse_shapes_errors(item, message):
    with pytest.raises(ToolchainError, match=message):
        parse_shapes([item], DIMS)


def test_parse_shapes_twice_is_an_error():
    with pytest.raises(ToolchainError, match=r"^--shapes suffix_len=1:2:3: 'suffix_len' is given twice$"):
        parse_shapes(["suffix_len=1:2:4", "suffix_len=1:2:3"], DIMS)
