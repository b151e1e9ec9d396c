"""`--backend tensorrt` in csprt run and csprt validate.

On CPU: every error comes before anything loads, each shown for real where this host can (no GPU) and
simulated where it cannot (a GPU host without engines, without TensorRT, with stale or foreign engines:
`_cuda_problem` replaced, engines faked with consistent sidecars); the session's wiring (TrtRunner,
CudaChain); and validate's per-backend report, with the GPU chain on a CPU stand-in (tests/device_fakes.py).
On a GPU (`gpu`, `trt`): csprt build, run and validate for real.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engines.session as session_mod
from engines import trt as trt_shim
from engines.session import ArtifactSession
from exporter.export import sample_image
from exporter.tiny import SEG_QUERY
from graphs.errors import ArtifactError, InputError, ToolchainError
from graphs.manifest import MANIFEST_NAME, file_sha256, write_manifest
from tests.cli_io import call, error_lines
from tools import cli

NO_GPU = (r"--backend tensorrt runs engines on an NVIDIA GPU; none is visible \(torch [^,]+, (a CPU-only build|built "
          r"for CUDA [\d.]+), sees no CUDA device\); use --backend onnxruntime")


@pytest.fixture(autouse=True)
def only_run_and_validate(monkeypatch):
    # Register only these subcommands, so these tests do not depend on the other tools' imports.
    monkeypatch.setattr(cli, "COMMANDS", {"run": "tools.run", "validate": "tools.validate", "build": "tools.build"})


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "sample.png"
    Image.fromarray(sample_image()).save(path)
    return path


@pytest.fixture
def art(export_tiny, tmp_path) -> Path:
    """A private copy of the tiny csp artifact (both modes), to add engines to."""
    dst = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), dst)
    return dst


@pytest.fixture
def gpu_host(monkeypatch):
    """This host as one with a CUDA GPU, as far as the backend checks are concerned."""
    monkeypatch.setattr(session_mod, "_cuda_problem", lambda: "")


def _skip_on_a_gpu() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")


def fake_engines(art: Path, flavor: str, version: str) -> None:
    """What `csprt build` leaves, without building: per stage a plan file and a sidecar matching the graphs,
    listed in the manifest. The plans are not engines; nothing here deserializes them."""
    from engines.build import engine_paths

    manifest = json.loads((art / MANIFEST_NAME).read_text(encoding="utf-8"))
    for entry in manifest["stages"]:
        plan_rel, sidecar_rel = engine_paths(flavor, entry["name"])
        (art / plan_rel).parent.mkdir(parents=True, exist_ok=True)
        (art / plan_rel).write_bytes(f"not an engine: {entry['name']}".encode())
        sidecar = {"format": "csprt.engine", "stage": entry["name"], "flavor": flavor, "trt_version": version,
                   "compute_capabilities": ["SM86"], "graph": entry["graph"], "graph_files": dict(entry["files"]),
                   "precision": manifest["precision"], "profiles": [{}], "dims": {}, "profiles_note": "one profile",
                   "build_key": "0" * 64, "plan": plan_rel, "plan_sha256": file_sha256(art / plan_rel),
                   "plan_bytes": (art / plan_rel).stat().st_size}
        (art / sidecar_rel).write_text(json.dumps(sidecar), encoding="utf-8")
        entry["engines"][flavor] = {"sidecar": sidecar_rel, **{k: sidecar[k] for k in (
            "plan", "build_key", "trt_version", "compute_capabilities", "precision", "dims", "profiles_note")}}
    write_manifest(art, manifest)


def _installed() -> tuple[str, str]:
    return trt_shim.load_trt()[1:]


# --- no GPU (real here) -------------------------------------------------------------------------------------

def test_run_without_a_gpu_exits_2_naming_onnxruntime(export_tiny, image_file, tmp_path):
    _skip_on_a_gpu()
    out = tmp_path / "out"
    rc, stdout, stderr = call(["run", str(export_tiny("csp", "both")), "--image", str(image_file), "--query",
                               SEG_QUERY, "--backend", "tensorrt", "--out", str(out)])
    assert rc == 2 and stdout == "" and not out.exists()
    (line,) = error_lines(stderr)
    assert re.fullmatch(f"csprt run: error: {NO_GPU}", line), line


def test_validate_without_a_gpu_exits_2_before_loading_anything(export_tiny):
    _skip_on_a_gpu()
    rc, stdout, stderr = call(["validate", str(export_tiny("csp", "both")), "--backends", "onnxruntime,tensorrt"])
    assert rc == 2 and stdout == ""
    (line,) = error_lines(stderr)
    assert re.fullmatch(f"csprt validate: error: {NO_GPU}", line), line
    assert "loading reference" not in stderr and "running the" not in stderr


def test_tensorrt_on_a_cpu_device(export_tiny, image_file, tmp_path):
    rc, _, stderr = call(["run", str(export_tiny("csp", "both")), "--image", str(image_file), "--query", SEG_QUERY,
                          "--backend", "tensorrt", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert rc == 2 and error_lines(stderr) == [
        "csprt run: error: --backend tensorrt runs on a CUDA device, not 'cpu'; pass --device cuda (or cuda:N), "
        "or use --backend onnxruntime"]


@pytest.mark.parametrize("backends, message", [
    ("onnxruntime,tvm", "--backends: unknown backend 'tvm'; choose from: onnxruntime, tensorrt"),
    ("tensorrt,onnxruntime,tensorrt", "--backends: tensorrt given twice"),
    (" , ", "--backends ' , ': name at least one of: onnxruntime, tensorrt"),
])
def test_validate_backends_flag(export_tiny, backends, message):
    rc, _, stderr = call(["validate", str(export_tiny("csp", "both")), "--backends", backends])
    assert rc == 2 and error_lines(stderr) == [f"csprt validate: error: {message}"]


# --- on a (simulated) GPU host: engines, TensorRT, stale engines ----------------------------------------------

def test_no_engines_names_csprt_build(art, gpu_host, image_file, tmp_path):
    rc, _, stderr = call(["run", str(art), "--image", str(image_file), "--query", SEG_QUERY, "--backend", "tensorrt",
                          "--out", str(tmp_path / "out")])
    assert rc == 2 and error_lines(stderr) == [
        f"csprt run: error: artifact {art} has no TensorRT engines; build them with: csprt build {art}"]


def test_no_tensorrt_names_the_package(art, gpu_host, monkeypatch):
    fake_engines(art, "tensorrt-rtx", "1.7.1.116")

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(trt_shim, "_import_module", missing)
    trt_shim.clear_cache()
    try:
        with pytest.raises(ToolchainError, match=r"^TensorRT is not installed; pip install tensorrt-rtx-cu13-libs==1\.7"
                                                 r"\.1\.116 tensorrt-rtx-cu13-bindings==1\.7\.1\.116 \(or 'csprt\[trt\]'\)"):
            ArtifactSession(art, backend="tensorrt")
    finally:
        trt_shim.clear_cache()


@pytest.mark.trt
def test_engines_of_another_tensorrt_version_are_refused(art, gpu_host):
    flavor, version = _installed()
    fake_engines(art, flavor, "0.9.0.1")
    pretty = trt_shim.PRETTY[flavor]
    with pytest.raises(ArtifactError, match=rf"^engine engines/{flavor}/vision\.plan was built with {pretty} 0\.9\.0\.1, "
                                            rf"but this host runs {pretty} {version}; an engine is never loaded into "
                                            rf"another TensorRT version or flavor; rebuild with: csprt build .*art$"):
        ArtifactSession(art, backend="tensorrt")


@pytest.mark.trt
def test_engines_of_another_flavor_are_refused(art, gpu_host):
    flavor, _ = _installed()
    other = "tensorrt" if flavor == "tensorrt-rtx" else "tensorrt-rtx"
    fake_engines(art, other, "10.13.0.35")
    with pytest.raises(ArtifactError, match=rf"^stage 'vision' has no {trt_shim.PRETTY[flavor]} engine in .*art \(it "
                                            rf"has {trt_shim.PRETTY[other]} 10\.13\.0\.35 engines, which never load into "
                                            r"another flavor\); build it with: csprt build .*art$"):
        ArtifactSession(art, backend="tensorrt")


@pytest.mark.trt
def test_engine_of_another_graph_is_refused(art, gpu_host):
    flavor, version = _installed()
    fake_engines(art, flavor, version)
    sidecar_path = art / f"engines/{flavor}/sam_decoder.json"
    sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    sidecar["graph_files"]["graphs/sam_decoder.onnx"] = "f" * 64  # built before a re-export changed the graph
    sidecar_path.write_text(json.dumps(sidecar), encoding="utf-8")
    with pytest.raises(ArtifactError, match=rf"^engine engines/{flavor}/sam_decoder\.plan was built from another "
                                            r"graphs/sam_decoder\.onnx \(the graph changed since the build.*rebuild "
                                            r"with: csprt build .*art$"):
        ArtifactSession(art, backend="tensorrt")


@pytest.mark.trt
def test_session_wires_trt_runners_and_the_cuda_chain(art, gpu_host):
    from engines.cuda_chain import CudaChain
    from engines.trt_runner import TrtRunner

    flavor, version = _installed()
    fake_engines(art, flavor, version)
    with ArtifactSession(art, backend="tensorrt") as s:
        assert s.device == "cuda" and isinstance(s.pipeline.chain, CudaChain)
        layout = s.artifact.layout
        runners = {st.name: s.pipeline.runner_for(st) for st in layout.stages}  # made, not activated
        assert all(isinstance(r, TrtRunner) and r.device == "cuda" for r in runners.values())
        want = "builtin" if flavor == "tensorrt-rtx" else "manual"
        assert {n: r.graph_mode for n, r in runners.items()} == {
            st.name: want if st.cache else "off" for st in layout.stages}  # blocks: their decode steps
    with ArtifactSession(art, backend="tensorrt", device="cuda:1") as s:
        assert s.device == "cuda:1" and s.pipeline.chain.device == "cuda:1"


@pytest.mark.trt
def test_text_longer_than_the_profile_is_caught_before_execution(art, gpu_host, image_file, tmp_path, monkeypatch):
    from engines.pipeline import Pipeline

    flavor, version = _installed()
    fake_engines(art, flavor, version)
    started = []
    real_runner = Pipeline.runner
    monkeypatch.setattr(Pipeline, "runner", lambda self, stage: started.append(stage.name) or real_runner(self, stage))
    long_query = "Where is the small grey cat " + "next to the cat " * 60 + "?"  # ~300 suffix tokens
    rc, stdout, stderr = call(["run", str(art), "--image", str(image_file), "--query", long_query, "--backend",
                               "tensorrt", "--out", str(tmp_path / "out")])
    assert rc == 2 and stdout == "" and started == []  # no engine was even created
    (line,) = error_lines(stderr)
    assert re.fullmatch(r"csprt run: error: stage 'host inputs' input 'suffix_ids': dim 'suffix_len' "
                                      r"is \d+, outside the exported range \[1, 256\]; shorten the text or re-export "
                                      r"with a larger --max-text-len", line), line


# --- validate --backends onnxruntime,tensorrt on a CPU stand-in of the GPU chain -----------------------------

@pytest.fixture
def cpu_tensorrt(monkeypatch):
    """`--backend tensorrt` where the runners are ONNX Runtime behaving like TrtRunner.enqueue (torch tensors in
    reused buffers) and the chain is the real CudaChain over a recording fake CUDA. Returns the fake's log."""
    pytest.importorskip("torch")
    from engines.cuda_chain import CudaChain
    from tests.device_fakes import FakeCuda, device_ort_runner_for

    cuda = FakeCuda()
    real = session_mod.runner_factory

    def runner_factory(artifact, backend="onnxruntime", device=None, threads=None):
        if backend != "tensorrt":
            return real(artifact, backend, device, threads=threads)
        return device_ort_runner_for(artifact.layout, artifact.graph_path, cuda.log)

    monkeypatch.setattr(session_mod, "runner_factory", runner_factory)
    monkeypatch.setattr(session_mod, "chain_for", lambda artifact, backend, device: CudaChain(
        artifact.layout, device, cuda=cuda, alloc_device="cpu") if backend == "tensorrt" else None)
    return cuda.log


def test_validate_two_backends_reports_each_and_the_pair(export_tiny, tiny_ckpt, cpu_tensorrt, capsys):
    from tools.validate import format_report

    art = export_tiny("csp", "both")
    rc, stdout, stderr = call(["validate", str(art), "--checkpoint", str(tiny_ckpt), "--backends",
                               "onnxruntime,tensorrt", "--json"])
    assert rc == 0, stderr
    assert stderr.count("loading reference") == 1  # the reference is loaded (and run) once for both backends
    report = json.loads(stdout)
    # the single-backend keys keep their meaning (the first backend is the baseline)
    assert report["backend"] == "onnxruntime" and report["passed"] is True and report["mask_iou"] == 1.0
    assert {"artifact", "checkpoint", "precision", "schedule", "stages", "end_to_end"} <= set(report)
    assert {s["backend"] for s in report["stages"]} == {"onnxruntime", "tensorrt"}
    assert len(report["end_to_end"]) == 4  # 2 backends x 2 modes
    ort, rt = report["backends"]["onnxruntime"], report["backends"]["tensorrt"]
    assert ort["tolerance_basis"] == "manifest, fp32"
    assert rt["tolerance_basis"] == "fp16: tensorrt computes a fp32 artifact in TF32"
    assert {e["mask_iou_min"] for e in rt["end_to_end"]} == {0.98}  # fp16's IoU threshold, not bit equality
    assert {e["mask_iou_min"] for e in ort["end_to_end"]} == {1.0}
    (pair,) = report["cross"]
    assert pair["backend"] == "tensorrt" and pair["against"] == "onnxruntime" and pair["passed"]
    assert {(s["name"], s["mode"]) for s in pair["stages"]} == {(s["name"], s["mode"]) for s in ort["stages"]}
    assert all(s["max_abs"] == 0.0 for s in pair["stages"])  # the stand-in computes with ONNX Runtime itself
    assert [(e["mode"], e["mask_iou"], e["ids_equal"]) for e in pair["end_to_end"]] == [
        ("single-pass", 1.0, True), ("generate", 1.0, True)]
    assert [e[1] for e in cpu_tensorrt if e[0] == "run" and e[2] == "sam_encoder"] == ["side", "side"]  # per mode
    text = format_report(report)
    assert "on tensorrt vs torch reference" in text and "tensorrt vs onnxruntime on the same feeds" in text
    assert text.endswith("PASSED")


def test_validate_one_backend_report_is_unchanged(export_tiny, tiny_ckpt):
    from tools.validate import validate_artifact

    report = validate_artifact(export_tiny("full", "single-pass"), tiny_ckpt, image=sample_image(), query=SEG_QUERY,
                               progress=lambda _m: None)
    assert report["backend"] == "onnxruntime" and report["cross"] == [] and list(report["backends"]) == ["onnxruntime"]
    assert report["stages"] == report["backends"]["onnxruntime"]["stages"] and report["passed"]


# --- GPU: the real thing --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(export_tiny, tmp_path_factory):
    """The tiny csp artifact with engines from `csprt build` for this GPU (skips where TensorRT-RTX cannot target it)."""
    import torch

    from engines.build import targetable

    trt, flavor, _ = trt_shim.load_trt()
    major, minor = torch.cuda.get_device_capability()
    if flavor == "tensorrt-rtx" and f"SM{major}{minor}" not in targetable(trt):
        pytest.skip(f"TensorRT-RTX {trt.__version__} cannot target SM{major}{minor}")
    art = tmp_path_factory.mktemp("built") / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    argv = ["build", str(art)] + (["--compute-capability", "current"] if flavor == "tensorrt-rtx" else [])
    rc, _, stderr = call(argv)
    assert rc == 0, stderr
    return art


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.parametrize("mode", ["single-pass", "generate"])
def test_run_tensorrt_returns_what_onnxruntime_returns(built, image_file, tmp_path, mode):
    results = {}
    for backend in ("onnxruntime", "tensorrt"):
        rc, stdout, stderr = call(["run", str(built), "--image", str(image_file), "--query", SEG_QUERY, "--mode", mode,
                                   "--backend", backend, "--out", str(tmp_path / backend), "--json"])
        assert rc == 0, stderr
        results[backend] = json.loads(stdout)
    ort, rt = results["onnxruntime"], results["tensorrt"]
    assert rt["backend"] == "tensorrt" and set(rt) == set(ort)
    for key in ("answer", "num_seg", "generated_ids", "image_tokens_per_layer", "image_size", "mode", "schedule"):
        assert rt[key] == ort[key], key
    masks = {b: np.asarray(Image.open(tmp_path / b / "mask.png")) > 0 for b in results}
    inter, union = (masks["tensorrt"] & masks["onnxruntime"]).sum(), (masks["tensorrt"] | masks["onnxruntime"]).sum()
    assert union == 0 or inter / union >= 0.98


@pytest.mark.gpu
@pytest.mark.trt
def test_validate_tensorrt_against_onnxruntime_and_the_reference(built, tiny_ckpt):
    rc, stdout, stderr = call(["validate", str(built), "--checkpoint", str(tiny_ckpt), "--backends",
                               "onnxruntime,tensorrt", "--json"])
    report = json.loads(stdout)
    assert rc == 0, json.dumps({k: report[k] for k in ("end_to_end", "cross")}, indent=1)
    assert report["passed"] and report["backends"]["tensorrt"]["passed"] and report["cross"][0]["passed"]


def test_unknown_backend_in_the_library_api(export_tiny):
    with pytest.raises(ToolchainError, match=r"^unknown backend 'tvm'; choose one of: onnxruntime, tensorrt$"):
        ArtifactSession(export_tiny("csp", "both"), backend="tvm")
    with pytest.raises(InputError, match=r"runs on a CUDA device, not 'cpu'"):
        ArtifactSession(export_tiny("csp", "both"), backend="tensorrt", device="cpu")
