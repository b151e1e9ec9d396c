"""A block stage built as several engines: choosing the split, refusing one that cannot fit, the runtime's bindings
between pieces (fake TensorRT contexts, CPU), and (trt) a tiny artifact built under a budget below its largest
block's estimate."""

from __future__ import annotations

import json
import shutil
import types

import pytest

from engines import build_memory as build_mod
from engines.build_memory import GIB
from engines.split_build import choose_groups, interface_specs, piece_profiles, plan_split
from graphs.errors import ToolchainError
from graphs.manifest import MANIFEST_NAME, load_artifact

STAGE = "llm_2"  # the tiny csp artifact's two-layer block


def test_choose_groups_takes_the_fewest_pieces_then_the_lowest_peak(monkeypatch):
    monkeypatch.setattr(build_mod, "BUILD_BASE", 0)
    monkeypatch.setattr(build_mod, "RATIO_MAPPED", 1.0)
    w = [(0, 10), (0, 10), (0, 10), (0, 30)]  # (inline, external) bytes per layer segment
    assert choose_groups(w, 59, None) == [(0, 3), (3, 4)]      # 2 pieces: 30 | 30
    assert choose_groups(w, 100, None) == [(0, 4)]             # fits as one
    assert choose_groups(w, 100, 2) == [(0, 2), (2, 4)]        # at most 2 layers: 20 | 40
    assert choose_groups(w, 29, None) is None                  # the last layer alone is over


def test_refusal_when_one_layer_cannot_fit_names_the_budget_that_would(export_tiny, monkeypatch):
    monkeypatch.setattr(build_mod, "BUILD_BASE", 0)
    artifact = load_artifact(export_tiny("csp", "both"))
    with pytest.raises(ToolchainError) as err:
        plan_split(artifact, STAGE, budget=1000)
    msg = str(err.value)
    assert f"stage '{STAGE}' cannot be built within --max-build-memory" in msg and "even one decoder layer" in msg
    assert "layer 3 alone needs about" in msg and "build with --max-build-memory 0.1 or more" in msg
    assert "\n" not in msg


def test_a_budget_over_the_whole_block_keeps_one_engine_unless_layers_are_capped(export_tiny):
    artifact = load_artifact(export_tiny("csp", "both"))
    assert plan_split(artifact, STAGE, budget=100 * GIB) is None
    plan = plan_split(artifact, STAGE, budget=100 * GIB, max_layers=1)
    assert [p.layers for p in plan.pieces] == [(2, 3), (3, 4)] and plan.reason == "--max-layers-per-engine 1"


# --- the runtime: a split stage's pieces on fake TensorRT contexts -------------------------------------------------

class _FakePieceContext:
    """What TrtRunner uses of an IExecutionContext; output shapes from ONNX shape inference at the bound shapes."""

    def __init__(self, plan, piece, log):
        self.plan, self.piece, self.log = plan, piece, log
        self.active_optimization_profile, self.addresses, self.shapes = 0, {}, {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def get_tensor_shape(self, name):
        from graphs.onnx_split import interface_shapes
        return interface_shapes(self.plan.model, self.log["stage_shapes"], [name])[name]

    def execute_async_v3(self, handle):
        self.log["ran"].append(self.piece.index)
        return True


def _piece_sidecars(plan, profiles):
    return [{"piece": p.index, "stage": STAGE, "inputs": list(p.inputs), "outputs": list(p.outputs),
             "interface_inputs": list(p.interface_in), "interface_outputs": interface_specs(plan, p, profiles),
             "profiles": [{n: s.to_dict() for n, s in prof.items()} for prof in piece_profiles(plan, p, profiles)],
             "plan": f"engines/x/{STAGE}.p{p.index}.plan"} for p in plan.pieces]


def test_split_stage_runs_its_pieces_in_order_through_shared_buffers(export_tiny, monkeypatch):
    torch = pytest.importorskip("torch")
    import contextlib

    from engines.gpu_plan import GraphCache
    from engines.profiles import stage_profiles
    from engines.split_runtime import piece_buffer_plan, piece_bindings
    from engines.trt_runner import TrtRunner, buffer_plan
    from graphs.runner import BaseRunner

    artifact = load_artifact(export_tiny("csp", "both"))
    stage, dims = artifact.layout.stage(STAGE), artifact.layout.dims
    plan = plan_split(artifact, STAGE, budget=100 * GIB, max_layers=1)
    profiles = stage_profiles(stage, dims)
    sidecars = _piece_sidecars(plan, profiles)
    # The pure plans: one buffer per interface tensor at its largest shape; the cache bound per call.
    bufs = piece_buffer_plan(buffer_plan(stage, dims), sidecars)
    iface = [n for n, b in bufs.items() if b.io == "interface"]
    assert iface == list(plan.pieces[0].interface_out) and all(bufs[n].nbytes > 0 for n in iface)
    assert bufs[iface[0]].max_shape == (dims["batch"].max, dims[f"rows_{STAGE}"].max, stage.input("hidden").shape[2])
    binds = piece_bindings(sidecars, {i for i, _ in stage.cache})
    assert binds[0]["past_key_2"] == "cache" and binds[1]["past_key_3"] == "cache" and "past_key_3" not in binds[0]

    log = {"ran": [], "stage_shapes": {}}
    r = object.__new__(TrtRunner)
    BaseRunner.__init__(r, stage, dims)
    r.device, r.graph_mode, r.graphs, r._staged, r.last_copied = "cpu", "off", GraphCache(), {}, {}
    r.pieces, r.buffers_plan, r.art_dir = sidecars, bufs, artifact.dir
    r._cache_inputs = {i for i, _ in stage.cache}
    def engine(path):  # what _activate_pieces reads of an ICudaEngine: its tensor names
        k = int(str(path).rsplit(".p", 2)[1].split(".")[0])  # engines/x/llm_2.p<k>.plan
        names = list(plan.pieces[k].inputs) + list(plan.pieces[k].outputs)
        return types.SimpleNamespace(k=k, num_io_tensors=len(names), get_tensor_name=names.__getitem__)

    monkeypatch.setattr(r, "_deserialize", engine)
    contexts = {}

    def context(engine):
        k = engine.k
        contexts[k] = _FakePieceContext(plan, plan.pieces[k], log)
        return contexts[k]

    monkeypatch.setattr(r, "_create_context", context)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    r._activate_pieces(torch, types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None))
    r.is_active = True
    batch, rows, cap = 2, 5, 9
    h = stage.input("hidden").shape[2]
    cache = {i: torch.zeros((batch, stage.input(i).shape[1], cap, stage.input(i).shape[3])) for i, _ in stage.cache}
    feed = {"hidden": torch.zeros((batch, rows, h)), "positions": torch.arange(rows).repeat(batch, 1),
            "row_lens": torch.tensor([rows] * batch), "past_len": torch.tensor([0] * batch), **cache}
    log["stage_shapes"] = {n: tuple(v.shape) for n, v in feed.items()}
    r._check_feed(feed)
    out = r._run_pieces(feed, types.SimpleNamespace(cuda_stream=0))
    assert log["ran"] == [0, 1]  # in order, each once
    c0, c1 = contexts[0], contexts[1]
    for name in iface:  # piece 0 writes each interface tensor where piece 1 reads it
        assert c0.addresses[name] == c1.addresses[name] == r._buffers[name].data_ptr()
        assert c1.shapes[name] == tuple(c0.get_tensor_shape(name))
    for ctx, piece in ((c0, plan.pieces[0]), (c1, plan.pieces[1])):  # each piece: its share of the caller's cache
        bound = {n for n in piece.inputs if n in cache}
        assert {n: ctx.addresses[n] for n in bound} == {n: cache[n].data_ptr() for n in bound}
    assert r.last_copied["cache"] == 0  # the cache is bound in place, never copied
    assert set(out) == {t.name for t in stage.outputs}
    assert out["hidden_out"].shape == (batch, rows, h) and out["key_3"].data_ptr() == r._buffers["key_3"].data_ptr()


# --- TensorRT-RTX builds (CPU) ---------------------------------------------------------------------------------------

@pytest.mark.trt
def test_budget_below_the_largest_block_builds_it_in_pieces(export_tiny, tmp_path, monkeypatch):
    from engines.build import build_engines, check_engine, estimate_stage_memory
    from engines.engine_check import check_pieces
    from tests.engines.test_build_memory import externalize

    monkeypatch.setattr(build_mod, "BUILD_BASE", 0)  # tiny weights: the budget is about them alone
    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    externalize(art, [STAGE])  # the pieces read the block's .data through the mapped-weights path
    before = json.loads((art / MANIFEST_NAME).read_text(encoding="utf-8"))
    artifact = load_artifact(art)
    whole = estimate_stage_memory(artifact, STAGE).peak_bytes
    plan = plan_split(artifact, STAGE, budget=whole - 1, whole=whole)
    budget = (max(m.peak_bytes for m in plan.memory) + whole) / 2
    lines = []
    report = build_engines(art, stages=[STAGE], max_build_memory_gb=budget / GIB, progress=lines.append,
                           flavor="tensorrt-rtx", compute_capabilities=["SM89"])
    assert report["stages"][STAGE]["engines"] == 2 and report["stages"][STAGE]["status"] == "built"
    told = [ln for ln in lines if ln.startswith(f"build memory: {STAGE}:")]  # said before it built
    assert len(told) == 1 and "2 engines: layers 2-2" in told[0] and lines.index(told[0]) < min(
        i for i, ln in enumerate(lines) if "piece 1/2" in ln)
    after = json.loads((art / MANIFEST_NAME).read_text(encoding="utf-8"))
    strip = lambda m: [{k: v for k, v in e.items() if k != "engines"} for e in m["stages"]]  # noqa: E731
    assert strip(after) == strip(before)  # graphs and layout unchanged: the split is in the sidecars
    plan_path, sidecar = check_engine(art, STAGE, "tensorrt-rtx", report["trt_version"])
    pieces = check_pieces(art, sidecar, "csprt build")
    assert [p["layers"] for _, p in pieces] == [[2, 3], [3, 4]] and plan_path == pieces[0][0]
    assert pieces[1][1]["interface_inputs"] == list(pieces[0][1]["interface_outputs"])
    assert all(p["build_memory"]["estimated_peak_bytes"] <= budget for _, p in pieces)
    again = build_engines(art, stages=[STAGE], max_build_memory_gb=budget / GIB, flavor="tensorrt-rtx",
                          compute_capabilities=["SM89"])
    assert again["stages"][STAGE]["status"] == "cached"
    pieces[1][0].write_bytes(b"changed")
    with pytest.raises(Exception, match=r"piece 2 of 2 of stage 'llm_2'\) changed since it was built"):
        check_engine(art, STAGE, "tensorrt-rtx", report["trt_version"])


@pytest.mark.trt
def test_whole_stages_and_pieces_build_through_one_build_step(export_tiny, tmp_path, monkeypatch):
    """Every engine, a whole stage's or a block piece's, is built by `engines.build.build_plan`, and its sidecar
    records what that step measured."""
    from engines import build as build_engine_mod
    from engines.build import build_engines
    from engines.split_build import piece_paths

    calls = []
    real = build_engine_mod.build_plan

    def spy(trt, prepare, what, path, timing_cache=None):
        built = real(trt, prepare, what, path, timing_cache)
        calls.append((what, path.name, built))
        return built

    monkeypatch.setattr(build_engine_mod, "build_plan", spy)
    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    build_engines(art, stages=["entry_0", STAGE], max_layers_per_engine=1, flavor="tensorrt-rtx",
                  compute_capabilities=["SM89"])
    assert [(w.split(" piece ")[-1], p) for w, p, _ in calls] == [
        ("stage 'entry_0' (graphs/entry_0.onnx)", "entry_0.plan"),
        ("1/2 (layers 2-2)", f"{STAGE}.p0.plan"), ("2/2 (layers 3-3)", f"{STAGE}.p1.plan")]
    sidecars = [json.loads((art / rel).read_text(encoding="utf-8")) for rel in
                ("engines/tensorrt-rtx/entry_0.json", piece_paths("tensorrt-rtx", STAGE, 0)[1],
                 piece_paths("tensorrt-rtx", STAGE, 1)[1])]
    for side, (_, _, built) in zip(sidecars, calls):
        assert (side["plan_sha256"], side["plan_bytes"]) == (built.sha256, built.nbytes) and built.nbytes > 0
        assert side["build_seconds"] == round(built.seconds, 3) and side["warnings"] == built.warnings
        assert side["build_memory"]["measured_peak_bytes"] == built.peak and built.peak > 0


@pytest.mark.trt
def test_cli_refuses_a_block_whose_one_layer_is_over_the_budget(export_tiny, tmp_path, capsys, monkeypatch):
    from tools.cli import main

    monkeypatch.setattr(build_mod, "BUILD_BASE", 0)
    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    assert main(["build", str(art), "--stages", STAGE, "--max-build-memory", "0.00001",
                 "--flavor", "tensorrt-rtx"]) == 2
    err = capsys.readouterr().err
    assert f"stage '{STAGE}' needs about" in err
    assert "to build even one decoder layer per engine (layer 3 alone: " in err
    assert "--max-build-memory 0.1 once that much is free" in err and "--stages" not in err  # nothing fits
    assert "Traceback" not in err and not (art / "engines").exists()
    assert main(["build", str(art), "--max-layers-per-engine", "0", "--flavor", "tensorrt-rtx"]) == 2
    assert "--max-layers-per-engine 0: expected a whole number of decoder layers, 1 or more" in capsys.readouterr().err


@pytest.mark.trt
def test_refusal_names_a_block_over_even_one_layer_per_engine_and_only_stages_that_fit(export_tiny, monkeypatch):
    """A block whose one-layer engines are over the budget, beside a whole stage also over it: the one line names
    the block with its largest one-layer estimate (the largest need of the build) and lists as fitting only the
    stages that do, never the block."""
    from engines.build import build_engines, estimate_stage_memory
    from engines.build_memory import gib
    from engines.split_build import splittable

    monkeypatch.setattr(build_mod, "BUILD_BASE", 0)  # tiny weights: the budget is about them alone
    art = export_tiny("csp", "both")
    artifact = load_artifact(art)
    layer = max(m.peak_bytes for m in plan_split(artifact, STAGE, budget=100 * GIB, max_layers=1).memory)
    need = {s.name: estimate_stage_memory(artifact, s.name).peak_bytes for s in artifact.layout.stages
            if not splittable(s)}
    smaller = sorted((n for n in need if need[n] < layer), key=need.get)
    assert len(smaller) >= 3
    budget = (need[smaller[-1]] + need[smaller[-2]]) / 2  # the largest of them is over, the others fit
    names = [s.name for s in artifact.layout.stages if s.name in smaller or s.name == STAGE]
    with pytest.raises(ToolchainError) as info:
        build_engines(art, stages=names, max_build_memory_gb=budget / GIB, flavor="tensorrt-rtx",
                      compute_capabilities=["SM86"])
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"stage '{STAGE}' needs about {gib(layer)} to build even one decoder layer per engine "
                          f"(layer 3 alone: ") and f"2 of {len(names)} stages to build are over" in msg
    assert "--max-build-memory 0.1 once that much is free" in msg  # fits the block's one-layer engines too
    assert msg.rsplit("--stages ", 1)[1].split(",") == [n for n in names if n in smaller[:-1]]


@pytest.mark.trt
def test_cli_refusal_on_a_budget_nothing_fits(export_tiny, tmp_path, capsys):
    """The issue's repro: every stage over 0.1 GiB; the block is named with its one-layer estimate and no stage is
    offered as fitting."""
    from tools.cli import main

    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    assert main(["build", str(art), "--flavor", "tensorrt-rtx", "--compute-capability", "SM86",
                 "--max-build-memory", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and not (art / "engines").exists()
    stages = len(load_artifact(art).layout.stages)
    assert f"{stages} of {stages} stages to build are over" in err and "--stages" not in err
    assert f"'{STAGE}' needs about 0.5 GiB even one decoder layer per engine (layer 3 alone)" in err
    assert "more than the --max-build-memory budget of 0.1 GiB; build it on a host with 0.6 GiB free" in err
