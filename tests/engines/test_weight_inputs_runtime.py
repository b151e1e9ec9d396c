"""Weight-free engines at run time (`csprt build --weights-as-inputs`), on CPU: the tiny block's weights read from
the artifact (mapped external data, inline tensors), uploaded once into one arena and bound on every profile's
context of a fake engine, never fed per call; engines or sidecars that disagree refused in one line; the rewrite
bit-exact on ONNX Runtime with the weights fed from the reader; Triton's TensorRT backend refusing such a stage."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import types

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engines.trt_runner import TrtRunner, buffer_plan, eval_dim
from engines.weight_upload import ALIGN, arena_offsets, weights_of
from graphs.errors import ArtifactError
from graphs.manifest import load_artifact
from graphs.weight_inputs import WeightReader, as_weight_inputs, weight_inputs
from tests.engines.test_build_memory import externalize

STAGE = "llm_2"  # the tiny csp artifact's two-layer block
FAKE_TRT = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
                                 DataType=types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", BF16="BF16"))


@pytest.fixture(scope="module")
def art(export_tiny, tmp_path_factory):
    """The tiny csp artifact with the block's tensors in graphs/llm_2.onnx.data (vision's stay inline)."""
    out = tmp_path_factory.mktemp("weight_inputs") / "art"
    shutil.copytree(export_tiny("csp", "both"), out)
    externalize(out, [STAGE])
    return load_artifact(out)


def _moved(artifact, stage=STAGE):
    rel = artifact.stage_entry(stage)["graph"]
    return weight_inputs(onnx.load(str(artifact.dir / rel), load_external_data=False), rel)


def _initializers(artifact, stage=STAGE) -> dict[str, np.ndarray]:
    model = onnx.load(str(artifact.dir / artifact.stage_entry(stage)["graph"]))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _sidecar(artifact, moved, **extra) -> dict:
    entry = artifact.stage_entry(STAGE)
    return {"plan": f"engines/x/{STAGE}.plan", "graph_files": dict(entry["files"]), "weights": "inputs",
            "weight_inputs": [w.to_json() for w in moved], "weight_input_bytes": sum(w.length for w in moved),
            **extra}


# --- reading the weights -------------------------------------------------------------------------------------------

def test_reader_maps_external_weights_and_loads_inline_ones(art, export_tiny):
    moved = _moved(art)
    assert moved and all(w.file == f"graphs/{STAGE}.onnx.data" and not w.inline for w in moved)
    want = _initializers(art)
    reader = WeightReader(art.dir)
    for w in moved:
        got = reader.read(w)
        assert not got.flags.writeable and not got.flags.owndata  # a view of the read-only mapping, not a copy
        np.testing.assert_array_equal(got, want[w.name])
    del got
    reader.close()
    inline_art = load_artifact(export_tiny("csp", "both"))  # the same graph with every tensor in the .onnx
    inline = _moved(inline_art)
    assert [w.name for w in inline] == [w.name for w in moved] and all(w.inline for w in inline)
    reader = WeightReader(inline_art.dir)
    for w in inline:
        np.testing.assert_array_equal(reader.read(w), want[w.name])


def test_truncated_external_data_names_reexport(art, tmp_path):
    damaged = tmp_path / "art"
    shutil.copytree(art.dir, damaged)
    data = damaged / "graphs" / f"{STAGE}.onnx.data"
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    last = _moved(art)[-1]  # past the half that is left
    with pytest.raises(ArtifactError, match=rf"llm_2\.onnx\.data: weight '{last.name}' .* does not fit the file "
                                            r"\(\d+ bytes\); .*re-export the artifact$"):
        WeightReader(damaged).read(last)
    data.unlink()
    with pytest.raises(ArtifactError, match=r"cannot read the engine's weights from it .*re-export it$"):
        WeightReader(damaged).read(last)


def _half_graphs(folder):
    """graphs/inline.onnx and graphs/external.onnx (+ .data): MatMuls on a bfloat16 and a float16 [64, 64] weight."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    bf16 = (rng.standard_normal(4096).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # truncated
    weights = [helper.make_tensor("w_bf16", TensorProto.BFLOAT16, [64, 64], bf16.tobytes(), raw=True),
               numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float16), "w_f16")]
    nodes = [helper.make_node("MatMul", ["xb", "w_bf16"], ["yb"]), helper.make_node("MatMul", ["xh", "w_f16"], ["yh"])]
    io = [helper.make_tensor_value_info(n, t, [1, 64]) for n, t in (("xb", TensorProto.BFLOAT16),
                                                                    ("xh", TensorProto.FLOAT16))]
    out = [helper.make_tensor_value_info(n, t, [1, 64]) for n, t in (("yb", TensorProto.BFLOAT16),
                                                                     ("yh", TensorProto.FLOAT16))]
    model = helper.make_model(helper.make_graph(nodes, "g", io, out, initializer=weights))
    (folder / "graphs").mkdir(parents=True)
    onnx.save(model, str(folder / "graphs" / "inline.onnx"))
    onnx.save(model, str(folder / "graphs" / "external.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="external.onnx.data", size_threshold=0)
    return {t.name: numpy_helper.to_array(t).reshape(-1).view(np.uint8) for t in weights}


def test_half_weights_upload_bytewise_from_either_file_kind(tmp_path):
    torch = pytest.importorskip("torch")
    from engines.weight_upload import DeviceWeights

    raw = _half_graphs(tmp_path)
    moved = []
    for rel in ("graphs/inline.onnx", "graphs/external.onnx"):
        moved += weight_inputs(onnx.load(str(tmp_path / rel), load_external_data=False), rel)
    assert [(w.name, w.dtype, w.inline) for w in moved] == [("w_bf16", "bfloat16", True), ("w_f16", "float16", True),
                                                           ("w_bf16", "bfloat16", False), ("w_f16", "float16", False)]
    stream = types.SimpleNamespace(synchronize=lambda: None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(pytest.MonkeyPatch.context()).setattr(torch.cuda, "stream",
                                                                  lambda s: contextlib.nullcontext())
        # one arena per graph, as per engine (the two graphs' weights share names)
        for part in (moved[:2], moved[2:]):
            dev = DeviceWeights.upload(torch, tmp_path, part, "cpu", stream, "stage 'g'")
            for w in part:
                np.testing.assert_array_equal(dev.arena[dev.offsets[w.name]:][:w.length].numpy(), raw[w.name])
                assert dev.offsets[w.name] % ALIGN == 0
                assert dev.address(w.name) == dev.arena.data_ptr() + dev.offsets[w.name]
        wrong = dataclasses.replace(moved[0], dtype="float16")  # the sidecar and the graph disagree
        with pytest.raises(ArtifactError, match=r"^stage 'g': weight 'w_bf16' in graphs/inline\.onnx is bfloat16 "
                                                r"\[64, 64\], its sidecar says float16 \[64, 64\]; rebuild with: "
                                                r"csprt build ART --weights-as-inputs$"):
            DeviceWeights.upload(torch, tmp_path, [wrong], "cpu", stream, "stage 'g'")


# --- the rewrite is exact: ONNX Runtime on the graph vs on its weights-as-inputs copy ------------------------------

def _spec_feed(spec, dims, sizes=None):
    rng = np.random.default_rng(0)
    sizes = {**{n: r.opt for n, r in dims.items()}, **(sizes or {})}
    return {t.name: rng.standard_normal(tuple(eval_dim(d, sizes) for d in t.shape)).astype(np.float32)
            if t.dtype == "float32" else np.zeros(tuple(eval_dim(d, sizes) for d in t.shape), np.int64)
            for t in spec.inputs}


def _ort(model, feed):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {i.name: feed[i.name]
                                                                         for i in sess.get_inputs()})))


@pytest.mark.parametrize("stage", [STAGE, "vision"], ids=["block-external-data", "vision-inline"])
def test_weights_as_inputs_equal_the_graph_on_onnxruntime(art, stage):
    from tests.graphs.test_onnx_split import block_feed

    spec = art.layout.stage(stage)
    moved = _moved(art, stage)
    assert len(moved) >= 2 and all(w.inline == (stage == "vision") for w in moved)
    full = onnx.load(str(art.graph_path(stage)))
    feed = block_feed(spec, 2, 7, 9, 0) if stage == STAGE else _spec_feed(spec, art.layout.dims, {"batch": 2})
    reader = WeightReader(art.dir)
    weights = {w.name: reader.read(w) for w in moved}
    want = _ort(full, feed)
    got = _ort(as_weight_inputs(full, moved), {**feed, **weights})
    assert set(got) == set(want)
    for name, ref in want.items():
        np.testing.assert_array_equal(got[name], ref, err_msg=name)  # the same ops on the same bytes: bit-exact


# --- activation on a fake engine (CPU): uploaded once, bound on every context, never fed ----------------------------

class _Engine:
    """What TrtRunner reads of an ICudaEngine: the stage's I/O plus `weights` as inputs."""

    def __init__(self, stage, weights, shapes=None, dtypes=None, drop=()):
        self.io = {t.name: "INPUT" for t in stage.inputs}
        self.io.update({w.name: "INPUT" for w in weights if w.name not in drop})
        self.io.update({t.name: "OUTPUT" for t in stage.outputs})
        self.names = list(self.io)
        self.shapes = {w.name: w.shape for w in weights} | (shapes or {})
        self.dtypes = {w.name: {"float32": "FLOAT", "float16": "HALF"}[w.dtype] for w in weights} | (dtypes or {})
        self.num_io_tensors, self.num_optimization_profiles = len(self.names), 2

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.io[name]

    def get_tensor_shape(self, name):
        return self.shapes[name]

    def get_tensor_dtype(self, name):
        return self.dtypes[name]


class _Context:
    def __init__(self, runner):
        self.runner, self.calls, self.executed = runner, [], 0

    def set_optimization_profile_async(self, index, handle):
        return True

    def set_input_shape(self, name, shape):
        self.calls.append(("shape", name, tuple(shape)))

    def set_tensor_address(self, name, ptr):
        self.calls.append(("address", name, ptr))

    def get_tensor_shape(self, name):
        return tuple(eval_dim(d, self.runner.last_dims) for d in self.runner.stage.output(name).shape)

    def execute_async_v3(self, handle):
        self.executed += 1
        return True


def _runner(artifact, sidecar, monkeypatch):
    """A TrtRunner of the block with `sidecar`, activating on fake TensorRT (device "cpu")."""
    from engines.gpu_plan import GraphCache
    from engines.profiles import stage_profiles
    from graphs.runner import BaseRunner

    stage, dims = artifact.layout.stage(STAGE), artifact.layout.dims
    r = object.__new__(TrtRunner)
    BaseRunner.__init__(r, stage, dims)
    r.trt, r.sidecar, r.plan_path, r.art_dir = FAKE_TRT, sidecar, sidecar["plan"], artifact.dir
    r.device, r.graph_mode, r.graphs, r._staged, r.last_copied, r.pieces = "cpu", "off", GraphCache(), {}, {}, []
    r.profiles = stage_profiles(stage, dims, decode=True)
    r.buffers_plan, r._cache_inputs = buffer_plan(stage, dims), {i for i, _ in stage.cache}
    r.weights, r._weights, r.load_report = weights_of(sidecar, STAGE), None, {}
    made = []
    monkeypatch.setattr(r, "_create_context", lambda engine: made.append(_Context(r)) or made[-1])
    return r, made


def _activate(r, engine, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(r, "_deserialize", lambda plan_path=None: engine)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    r._activate_engine(torch, types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None))
    r.is_active = True


def test_weights_are_uploaded_once_and_bound_on_every_context(art, monkeypatch):
    torch = pytest.importorskip("torch")
    from tests.graphs.test_onnx_split import block_feed

    moved = _moved(art)
    r, contexts = _runner(art, _sidecar(art, moved), monkeypatch)
    assert r.weights == moved  # the sidecar's list, in graph order
    reads = []
    real_read = WeightReader.read
    monkeypatch.setattr(WeightReader, "read", lambda self, w: reads.append(w.name) or real_read(self, w))
    _activate(r, _Engine(r.stage, moved), monkeypatch)
    assert reads == [w.name for w in moved]  # each read (and uploaded) once, for every context
    assert r._inputs == [t.name for t in r.stage.inputs]  # the per-call feed: the stage's inputs, no weight
    offsets, size = arena_offsets(moved)
    arena = r._weights.arena
    assert arena.dtype == torch.uint8 and arena.numel() == size < sum(w.length for w in moved) + ALIGN * len(moved)
    want = _initializers(art)
    for w in moved:
        assert offsets[w.name] % ALIGN == 0
        got = arena[offsets[w.name]:offsets[w.name] + w.length].numpy().view(np.dtype(w.dtype)).reshape(w.shape)
        np.testing.assert_array_equal(got, want[w.name])
    assert len(contexts) == 2
    for ctx in contexts:  # every weight bound once per context, at its place in the arena; no shape set (static)
        bound = [(n, p) for kind, n, p in ctx.calls if kind == "address" and n in offsets]
        assert bound == [(w.name, arena.data_ptr() + offsets[w.name]) for w in moved]
        assert not [c for c in ctx.calls if c[0] == "shape"]
    assert r.load_report["weight_bytes"] == sum(w.length for w in moved) and r.load_report["weights_s"] > 0
    # A call with the stage's own feed runs; the weights stay where they were bound, untouched by it.
    feed = {n: torch.from_numpy(v) for n, v in block_feed(r.stage, 2, 7, 9, 0).items()}
    before = [list(c.calls) for c in contexts]
    r._check_feed(feed)
    out = r._run(feed, types.SimpleNamespace(cuda_stream=0))
    assert sum(c.executed for c in contexts) == 1 and out["hidden_out"].shape == (2, 7, 64)
    new = [c for ctx, old in zip(contexts, before) for c in ctx.calls[len(old):]]
    assert new and not [c for c in new if c[1] in offsets]  # nothing about a weight per call
    assert r.last_copied["inputs"] == sum(v.numel() * v.element_size() for n, v in feed.items()
                                          if n not in r._cache_inputs)
    r._deactivate()
    assert r._weights is None


def test_a_weight_of_dynamic_engine_shape_gets_its_shape_once_per_context(art, monkeypatch):
    pytest.importorskip("torch")
    moved = _moved(art)
    r, contexts = _runner(art, _sidecar(art, moved), monkeypatch)
    w = moved[0]
    _activate(r, _Engine(r.stage, moved, shapes={w.name: (-1, w.shape[1])}), monkeypatch)
    for ctx in contexts:
        assert [c for c in ctx.calls if c[0] == "shape"] == [("shape", w.name, w.shape)]


@pytest.mark.parametrize("change", ["missing", "shape", "dtype"])
def test_an_engine_that_disagrees_with_its_weight_inputs_is_refused(art, monkeypatch, change):
    pytest.importorskip("torch")
    moved = _moved(art)
    w = moved[1]
    engine = _Engine(art.layout.stage(STAGE), moved, drop=[w.name] if change == "missing" else (),
                     shapes={w.name: (w.shape[0], w.shape[1] + 1)} if change == "shape" else None,
                     dtypes={w.name: "HALF"} if change == "dtype" else None)
    r, _ = _runner(art, _sidecar(art, moved), monkeypatch)
    problem = {"missing": "is not one of its inputs",
               "shape": rf"has shape \[{w.shape[0]}, {w.shape[1] + 1}\] in the engine, \[{w.shape[0]}, {w.shape[1]}\]"
                        " in the sidecar",
               "dtype": "is HALF in the engine, float32 in the sidecar"}[change]
    with pytest.raises(ArtifactError, match=rf"^stage 'llm_2': engine engines/x/llm_2\.plan does not match its "
                                            rf"sidecar's weight inputs: weight '{w.name}' {problem}; rebuild with: "
                                            r"csprt build ART --weights-as-inputs$"):
        _activate(r, engine, monkeypatch)


@pytest.mark.parametrize("change, match", [
    ({"weights": "mapped"}, r"weights 'mapped', expected 'engine' or 'inputs'; rebuild with: csprt build ART$"),
    ({"pieces": ["engines/x/llm_2.p0.json"]}, r"an engine built in pieces never takes its weights as inputs"),
    ({"weight_inputs": [{"name": "w"}]}, r"its weight_inputs are unreadable \(KeyError"),
    ({"graph_files": {"graphs/llm_2.onnx": "0"}}, r"weight '[^']+' is read from graphs/llm_2\.onnx\.data, which is "
                                                  r"not one of the graph files the engine was built from "
                                                  r"\(graphs/llm_2\.onnx\)"),
    ({"weight_input_bytes": 1}, r"weight_input_bytes 1 but its \d+ weight_inputs hold \d+ bytes"),
], ids=["mode", "pieces", "unreadable", "outside-graph-files", "total"])
def test_a_sidecar_whose_weight_inputs_do_not_hold_is_refused(art, change, match):
    assert weights_of({"plan": "p"}, STAGE) == [] and weights_of({"weights": "engine"}, STAGE) == []
    where = r"^stage 'llm_2': engine sidecar of engines/x/llm_2\.plan: "
    with pytest.raises(ArtifactError, match=where + match) as err:
        weights_of(_sidecar(art, _moved(art), **change), STAGE)
    assert "\n" not in str(err.value)


# --- Triton ---------------------------------------------------------------------------------------------------------

def test_triton_tensorrt_backend_refuses_a_weight_input_engine(art, tmp_path):
    from engines.engine_check import engine_paths
    from engines.triton_repo import write_triton_repo
    from tests.engines.test_triton_repo import fake_engines

    eng = fake_engines(art.dir, tmp_path / "art", "tensorrt")
    sidecar_path = eng / engine_paths("tensorrt", STAGE)[1]
    sidecar = json.loads(sidecar_path.read_text())
    sidecar_path.write_text(json.dumps({**sidecar, **_sidecar(art, _moved(art), plan=sidecar["plan"])}))
    with pytest.raises(ArtifactError, match=r"^stage 'llm_2': its engine takes its weights as inputs \(built with "
                                            r"--weights-as-inputs\), which Triton's TensorRT backend cannot serve "
                                            r".*; rebuild that stage with its weights inside: csprt build \S+ "
                                            r"--stages llm_2$"):
        write_triton_repo(eng, tmp_path / "repo", backend="tensorrt")
    assert not (tmp_path / "repo").exists()
    write_triton_repo(eng, tmp_path / "repo", backend="onnxruntime", device="cpu")  # the graphs still serve
    assert (tmp_path / "repo" / "csprt_llm_2" / "1" / "model.onnx").is_file()


# --- GPU: a weight-free engine built for this GPU runs like ONNX Runtime --------------------------------------------

@pytest.mark.gpu
@pytest.mark.trt
def test_weight_free_block_engine_matches_onnxruntime(art, tmp_path):
    """`csprt build --stages llm_2 --weights-as-inputs` on the block with external data, run by TrtRunner (weights
    uploaded from the .data and bound) against ONNX Runtime on the graph; its load report counts those weights."""
    import torch

    from engines.build import targetable
    from engines.engine_check import check_engine
    from engines.ort_runner import OrtRunner
    from engines.trt import load_trt
    from tests.cli_io import call
    from tests.graphs.test_onnx_split import block_feed

    trt, flavor, _ = load_trt()
    major, minor = torch.cuda.get_device_capability()
    if flavor == "tensorrt-rtx" and f"SM{major}{minor}" not in targetable(trt):
        pytest.skip(f"TensorRT-RTX {trt.__version__} cannot target SM{major}{minor}")
    copy = tmp_path / "art"
    shutil.copytree(art.dir, copy)
    target = ["--compute-capability", "current"] if flavor == "tensorrt-rtx" else []
    rc, _, err = call(["build", str(copy), "--stages", STAGE, "--weights-as-inputs", *target])
    assert rc == 0, err
    _, sidecar = check_engine(copy, STAGE)
    moved = weights_of(sidecar, STAGE)
    assert [w.name for w in moved] == [w.name for w in _moved(art)]
    artifact = load_artifact(copy)
    spec = artifact.layout.stage(STAGE)
    feed = block_feed(spec, 2, 7, 9, 0)
    with OrtRunner(spec, artifact.layout.dims, artifact.graph_path(STAGE)) as ort, TrtRunner(spec, copy) as rt:
        want, got = ort.infer(feed), rt.infer(feed)
        report = dict(rt.load_report)
    for name, ref in want.items():
        np.testing.assert_allclose(got[name].astype(np.float64), ref.astype(np.float64), atol=2e-2, rtol=2e-2,
                                   err_msg=name)  # test_trt_runner's TensorRT-vs-ONNX Runtime budget
    assert report["weight_bytes"] == sidecar["weight_input_bytes"] and report["plan_bytes"] == sidecar["plan_bytes"]
    assert report["deserialize_s"] > 0 and report["weights_s"] > 0
