"""csprt build's errors: no TensorRT, precision, compute capabilities, stages, settings, unbuilt or unimportable
graphs. Most need no TensorRT; those that parse or build are marked `trt`."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import onnx
import pytest
from onnx import TensorProto, helper

from engines import trt as trt_shim
from engines.build import (CaptureLogger, NetworkFromOnnx, build_engines, check_engine, parse_compute_capability,
                           resolve_compute_capabilities, resolve_precision)
from graphs.errors import ArtifactError, ToolchainError
from graphs.manifest import load_artifact, sealed

INSTALL = "pip install tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116 (or 'csprt[trt]')"


@pytest.fixture
def no_tensorrt(monkeypatch):
    """A host where neither tensorrt nor tensorrt_rtx(_bindings) imports."""
    def fail(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(trt_shim, "_import_module", fail)
    trt_shim.clear_cache()
    yield
    trt_shim.clear_cache()


# --- the shim ---------------------------------------------------------------------------------------

def test_no_tensorrt_names_the_packages(no_tensorrt):
    with pytest.raises(ToolchainError, match=r"^TensorRT is not installed; pip install tensorrt-rtx-cu13-libs==1\.7\.1\.116 "
                                             r"tensorrt-rtx-cu13-bindings==1\.7\.1\.116 \(or 'csprt\[trt\]'\), or "
                                             r"tensorrt on a data-center GPU host$"):
        trt_shim.load_trt()
    with pytest.raises(ToolchainError, match=r"^TensorRT-RTX is not installed; pip install tensorrt-rtx-cu13-libs"):
        trt_shim.load_trt("tensorrt-rtx")
    assert trt_shim.available_flavors() == ()


def test_installed_but_unloadable_says_why(monkeypatch):
    def broken(name):
        if name == "tensorrt_rtx_bindings":
            raise ImportError("libtensorrt_rtx.so.1: cannot open shared object file")
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(trt_shim, "_import_module", broken)
    trt_shim.clear_cache()
    try:
        with pytest.raises(ToolchainError, match=r"^TensorRT is not installed \(found but failed to load: "
                                                 r"tensorrt_rtx_bindings: libtensorrt_rtx\.so\.1: cannot open"):
            trt_shim.load_trt()
    finally:
        trt_shim.clear_cache()


def test_probe_is_cached(monkeypatch):
    calls = []

    def counting(name):
        calls.append(name)
        raise ModuleNotFoundError(name=name)

    monkeypatch.setattr(trt_shim, "_import_module", counting)
    trt_shim.clear_cache()
    try:
        for _ in range(3):
            with pytest.raises(ToolchainError):
                trt_shim.load_trt()
        assert calls == ["tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings"]
    finally:
        trt_shim.clear_cache()


def test_auto_prefers_tensorrt(monkeypatch):
    fake = {"tensorrt": SimpleNamespace(__version__="10.13.0.35"), "tensorrt_rtx_bindings": SimpleNamespace(__version__="1.7")}

    def imp(name):
        if name in fake:
            return fake[name]
        raise ModuleNotFoundError(name=name)

    monkeypatch.setattr(trt_shim, "_import_module", imp)
    trt_shim.clear_cache()
    try:
        assert trt_shim.load_trt("auto") == (fake["tensorrt"], "tensorrt", "10.13.0.35")
        assert trt_shim.load_trt("tensorrt-rtx")[1:] == ("tensorrt-rtx", "1.7")
        assert trt_shim.available_flavors() == ("tensorrt", "tensorrt-rtx")
    finally:
        trt_shim.clear_cache()


def test_unknown_flavor():
    with pytest.raises(ToolchainError, match=r"^unknown TensorRT flavor 'rtx'; choose one of: auto, tensorrt, "
                                             r"tensorrt-rtx$"):
        trt_shim.load_trt("rtx")


def test_cli_without_tensorrt_exits_2_naming_the_package(no_tensorrt, export_tiny, capsys):
    from tools.cli import main

    art = export_tiny("csp", "both")
    capsys.readouterr()
    assert main(["build", str(art)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("csprt build: error: TensorRT is not installed; ") and INSTALL in err


# --- settings ---------------------------------------------------------------------------------------

def test_precision_must_match_the_artifact(export_tiny):
    art = load_artifact(export_tiny("csp", "both"))
    assert resolve_precision(None, art) == resolve_precision("fp32", art) == "fp32"
    with pytest.raises(ToolchainError, match=r"^--precision fp16: this artifact's graphs are fp32, and TensorRT-RTX "
                                             r"and TensorRT 11 build strongly typed networks, so an engine computes in "
                                             r"its graph's dtypes \(there is no fp16 builder flag\); re-export with: "
                                             r"csprt export .* --precision fp16$"):
        resolve_precision("fp16", art)
    with pytest.raises(ToolchainError, match=r"^--precision bf16: csprt cannot export bf16 graphs yet \(export offers "
                                             r"fp32 and fp16\) .*this artifact is fp32: build it as is, or re-export "
                                             r"for fp16 with: csprt export .*--precision fp16$"):
        resolve_precision("bf16", art)
    with pytest.raises(ToolchainError, match=r"^unknown precision 'int8'; choose one of: fp16, bf16, fp32$"):
        resolve_precision("int8", art)


def test_precision_error_comes_before_any_build(export_tiny, no_tensorrt):
    with pytest.raises(ToolchainError, match=r"^--precision fp16: this artifact's graphs are fp32"):
        build_engines(export_tiny("csp", "both"), precision="fp16")


def test_reexport_command_replaces_the_precision(export_tiny, tmp_path):
    import json

    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["export"]["command"] = "csprt export ck --schedule csp --out 'my art' --mode both --precision fp32"
    (art / "manifest.json").write_text(json.dumps(sealed(manifest)))
    with pytest.raises(ToolchainError, match=r"re-export with: csprt export ck --schedule csp --out 'my art' --mode "
                                             r"both --precision fp16$"):
        resolve_precision("fp16", load_artifact(art))


@pytest.mark.parametrize("text, want", [("SM86", "SM86"), ("sm_89", "SM89"), ("8.6", "SM86"), ("120", "SM120"),
                                        ("12.0", "SM120"), ("current", "CURRENT")])
def test_parse_compute_capability(text, want):
    assert parse_compute_capability(text) == want


def test_parse_compute_capability_error():
    with pytest.raises(ToolchainError, match=r"^--compute-capability ampere: expected a compute capability like SM86, "
                                             r"8\.6 or 86, or 'current'$"):
        parse_compute_capability("ampere")


FAKE_RTX = SimpleNamespace(__version__="1.7.1.116", ComputeCapability=SimpleNamespace(__members__=dict.fromkeys(
    ["NONE", "CURRENT", "SM75", "SM80", "SM86", "SM89", "SM120", "SM121"])))


def test_compute_capabilities_for_tensorrt_rtx():
    assert resolve_compute_capabilities(FAKE_RTX, "tensorrt-rtx") == ("SM80", "SM86", "SM89", "SM120", "SM121")
    assert resolve_compute_capabilities(FAKE_RTX, "tensorrt-rtx", ["SM120", "8.6", "sm86", "SM75"]) == (
        "SM75", "SM86", "SM120")
    assert resolve_compute_capabilities(FAKE_RTX, "tensorrt-rtx", ["current"]) == ("CURRENT",)
    with pytest.raises(ToolchainError, match=r"^--compute-capability SM90: TensorRT-RTX 1\.7\.1\.116 cannot target it; "
                                             r"it targets: SM75, SM80, SM86, SM89, SM120, SM121 \(or 'current'"):
        resolve_compute_capabilities(FAKE_RTX, "tensorrt-rtx", ["SM90"])
    with pytest.raises(ToolchainError, match=r"^--compute-capability current cannot be combined"):
        resolve_compute_capabilities(FAKE_RTX, "tensorrt-rtx", ["current", "SM86"])


def test_compute_capabilities_for_tensorrt():
    assert resolve_compute_capabilities(SimpleNamespace(), "tensorrt") == ("CURRENT",)
    with pytest.raises(ToolchainError, match=r"^--compute-capability applies to TensorRT-RTX only \(--flavor "
                                             r"tensorrt-rtx\); TensorRT builds for the GPU it runs on$"):
        resolve_compute_capabilities(SimpleNamespace(), "tensorrt", ["SM86"])


@pytest.mark.parametrize("kwargs, message", [
    ({"stages": "seg_head,nope"}, r"^unknown stage 'nope'; this artifact has: vision, sam_encoder, embed, entry_0, llm_0, "),
    ({"shapes": ["suffix_len=1:8:9999"]}, r"^--shapes suffix_len=1:8:9999: max 9999 is above the exported max 256"),
    ({"workspace_gb": 0}, r"^--workspace 0: expected a positive size in GiB$"),
], ids=["unknown-stage", "shapes", "workspace"])
def test_bad_settings_fail_before_tensorrt_loads(export_tiny, no_tensorrt, kwargs, message):
    with pytest.raises(ToolchainError, match=message):
        build_engines(export_tiny("csp", "both"), **kwargs)


def test_cli_bad_shapes_exit_2(export_tiny, capsys):
    from tools.cli import main

    art = export_tiny("csp", "both")
    capsys.readouterr()
    assert main(["build", str(art), "--shapes", "suffix_len=1:64:512"]) == 2
    assert capsys.readouterr().err == (
        "csprt build: error: --shapes suffix_len=1:64:512: max 512 is above the exported max 256 of 'suffix_len' "
        "(exported range [1, 256]); re-export with a larger --max-text-len\n")


def test_missing_engine_names_csprt_build(export_tiny):
    art = export_tiny("csp", "both")
    with pytest.raises(ArtifactError, match=rf"^stage 'seg_head' has no TensorRT-RTX engine in {art}; build it with: "
                                            rf"csprt build {art}$"):
        check_engine(art, "seg_head", "tensorrt-rtx", "1.7.1.116")
    with pytest.raises(ArtifactError, match=r"^unknown stage 'seghead'; this artifact has: "):
        check_engine(art, "seghead", "tensorrt-rtx", "1.7.1.116")


# --- what the parser and builder reject (TensorRT-RTX) ----------------------------------------------

def _graph(tmp_path, nodes, inputs, outputs, inits=()):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits)),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.trt
def test_nonzero_is_rejected_naming_node_and_fix(tmp_path):
    trt = trt_shim.load_trt()[0]
    path = _graph(tmp_path, [helper.make_node("NonZero", ["x"], ["nz"], name="seg_rows")],
                  [helper.make_tensor_value_info("x", TensorProto.INT64, ["n"])],
                  [helper.make_tensor_value_info("nz", TensorProto.INT64, [1, "k"])])
    with pytest.raises(ToolchainError, match=r"^stage 'x': TensorRT-RTX 1\.7\.1\.116 cannot import the graph: node "
                                             r"'seg_rows' \(NonZero\): .*plugin.* \(TensorRT-RTX imports NonZero only "
                                             r"through a plugin it does not ship; the exporter must select "):
        NetworkFromOnnx(trt, path, CaptureLogger(trt), "stage 'x'")()


@pytest.mark.trt
def test_argmax_over_1d_is_rejected(tmp_path):
    trt = trt_shim.load_trt()[0]
    path = _graph(tmp_path, [helper.make_node("ArgMax", ["x"], ["i"], axis=0, keepdims=1, name="first_seg")],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                  [helper.make_tensor_value_info("i", TensorProto.INT64, [1])])
    with pytest.raises(ToolchainError, match=r"node 'first_seg' \(ArgMax\): .*at least 2 dimensions are required.*"
                                             r"\(TensorRT's ArgMax/ArgMin/TopK need a tensor of rank >= 2") as info:
        NetworkFromOnnx(trt, path, CaptureLogger(trt), "stage 'x'")()
    assert "cudaError" not in str(info.value)  # the GPU-less host's CUDA noise is not in the message


@pytest.mark.trt
def test_missing_graph_file(tmp_path):
    trt = trt_shim.load_trt()[0]
    with pytest.raises(ToolchainError, match=r"cannot import the graph: Assertion failed: .*Input file cannot be found"):
        NetworkFromOnnx(trt, tmp_path / "nope.onnx", CaptureLogger(trt), "stage 'x'")()


@pytest.mark.trt
def test_builder_failure_names_the_reason(export_tiny, tmp_path):
    from engines.build import EngineBuildError

    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    with pytest.raises(EngineBuildError, match=r"^1 of 1 stage engines failed to build \(seg_head\); first: stage "
                                               r"'seg_head' \(graphs/seg_head\.onnx\): the TensorRT builder failed: .*"
                                               r"for Turing \(SM75\): FP32 GEMM is not supported") as info:
        build_engines(art, stages="seg_head", compute_capabilities=["SM75"])
    assert info.value.report["stages"] == {} and not (art / "engines" / "tensorrt-rtx" / "seg_head.plan").exists()
