"""config.pbtxt text from layouts (no export): parsed with Triton's own ModelConfig proto from tritonclient,
dims/dtypes equal to the stage specs, ranges recorded, backends, the BLS model's tensors, and bad input."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from exporter.tiny import tiny_shape
from graphs.schedule import resolve
from graphs.stages import LayoutOptions, StageSpec, TensorSpec, build_layout
from graphs.triton_config import (BLS_INPUTS, BLS_OUTPUTS, DIMS_PARAMETER, TRITON_DTYPES, bls_config, bls_inputs,
                                  stage_config, stage_max_batch, triton_dims)

CASES = {  # id -> (preset, schedule knobs, LayoutOptions)
    "csp-both-fp32": ("csp", {}, LayoutOptions(mode="both")),
    "full-single-fp16": ("full", {}, LayoutOptions(mode="single-pass", precision="fp16")),
    "csp-seg_first-generate": ("csp", {"cluster_method": "seg_first"}, LayoutOptions(mode="generate")),
}
PB = model_config_pb2.ModelConfig
DT = model_config_pb2.DataType


def _layout(case: str):
    preset, knobs, opts = CASES[case]
    shape = tiny_shape()
    return build_layout(resolve(preset, shape.llm.layers, shape.num_image_tokens, **knobs), shape, opts,
                        seg_token_id=0, stop_token_ids=(1,))


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def params(cfg) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def assert_matches_spec(cfg_tensors, specs, batched: bool = False) -> None:
    """Config inputs or outputs agree with stage specs: same names in order, Triton dtype, dims (-1 for named);
    `batched`: without the leading batch dim, which Triton owns ([batch] alone: dims [1], reshape [])."""
    assert [t.name for t in cfg_tensors] == [s.name for s in specs]
    for t, s in zip(cfg_tensors, specs):
        assert DT.Name(t.data_type) == TRITON_DTYPES[s.dtype], s.name
        shape = [d if isinstance(d, int) else -1 for d in (s.shape[1:] if batched else s.shape)]
        assert list(t.dims) == (shape or [1]), s.name
        assert t.HasField("reshape") == (batched and not shape) and not t.reshape.shape, s.name


@pytest.mark.parametrize("case", CASES)
def test_every_stage_config_parses_and_matches_its_spec(case):
    layout = _layout(case)
    for stage in layout.stages:
        cfg = parse(stage_config(stage, layout.dims, name=f"csprt_{stage.name}", header="a\nb"))
        leads = all(t.shape[:1] == ("batch",) for t in (*stage.inputs, *stage.outputs))
        assert cfg.name == f"csprt_{stage.name}" and cfg.max_batch_size == (layout.dims["batch"].max if leads else 0)
        assert not cfg.HasField("dynamic_batching")
        assert (cfg.platform, cfg.backend, cfg.default_model_filename) == ("onnxruntime_onnx", "onnxruntime", "model.onnx")
        assert_matches_spec(cfg.input, stage.inputs, leads)
        assert_matches_spec(cfg.output, stage.outputs, leads)
        assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in cfg.instance_group] == [
            (1, "KIND_GPU")]
        p = params(cfg)
        assert (p["csprt_stage"], p["csprt_kind"]) == (stage.name, stage.kind)
        used = {d for t in stage.inputs for d in t.shape if isinstance(d, str)}
        want = {f"{d}={r.min}:{r.opt}:{r.max}" for d, r in layout.dims.items() if d in used}
        assert set(p.get(DIMS_PARAMETER, "").split()) - {""} == want


def test_dims_comments_give_named_shape_and_range():
    layout = _layout("csp-both-fp32")
    r = layout.dims["rows_llm_1"]
    text = stage_config(layout.stage("llm_1"), layout.dims, name="m")
    b = layout.dims["batch"]
    assert (f"# [batch, rows_llm_1, 64]; batch={b.min}:{b.opt}:{b.max}; rows_llm_1={r.min}:{r.opt}:{r.max}\n"
            'input {\n  name: "hidden"\n  data_type: TYPE_FP32\n  dims: -1\n  dims: 64\n}') in text  # before its tensor
    c = layout.dims["cache_llm_1"]
    assert f"# [batch, 2, cache_llm_1, 16]; batch={b.min}:{b.opt}:{b.max}; cache_llm_1={c.min}:{c.opt}:{c.max}" in text
    assert f"max_batch_size {b.max}: every tensor leads with the batch dim" in text
    text = stage_config(layout.stage("seg_head"), layout.dims, name="m")  # [num_seg, ...]: the batch's [SEG] rows
    assert "max_batch_size 0: Triton adds no batch axis" in text
    assert parse(text).max_batch_size == 0 and "\nmax_batch_size:" not in text  # text_format omits a default


def test_stage_max_batch():
    layout = _layout("csp-both-fp32")
    narrowed = {**layout.dims, "batch": type(layout.dims["batch"])(1, 2, 4)}  # csprt build --shapes batch=1:2:4
    assert stage_max_batch(layout.stage("vision"), narrowed) == 4
    assert stage_max_batch(layout.stage("sam_decoder"), layout.dims) == 0
    assert {s.name for s in layout.stages if not stage_max_batch(s, layout.dims)} == {"seg_gather", "seg_head",
                                                                                       "sam_decoder"}


def test_triton_dims():
    assert triton_dims((1, "prefix_len", 64)) == [1, -1, 64]
    assert triton_dims(("prefix_len + 16 + suffix_len",)) == [-1]  # an expression dim


def test_engine_backends_and_options():
    layout = _layout("csp-both-fp32")
    stage = layout.stage("llm_1")
    trt = parse(stage_config(stage, layout.dims, name="m", backend="tensorrt", instances=3))
    assert (trt.platform, trt.backend, trt.default_model_filename) == ("tensorrt_plan", "tensorrt", "model.plan")
    assert trt.instance_group[0].count == 3 and list(trt.instance_group[0].profile) == []
    two = parse(stage_config(stage, layout.dims, name="m", backend="tensorrt", profiles=2))  # prefill + decode
    assert list(two.instance_group[0].profile) == ["0", "1"]
    rtx = parse(stage_config(stage, layout.dims, name="m", backend="tensorrt-rtx", kind="cpu"))
    assert (rtx.platform, rtx.backend) == ("", "tensorrt_rtx")
    assert rtx.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    # an input the graph dropped is left out (Triton rejects a config input its model lacks)
    entry = layout.stage("entry_2")
    keep = [t.name for t in entry.inputs if t.name != "suffix_ids"]
    cfg = parse(stage_config(entry, layout.dims, name="m", inputs=keep))
    assert [t.name for t in cfg.input] == keep
    assert "prefix_len" in params(cfg)[DIMS_PARAMETER]  # still used by prefix_ids


@pytest.mark.parametrize("max_batch_size", [0, 8])
@pytest.mark.parametrize("case", ["csp-both-fp32", "csp-seg_first-generate"])
def test_bls_config(case, max_batch_size):
    layout = _layout(case)
    cfg = parse(bls_config(layout, name="seg", instances=2, max_batch_size=max_batch_size, max_queue_delay_us=1500,
                           parameters={"csprt_version": "1.2.3"}))
    assert (cfg.name, cfg.backend, cfg.platform, cfg.max_batch_size) == ("seg", "python", "", max_batch_size)
    assert cfg.HasField("dynamic_batching") == (max_batch_size > 0)
    assert cfg.dynamic_batching.max_queue_delay_microseconds == (1500 if max_batch_size else 0)
    got_in = [(t.name, DT.Name(t.data_type), list(t.dims), t.optional) for t in cfg.input]
    assert got_in == [(t.name, t.data_type, list(t.dims), t.optional) for t in bls_inputs(layout)]
    assert [(t.name, DT.Name(t.data_type), list(t.dims)) for t in cfg.output] == [
        (t.name, t.data_type, list(t.dims)) for t in BLS_OUTPUTS]
    assert cfg.instance_group[0].count == 2
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert params(cfg) == {"csprt_version": "1.2.3"}
    names = [t.name for t in cfg.input]
    assert names[:len(BLS_INPUTS)] == [t.name for t in BLS_INPUTS]
    if case.endswith("seg_first-generate"):
        g = tiny_shape().vision.grid
        assert (names[-1], list(cfg.input[-1].dims)) == ("instance_masks", [-1, g, g])
    else:
        assert "instance_masks" not in names


def test_bugs_are_internal_errors():
    layout = _layout("csp-both-fp32")
    bad = StageSpec("s", "vision", (TensorSpec("x", "bfloat16", (1,)),), ())
    with pytest.raises(AssertionError, match="internal error.*bfloat16"):
        stage_config(bad, {}, name="m")
    with pytest.raises(AssertionError, match="internal error"):
        stage_config(layout.stage("vision"), layout.dims, name="m", backend="tvm")
    with pytest.raises(AssertionError, match="internal error"):
        stage_config(layout.stage("vision"), layout.dims, name="m", inputs=["nope"])
    with pytest.raises(AssertionError, match="internal error"):
        stage_config(layout.stage("vision"), layout.dims, name="bad\nname")


def test_text_is_protobufs_own_with_csprt_comments_between_fields():
    """Every line that is not a comment is text_format's: the comment-free text prints back identically once
    parsed and printed field by field in the same order (protobuf writes the file, csprt only adds comments)."""
    layout = _layout("csp-both-fp32")
    for text in (stage_config(layout.stage("llm_1"), layout.dims, name="m", header="made by a test"),
                 bls_config(layout, name="seg", max_batch_size=4, parameters={"k": "v"})):
        assert text.startswith("# made by a test\nname:") or text.startswith('name: "seg"')
        bare = "".join(line for line in text.splitlines(True) if not line.startswith("#"))
        cfg = parse(bare)
        assert cfg == parse(text)
        assert sorted(bare.split("\n")) == sorted(text_format.MessageToString(cfg).split("\n"))
    assert "# the question, UTF-8\ninput {\n  name: \"query\"" in bls_config(layout, name="seg")


def test_without_tritonclient_one_line_naming_the_fix(monkeypatch):
    import sys

    from graphs.errors import ToolchainError
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # import of it fails, as when not installed
    layout = _layout("csp-both-fp32")
    with pytest.raises(ToolchainError, match=r"needs Triton's model-config protobuf from tritonclient .*"
                                             r"pip install -e '\.\[serve\]'"):
        stage_config(layout.stage("vision"), layout.dims, name="m")
