"""`csprt triton-repo` on the tiny artifact: repository layout, configs against the manifest (parsed with Triton's
ModelConfig proto), the BLS model.py run for real under a fake `triton_python_backend_utils` whose BLS requests
run the repo's own model.onnx files with OrtRunner (masks equal ArtifactSession's exactly), error responses,
atomic replacement, and TensorRT plans (fake engines + sidecars: building real ones is too slow for CI)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import shutil
import sys
import types

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

from engines.build import engine_paths
from engines.ort_runner import OrtRunner
from engines.profiles import dims_to_json, profiles_to_json, stage_dims, stage_profiles
from engines.session import ArtifactSession
from engines.triton_repo import REPO_MARKER, bls_template, write_triton_repo
from graphs.errors import ArtifactError, ToolchainError
from graphs.imageio import decode_image_bytes
from graphs.manifest import MANIFEST_NAME, file_sha256, load_artifact, write_manifest
from graphs.triton_config import BLS_INPUTS, BLS_OUTPUTS, DIMS_PARAMETER, TRITON_DTYPES
from tests.cli_io import call, error_lines
from tools import cli

QUERY = "Where is the cat's left eye?"
NP_OF = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64, "TYPE_UINT8": np.uint8,
         "TYPE_BOOL": np.bool_, "TYPE_STRING": np.object_}
DT = model_config_pb2.DataType


def parse_config(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def chelsea_png() -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, format="PNG")
    return buf.getvalue()


# --- a fake triton_python_backend_utils -----------------------------------------------------------------------

class TritonError(Exception):
    INTERNAL, INVALID_ARG = "INTERNAL", "INVALID_ARG"

    def __init__(self, message, code="INTERNAL"):
        super().__init__(message)
        self._message, self._code = message, code

    def message(self):
        return self._message

    def code(self):
        return self._code


class Tensor:
    def __init__(self, name, array):
        assert isinstance(array, np.ndarray), (name, type(array))  # the real one takes numpy arrays only
        assert array.dtype != object or all(isinstance(v, bytes) for v in array.flat), name  # BYTES: bytes objects
        self._name, self._array = name, array

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors, error=None):
        self._tensors, self._error = list(output_tensors), error

    def output_tensors(self):
        return self._tensors

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error


class PreferredMemory:
    def __init__(self, kind, device_id=0):
        self.kind, self.device_id = kind, device_id


class InferenceRequest:
    models: dict = {}  # model name -> StageModel; Triton's repository, as the test sets it up
    log: list = []     # (model name, leading dim of its first input) per BLS request, in order

    def __init__(self, model_name="", inputs=(), requested_output_names=(), preferred_memory=None):
        self.model_name, self._inputs = model_name, list(inputs)
        self._requested = list(requested_output_names)
        self.preferred_memory = preferred_memory

    def inputs(self):
        return self._inputs

    def exec(self):
        model = self.models.get(self.model_name)
        if model is None:
            return InferenceResponse([], TritonError(f"Request for unknown model: '{self.model_name}' is not found"))
        self.log.append((self.model_name, self._inputs[0].as_numpy().shape[:1] if self._inputs else ()))
        try:
            out = model({t.name(): t.as_numpy() for t in self._inputs})
        except Exception as exc:  # noqa: BLE001  Triton turns a model failure into an error response
            return InferenceResponse([], TritonError(str(exc)))
        return InferenceResponse([Tensor(n, out[n]) for n in self._requested])


def _by_name(tensors, name):
    return next((t for t in tensors if t.name() == name), None)


def fake_pb_utils() -> types.ModuleType:
    m = types.ModuleType("triton_python_backend_utils")
    m.TritonError, m.Tensor, m.InferenceResponse, m.InferenceRequest = TritonError, Tensor, InferenceResponse, InferenceRequest
    m.PreferredMemory, m.TRITONSERVER_MEMORY_CPU = PreferredMemory, 0
    m.get_input_tensor_by_name = lambda request, name: _by_name(request.inputs(), name)
    m.get_output_tensor_by_name = lambda response, name: _by_name(response.output_tensors(), name)
    return m


def _check_against_config(what: str, tensors: dict, config_tensors, batched: bool = False,
                          may_lack: tuple[str, ...] = ("host_steps",)) -> None:
    """What Triton checks: exact names (optional inputs, `may_lack` outputs may be absent: host_steps, which only an
    artifact with host steps (ACCM) gives), dtype, rank, static dims
    (with `batched`, the batch axis first and then the dims, or the reshape's shape when there is one)."""
    want = {t.name: t for t in config_tensors}
    required = {t.name for t in config_tensors if not getattr(t, "optional", False)} - set(may_lack)
    assert set(tensors) <= set(want) and required <= set(tensors), (what, sorted(tensors), sorted(want))
    for name, value in tensors.items():
        t = want[name]
        dims = ([-1] if batched else []) + list(t.reshape.shape if t.HasField("reshape") else t.dims)
        assert value.dtype == NP_OF[DT.Name(t.data_type)], (what, name, value.dtype)
        assert value.ndim == len(dims) and all(d in (-1, s) for d, s in zip(dims, value.shape)), (what, name, value.shape)


class StageModel:
    """A stage model as Triton's onnxruntime backend would run it: config checks, then the repo's model.onnx (or
    `graph`: the stage's graph, standing in for a TensorRT plan)."""

    def __init__(self, model_dir, stage, dims, graph=None):
        self.config = parse_config(model_dir / "config.pbtxt")
        names = {t.name for t in self.config.input}
        self.runner = OrtRunner(dataclasses.replace(stage, inputs=tuple(t for t in stage.inputs if t.name in names)),
                                dims, graph or model_dir / "1" / "model.onnx")
        self.runner.activate()

    def __call__(self, feed):
        return self.checked(self.config, feed, self.runner.infer)

    @staticmethod
    def checked(config, feed, run):
        """`run(feed)` between what Triton checks of a request and of its response against `config`."""
        batched = config.max_batch_size > 0  # then Triton's batch axis leads, at most max_batch_size
        _check_against_config(config.name, feed, config.input, batched)
        sizes = {v.shape[0] for v in feed.values()} if batched else set()
        assert len(sizes) <= 1 and all(1 <= b <= config.max_batch_size for b in sizes), (config.name, sizes)
        out = run(feed)
        _check_against_config(config.name, out, config.output, batched)
        return out


def bls_module(model_py, pb_utils):
    """Import a BLS model.py with `pb_utils` as triton_python_backend_utils."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
        spec = importlib.util.spec_from_file_location(f"bls_{id(model_py)}", model_py)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def load_bls(repo, pb_utils, name="csprt"):
    """Import <repo>/<name>/1/model.py with `pb_utils` as triton_python_backend_utils and initialize it as Triton does."""
    config = parse_config(repo / name / "config.pbtxt")
    model = bls_module(repo / name / "1" / "model.py", pb_utils).TritonPythonModel()
    model.initialize({"model_repository": str(repo / name), "model_version": "1", "model_name": name,
                      "model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True))})
    return model, config


def request(pb, batched=True, **values):
    """A client request: BYTES for str/bytes, else the array as given; [1, ...] batch axis when `batched`."""
    tensors = []
    for name, v in values.items():
        arr = np.array([v.encode() if isinstance(v, str) else v], dtype=object) if isinstance(v, (str, bytes)) else v
        tensors.append(pb.Tensor(name, arr[None] if batched else arr))
    return pb.InferenceRequest(model_name="csprt", inputs=tensors)


def outputs(response, batched=True) -> dict:
    assert not response.has_error(), response.error().message()
    return {t.name(): (t.as_numpy()[0] if batched else t.as_numpy()) for t in response.output_tensors()}


# --- fixtures --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def art(export_tiny):
    return export_tiny()


@pytest.fixture(scope="module")
def repo(art, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    report = write_triton_repo(art, out, device="cpu")
    return out, report


@pytest.fixture(scope="module")
def bls(art, repo):
    """(BLS model, its config, fake pb_utils) over the repo; stage models run by OrtRunner."""
    out, report = repo
    layout = load_artifact(art).layout
    pb = fake_pb_utils()
    InferenceRequest.models = {model: StageModel(out / model, layout.stage(stage), layout.dims)
                               for stage, model in report["stage_models"].items()}
    model, config = load_bls(out, pb)
    yield model, config, pb
    model.finalize()
    for m in InferenceRequest.models.values():
        m.runner.deactivate()
    InferenceRequest.models = {}


@pytest.fixture(scope="module")
def session(art):
    with ArtifactSession(art) as s:
        yield s


# --- layout and configs ----------------------------------------------------------------------------------------

def test_repo_layout(art, repo):
    out, report = repo
    artifact = load_artifact(art)
    marker = json.loads((out / REPO_MARKER).read_text())
    assert marker == {k: v for k, v in report.items() if k != "repo"}
    assert (marker["backend"], marker["bls_model"], marker["max_batch_size"], marker["max_queue_delay_us"]) == (
        "onnxruntime", "csprt", 8, 2000)
    assert marker["manifest_sha256"] == file_sha256(art / MANIFEST_NAME)
    models = {s.name: f"csprt_{s.name}" for s in artifact.layout.stages}
    assert marker["stage_models"] == models
    assert sorted(p.name for p in out.iterdir()) == sorted([REPO_MARKER, "csprt", *models.values()])
    for stage, model in models.items():
        assert sorted(p.name for p in (out / model).iterdir()) == ["1", "config.pbtxt"]
        assert file_sha256(out / model / "1" / "model.onnx") == file_sha256(artifact.graph_path(stage))
    bls_dir = out / "csprt" / "1"
    assert (bls_dir / "model.py").read_bytes() == bls_template().read_bytes()
    assert (bls_dir / "artifact" / MANIFEST_NAME).read_bytes() == (art / MANIFEST_NAME).read_bytes()
    tok = artifact.manifest["tokenizer"]["dir"]
    assert sorted(p.name for p in (bls_dir / "artifact" / tok).iterdir()) == sorted(p.name for p in (art / tok).iterdir())
    stages = json.loads((bls_dir / "stages.json").read_text())["stage_models"]
    assert stages == {s.name: {"model": models[s.name], "inputs": [t.name for t in s.inputs]}
                      for s in artifact.layout.stages}
    assert [p.name for p in out.parent.iterdir()] == ["repo"]  # no temp directory left behind
    probe_file, probe_dir = out.parent / "probe.txt", out.parent / "probe"
    probe_file.write_text("")
    probe_dir.mkdir()
    tree = [out, *out.rglob("*")]  # every file and directory gets the umask's mode, as new ones do here:
    assert {p.stat().st_mode & 0o777 for p in tree if p.is_file()} == {probe_file.stat().st_mode & 0o777}
    assert {p.stat().st_mode & 0o777 for p in tree if p.is_dir()} == {probe_dir.stat().st_mode & 0o777}
    probe_file.unlink()
    probe_dir.rmdir()  # (not 0600 temp files: Triton may run as another user)


def test_stage_configs_agree_with_the_manifest(art, repo):
    """A stage whose every tensor leads with the batch dim has Triton's batch axis (max_batch_size = the exported
    max, dims without it, [batch] as [1] reshaped to []); the others (flat [SEG] rows) keep full shapes."""
    out, report = repo
    layout = load_artifact(art).layout
    batched = set()
    for stage in layout.stages:
        cfg = parse_config(out / report["stage_models"][stage.name] / "config.pbtxt")
        leads = all(t.shape[:1] == ("batch",) for t in (*stage.inputs, *stage.outputs))
        batched |= {stage.name} if leads else set()
        assert (cfg.name, cfg.platform, cfg.backend, cfg.max_batch_size) == (
            report["stage_models"][stage.name], "onnxruntime_onnx", "onnxruntime", layout.dims["batch"].max if leads else 0)
        assert not cfg.HasField("dynamic_batching")  # a stage request already is a batch (from the BLS model)
        for got, specs in ((cfg.input, stage.inputs), (cfg.output, stage.outputs)):
            assert [t.name for t in got] == [s.name for s in specs]
            for t, s in zip(got, specs):
                assert DT.Name(t.data_type) == TRITON_DTYPES[s.dtype]
                shape = [d if isinstance(d, int) else -1 for d in (s.shape[1:] if leads else s.shape)]
                assert list(t.dims) == (shape or [1]) and t.HasField("reshape") == (leads and not shape)
                if t.HasField("reshape"):
                    assert list(t.reshape.shape) == []
        assert model_config_pb2.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == "KIND_CPU"
        ranges = cfg.parameters[DIMS_PARAMETER].string_value.split() if DIMS_PARAMETER in cfg.parameters else []
        for item in ranges:
            name, lo_opt_hi = item.split("=")
            r = layout.dims[name]
            assert lo_opt_hi == f"{r.min}:{r.opt}:{r.max}"
        assert "regenerate rather than edit: csprt triton-repo" in (out / cfg.name / "config.pbtxt").read_text()
    assert {"vision", "sam_encoder"} <= batched and not {"seg_head", "sam_decoder"} & batched


def test_bls_config(repo):
    out, _ = repo
    cfg = parse_config(out / "csprt" / "config.pbtxt")
    assert (cfg.backend, cfg.max_batch_size) == ("python", 8) and cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(t.name, t.optional) for t in cfg.input] == [(t.name, t.optional) for t in BLS_INPUTS]
    assert [t.name for t in cfg.output] == [t.name for t in BLS_OUTPUTS]
    assert cfg.parameters["csprt_image_cache_mb"].string_value == "512"  # model.py's image cache, per instance


def test_tensor_names_match_csprt_serve():
    """One client for `csprt serve` and this repository: the same request and response tensors."""
    serving = pytest.importorskip("engines.serving")
    name = {"BYTES": "TYPE_STRING", "BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "INT64": "TYPE_INT64",
            "FP32": "TYPE_FP32"}
    serve_in = {n: (name[d], tuple(s), opt) for n, (d, s, opt, _) in serving.INPUTS.items()}
    ours_in = {t.name: (t.data_type, t.dims, t.optional) for t in BLS_INPUTS}
    assert {n: ours_in[n] for n in serve_in if n in ours_in} == serve_in
    assert {n: (name[d], tuple(s)) for n, (d, s, _) in serving.OUTPUTS.items()} == {
        t.name: (t.data_type, t.dims) for t in BLS_OUTPUTS}


# --- the BLS model, run for real -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["single-pass", "generate"])
def test_bls_equals_artifact_session(bls, session, mode):
    """Twice per mode: the second request (and generate's first, after single-pass's) reuses the cached image
    encoding, bit for bit the same answer."""
    from skimage import data

    model, config, pb = bls
    extra = {"mode": mode} if mode == "generate" else {}
    ref = session.segment(data.chelsea(), QUERY, mode=mode, max_new_tokens=32 if mode == "generate" else None)
    assert ref.masks.shape[0] >= 1
    for attempt in range(2):
        [response] = model.execute([request(pb, image=chelsea_png(), query=QUERY, return_logits=np.array([True]),
                                            **extra)])
        got = outputs(response)
        _check_against_config("bls", {t.name(): t.as_numpy() for t in response.output_tensors()}, config.output,
                              batched=True)
        k, h, w = got["masks_shape"]
        masks = np.unpackbits(got["masks_packed"], count=k * h * w).reshape(k, h, w).astype(bool)
        assert np.array_equal(masks, ref.masks)
        assert np.array_equal(got["mask_logits"], ref.mask_logits)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(got["mask_png"][0]))) > 0, ref.masks.any(axis=0))
        assert got["answer"][0].decode() == ref.answer
        assert got["generated_ids"].tolist() == ref.generated_ids
        timings = json.loads(got["timings"][0])
        assert {"decode_image", "segment", "sam_decoder", "total", "image_cache_hit"} <= set(timings)
        assert ("decode" in timings) == (mode == "generate")
        assert timings["image_cache_hit"] == int("vision" not in timings)
        if attempt == 1:
            assert timings["image_cache_hit"] == 1


def test_bls_bad_requests_get_error_responses(bls):
    model, _, pb = bls
    png = chelsea_png()
    bad = [
        (request(pb, image=b"not an image", query=QUERY), "not an image format"),
        (request(pb, image=png, query="   "), "the query is empty"),
        (request(pb, image=png, query=QUERY, mode="chat"), "unknown mode 'chat'"),
        (request(pb, image=png), "no 'query' input"),
        (pb.InferenceRequest(inputs=[pb.Tensor("image", np.array([[png], [png]], dtype=object)),
                                     pb.Tensor("query", np.array([[QUERY.encode()]], dtype=object))]), "batch size 2"),
    ]
    good = request(pb, image=png, query=QUERY)
    responses = model.execute([r for r, _ in bad[:2]] + [good] + [r for r, _ in bad[2:]])
    assert outputs(responses.pop(2))["masks_shape"][0] >= 1  # a bad request does not fail its batch neighbours
    for response, (_, match) in zip(responses, bad):
        assert response.has_error() and match in response.error().message()
        assert response.error().code() == TritonError.INVALID_ARG
    from engines.image_cache import image_key

    assert model.cache.get(image_key(b"not an image", model.session.image_settings)) is None  # never cached


def test_bls_runs_a_group_as_one_batched_pipeline_call(bls, session):
    """A dynamic-batcher group with bad requests, an image cache hit beside a miss, and both modes: the bad ones get
    their own errors; the good single-pass ones are one batch (each stage model one request with batch 2, the image
    stages only for the miss); every good one equals the request alone."""
    from skimage import data

    model, _, pb = bls
    cat, buf = chelsea_png(), io.BytesIO()
    Image.fromarray(data.astronaut()[::4, ::4].copy()).save(buf, format="PNG")
    person = buf.getvalue()
    model.execute([request(pb, image=cat, query=QUERY)])  # the cat's encoding is cached
    group = [(cat, "Where is the cat?", "single-pass"), (b"not an image", QUERY, "single-pass"),
             (person, "Segment the person.", "single-pass"), (cat, "cat " * 400, "single-pass"),
             (cat, "What is on the left?", "generate")]
    InferenceRequest.log.clear()
    responses = model.execute([request(pb, image=im, query=q, mode=m, return_logits=np.array([True]))
                               for im, q, m in group])
    assert [r.has_error() for r in responses] == [False, True, False, True, False]
    assert "not an image format" in responses[1].error().message()
    assert "suffix_len" in responses[3].error().message() and responses[3].error().code() == TritonError.INVALID_ARG
    calls = {}
    for name, lead in InferenceRequest.log:
        calls.setdefault(name, []).append(lead)
    assert calls["csprt_vision"] == calls["csprt_sam_encoder"] == [(1,)]  # the person only: the cat was a hit
    assert calls["csprt_embed"][0] == (2,) and set(calls["csprt_embed"][1:]) == {(1,)}  # then generate's
    for i in (0, 2, 4):
        image, query, mode = group[i]
        ref = session.segment(decode_image_bytes(image), query, mode=mode,
                              max_new_tokens=model.default_max_new_tokens if mode == "generate" else None)
        got = outputs(responses[i])
        k, h, w = got["masks_shape"]
        assert np.array_equal(np.unpackbits(got["masks_packed"], count=k * h * w).reshape(k, h, w).astype(bool),
                              ref.masks), i
        np.testing.assert_allclose(got["mask_logits"], ref.mask_logits, rtol=0, atol=1e-5)
        assert got["generated_ids"].tolist() == ref.generated_ids and got["answer"][0].decode() == ref.answer
        timings = json.loads(got["timings"][0])
        assert (timings["batch_size"], timings["image_cache_hit"]) == ({0: 2, 2: 2, 4: 1}[i], int(image == cat))


def test_bls_max_batch_size_above_the_exported_batch(art, tmp_path):
    with pytest.raises(ToolchainError, match=r"--max-batch-size 9 is more than this artifact's exported maximum "
                                             r"batch of 8.*--max-batch 9"):
        write_triton_repo(art, tmp_path / "r", max_batch_size=9)
    assert not (tmp_path / "r").exists()


def test_bls_stage_failure_is_an_internal_error(bls, monkeypatch):
    model, _, pb = bls
    monkeypatch.delitem(InferenceRequest.models, "csprt_seg_head")
    [response] = model.execute([request(pb, image=chelsea_png(), query=QUERY)])
    assert response.has_error() and response.error().code() == TritonError.INTERNAL
    assert "stage 'seg_head': Triton model 'csprt_seg_head' failed" in response.error().message()


def test_bls_bug_is_an_internal_error_for_that_request_only(bls, monkeypatch, capsys):
    model, _, pb = bls

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(model.host, "answer", broken)
    [response] = model.execute([request(pb, image=chelsea_png(), query=QUERY)])
    assert response.has_error() and response.error().code() == TritonError.INTERNAL
    assert "csprt internal error (please report; traceback in the server log): RuntimeError: boom" in \
        response.error().message()
    assert "Traceback" in capsys.readouterr().err


def test_bls_without_batch_axis(art, repo, bls, tmp_path):
    """--max-batch-size 0: no batch axis on the request or the response."""
    _, _, pb = bls  # its stage models serve this repository's names too
    out = tmp_path / "repo0"
    write_triton_repo(art, out, max_batch_size=0, device="cpu")
    model, config = load_bls(out, pb)
    try:
        [response] = model.execute([request(pb, batched=False, image=chelsea_png(), query=QUERY)])
        _check_against_config("bls", {t.name(): t.as_numpy() for t in response.output_tensors()}, config.output,
                              may_lack=("mask_logits", "host_steps"))
        assert outputs(response, batched=False)["masks_shape"][0] >= 1
    finally:
        model.finalize()


# --- writing: refusal, replacement, atomicity ------------------------------------------------------------------

def test_refuses_what_it_did_not_write(art, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ToolchainError, match="not a Triton repository csprt wrote"):
        write_triton_repo(art, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ToolchainError, match="not a directory"):
        write_triton_repo(art, tmp_path / "file")
    with pytest.raises(ToolchainError, match="contains the artifact"):
        write_triton_repo(art, art.parent)
    with pytest.raises(ToolchainError, match="--instances 0"):
        write_triton_repo(art, tmp_path / "r", instances=0)
    with pytest.raises(ToolchainError, match="--device cpu: TensorRT engines run on a GPU only"):
        write_triton_repo(art, tmp_path / "r", backend="tensorrt", device="cpu")
    with pytest.raises(ToolchainError, match="--name 'a b'"):
        write_triton_repo(art, tmp_path / "r", name="a b")
    assert not (tmp_path / "r").exists()


def test_replaces_its_own_repo_and_a_failure_keeps_the_old_one(art, tmp_path, monkeypatch):
    out = tmp_path / "repo"
    out.mkdir()  # an empty directory is fine
    write_triton_repo(art, out, name="first", link=True)
    write_triton_repo(art, out, name="second")
    assert (out / "second").is_dir() and not (out / "first").exists()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    import engines.triton_repo as tr

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tr, "_write_bls", boom)
    with pytest.raises(OSError, match="disk full"):
        write_triton_repo(art, out, name="third")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]


def test_external_data_sits_beside_model_onnx(art, tmp_path):
    import onnx

    from graphs.manifest import graph_files

    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    graph = copy / "graphs" / "seg_head.onnx"
    onnx.save_model(onnx.load(str(graph)), str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="seg_head.onnx.data", size_threshold=0)  # as the exporter writes graphs over 2 GB
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    entry = next(e for e in manifest["stages"] if e["name"] == "seg_head")
    entry["files"] = graph_files(copy, entry["graph"])
    write_manifest(copy, manifest)
    write_triton_repo(copy, tmp_path / "repo", link=True)
    version_dir = tmp_path / "repo" / "csprt_seg_head" / "1"
    assert sorted(p.name for p in version_dir.iterdir()) == ["model.onnx", "seg_head.onnx.data"]
    layout = load_artifact(copy).layout
    stage = layout.stage("seg_head")
    h = stage.input("seg_hidden").shape[1]
    x = {"seg_hidden": np.linspace(-1, 1, 2 * h, dtype=np.float32).reshape(2, h)}  # [num_seg, H]
    with OrtRunner(stage, layout.dims, version_dir / "model.onnx") as got, \
            OrtRunner(stage, layout.dims, art / "graphs" / "seg_head.onnx") as ref:
        assert np.array_equal(got.infer(x)["seg_embeddings"], ref.infer(x)["seg_embeddings"])


# --- TensorRT plans --------------------------------------------------------------------------------------------

def fake_engines(art, dest, flavor, version="10.13.0.35", narrow=None, drop_input=None):
    """A copy of `art` with a fake plan + sidecar + manifest entry per stage, as `csprt build` records them."""
    shutil.copytree(art, dest)
    artifact = load_artifact(dest)
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    for entry in manifest["stages"]:
        spec = artifact.layout.stage(entry["name"])
        dims = {**artifact.layout.dims, **(narrow or {})}
        plan_rel, sidecar_rel = engine_paths(flavor, spec.name)
        plan = f"fake {flavor} plan of {spec.name}".encode()
        (dest / plan_rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / plan_rel).write_bytes(plan)
        names = [t.name for t in spec.inputs if (spec.name, t.name) != drop_input]
        sidecar = {"format": "csprt.engine", "stage": spec.name, "flavor": flavor, "trt_version": version,
                   "compute_capabilities": ["SM80", "SM86"], "graph": entry["graph"], "graph_files": dict(entry["files"]),
                   "precision": manifest["precision"], "profiles": profiles_to_json(stage_profiles(
                       spec, dims, names, decode=artifact.layout.decodes(spec.name))),
                   "dims": dims_to_json(stage_dims(spec, dims)), "plan": plan_rel,
                   "plan_sha256": hashlib.sha256(plan).hexdigest(), "plan_bytes": len(plan)}
        (dest / sidecar_rel).write_text(json.dumps(sidecar))
        entry["engines"][flavor] = {"sidecar": sidecar_rel, "plan": plan_rel, "trt_version": version}
    write_manifest(dest, manifest)
    return dest


def test_tensorrt_plans(art, tmp_path):
    from graphs.stages import DimRange

    with pytest.raises(ArtifactError, match=r"12 of 12 stages .* have no TensorRT engine .*csprt build .* --flavor tensorrt"):
        write_triton_repo(art, tmp_path / "r", backend="tensorrt")
    eng = fake_engines(art, tmp_path / "art", "tensorrt", narrow={"suffix_len": DimRange(1, 32, 128)},
                       drop_input=("entry_1", "suffix_ids"))
    report = write_triton_repo(eng, tmp_path / "repo", backend="tensorrt")
    assert (report["flavor"], report["trt_version"]) == ("tensorrt", "10.13.0.35")
    layout = load_artifact(eng).layout
    for stage in layout.stages:
        model_dir = tmp_path / "repo" / report["stage_models"][stage.name]
        cfg = parse_config(model_dir / "config.pbtxt")
        assert (cfg.platform, cfg.backend, cfg.default_model_filename) == ("tensorrt_plan", "tensorrt", "model.plan")
        assert (model_dir / "1" / "model.plan").read_bytes() == f"fake tensorrt plan of {stage.name}".encode()
        assert [t.name for t in cfg.input] == [t.name for t in stage.inputs if (stage.name, t.name) != ("entry_1", "suffix_ids")]
        assert "TensorRT 10.13.0.35 engine for SM80, SM86" in (model_dir / "config.pbtxt").read_text()
        # a decoded block's plan has prefill and decode profiles: both listed, or Triton would use profile 0 only
        assert list(cfg.instance_group[0].profile) == (["0", "1"] if layout.decodes(stage.name) else [])
    assert any(layout.decodes(s.name) for s in layout.stages)
    entry_0 = parse_config(tmp_path / "repo" / "csprt_embed" / "config.pbtxt")
    assert "suffix_len=1:32:128" in entry_0.parameters[DIMS_PARAMETER].string_value  # the engine's narrowed profile
    stages = json.loads((tmp_path / "repo" / "csprt" / "1" / "stages.json").read_text())["stage_models"]
    assert "suffix_ids" not in stages["entry_1"]["inputs"]


def test_tensorrt_rtx_plans_need_their_own_backend(art, tmp_path):
    eng = fake_engines(art, tmp_path / "art", "tensorrt-rtx", version="1.7.1.116")
    with pytest.raises(ArtifactError, match="TensorRT-RTX engines only; stock Triton's tensorrt backend"):
        write_triton_repo(eng, tmp_path / "r", backend="tensorrt")
    write_triton_repo(eng, tmp_path / "repo", backend="tensorrt", flavor="tensorrt-rtx")
    cfg = parse_config(tmp_path / "repo" / "csprt_vision" / "config.pbtxt")
    assert (cfg.platform, cfg.backend, cfg.default_model_filename) == ("", "tensorrt_rtx", "model.plan")
    # a plan whose graph changed since the build is refused (engines.build.check_engine)
    (eng / "engines" / "tensorrt-rtx" / "vision.plan").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="vision.plan changed since it was built.*csprt build"):
        write_triton_repo(eng, tmp_path / "repo", backend="tensorrt", flavor="tensorrt-rtx")


# --- CLI -------------------------------------------------------------------------------------------------------

def test_cli(art, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"triton-repo": "tools.triton_repo"})
    rc, out, err = call(["triton-repo", str(art), "--out", str(tmp_path / "repo"), "--name", "seg",
                         "--instances", "2", "--device", "cpu"])
    assert rc == 0, err
    assert f"triton repository: {tmp_path / 'repo'} (onnxruntime; BLS model 'seg', 12 stage models)" in out
    cfg = parse_config(tmp_path / "repo" / "seg_vision" / "config.pbtxt")
    assert cfg.instance_group[0].count == 2
    assert "--name seg --instances 2 --device cpu" in json.loads((tmp_path / "repo" / REPO_MARKER).read_text())["command"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    rc, out, err = call(["triton-repo", str(art), "--out", str(tmp_path / "other")])
    assert rc == 2
    [line] = error_lines(err)
    assert line.startswith("csprt triton-repo: error: --out") and "not a Triton repository csprt wrote" in line
    rc, out, err = call(["triton-repo", str(art), "--out", str(tmp_path / "big"), "--max-batch-size", "16"])
    [line] = error_lines(err)
    assert rc == 2 and "exported maximum batch of 8" in line and "csprt export --max-batch 16" in line
    rc, out, err = call(["triton-repo", str(art), "--out", str(tmp_path / "slow"), "--max-queue-delay-us", "500"])
    assert rc == 0, err
    assert parse_config(tmp_path / "slow" / "csprt" / "config.pbtxt").dynamic_batching.max_queue_delay_microseconds == 500
