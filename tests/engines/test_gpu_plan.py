"""engines.gpu_plan and the GPU chain's logic on CPU: stream plan, host reads, graph policy, and the Pipeline
running with CudaChain over a recording fake CUDA and runners that return torch tensors in reused buffers."""

from __future__ import annotations

import numpy as np
import pytest

from engines.gpu_plan import (CAPTURE, MAIN, PLAIN, REPLAY, SIDE, GraphCache, StreamPlan, graph_key, graph_mode,
                              host_reads, plan_streams, unknown_dims)
from engines.pipeline import Pipeline
from exporter.tiny import tiny_shape
from graphs.schedule import resolve
from graphs.stages import LayoutOptions, build_layout

torch = pytest.importorskip("torch")

from engines.cuda_chain import CudaChain  # noqa: E402
from tests.device_fakes import FakeCuda, device_ort_runner_for  # noqa: E402


def _layout(schedule="csp", mode="both"):
    shape = tiny_shape()
    return build_layout(resolve(schedule, shape.llm.layers, shape.num_image_tokens), shape, LayoutOptions(mode=mode),
                        seg_token_id=0, stop_token_ids=(1,))


# --- stream plan ----------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["full", "csp"])
@pytest.mark.parametrize("mode", ["single-pass", "generate"])
def test_sam_encoder_runs_on_the_side_stream_and_sam_decoder_waits_for_it(schedule, mode):
    layout = _layout(schedule)
    plan = plan_streams(layout, mode)
    names = [s.name for s in layout.sequence(mode)]
    assert list(plan.stream) == names
    assert {n for n, s in plan.stream.items() if s == SIDE} == {"sam_encoder"}
    assert plan == StreamPlan(stream=plan.stream, waits={"sam_decoder": ("sam_encoder",)}, record=("sam_encoder",),
                              join=("sam_encoder",))
    assert plan.stream[layout.loop.after if mode == "generate" else "seg_gather"] == MAIN


def test_side_kind_reading_a_stage_output_stays_on_main(make_toy_layout):
    layout = make_toy_layout()
    # toy s1 reads host.a, host.b; s2 reads s1.sum in single-pass and host.a in generate
    sp = plan_streams(layout, "single-pass", side_kinds=("vision",))
    assert sp.stream == {"s1": SIDE, "s2": MAIN, "prefill": MAIN, "head": MAIN, "dec2": MAIN}
    assert sp.waits == {"s2": ("s1",), "dec2": ("s1",)} and sp.record == ("s1",) and sp.join == ("s1",)
    gen = plan_streams(layout, "generate", side_kinds=("vision",))
    assert gen.stream["s2"] == SIDE and gen.waits == {"dec2": ("s1",)} and gen.join == ("s1", "s2")
    assert gen.record == ("s1", "s2")
    assert set(plan_streams(layout, "generate").stream.values()) == {MAIN}  # no sam_encoder: one stream


def test_host_reads_are_the_outputs_and_the_loop_tokens():
    layout = _layout()
    single = host_reads(layout, "single-pass")
    assert single == ("sam_decoder.masks", "sam_decoder.low_res_masks", "seg_head.seg_embeddings")
    gen = host_reads(layout, "generate")
    # generated_ids is assembled on the host; the first position is read once
    assert gen == single + ("loop.seg_batch", "llm_2.next_token", "entry_0.next_position", "step_llm_2.next_token")
    assert host_reads(_layout(mode="single-pass"), "single-pass") == single


# --- CUDA graph policy ----------------------------------------------------------------------------

def test_graph_mode_for_block_engines_only():
    """A block's engine serves its decode steps (TrtRunner graphs only its one-row calls); other engines never."""
    layout = _layout()
    block = layout.stage("llm_0")
    assert graph_mode(block, "tensorrt-rtx") == "builtin"
    assert graph_mode(block, "tensorrt") == "manual"
    assert graph_mode(block, "tensorrt", enabled=False) == "off"
    for name in ("embed", "entry_1", "vision", "seg_head"):
        assert graph_mode(layout.stage(name), "tensorrt") == "off" == graph_mode(layout.stage(name), "tensorrt-rtx")


def test_graph_cache_warms_up_captures_then_replays():
    cache = GraphCache(max_graphs=2)
    a = graph_key(0, {"token_ids": (1,), "past_key_0": (1, 2, 40, 16)})
    b = graph_key(0, {"token_ids": (1,), "past_key_0": (1, 2, 41, 16)})
    assert a != b and a == graph_key(0, {"token_ids": (1,), "past_key_0": (1, 2, 40, 16)})
    assert [cache.decide(a), cache.decide(b)] == [PLAIN, PLAIN]  # first sight of a shape: plain
    assert cache.decide(a) == CAPTURE
    assert cache.store(a, "graph-a") is None
    assert [cache.decide(a), cache.decide(a)] == [REPLAY, REPLAY] and cache.replays == 2
    assert cache.decide(b) == CAPTURE and cache.store(b, "graph-b") is None
    c = graph_key(0, {"token_ids": (1,), "past_key_0": (1, 2, 42, 16)})
    cache.decide(c)
    assert cache.decide(c) == CAPTURE
    assert cache.store(c, "graph-c") == "graph-a"  # a is the least recently used: evicted, the caller frees it
    assert cache.decide(a) == CAPTURE and list(cache.graphs) == [b, c]  # warmed up before: captured again


def test_graph_cache_falls_back_to_plain_after_a_failed_capture():
    cache = GraphCache()
    k = graph_key(0, {"x": (1,)})
    cache.store(k, "kept")
    cache.disable("RuntimeError: operation not permitted when stream is capturing")
    assert cache.decide(k) == REPLAY  # graphs captured before still replay
    other = graph_key(0, {"x": (2,)})
    assert [cache.decide(other) for _ in range(3)] == [PLAIN] * 3
    assert cache.disabled.startswith("RuntimeError")


def test_unknown_dims():
    assert unknown_dims({"masks": (2, 128, 128), "rows": (-1, 64)}) == ["rows"]
    assert unknown_dims({"masks": (2, 128, 128)}) == []


# --- the Pipeline on CudaChain (fake CUDA, torch CPU tensors) ---------------------------------------

def _toy_host(seg_rows=None):
    a = np.arange(4, dtype=np.float32)[None]
    host = {"a": a, "b": 10 * a, "ids": np.asarray([[3, 5, 1]], dtype=np.int64), "row_lens": np.asarray([3], np.int64)}
    if seg_rows is not None:
        host["seg_rows"] = np.asarray(seg_rows, dtype=np.float32).reshape(-1, 2)
    return host


class _ReadLog(CudaChain):
    """CudaChain that logs the source of every device tensor it reads to the host."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads: list[str] = []

    def tokens(self, source, value):
        self.reads += [source] if isinstance(value, torch.Tensor) else []
        return super().tokens(source, value)

    def to_host(self, source, value):
        self.reads += [source] if isinstance(value, torch.Tensor) else []
        return super().to_host(source, value)


def _assert_device_resident(log, layout, mode):
    """Every stage input that comes from another stage arrived as a tensor (no host round trip)."""
    runs = [e for e in log if e[0] == "run"]
    assert runs
    steps = layout.loop.steps if layout.loop is not None else ()
    for _, _, name, kinds in runs:  # a run names its graph: the stage itself, or a decode step running it
        specs = [s for s in (*layout.stages, *steps) if s.graph_name == name]
        for t in layout.stage(name).inputs:
            ok = {"numpy" if s.input(t.name).source_for(mode).startswith("host.") else "tensor" for s in specs}
            assert kinds[t.name] in ok, (name, t.name, ok)


@pytest.mark.parametrize("mode, seg_rows", [("single-pass", [[1, 2], [3, 4]]), ("generate", None)])
def test_toy_pipeline_on_cuda_chain_matches_host_chain(make_toy_layout, toy_graphs, mode, seg_rows):
    from engines.ort_runner import OrtRunner

    layout = make_toy_layout(seg=7, eos=9)
    host = _toy_host(seg_rows)
    with Pipeline(layout, lambda s: OrtRunner(s, layout.dims, toy_graphs[s.name])) as pipe:
        want = pipe.run(host, mode, record=True)
    cuda = FakeCuda()
    chain = _ReadLog(layout, "cuda", side_kinds=("vision",), cuda=cuda, alloc_device="cpu")
    with Pipeline(layout, device_ort_runner_for(layout, toy_graphs.__getitem__, cuda.log), chain=chain) as pipe:
        got = pipe.run(host, mode, record=True)
    assert set(got.outputs) == set(want.outputs)
    for name, value in want.outputs.items():
        assert isinstance(got.outputs[name], np.ndarray), name  # outputs reach the host
        np.testing.assert_array_equal(got.outputs[name], value, err_msg=name)
    assert got.generated_ids == want.generated_ids
    assert list(got.timings_ms) == list(want.timings_ms)  # same stages, same order
    assert all(isinstance(v, np.ndarray) for f in got.feeds.values() for v in f.values())  # record: host copies
    assert set(chain.reads) == set(host_reads(layout, mode))  # nothing else comes to the host
    _assert_device_resident(cuda.log, layout, mode)
    ops = [e[:3] for e in cuda.log if e[0] != "sync"]
    assert ("run", "side", "s1") in ops and ("run", "main", "prefill") in ops
    assert ops.index(("record", "side", "s1")) < ops.index(("wait", "main", "s1")) < ops.index(("run", "main", "dec2"))


def test_generate_keeps_seg_rows_from_reused_buffers(make_toy_layout, toy_graphs):
    """seg 7 then 8 then eos 9: the [SEG] row lives in decode's last_hidden buffer, which the next steps overwrite."""
    from engines.ort_runner import OrtRunner

    layout = make_toy_layout(seg=7, eos=9)
    with Pipeline(layout, lambda s: OrtRunner(s, layout.dims, toy_graphs[s.name])) as pipe:
        want = pipe.run(_toy_host(), "generate")
    cuda = FakeCuda()
    with Pipeline(layout, device_ort_runner_for(layout, toy_graphs.__getitem__, cuda.log),
                  chain=CudaChain(layout, "cuda", cuda=cuda, alloc_device="cpu")) as pipe:
        got = pipe.run(_toy_host(), "generate")
    assert got.generated_ids == [[6, 7, 8, 9]]
    np.testing.assert_array_equal(got.tensors["loop.seg_hidden"].numpy(), want.tensors["loop.seg_hidden"])  # [[7, 4]]
    assert got.timings_ms["decode"] == 3.0 and got.timings_ms["decode_steps"] == 3  # one event pair per step


@pytest.fixture(scope="module")
def tiny_art(export_tiny):
    return export_tiny("csp", "both")


@pytest.mark.parametrize("mode", ["single-pass", "generate"])
def test_artifact_on_cuda_chain_matches_onnxruntime(tiny_art, mode):
    """The real tiny layout through CudaChain: sam_encoder on the side stream, [SEG] rows, the decode loop."""
    from engines.session import ArtifactSession
    from exporter.export import sample_image
    from exporter.tiny import SEG_QUERY

    image = sample_image()
    with ArtifactSession(tiny_art) as ort:
        want = ort.segment(image, SEG_QUERY, mode=mode, max_new_tokens=8)
    cuda = FakeCuda()
    with ArtifactSession(tiny_art, verify=False) as dev:
        art = dev.artifact
        chain = _ReadLog(art.layout, "cuda", cuda=cuda, alloc_device="cpu")
        dev.pipeline = Pipeline(art.layout, device_ort_runner_for(art.layout, art.graph_path, cuda.log), chain=chain)
        got = dev.segment(image, SEG_QUERY, mode=mode, max_new_tokens=8)
    assert got.generated_ids == want.generated_ids and got.answer == want.answer
    assert got.masks.shape[0] == 1  # the tiny checkpoint answers with one [SEG]
    np.testing.assert_array_equal(got.mask_logits, want.mask_logits)
    assert got.image_tokens_per_layer == want.image_tokens_per_layer
    _assert_device_resident(cuda.log, art.layout, mode)
    assert [e[1] for e in cuda.log if e[0] == "run" and e[2] == "sam_encoder"] == ["side"]
    assert {e[1] for e in cuda.log if e[0] == "run" and e[2] != "sam_encoder"} == {"main"}
    assert ("wait", "main", "sam_encoder") in cuda.log
    assert set(chain.reads) == set(host_reads(art.layout, mode))
