"""engines.trt_runner: the buffer plan, engine dims, profile selection and feed checks on CPU; execution, the
Pipeline on TensorRT and CUDA-graph decode on a GPU (`gpu`, `trt`)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from engines.profiles import InputShapes
from engines.trt_runner import BufferSpec, buffer_plan, checkable, engine_dims, eval_dim
from exporter.tiny import tiny_shape
from graphs.errors import InputError
from graphs.schedule import resolve
from graphs.stages import DimRange, LayoutOptions, build_layout


def _layout(schedule="csp", mode="both"):
    shape = tiny_shape()
    return build_layout(resolve(schedule, shape.llm.layers, shape.num_image_tokens), shape, LayoutOptions(mode=mode),
                        seg_token_id=0, stop_token_ids=(1,))


@pytest.mark.parametrize("dim, want", [(7, 7), ("prefix_len", 3), ("prefix_len + 16 + suffix_len", 24),
                                       ("past_llm_0 + step_len", 11), ("2 * prefix_len", 6)])
def test_eval_dim(dim, want):
    assert eval_dim(dim, {"prefix_len": 3, "suffix_len": 5, "past_llm_0": 10, "step_len": 1}) == want


@pytest.mark.parametrize("dim", ["prefix_len - 1", "max(prefix_len, 2)", "unknown + 1", "prefix_len +"])
def test_eval_dim_rejects_what_has_no_max(dim):
    with pytest.raises(AssertionError, match="csprt internal error"):
        eval_dim(dim, {"prefix_len": 3})


def test_buffer_plan_sizes_every_tensor_at_the_maxima():
    layout = _layout()
    dims = layout.dims
    h, kv, hd = 64, 2, 16  # tiny LLM: hidden 64, 2 kv heads, head_dim 64 / 4 heads
    plan = buffer_plan(layout.stage("llm_0"), dims)
    rows, cache, b = dims["rows_llm_0"].max, dims["cache_llm_0"].max, dims["batch"].max
    assert plan["positions"] == BufferSpec("positions", "input", "int64", (b, rows), 8 * b * rows)
    assert plan["key_0"] == BufferSpec("key_0", "output", "float32", (b, kv, rows, hd), 4 * b * kv * rows * hd)
    assert plan["hidden_out"].max_shape == (b, rows, h) and plan["row_lens"].max_shape == (b,)
    assert plan["past_key_0"].max_shape == (b, kv, cache, hd)  # sized, but never allocated: bound in place
    assert [b.io for b in plan.values()] == sorted(b.io for b in plan.values())  # inputs first


def test_buffer_plan_follows_narrowed_engine_dims():
    layout = _layout()
    sidecar = {"dims": {"num_seg": {"min": 1, "opt": 1, "max": 2}}}
    dims = engine_dims(layout.dims, sidecar)
    assert dims["num_seg"] == DimRange(1, 1, 2) and dims["prefix_len"] == layout.dims["prefix_len"]
    plan = buffer_plan(layout.stage("sam_decoder"), dims)
    assert plan["masks"].max_shape == (2, 128, 128) and plan["masks"].nbytes == 2 * 128 * 128 * 4


def test_torch_tensors_are_checked_through_a_zero_copy_stand_in():
    from graphs.runner import bind_dims

    torch = pytest.importorskip("torch")
    t = torch.zeros((3, 64), dtype=torch.float32)
    c = checkable(t)
    assert isinstance(c, np.ndarray) and c.shape == (3, 64) and c.dtype == np.float32 and c.strides == (0, 0)
    arr = np.zeros(3, np.float32)
    assert checkable(arr) is arr
    layout = _layout()
    assert bind_dims(layout.stage("seg_head"), {"seg_hidden": c}, layout.dims) == {"num_seg": 3}
    with pytest.raises(InputError, match=r"^stage 'seg_head' input 'seg_hidden': dtype is float16, expected float32$"):
        bind_dims(layout.stage("seg_head"), {"seg_hidden": checkable(t.half())}, layout.dims)
    with pytest.raises(InputError, match=r"^x: dtype is torch\.bfloat16, expected one of torch\.float32, "
                                         r"torch\.float16, torch\.int64$"):
        checkable(t.bfloat16(), "x")


@pytest.mark.trt
def test_request_outside_the_engine_profile_is_caught_before_execution(export_tiny, tmp_path, monkeypatch):
    from engines.build import build_engines
    from engines.trt_runner import TrtRunner

    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    build_engines(art, stages="seg_head", shapes=["num_seg=1:1:2"])
    stage = _layout().stage("seg_head")
    runner = TrtRunner(stage, art)  # checks the engine against graph and TensorRT; loads nothing yet
    assert runner.dims["num_seg"] == DimRange(1, 1, 2) and runner.buffers_plan["seg_hidden"].max_shape == (2, 64)
    ran = []
    monkeypatch.setattr(runner, "_activate", lambda: None)  # no GPU here: stop short of deserializing
    monkeypatch.setattr(runner, "_infer", lambda feed: ran.append(feed))
    outside = (r"^stage 'seg_head' input 'seg_hidden': dim 'num_seg' is 3, outside the exported range \[1, 2\]; "
               r"re-export with a larger --max-seg$")
    with runner:
        with pytest.raises(InputError, match=outside):
            runner.infer({"seg_hidden": np.zeros((3, 64), np.float32)})
        torch = pytest.importorskip("torch")
        with pytest.raises(InputError, match=outside):  # a device tensor from the previous stage: same check
            runner.infer({"seg_hidden": torch.zeros((3, 64))})
        with pytest.raises(InputError, match=outside):  # the Pipeline's device path
            runner.enqueue({"seg_hidden": torch.zeros((3, 64))}, stream=None)
    assert ran == []
    assert runner.graph_mode == "off"  # CUDA graphs are for decode steps only


@pytest.mark.trt
def test_activation_without_a_gpu_says_so(export_tiny, tmp_path):
    from engines.build import build_engines
    from engines.trt_runner import TrtRunner
    from graphs.errors import ToolchainError

    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    build_engines(art, stages="seg_head")
    with pytest.raises(ToolchainError, match=r"^stage 'seg_head': running a TensorRT engine needs a CUDA GPU"):
        with TrtRunner(_layout().stage("seg_head"), art):
            pass


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.parametrize("stage", ["seg_head", "sam_decoder", "sam_encoder", "vision", "llm_0", "decode"])
def test_engine_matches_onnxruntime(export_tiny, tmp_path, stage):
    """TensorRT vs ONNX Runtime on one stage, where this GPU is one TensorRT-RTX can target."""
    import torch

    from engines.build import build_engines, targetable
    from engines.ort_runner import OrtRunner
    from engines.trt import load_trt
    from engines.trt_runner import TrtRunner
    from graphs.manifest import load_artifact

    trt, flavor, _ = load_trt()
    major, minor = torch.cuda.get_device_capability()
    if flavor == "tensorrt-rtx" and f"SM{major}{minor}" not in targetable(trt):
        pytest.skip(f"TensorRT-RTX {trt.__version__} cannot target SM{major}{minor}")
    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    build_engines(art, stages=stage, compute_capabilities=["current"] if flavor == "tensorrt-rtx" else None)
    artifact = load_artifact(art)
    spec = artifact.layout.stage(stage)
    rng = np.random.default_rng(0)
    feed = {}
    for t in spec.inputs:
        shape = tuple(d if isinstance(d, int) else artifact.layout.dims[d].opt for d in t.shape)
        feed[t.name] = (rng.integers(0, 16, shape) if t.dtype == "int64" else rng.standard_normal(shape)).astype(t.dtype)
    with OrtRunner(spec, artifact.layout.dims, artifact.graph_path(stage)) as ort, TrtRunner(spec, art) as rt:
        want, got = ort.infer(feed), rt.infer(feed)
    for name, ref in want.items():
        assert got[name].shape == ref.shape, name
        np.testing.assert_allclose(got[name].astype(np.float64), ref.astype(np.float64), atol=2e-2, rtol=2e-2,
                                   err_msg=name)


# --- GPU: the Pipeline on TensorRT, and CUDA-graph decode -----------------------------------------------------

@pytest.fixture(scope="module")
def gpu_art(export_tiny, tmp_path_factory):
    """The tiny csp artifact (both modes) with every stage engine built for this GPU; built once per module."""
    import torch

    from engines.build import build_engines, targetable
    from engines.trt import load_trt

    trt, flavor, _ = load_trt()
    major, minor = torch.cuda.get_device_capability()
    if flavor == "tensorrt-rtx" and f"SM{major}{minor}" not in targetable(trt):
        pytest.skip(f"TensorRT-RTX {trt.__version__} cannot target SM{major}{minor}")
    art = tmp_path_factory.mktemp("gpu_art") / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    build_engines(art, compute_capabilities=["current"] if flavor == "tensorrt-rtx" else None)
    return art


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.parametrize("mode", ["single-pass", "generate"])
def test_pipeline_matches_onnxruntime(gpu_art, mode):
    """The whole chain on TensorRT (device-resident, SAM encoder on the side stream) against ONNX Runtime."""
    import torch

    from engines.compare import mask_iou
    from engines.session import ArtifactSession
    from exporter.export import sample_image
    from exporter.tiny import SEG_QUERY
    from graphs.manifest import load_artifact
    from tools.validate import tolerances

    image = sample_image()
    with ArtifactSession(gpu_art) as ort:
        want = ort.segment(image, SEG_QUERY, mode=mode, max_new_tokens=8)
    with ArtifactSession(gpu_art, backend="tensorrt") as rt:
        got = rt.segment(image, SEG_QUERY, mode=mode, max_new_tokens=8)
        assert rt.pipeline.chain.plan.stream["sam_encoder"] == "side"
        kept = {k: v for k, v in got.pipeline.tensors.items() if isinstance(v, torch.Tensor)}
        assert "vision.image_hidden" in kept and all(v.is_cuda for v in kept.values())  # stayed on the GPU
        again = rt.segment(image, SEG_QUERY, mode=mode, max_new_tokens=8)  # engines, buffers (and graphs) reused
    tol = tolerances(load_artifact(gpu_art), "tensorrt")["end_to_end"]
    assert got.generated_ids == want.generated_ids == again.generated_ids and got.answer == want.answer
    assert got.masks.shape == want.masks.shape and got.masks.shape[0] == 1
    assert mask_iou(got.masks.any(0), want.masks.any(0)) >= tol["mask_iou_min"]
    assert float(np.abs(got.mask_logits - want.mask_logits).max()) <= tol["mask_logits_atol"]
    np.testing.assert_allclose(again.mask_logits, got.mask_logits, atol=tol["mask_logits_atol"])
    ran = {s.name for s in load_artifact(gpu_art).layout.sequence(mode)}
    assert ran - {"decode"} <= set(got.timings_ms) and all(v >= 0 for v in got.timings_ms.values())


@pytest.mark.gpu
@pytest.mark.trt
def test_built_block_engine_reports_prefill_and_decode_profiles(gpu_art):
    """The plan itself (deserialized: a GPU) has the sidecar's two profiles; the runner holds one context each and
    runs a one-row call on the decode profile's."""
    import torch

    from engines.profiles import call_profile
    from engines.trt_runner import TrtRunner
    from graphs.manifest import load_artifact

    layout = load_artifact(gpu_art).layout
    stage = layout.stage("llm_0")
    with TrtRunner(stage, gpu_art) as r:
        engine = r._engine
        assert engine.num_optimization_profiles == len(r.profiles) == len(r._contexts) == 2
        for i, profile in enumerate(r.profiles):
            for name, shapes in profile.items():
                got = tuple(tuple(s) for s in engine.get_tensor_profile_shape(name, i))
                assert got == (shapes.min, shapes.opt, shapes.max), (i, name)
        assert engine.get_tensor_profile_shape("hidden", 1)[2][1] == 1  # decode: one row
        b, kv, hd = 1, stage.input("past_key_0").shape[1], stage.input("past_key_0").shape[3]
        feed = {"hidden": torch.zeros((b, 1, stage.input("hidden").shape[2]), device="cuda"),
                "positions": torch.full((b, 1), 40, device="cuda"), "row_lens": torch.ones(b, dtype=torch.int64,
                                                                                          device="cuda"),
                "past_len": torch.full((b,), 39, device="cuda"),
                **{i: torch.zeros((b, kv, 48, hd), device="cuda") for i, _ in stage.cache}}
        r.infer(feed)
        assert r._context is r._contexts[1] == r._contexts[call_profile(r.profiles, {n: tuple(v.shape)
                                                                                     for n, v in feed.items()})]


@pytest.mark.gpu
@pytest.mark.trt
def test_cuda_graph_decode_matches_plain_decode(gpu_art):
    """Six one-row decode calls of a block over its static cache (bound at its address; past_len advancing), three
    times over (manual graphs: plain, then captured, then replayed), against the same engine without graphs."""
    import torch

    from engines.session import ArtifactSession
    from engines.trt_runner import TrtRunner
    from exporter.export import sample_image
    from exporter.tiny import SEG_QUERY
    from graphs.manifest import load_artifact

    layout = load_artifact(gpu_art).layout
    with ArtifactSession(gpu_art) as ort:
        first = ort.segment(sample_image(), SEG_QUERY, mode="generate", max_new_tokens=8, record=True)
    step = layout.loop.steps[1]  # the first block's decode step
    feed0 = {k: torch.from_numpy(v).cuda() for k, v in first.pipeline.feeds[step.name].items()}
    valid = int(feed0["past_len"][0])

    def steps(runner, n=6):
        outs = []
        for i in range(n):
            feed = {**feed0, "past_len": torch.tensor([valid + i], device="cuda")}
            outs.append(runner.infer(feed))
        return outs

    with TrtRunner(layout.stage(step.graph), gpu_art, cuda_graphs=False) as plain:
        assert plain.graph_mode == "off"
        want = steps(plain)
    with TrtRunner(layout.stage(step.graph), gpu_art) as graphed:
        assert graphed.graph_mode in ("builtin", "manual")
        runs = [steps(graphed) for _ in range(3)]
        if graphed.graph_mode == "manual":
            assert not graphed.graphs.disabled, f"capture fell back to plain runs: {graphed.graphs.disabled}"
            assert graphed.graphs.replays == 3 * 6 - 2 and len(graphed.graphs.graphs) == 1
            assert graphed.last_copied["cache"] == 0
    for run in runs:
        for got_step, want_step in zip(run, want):
            for name, ref in want_step.items():
                np.testing.assert_allclose(got_step[name], ref, rtol=1e-5, atol=1e-5, err_msg=name)


# --- a block's engine on a fake TensorRT context (CPU): cache bound in place, decode steps under CUDA graphs ---

class _FakeContext:
    """What TrtRunner._run uses of an IExecutionContext; output shapes from the spec at the bound dims."""

    def __init__(self, runner, profile=0):
        self.runner, self.profile = runner, profile
        self.addresses, self.executed, self.shapes = {}, 0, []

    def set_optimization_profile_async(self, index, handle):
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        self.shapes.append((name, tuple(shape)))

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def get_tensor_shape(self, name):
        return tuple(eval_dim(d, self.runner.last_dims) for d in self.runner.stage.output(name).shape)

    def execute_async_v3(self, handle):
        self.executed += 1
        return True


def _fake_block_runner(monkeypatch, capture_ok=True, profiles=2):
    """A TrtRunner of the csp `both` artifact's llm_0 on fake contexts: `profiles` 2 (prefill + decode, as built
    now) or 1 (an engine built before the decode profile)."""
    import contextlib
    import math
    import types

    import torch

    from engines.gpu_plan import GraphCache
    from engines.profiles import stage_profiles
    from engines.trt_runner import TrtRunner
    from graphs.runner import BaseRunner

    layout = _layout()
    stage = layout.stage("llm_0")
    r = object.__new__(TrtRunner)
    BaseRunner.__init__(r, stage, layout.dims)
    r.device, r.graph_mode, r.graphs, r._staged = "cpu", "manual", GraphCache(), {}
    assert layout.decodes(stage.name)
    r.profiles = stage_profiles(stage, layout.dims, decode=profiles == 2)
    r.buffers_plan = buffer_plan(stage, layout.dims)
    r._cache_inputs = {i for i, _ in stage.cache}
    r._inputs = [t.name for t in stage.inputs]
    r._buffers = {n: torch.zeros(max(1, math.prod(b.max_shape)), dtype=getattr(torch, b.dtype))
                  for n, b in r.buffers_plan.items() if n not in r._cache_inputs}
    r._contexts, r.is_active = [_FakeContext(r, i) for i in range(profiles)], True
    captures = []

    def capture(stream):
        captures.append(1)
        if not capture_ok:
            r.graphs.disable("RuntimeError: operation not permitted when stream is capturing")
            return None
        ctx = r._context  # the graph replays the context it was captured on
        return types.SimpleNamespace(replay=lambda: setattr(ctx, "executed", ctx.executed + 1))

    monkeypatch.setattr(r, "_capture", capture)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    return r, captures


def _block_feed(stage, rows, cache, past_len):
    import torch

    h = stage.input("hidden").shape[2]
    feed = {"hidden": torch.zeros((1, rows, h)), "positions": torch.arange(rows)[None],
            "row_lens": torch.tensor([rows]), "past_len": torch.tensor([past_len])}
    return {**feed, **cache}


def _cache(stage, capacity):
    import torch

    return {i: torch.zeros((1, stage.input(i).shape[1], capacity, stage.input(i).shape[3])) for i, _ in stage.cache}


@pytest.mark.parametrize("profiles", [2, 1], ids=["prefill+decode", "one-profile-engine"])
def test_block_engine_binds_the_cache_in_place_and_replays_decode_steps(monkeypatch, profiles):
    """Prefill on profile 0's context, one-row steps on the decode profile's (profile 1; an engine built with one
    profile runs them on profile 0), the same cache buffers bound in both; capture per (profile, shapes)."""
    pytest.importorskip("torch")
    import types

    r, captures = _fake_block_runner(monkeypatch, profiles=profiles)
    stream = types.SimpleNamespace(cuda_stream=0)
    cache = _cache(r.stage, 40)
    prefill_ctx, step_ctx = r._contexts[0], r._contexts[-1]
    for request in range(2):  # a later request with the same bounds (the same buffers) replays at once
        for step, rows in enumerate([30] + [1] * 9):
            feed = _block_feed(r.stage, rows, cache, 0 if step == 0 else 29 + step)
            r._check_feed(feed)
            r._run(feed, stream)
            ctx = prefill_ctx if step == 0 else step_ctx
            assert r._context is ctx and ctx.shapes[-len(feed):] == [(n, tuple(feed[n].shape)) for n in r._inputs]
            assert {n: ctx.addresses[n] for n in cache} == {n: v.data_ptr() for n, v in cache.items()}
            assert r.last_copied["cache"] == 0  # the cache is bound at its address, never copied
            assert r.last_copied["inputs"] == sum(feed[n].numel() * feed[n].element_size() for n in feed
                                                  if n not in cache)
    assert captures == [1]  # once: after one plain decode step of that shape
    assert len(r.graphs.graphs) == 1 and r.graphs.replays == 7 + 9  # steps 3..9, then all 9 of the next request
    assert [key[0] for key in r.graphs.graphs] == [profiles - 1]  # keyed by the decode call's profile
    if profiles == 2:
        assert (prefill_ctx.executed, step_ctx.executed) == (2, 2 * 9)  # every call ran once, on its profile's
        assert {c.profile for c in r._contexts} == {0, 1}
    else:
        assert prefill_ctx.executed == 2 * 10


def test_contexts_one_per_profile_set_once(monkeypatch):
    """Activation makes one execution context per profile, each set to its profile; a sidecar that disagrees with
    the engine's profile count is refused with the rebuild command."""
    pytest.importorskip("torch")
    import types

    from graphs.errors import ArtifactError

    r, _ = _fake_block_runner(monkeypatch)
    r.plan_path = "engines/tensorrt-rtx/llm_0.plan"
    stream = types.SimpleNamespace(cuda_stream=7, synchronize=lambda: None)
    made = []
    monkeypatch.setattr(r, "_create_context", lambda engine: made.append(_FakeContext(r, profile=-1)) or made[-1])
    contexts = r._create_contexts(types.SimpleNamespace(num_optimization_profiles=2), stream)
    assert contexts == made and [c.profile for c in contexts] == [0, 1]
    r.profiles = r.profiles[:1]  # an engine built with one profile: one context, left at its default profile
    (one,) = r._create_contexts(types.SimpleNamespace(num_optimization_profiles=1), stream)
    assert one is made[-1] and one.profile == -1
    with pytest.raises(ArtifactError, match=r"^stage 'llm_0': engine engines/tensorrt-rtx/llm_0\.plan has 2 "
                                            r"optimization profiles, its sidecar lists 1; "
                                            r"rebuild with: csprt build ART$"):
        r._create_contexts(types.SimpleNamespace(num_optimization_profiles=2), stream)


def test_failed_capture_falls_back_once_loudly(monkeypatch, caplog):
    pytest.importorskip("torch")
    import types

    r, captures = _fake_block_runner(monkeypatch, capture_ok=False)
    stream = types.SimpleNamespace(cuda_stream=0)
    cache = _cache(r.stage, 40)
    with caplog.at_level("WARNING", logger="csprt"):
        for step, rows in enumerate([30] + [1] * 6):
            feed = _block_feed(r.stage, rows, cache, 0 if step == 0 else 29 + step)
            r._check_feed(feed)
            r._run(feed, stream)
    assert captures == [1] and r.graphs.disabled.startswith("RuntimeError")
    warnings = [rec.getMessage() for rec in caplog.records if "CUDA graph capture failed" in rec.getMessage()]
    assert len(warnings) == 1 and "without CUDA graphs" in warnings[0]
    assert sum(c.executed for c in r._contexts) == 7  # every step still ran, plainly
