"""Exported artifacts against the PyTorch reference: every preset, both modes, per stage and end to end."""

from __future__ import annotations

import numpy as np
import pytest

from exporter.export import sample_image
from exporter.tiny import SEG_QUERY
from graphs.schedule import PRESETS

PRESET_NAMES = list(PRESETS)


@pytest.fixture(scope="module")
def reports(export_tiny, tiny_ckpt):
    """validate_artifact on each preset's artifact (both modes), computed once per module."""
    from tools.validate import validate_artifact

    cache = {}

    def get(preset: str) -> dict:
        if preset not in cache:
            cache[preset] = validate_artifact(export_tiny(preset, "both"), tiny_ckpt, image=sample_image(),
                                              query=SEG_QUERY, progress=lambda _m: None)
        return cache[preset]

    return get


@pytest.mark.parametrize("mode", ["single-pass", "generate"])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_stages_and_end_to_end_match_reference(reports, preset, mode):
    report = reports(preset)
    stages = [s for s in report["stages"] if s["mode"] == mode]
    names = {s["name"] for s in stages}
    assert {"vision", "sam_encoder", "seg_head", "sam_decoder"} <= names
    assert any(n.startswith("step_") for n in names) == (mode == "generate")  # decode steps, on the blocks
    for s in stages:
        assert s["passed"] and s["max_abs"] <= 1e-4, s
    (e2e,) = [e for e in report["end_to_end"] if e["mode"] == mode]
    # The tiny checkpoint answers the sample request with "[SEG]</s>", so generate mode has a mask to compare.
    assert e2e["num_seg"] == e2e["ref_num_seg"] == 1
    assert e2e["mask_logits_max_abs"] <= 1e-3
    assert e2e["mask_iou"] == 1.0
    assert e2e["ids_equal"]
    if mode == "generate":
        assert len(e2e["generated_ids"]) == 2
    assert report["passed"]


def test_other_image_and_query_single_pass(export_tiny, tiny_ckpt):
    from tools.validate import validate_artifact

    image = (np.random.RandomState(7).rand(61, 45, 3) * 255).astype(np.uint8)
    report = validate_artifact(export_tiny("csp", "both"), tiny_ckpt, image=image, query="Which part is brightest?",
                               modes=["single-pass"], progress=lambda _m: None)
    assert report["passed"], report["end_to_end"]
    assert report["end_to_end"][0]["mask_iou"] == 1.0


def test_validate_cli_json(export_tiny, tiny_ckpt, capsys):
    import json

    from tools.cli import main

    art = export_tiny("full", "single-pass")
    assert main(["validate", str(art), "--checkpoint", str(tiny_ckpt), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True
    assert {s["name"] for s in report["stages"]} == {"vision", "sam_encoder", "embed", "entry_0", "llm_0", "seg_gather",
                                                  "seg_head", "sam_decoder"}
    assert all(set(s) >= {"name", "max_abs", "passed"} for s in report["stages"])
    assert report["mask_iou"] == 1.0


def test_validate_fails_on_a_wrong_checkpoint(export_tiny, tmp_path, capsys):
    """A checkpoint with other weights (same shapes) gives a non-zero exit and a failed report."""
    from exporter.tiny import TinyOptions, make_tiny
    from tools.cli import main

    other = make_tiny(tmp_path / "other", TinyOptions(seed=1))
    art = export_tiny("full", "single-pass")
    assert main(["validate", str(art), "--checkpoint", str(other), "--json"]) == 1
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False
    assert any(not s["passed"] for s in report["stages"])


def test_fp16_artifact_within_documented_tolerance(export_tiny, tiny_ckpt):
    """fp16 graphs (weights and float I/O fp16; Softmax and ReduceMean computed in fp32) against the fp32
    reference. Tolerances are the manifest's: see graphs.tolerance.E2E_TOLERANCES for the measured values."""
    import onnx

    from graphs.manifest import load_artifact
    from graphs.onnx_passes import fp16_sensitive_ops_report
    from tools.validate import validate_artifact

    art_dir = export_tiny("csp", "both", "fp16")
    art = load_artifact(art_dir)
    assert art.precision == "fp16"
    assert art.manifest["tolerances"]["end_to_end"] == {"mask_logits_atol": 0.05, "mask_iou_min": 0.98}
    for stage in art.layout.stages:
        report = fp16_sensitive_ops_report(onnx.load(str(art.graph_path(stage.name))))
        assert not [line for line in report if "Softmax" in line or "ReduceMean" in line], (stage.name, report)
    report = validate_artifact(art_dir, tiny_ckpt, image=sample_image(), query=SEG_QUERY, progress=lambda _m: None)
    assert report["passed"], report["end_to_end"]
    from graphs.tolerance import stage_atol

    for s in report["stages"]:  # the documented per-stage numbers (graphs.tolerance), not just the manifest's
        assert s["max_abs"] <= stage_atol("fp16", s["name"].split(" ")[0]) <= 4e-2, s
    for e in report["end_to_end"]:
        assert e["num_seg"] == 1 and e["ids_equal"]
        assert e["mask_logits_max_abs"] <= 0.05 and e["mask_iou"] >= 0.98


def test_validate_unknown_stage_name_is_a_clear_error(export_tiny, capsys):
    from tools.cli import main

    art = export_tiny("full", "single-pass")
    assert main(["validate", str(art), "--stages", "llm_0,llm_9"]) == 2
    err = capsys.readouterr().err
    assert "llm_9" in err and "vision, sam_encoder, embed, entry_0, llm_0" in err and "Traceback" not in err


def test_validate_subset_of_stages(export_tiny, tiny_ckpt, capsys):
    import json

    from tools.cli import main

    art = export_tiny("full", "single-pass")
    assert main(["validate", str(art), "--checkpoint", str(tiny_ckpt), "--stages", "llm_0", "--json"]) == 0
    assert [s["name"] for s in json.loads(capsys.readouterr().out)["stages"]] == ["llm_0"]
