"""FLOPs accounting: the LLM formula exactly, image-token FLOPs, and the preset reductions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from graphs.errors import ScheduleError, ToolchainError
from graphs.flops import CONVENTIONS, flops_report, llm_layer_flops
from graphs.schedule import resolve
from graphs.shapes import SHAPES, LlmShape, ModelShape, VisionShape

REPO = Path(__file__).resolve().parents[2]
# 2 LLM layers, d=8, m=16; CLIP grid 2x2 -> N=4 image tokens.
TINY = ModelShape(vision=VisionShape(layers=2, hidden=8, heads=2, intermediate=16, image_size=28, patch_size=14),
                  llm=LlmShape(layers=2, hidden=8, heads=2, kv_heads=2, intermediate=16, vocab=64))


def test_llm_flops_hand_computed():
    # `fastv` on L=2, N=4: layer 0 keeps all 4 image tokens, layer 1 keeps 2. Text = 3 tokens.
    sched = resolve("fastv", 2, 4)
    assert sched.tokens_per_layer() == [4, 2]
    r = flops_report(TINY, sched, text_tokens=3)
    d, m = 8, 16
    fastv = (4 * 7 * d**2 + 2 * 7**2 * d + 2 * 7 * d * m) + (4 * 5 * d**2 + 2 * 5**2 * d + 2 * 5 * d * m)
    swiglu = (4 * 7 * d**2 + 2 * 7**2 * d + 3 * 7 * d * m) + (4 * 5 * d**2 + 2 * 5**2 * d + 3 * 5 * d * m)
    assert (fastv, swiglu) == (7328, 8864)
    assert r["flops"]["llm"] == {"fastv": fastv, "swiglu": swiglu}
    text_only = {"fastv": 2 * (4 * 3 * d**2 + 2 * 3**2 * d + 2 * 3 * d * m),
                 "swiglu": 2 * (4 * 3 * d**2 + 2 * 3**2 * d + 3 * 3 * d * m)}
    assert r["flops"]["llm_image_tokens"] == {c: r["flops"]["llm"][c] - text_only[c] for c in CONVENTIONS}
    full_image = 2 * (4 * 7 * d**2 + 2 * 7**2 * d + 2 * 7 * d * m) - text_only["fastv"]
    assert r["image_token_flops_reduction_pct"] == pytest.approx(100 * (1 - (fastv - text_only["fastv"]) / full_image))


def test_layer_formula_and_conventions():
    assert llm_layer_flops(10, 4, 6) == 4 * 10 * 16 + 2 * 100 * 4 + 2 * 10 * 4 * 6
    assert llm_layer_flops(10, 4, 6, "swiglu") == 4 * 10 * 16 + 2 * 100 * 4 + 3 * 10 * 4 * 6
    with pytest.raises(ToolchainError, match="fastv, swiglu"):
        llm_layer_flops(1, 1, 1, "gelu")


def test_full_schedule_image_flops_are_llm_minus_text_only():
    shape = SHAPES["lisa-7b"]
    r = flops_report(shape, resolve("full", 32, 256), text_tokens=40)
    text_only = 32 * llm_layer_flops(40, 4096, 11008)
    assert r["flops"]["llm_image_tokens"]["fastv"] == r["flops"]["llm"]["fastv"] - text_only
    assert r["flops"]["llm"]["fastv"] == 32 * llm_layer_flops(296, 4096, 11008)
    assert r["image_token_reduction_pct"] == 0 and r["image_token_flops_reduction_pct"] == 0
    assert r["llm_flops_reduction_pct"] == 0


@pytest.mark.parametrize("name", ["lisa-7b", "lisa-13b", "small"])
def test_report_keys_and_totals(name):
    shape = SHAPES[name]
    r = flops_report(shape, resolve("csp", shape.llm.layers, shape.num_image_tokens))
    f = r["flops"]
    assert set(f) == {"vision", "projector", "llm", "llm_image_tokens", "sam_encoder", "sam_decoder", "total"}
    for c in CONVENTIONS:
        assert f["total"][c] == sum(f[k][c] for k in ("vision", "projector", "llm", "sam_encoder", "sam_decoder"))
        assert all(f[k][c] > 0 for k in f)
    # Components without a SwiGLU FFN read the same in both conventions.
    assert all(f[k]["fastv"] == f[k]["swiglu"] for k in ("vision", "projector", "sam_encoder", "sam_decoder"))
    assert 0 < r["llm_flops_reduction_pct"] < r["image_token_flops_reduction_pct"] < 100
    assert len(r["tokens_per_layer"]) == r["n_layers"] == shape.llm.layers


def test_sam_and_vision_are_sensible_for_lisa_7b():
    f = flops_report(SHAPES["lisa-7b"], resolve("full", 32, 256))["flops"]
    # ViT-H SAM encoder at 1024 is ~3 TMACs; CLIP ViT-L/14 at 224 ~80 GMACs (23 of 24 layers run).
    assert 2.5e12 < f["sam_encoder"]["fastv"] < 3.5e12
    assert 6e10 < f["vision"]["fastv"] < 9e10
    assert f["projector"]["fastv"] == 256 * 1024 * 4096


def test_mismatched_schedule_and_bad_text_tokens():
    with pytest.raises(ScheduleError, match="L=32"):
        flops_report(SHAPES["lisa-13b"], resolve("csp", 32, 256))
    with pytest.raises(ToolchainError, match="text_tokens"):
        flops_report(TINY, resolve("full", 2, 4), text_tokens=0)


def test_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import graphs.flops, tools.flops"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.parametrize("schedule", ["full", "csp", "evtp"])
def test_cached_question_skips_the_image_only_stages(schedule):
    """A further question about an encoded image skips CLIP + projector + the SAM encoder (from the wiring)."""
    r = flops_report(SHAPES["lisa-7b"], resolve(schedule, 32, 256))
    f, cached = r["flops"], r["cached_question"]
    assert cached["image_only_stages"] == ["vision", "sam_encoder"]
    for c in CONVENTIONS:
        assert cached["skipped_flops"][c] == f["vision"][c] + f["projector"][c] + f["sam_encoder"][c]
    assert cached["skipped_pct"] == pytest.approx(100 * cached["skipped_flops"]["fastv"] / f["total"]["fastv"])
    assert 60 < cached["skipped_pct"] < 90  # the SAM ViT-H encoder outweighs the whole 7B prefill


@pytest.mark.parametrize("name", ["full", "csp", "csp-70", "evtp", "fastv", "accm-36", "accm-18"])
def test_cached_question_names_the_layouts_stages(name):
    """The image-only stages are named as the layout (and so the manifest) names them: an ACCM schedule's CLIP
    stage is accm_vision (it used to be reported as `vision`), and what it skips includes ACCM's own CLIP work."""
    from graphs.accm import AccmShape
    from graphs.accm_layout import AccmLayoutInfo
    from graphs.stages import LayoutOptions, build_layout

    schedule = resolve(name, 32, 256)
    accm = AccmLayoutInfo(AccmShape(), stop_id=13) if schedule.accm else None
    layout = build_layout(schedule, SHAPES["lisa-7b"], LayoutOptions(precision="fp16", mode="both", max_batch=1),
                          seg_token_id=32000, stop_token_ids=(2,), accm=accm)
    r = flops_report(SHAPES["lisa-7b"], schedule)
    f, cached = r["flops"], r["cached_question"]
    vision = "accm_vision" if schedule.accm else "vision"
    assert cached["image_only_stages"] == [vision, "sam_encoder"]
    assert set(cached["image_only_stages"]) <= {s.name for s in layout.stages}
    parts = ["vision", "projector", "sam_encoder"] + (["accm_vision"] if schedule.accm else [])
    assert cached["skipped_flops"]["fastv"] == sum(f[p]["fastv"] for p in parts)
