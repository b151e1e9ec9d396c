"""Weight-free engines (`csprt build --weights-as-inputs`): which weights become engine inputs, and (trt) what the
build makes of them: no weight byte in the plan, none read by the builder, a sidecar the runtime reads them from."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engines import build_memory as build_mod
from engines.build_memory import GIB
from graphs.manifest import load_artifact
from graphs.weight_inputs import MIN_BYTES, WeightInput, WeightReader, as_weight_inputs, weight_inputs
from tests.engines.test_build_memory import externalize

STAGE = "llm_2"
FLAVOR = dict(flavor="tensorrt-rtx", compute_capabilities=["SM89"])


def _operands(model) -> dict[str, set[tuple[str, int]]]:
    out: dict[str, set[tuple[str, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            out.setdefault(name, set()).add((node.op_type, i))
    return out


@pytest.mark.parametrize("stage", ["llm_2", "embed", "vision", "sam_decoder"])
def test_gemm_and_embedding_weights_move_and_nothing_else(export_tiny, stage):
    art = export_tiny("csp", "both")
    rel = load_artifact(art).stage_entry(stage)["graph"]
    model = onnx.load(str(art / rel))
    moved = weight_inputs(model, rel)
    uses = _operands(model)
    names = {w.name for w in moved}
    assert names, f"{stage}: no weight moved"
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        gemm_like = uses.get(t.name) and uses[t.name] <= {("MatMul", 1), ("Gemm", 1), ("Gather", 0), ("Transpose", 0)}
        expected = bool(gemm_like) and a.ndim == 2 and a.dtype.kind == "f" and a.nbytes >= MIN_BYTES
        assert (t.name in names) == expected, t.name
    if stage == "llm_2":  # every Linear of both layers and the LM head
        assert len(moved) == 2 * 7 + 1 and "model.llm.lm_head.weight" in names
    if stage == "embed":
        assert [uses[w.name] for w in moved] == [{("Gather", 0)}]
    rewritten = as_weight_inputs(model, moved)
    onnx.checker.check_model(rewritten)
    inputs = [i.name for i in rewritten.graph.input]
    assert inputs == [i.name for i in model.graph.input] + [w.name for w in moved]  # the stage's inputs first
    assert not names & {t.name for t in rewritten.graph.initializer}
    assert all(w.inline and w.file == rel for w in moved)  # tiny graphs keep their weights in the .onnx


def test_external_weights_are_read_as_views_of_the_data_file(export_tiny, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    externalize(art, [STAGE])
    rel = load_artifact(art).stage_entry(STAGE)["graph"]
    moved = weight_inputs(onnx.load(str(art / rel), load_external_data=False), rel)
    full = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(art / rel)).graph.initializer}
    reader = WeightReader(art)
    for w in moved:
        assert w.file == rel + ".data" and w.offset >= 0
        got = reader.read(w)
        np.testing.assert_array_equal(got, full[w.name])
        assert not got.flags.owndata  # a view of the mapping: nothing copied before the upload
    json_round = [WeightInput.from_json(json.loads(json.dumps(w.to_json()))) for w in moved]
    assert json_round == moved


# --- TensorRT-RTX builds (CPU) ---------------------------------------------------------------------------------------

@pytest.mark.trt
def test_weight_free_engine_holds_no_weight_and_its_build_reads_none(export_tiny, tmp_path, monkeypatch):
    from engines.build import build_engines, check_engine, estimate_stage_memory

    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    externalize(art, [STAGE])
    artifact = load_artifact(art)
    full = build_engines(art, stages=[STAGE], **FLAVOR)
    full_plan = (art / "engines/tensorrt-rtx/llm_2.plan").read_bytes()

    mapped = []  # every external tensor the parser is handed
    real_address = build_mod.MappedWeights.address
    monkeypatch.setattr(build_mod.MappedWeights, "address",
                        lambda self, loc, off, n: mapped.append((loc, off)) or real_address(self, loc, off, n))
    lines = []
    free = build_engines(art, stages=["entry_0", STAGE], weights_as_inputs=True, progress=lines.append, **FLAVOR)
    assert free["stages"][STAGE]["status"] == "built"  # another build key than the full engine's
    _, weightless = check_engine(art, "entry_0", "tensorrt-rtx", free["trt_version"])
    assert "weights" not in weightless and free["stages"]["entry_0"]["weight_input_bytes"] == 0  # nothing moved
    plan_path, sidecar = check_engine(art, STAGE, "tensorrt-rtx", free["trt_version"])
    moved = [WeightInput.from_json(w) for w in sidecar["weight_inputs"]]
    rel = artifact.stage_entry(STAGE)["graph"]
    assert moved == weight_inputs(onnx.load(str(art / rel), load_external_data=False), rel)
    assert sidecar["weights"] == "inputs" and sidecar["settings"]["weights"] == "inputs"
    listed = next(e for e in load_artifact(art).manifest["stages"] if e["name"] == STAGE)["engines"]["tensorrt-rtx"]
    assert listed["weights"] == "inputs"
    assert sidecar["weight_input_bytes"] == sum(w.length for w in moved) == free["stages"][STAGE]["weight_input_bytes"]
    assert not {(w.file.split("/")[-1], w.offset) for w in moved} & set(mapped)  # the builder never read them
    assert not any({w.name for w in moved} & set(p) for p in sidecar["profiles"])  # static: the stage's own profiles
    # The weights are in neither form in the weight-free plan; the full plan holds most of them verbatim.
    reader = WeightReader(art)
    chunks = [reader.read(w).tobytes()[:256] for w in moved]
    assert sum(c in full_plan for c in chunks) >= len(chunks) // 2
    assert not any(c in plan_path.read_bytes() for c in chunks)
    whole = estimate_stage_memory(artifact, STAGE)
    told = [ln for ln in lines if ln.startswith(f"build memory: {STAGE}:")]
    assert len(told) == 1 and "of them engine inputs" in told[0]
    estimate = sidecar["build_memory"]
    assert estimate["weight_input_bytes"] == sum(w.length for w in moved)
    assert whole.peak_bytes - estimate["estimated_peak_bytes"] == pytest.approx(
        (build_mod.RATIO_MAPPED - build_mod.RATIO_INPUT) * estimate["weight_input_bytes"], abs=1)
    again = build_engines(art, stages=[STAGE], weights_as_inputs=True, **FLAVOR)
    assert again["stages"][STAGE]["status"] == "cached"
    back = build_engines(art, stages=[STAGE], **FLAVOR)  # the full engine again: a rebuild, not the weight-free one
    assert back["stages"][STAGE]["status"] == "built" and full["stages"][STAGE]["plan_bytes"] > 0
    assert "weights" not in json.loads((art / "engines/tensorrt-rtx/llm_2.json").read_text(encoding="utf-8"))


@pytest.mark.trt
def test_a_budget_only_weight_free_engines_fit_builds_blocks_whole(export_tiny, tmp_path, monkeypatch):
    from engines.build import build_engines, estimate_stage_memory

    monkeypatch.setattr(build_mod, "BUILD_BASE", 0)
    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    externalize(art, [STAGE])
    whole = estimate_stage_memory(load_artifact(art), STAGE)
    free = whole.peak_bytes - (build_mod.RATIO_MAPPED - build_mod.RATIO_INPUT) * whole.external_bytes * 0.9
    assert whole.peak_bytes > free  # the full engine would be over this budget
    report = build_engines(art, stages=[STAGE], weights_as_inputs=True, max_build_memory_gb=free / GIB, **FLAVOR)
    assert report["stages"][STAGE]["engines"] == 1  # where the full engine would need pieces


@pytest.mark.trt
def test_cli_refuses_weights_as_inputs_with_pieces(export_tiny, tmp_path, capsys):
    from tools.cli import main

    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    assert main(["build", str(art), "--weights-as-inputs", "--max-layers-per-engine", "1",
                 "--flavor", "tensorrt-rtx"]) == 2
    err = capsys.readouterr().err
    assert "--max-layers-per-engine cannot be combined with --weights-as-inputs" in err and "Traceback" not in err
    assert not (art / "engines").exists()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_stage_with_its_weights_as_inputs_gives_the_same_outputs_on_onnxruntime(export_tiny, precision):
    """Every stage of a generate run (decode steps included), fed what the pipeline fed it: the weights-as-inputs
    graph, its weights read from the artifact by `WeightReader`, equals the graph on ONNX Runtime (to rounding)."""
    from engines.session import ArtifactSession
    from exporter.export import sample_image
    from exporter.tiny import SEG_QUERY
    from tests.engines.test_weight_inputs_runtime import _ort

    art = export_tiny("csp", "both", precision)
    with ArtifactSession(art, threads=1) as s:
        feeds = s.segment(sample_image(), SEG_QUERY, mode="generate", max_new_tokens=4, record=True).pipeline.feeds
    artifact, reader, moved_any = load_artifact(art), WeightReader(art), 0

    for name, feed in feeds.items():
        stage = artifact.layout.stage(name).graph_name  # a decode step runs its block's graph
        rel = artifact.stage_entry(stage)["graph"]
        model = onnx.load(str(art / rel))
        moved = weight_inputs(model, rel)
        moved_any += len(moved)
        want = _ort(model, feed)
        got = _ort(as_weight_inputs(model, moved), {**feed, **{w.name: reader.read(w) for w in moved}})
        assert set(got) == set(want)
        # ONNX Runtime pre-packs a constant GEMM weight and cannot pre-pack an input: a one-row GEMM may then sum
        # in another order (seen: 4e-9 on fp32 decode steps). Anything past rounding is a rewrite error.
        for out, ref in want.items():
            np.testing.assert_allclose(got[out], ref, rtol=1e-5, atol=1e-7, err_msg=f"{name} ({stage}) {out}")
    assert moved_any > 0 and {"vision", "embed", "llm_0", "llm_2", "sam_decoder"} <= set(feeds)
