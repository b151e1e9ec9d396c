"""`csprt triton-repo --backend tensorrt` for a block built in pieces (`csprt build --max-layers-per-engine 1`): one
Triton model per piece whose config matches the piece's sidecar, stages.json listing them in run order, and the BLS
model chaining them, run under tests/engines/test_triton_repo.py's fake `triton_python_backend_utils` with each
piece model on ONNX Runtime (`graphs.onnx_split.piece_model` of the block, the pieces `csprt build` made): the same
block outputs as the whole block's graph, and the same masks as `ArtifactSession` end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from tritonclient.grpc import model_config_pb2

from engines.build_memory import GIB
from engines.ort_runner import OrtRunner
from engines.split_build import plan_split
from engines.triton_repo import bls_template, write_triton_repo
from graphs.errors import ArtifactError
from graphs.manifest import load_artifact
from graphs.onnx_split import piece_model, tensor_types
from graphs.triton_config import TRITON_DTYPES
from tests.graphs.test_onnx_split import block_feed
from tests.engines.test_triton_repo import (QUERY, InferenceRequest, StageModel, bls_module, chelsea_png, fake_pb_utils,
                                            load_bls, outputs, parse_config, request)

ort = pytest.importorskip("onnxruntime")

STAGE = "llm_2"  # the tiny csp artifact's two-layer block: layers 2 and 3
FLAVOR = "tensorrt-rtx"  # builds on this CPU host
DT = model_config_pb2.DataType


class PieceModel:
    """A piece model as Triton's TensorRT backend would run it (config checks), its plan stood in for by the piece's
    ONNX graph on ONNX Runtime."""

    def __init__(self, model_dir, model):
        self.config = parse_config(model_dir / "config.pbtxt")
        self.session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.runner = self  # StageModel's interface: fixtures deactivate every model's runner

    def __call__(self, feed):
        return StageModel.checked(self.config, feed, lambda f: dict(zip(
            [o.name for o in self.session.get_outputs()], self.session.run(None, f))))

    def deactivate(self):
        self.session = None


def piece_graphs(artifact) -> tuple[list, list]:
    """The block's pieces as `csprt build --max-layers-per-engine 1` cuts them, as ONNX models (weights inline)."""
    plan = plan_split(artifact, STAGE, budget=100 * GIB, max_layers=1)
    full = onnx.load(str(artifact.graph_path(STAGE)))
    types = tensor_types(plan.model)
    return plan.pieces, [piece_model(full, p, types) for p in plan.pieces]


# --- the BLS runner's chaining, no engines (CPU) ----------------------------------------------------------------

@pytest.mark.parametrize("batch,rows,cache,past_len", [(2, 7, 9, 0), (2, 1, 9, 5)], ids=["prefill", "decode-step"])
def test_bls_runner_chains_the_pieces_into_the_block(export_tiny, tmp_path, batch, rows, cache, past_len):
    """TritonStageRunner on a stages.json entry with pieces: each piece model requested once, in order, fed only the
    stage inputs and interface tensors it lists; the stage outputs equal the whole block's graph bit for bit."""
    artifact = load_artifact(export_tiny())
    spec, dims = artifact.layout.stage(STAGE), artifact.layout.dims
    pieces, graphs = piece_graphs(artifact)
    sessions = {f"p{p.index}": ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
                for p, g in zip(pieces, graphs)}
    fed = []

    def run(name):
        def call(feed):
            fed.append((name, sorted(feed)))
            s = sessions[name]
            return dict(zip([o.name for o in s.get_outputs()], s.run(None, feed)))
        return call

    module = bls_module(bls_template(), fake_pb_utils())
    entry = {"pieces": [{"model": f"p{p.index}", "inputs": list(p.inputs), "outputs": list(p.outputs)} for p in pieces]}
    InferenceRequest.models = {name: run(name) for name in sessions}
    try:
        feed = block_feed(spec, batch, rows, cache, past_len)
        with module.TritonStageRunner(spec, dims, entry) as got, \
                OrtRunner(spec, dims, artifact.graph_path(STAGE)) as ref:
            out, want = got.infer(feed), ref.infer(feed)
    finally:
        InferenceRequest.models = {}
    assert fed == [(f"p{p.index}", sorted(p.inputs)) for p in pieces]
    assert pieces[1].interface_in and set(pieces[1].interface_in) <= set(pieces[0].outputs)
    assert sorted(out) == sorted(t.name for t in spec.outputs)
    for name, value in want.items():
        np.testing.assert_array_equal(out[name], value, err_msg=name)  # the same ops on the same data
    with pytest.raises(ArtifactError, match=r"no Triton model in stages.json returns hidden_out"):
        module.TritonStageRunner(spec, dims, {"pieces": entry["pieces"][:1]})


# --- a repository of real engines: TensorRT-RTX builds here --------------------------------------------------------

@pytest.fixture(scope="module")
def built(export_tiny, tmp_path_factory):
    """The tiny artifact with TensorRT-RTX engines, its two-layer block as two one-layer engines, and its repo."""
    from engines.build import build_engines

    base = tmp_path_factory.mktemp("pieces")
    art = base / "art"
    shutil.copytree(export_tiny(), art)
    build_engines(art, flavor=FLAVOR, compute_capabilities=["SM89"], max_layers_per_engine=1)
    report = write_triton_repo(art, base / "repo", backend="tensorrt", flavor=FLAVOR)
    return art, base / "repo", report


def _piece_sidecars(art) -> list[dict]:
    stage_sidecar = json.loads((art / "engines" / FLAVOR / f"{STAGE}.json").read_text())
    return [json.loads((art / rel).read_text()) for rel in stage_sidecar["pieces"]]


@pytest.mark.trt
def test_one_model_per_piece_with_the_pieces_io(built):
    art, repo, report = built
    layout = load_artifact(art).layout
    stage = layout.stage(STAGE)
    sidecars = _piece_sidecars(art)
    models = [f"csprt_{STAGE}_p{k}" for k in range(len(sidecars))]
    assert len(sidecars) == 2 and report["stage_models"][STAGE] == models
    assert not (repo / f"csprt_{STAGE}").exists()
    assert all(isinstance(report["stage_models"][s.name], str) for s in layout.stages if s.name != STAGE)
    interface = {n: spec for side in sidecars for n, spec in side["interface_outputs"].items()}
    for model, side in zip(models, sidecars):
        assert (repo / model / "1" / "model.plan").read_bytes() == (art / side["plan"]).read_bytes()
        cfg = parse_config(repo / model / "config.pbtxt")
        assert (cfg.name, cfg.backend, cfg.default_model_filename) == (model, "tensorrt_rtx", "model.plan")
        assert cfg.max_batch_size == layout.dims["batch"].max  # every piece tensor leads with the batch dim
        assert sorted(t.name for t in cfg.input) == sorted(side["inputs"])
        assert sorted(t.name for t in cfg.output) == sorted(side["outputs"])
        assert list(cfg.instance_group[0].profile) == ["0", "1"]  # prefill and decode, as the whole block's
        for t in cfg.input:  # dtypes from the stage or the writer's sidecar; dims from the piece's own profiles
            dtype = interface[t.name]["dtype"] if t.name in interface else stage.input(t.name).dtype
            assert DT.Name(t.data_type) == TRITON_DTYPES[dtype], t.name
            shapes = [prof[t.name] for prof in side["profiles"]]
            want = [lo if all(s["min"][i] == s["max"][i] == lo for s in shapes) else -1
                    for i, lo in enumerate(shapes[0]["min"])][1:]  # Triton owns the batch axis
            assert list(t.reshape.shape if t.HasField("reshape") else t.dims) == want, t.name
        for t in cfg.output:
            dtype = interface[t.name]["dtype"] if t.name in interface else stage.output(t.name).dtype
            assert DT.Name(t.data_type) == TRITON_DTYPES[dtype], t.name
        text = (repo / model / "config.pbtxt").read_text()
        a, b = side["layers"]
        assert f"Piece {side['piece'] + 1} of 2 of stage '{STAGE}' (layers {a}-{b - 1})" in text
        assert "rows_llm_2=" in cfg.parameters["csprt_dims"].string_value
    hidden = next(n for n, spec in interface.items() if len(spec["max_shape"]) == 3)  # the rows after layer 2
    h = stage.input("hidden").shape[2]
    assert f'# [batch, rows_{STAGE}, {h}]; batch=' in (repo / models[1] / "config.pbtxt").read_text().split(
        f'name: "{hidden}"')[0].rsplit("\n", 2)[0]  # its dims named after the stage's (ranges in the comment)
    entry = json.loads((repo / "csprt" / "1" / "stages.json").read_text())["stage_models"][STAGE]
    assert entry == {"pieces": [{"model": m, "inputs": [t.name for t in parse_config(repo / m / "config.pbtxt").input],
                                 "outputs": [t.name for t in parse_config(repo / m / "config.pbtxt").output]}
                                for m in models]}
    assert [sorted(p["inputs"]) for p in entry["pieces"]] == [sorted(s["inputs"]) for s in sidecars]


@pytest.mark.trt
@pytest.mark.parametrize("mode", ["single-pass", "generate"])
def test_bls_over_piece_models_equals_artifact_session(built, export_tiny, mode):
    """Every stage model run on ONNX Runtime (whole stages: the artifact's graphs; the block's pieces: their ONNX
    graphs), config-checked as Triton would: the BLS model's masks, logits and answer equal ArtifactSession's."""
    from skimage import data

    from engines.session import ArtifactSession

    art, repo, report = built
    artifact = load_artifact(art)
    layout = artifact.layout
    pieces, graphs = piece_graphs(artifact)
    assert [(list(p.inputs), list(p.outputs)) for p in pieces] == [(s["inputs"], s["outputs"]) for s in
                                                                   _piece_sidecars(art)]  # the pieces the build made
    pb = fake_pb_utils()
    models = {}
    for stage in layout.stages:
        names = report["stage_models"][stage.name]
        if isinstance(names, list):
            models.update({m: PieceModel(repo / m, g) for m, g in zip(names, graphs)})
        else:
            models[names] = StageModel(repo / names, stage, layout.dims, graph=artifact.graph_path(stage.name))
    InferenceRequest.models = models
    model, config = load_bls(repo, pb)
    try:
        with ArtifactSession(export_tiny()) as session:
            ref = session.segment(data.chelsea(), QUERY, mode=mode, max_new_tokens=32 if mode == "generate" else None)
        InferenceRequest.log.clear()
        extra = {"mode": mode} if mode == "generate" else {}
        [response] = model.execute([request(pb, image=chelsea_png(), query=QUERY, return_logits=np.array([True]),
                                            **extra)])
        got = outputs(response)
    finally:
        model.finalize()
        for m in models.values():
            m.runner.deactivate()
        InferenceRequest.models = {}
    k, h, w = got["masks_shape"]
    assert k >= 1
    assert np.array_equal(np.unpackbits(got["masks_packed"], count=k * h * w).reshape(k, h, w).astype(bool), ref.masks)
    assert np.array_equal(got["mask_logits"], ref.mask_logits)
    assert got["answer"][0].decode() == ref.answer and got["generated_ids"].tolist() == ref.generated_ids
    calls = [name for name, _ in InferenceRequest.log if name.startswith(f"csprt_{STAGE}")]
    runs = len(calls) // 2  # a prefill, then (generate) one per decode step: each its pieces in order
    assert calls == [f"csprt_{STAGE}_p0", f"csprt_{STAGE}_p1"] * runs and runs == (
        1 if mode == "single-pass" else len(ref.generated_ids))


@pytest.mark.trt
def test_cli_counts_piece_models_and_pieces_that_do_not_chain_are_refused(built, tmp_path, monkeypatch):
    from tests.cli_io import call, error_lines
    from tools import cli

    art, _, _ = built
    monkeypatch.setattr(cli, "COMMANDS", {"triton-repo": "tools.triton_repo"})
    rc, out, err = call(["triton-repo", str(art), "--out", str(tmp_path / "repo"), "--backend", "tensorrt",
                         "--flavor", FLAVOR])
    assert rc == 0, err
    assert f"13 stage models; {STAGE} as 2 piece models)" in out
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    rel = json.loads((copy / "engines" / FLAVOR / f"{STAGE}.json").read_text())["pieces"][1]
    side = json.loads((copy / rel).read_text())
    side["interface_inputs"].append("from_nowhere")
    (copy / rel).write_text(json.dumps(side))
    rc, out, err = call(["triton-repo", str(copy), "--out", str(tmp_path / "bad"), "--backend", "tensorrt",
                         "--flavor", FLAVOR])
    [line] = error_lines(err)
    assert rc == 2 and "reads 'from_nowhere', which no earlier piece writes; rebuild with: csprt build" in line
    assert not (tmp_path / "bad").exists()
