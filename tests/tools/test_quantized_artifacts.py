"""csprt export --quantize on the tiny checkpoint: each method through export, build (TensorRT-RTX), run and
validate; engines never cross between float and quantized graphs; bad calibration sets are one clear line."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.cli_io import call, error_lines

VARIANTS = [("int8", "ort"), ("int8", "qdq"), ("int4-wo", "ort"), ("int4-wo", "qdq"), ("fp8", "qdq"),
            ("int8", "modelopt"), ("int4-wo", "modelopt"), ("fp8", "modelopt")]  # modelopt: in .venv-modelopt
IDS = [f"{m}-{f}" for m, f in VARIANTS]
LLM = ("llm_0", "llm_1", "llm_2")


def _export_args(ckpt, out, *extra) -> list[str]:
    return ["export", str(ckpt), "--schedule", "csp", "--mode", "both", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def quantized(tiny_ckpt, export_tiny, tmp_path_factory):
    """`quantized(method, fmt) -> Path`: `csprt export --quantize` of the tiny checkpoint (csp, both modes). The
    float stages come from the session's csp artifact (copied, then re-exported incrementally: nothing re-traces)."""
    made = {}

    def get(method: str, fmt: str):
        if (method, fmt) not in made:
            out = tmp_path_factory.mktemp(f"q_{method}_{fmt}") / "art"
            shutil.copytree(export_tiny("csp", "both"), out)
            rc, stdout, stderr = call(_export_args(tiny_ckpt, out, "--quantize", method, "--quantize-format", fmt))
            assert rc == 0, stderr
            assert "0 to export" in stderr and f"quantized {method} ({fmt})" in stdout
            made[(method, fmt)] = out
        return made[(method, fmt)]

    return get


@pytest.mark.parametrize("method,fmt", VARIANTS, ids=IDS)
def test_manifest_records_the_quantization_in_one_place(quantized, export_tiny, method, fmt):
    from graphs.manifest import load_artifact
    from graphs.quantize import artifact_weights

    art = load_artifact(quantized(method, fmt))  # every file hash verified
    q = art.manifest["quantization"]
    assert (q["method"], q["format"], q["stages"]) == (method, fmt, list(LLM))
    assert q["bits"] == (4 if method == "int4-wo" else 8)
    assert q["block_size"] == (32 if method == "int4-wo" else None)
    calibrated = fmt == "modelopt" or (fmt == "qdq" and method != "int4-wo")
    assert (q["calibration"] is not None) == calibrated
    assert q["tool"].startswith("nvidia-modelopt 0.47.0" if fmt == "modelopt" else "onnxruntime.quantization")
    if calibrated:
        assert len(q["calibration"]["sha256"]) == 64 and q["calibration"]["samples"] == 6
    assert f"--quantize {method} --quantize-format {fmt}" in art.rebuild_command
    float_art = load_artifact(export_tiny("csp", "both"))
    mine, theirs = artifact_weights(art.manifest, art.dir), artifact_weights(float_art.manifest, float_art.dir)
    # ModelOpt's int8/fp8 leave the LM head float (a GEMV on the last row: graphs/quantize_modelopt.py), which at
    # the tiny shape is a fifth of the blocks' weights (2% at LISA-7B)
    assert mine["llm"] < (0.45 if fmt == "modelopt" and method != "int4-wo" else 0.4) * theirs["llm"]
    assert {k: v for k, v in mine["stages"].items() if k not in LLM} == \
        {k: v for k, v in theirs["stages"].items() if k not in LLM}  # vision, SAM, embeddings stay float


@pytest.fixture(scope="module")
def quantized16(tiny_ckpt, export_tiny, tmp_path_factory):
    """`quantized16(method, fmt) -> Path`: as `quantized`, from the session's fp16 csp artifact (--precision fp16)."""
    made = {}

    def get(method: str, fmt: str):
        if (method, fmt) not in made:
            out = tmp_path_factory.mktemp(f"q16_{method}_{fmt}") / "art"
            shutil.copytree(export_tiny("csp", "both", "fp16"), out)
            rc, stdout, stderr = call(_export_args(tiny_ckpt, out, "--precision", "fp16", "--quantize", method,
                                                   "--quantize-format", fmt))
            assert rc == 0, stderr
            assert "0 to export" in stderr and f"quantized {method} ({fmt})" in stdout
            made[(method, fmt)] = out
        return made[(method, fmt)]

    return get


FP16 = [("int4-wo", "ort", "generate"), ("int4-wo", "qdq", "single-pass"), ("int8", "ort", "single-pass"),
        ("int4-wo", "modelopt", "single-pass")]


@pytest.mark.parametrize("method,fmt,mode", FP16, ids=[f"{m}-{f}" for m, f, _ in FP16])
def test_fp16_exports_quantize_run_and_validate(quantized16, export_tiny, method, fmt, mode):
    """fp16 graphs take the tensor-at-a-time methods: int4-wo keeps fp16 activations (fp16 scales), dynamic int8
    runs its pieces in fp32 between Casts; and ModelOpt's AWQ, which keeps the graph's fp16. Judged like the fp32
    ones: mask IoU and ids against the reference."""
    from graphs.manifest import load_artifact
    from graphs.quantize import artifact_weights
    from tools.validate import validate_backends

    art = load_artifact(quantized16(method, fmt))
    assert art.precision == "fp16" and art.manifest["quantization"]["method"] == method
    float_art = load_artifact(export_tiny("csp", "both", "fp16"))
    ratio = artifact_weights(art.manifest, art.dir)["llm"] / artifact_weights(float_art.manifest, float_art.dir)["llm"]
    assert ratio < (0.35 if method == "int4-wo" else 0.6), ratio  # of fp16 bytes: 4.5 or 8-and-a-bit of 16 bits
    report = validate_backends(art.dir, modes=[mode], progress=lambda _m: None, stages=[*LLM, "seg_head"])
    assert report["passed"], [e for e in report["end_to_end"] if not e["passed"]]
    assert all(s["report_only"] for s in report["stages"] if s["name"] in LLM)
    for e in report["end_to_end"]:
        assert e["ids_equal"] and e["mask_iou"] >= e["mask_iou_min"]


@pytest.mark.parametrize("method,fmt", VARIANTS, ids=IDS)
def test_runs_and_validates_against_the_float_reference(quantized, method, fmt):
    from tools.validate import validate_backends

    # One mode each keeps the time down; both modes are covered, and generate mode (ids) for every method. Per
    # stage: the quantized blocks and the float stages between them (the image stages are unchanged float graphs,
    # checked by the float artifact's own tests).
    mode = "single-pass" if (method, fmt) in (("int8", "qdq"), ("int4-wo", "qdq"), ("fp8", "modelopt")) \
        else "generate"
    report = validate_backends(quantized(method, fmt), modes=[mode], progress=lambda _m: None,
                               stages=[*LLM, "entry_1", "entry_2", "seg_head"])
    assert report["passed"], [e for e in report["end_to_end"] if not e["passed"]]
    assert "quantized" in report["tolerance_basis"]
    llm = [s for s in report["stages"] if s["name"] in LLM]
    assert llm and all(s["report_only"] for s in llm)
    assert max(s["max_abs"] for s in llm) > 1e-4  # really quantized: beyond the float tolerance
    others = [s for s in report["stages"] if s["name"] in ("entry_1", "entry_2", "seg_head")]
    assert others and all(s["passed"] and not s.get("report_only") for s in others)
    for e in report["end_to_end"]:
        assert e["mask_logits_atol"] is None and e["ids_equal"] and e["mask_iou"] >= e["mask_iou_min"]


def test_csprt_run_segments_with_a_quantized_artifact(quantized, tmp_path):
    from PIL import Image

    from exporter.export import sample_image

    Image.fromarray(sample_image()).save(tmp_path / "img.png")
    rc, stdout, stderr = call(["run", str(quantized("int4-wo", "ort")), "--image", str(tmp_path / "img.png"),
                               "--query", "Where is the cat in this picture?", "--out", str(tmp_path / "out"),
                               "--json"])
    assert rc == 0, stderr
    assert (tmp_path / "out" / "mask.png").is_file() and json.loads(stdout)["timings_ms"]


@pytest.mark.trt
@pytest.mark.parametrize("method,fmt", [v for v in VARIANTS if v[1] != "ort"], ids=[i for i in IDS if "ort" not in i])
def test_qdq_graphs_build_with_tensorrt_rtx(quantized, method, fmt):
    from engines.build import build_engines
    from engines.engine_check import check_engine

    art = quantized(method, fmt)
    # llm_2: the largest block, with the LM head; the others are the same layers. fp8 needs SM89+.
    report = build_engines(art, stages="llm_2", compute_capabilities=["SM89"])
    assert report["stages"]["llm_2"]["status"] == "built"
    _, sidecar = check_engine(art, "llm_2")
    assert sidecar["quantization"] == f"{method}/{fmt}"


@pytest.mark.parametrize("method", ["int8", "int4-wo"])
def test_build_refuses_onnxruntime_format_naming_the_qdq_export(quantized, method):
    rc, _, stderr = call(["build", str(quantized(method, "ort")), "--stages", "llm_0"])
    lines = error_lines(stderr)
    assert rc == 2 and len(lines) == 1
    assert "TensorRT cannot take" in lines[0] and f"--quantize {method} --quantize-format qdq" in lines[0]


@pytest.mark.trt
def test_engines_never_cross_between_float_and_quantized_graphs(export_tiny, quantized, tmp_path):
    from engines.build import build_engines
    from engines.engine_check import check_engine
    from graphs.errors import ArtifactError
    from graphs.manifest import write_manifest
    from graphs.quantize import QuantOptions
    from tools.quantize_args import quantize_after_export

    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    build_engines(art, stages="llm_0", compute_capabilities=["SM89"])
    check_engine(art, "llm_0")  # the float engine runs the float graph
    quantize_after_export(art, QuantOptions("int8", "qdq").resolved(), lambda _m: None)  # quantized in place
    with pytest.raises(ArtifactError, match=r"built for the float graph .* now holds the int8 qdq quantized graph"
                                            rf".*rebuild with: csprt build {art}"):
        check_engine(art, "llm_0")

    flt = tmp_path / "float"
    shutil.copytree(export_tiny("csp", "both"), flt)
    build_engines(art, stages="llm_0", compute_capabilities=["SM89"])  # the quantized engine, rebuilt
    manifest = json.loads((flt / "manifest.json").read_text())
    entry = next(e for e in manifest["stages"] if e["name"] == "llm_0")
    entry["engines"] = next(e for e in json.loads((art / "manifest.json").read_text())["stages"]
                            if e["name"] == "llm_0")["engines"]
    write_manifest(flt, manifest)  # resealed: the engine record is what csprt build would have written
    shutil.copytree(art / "engines", flt / "engines")  # a quantized artifact's engines shipped with a float one
    with pytest.raises(ArtifactError, match=r"built for the int8 qdq quantized graph .* now holds the float graph"
                                            rf".*rebuild with: csprt build {flt}"):
        check_engine(flt, "llm_0")


@pytest.mark.parametrize("content,expected", [
    ("", "not JSON"),
    ('{"format": "csprt.calibration", "samples": []}', "is empty"),
    ('{"format": "csprt.calibration", "samples": [{"image": "nope.png", "query": "where?"}]}', "sample 0"),
], ids=["corrupt", "empty", "missing-image"])
def test_a_bad_calibration_set_fails_before_any_export(tiny_ckpt, tmp_path, content, expected):
    calib = tmp_path / "calib.json"
    calib.write_text(content, encoding="utf-8")
    out = tmp_path / "art"
    rc, _, stderr = call(_export_args(tiny_ckpt, out, "--quantize", "fp8", "--calibration", str(calib)))
    lines = error_lines(stderr)
    assert rc == 2 and len(lines) == 1 and expected in lines[0] and str(calib) in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("extra,expected", [
    (["--precision", "fp16", "--quantize", "int8", "--quantize-format", "qdq"], "export with --precision fp32"),
    (["--quantize", "fp8", "--quantize-format", "ort"], "fp8 is for TensorRT"),
    (["--quantize-format", "qdq"], "without --quantize"),
    (["--quantize", "int8", "--quantize-format", "qdq", "--trace-only"], "drop --trace-only"),
    (["--quantize", "int4-wo", "--calibration", "x.json"], "takes no calibration"),
    (["--quantize", "int4-wo", "--quantize-format", "modelopt", "--trace-only"], "drop --trace-only"),
], ids=["fp16", "fp8-ort", "format-alone", "trace-only", "calib-unused", "awq-trace-only"])
def test_quantize_flags_are_checked_before_any_export(tiny_ckpt, tmp_path, extra, expected):
    out = tmp_path / "art"
    rc, _, stderr = call(_export_args(tiny_ckpt, out, *extra))
    lines = error_lines(stderr)
    assert rc == 2 and len(lines) == 1 and expected in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("argv,expected", [
    (["bench", "--shape", "tiny", "--quantize", "int3"], "choose one of none, int8, int4-wo, fp8"),
    (["bench", "--shape", "tiny", "--quantize", "int8:qdq", "--precision", "fp16"], "export with --precision fp32"),
    (["bench", "--shape", "tiny", "--quantize", "none,none"], "lists a value twice"),
], ids=["unknown", "fp16", "twice"])
def test_bench_quantize_list_is_checked_before_any_work(argv, expected):
    rc, _, stderr = call(argv)
    lines = error_lines(stderr)
    assert rc == 2 and len(lines) == 1 and expected in lines[0]


def test_bench_of_an_artifact_takes_its_own_quantization(quantized):
    rc, _, stderr = call(["bench", str(quantized("int8", "ort")), "--quantize", "int4-wo"])
    assert rc == 2 and "an artifact has its own quantization" in error_lines(stderr)[0]


def test_modelopt_missing_is_one_line_before_any_export(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("CSPRT_MODELOPT_PYTHON", str(tmp_path / "no-such-python"))
    out = tmp_path / "art"
    rc, _, stderr = call(_export_args(tiny_ckpt, out, "--quantize", "int4-wo", "--quantize-format", "modelopt"))
    lines = error_lines(stderr)
    assert rc == 2 and len(lines) == 1, stderr
    assert "no-such-python does not exist" in lines[0] and "bash .ci/setup-modelopt" in lines[0]
    assert not out.exists()
