"""engines.pipeline: wiring by source, mode-dict sources, record, skip_if_empty and the decode loop, on toy ONNX graphs."""

from __future__ import annotations

import numpy as np
import pytest

from engines.ort_runner import OrtRunner
from engines.pipeline import DecodeIds, Pipeline
from graphs.errors import InputError


def _pipeline(layout, graphs, made=None):
    def runner_for(stage):
        if made is not None:
            made.append(stage.name)
        return OrtRunner(stage, layout.dims, graphs[stage.name])

    return Pipeline(layout, runner_for)


def _host(n=4, ids=(3, 5, 1), seg_rows=None):
    a = np.arange(n, dtype=np.float32)[None]
    host = {"a": a, "b": 10 * a, "ids": np.asarray([ids], dtype=np.int64),
            "row_lens": np.asarray([len(ids)], dtype=np.int64)}  # a batch of one
    if seg_rows is not None:
        host["seg_rows"] = np.asarray(seg_rows, dtype=np.float32).reshape(-1, 2)
    return host


def test_single_pass_wiring(make_toy_layout, toy_graphs):
    host = _host(seg_rows=[[1, 2], [3, 4]])
    with _pipeline(make_toy_layout(), toy_graphs) as pipe:
        res = pipe.run(host, "single-pass", record=True)
    s = 11 * host["a"]
    np.testing.assert_array_equal(res.tensors["s1.sum"], s)
    np.testing.assert_array_equal(res.outputs["y"], s)  # s2.x comes from s1.sum in single-pass
    np.testing.assert_array_equal(res.outputs["emb"], [[1, 2, 3], [3, 4, 7]])
    np.testing.assert_array_equal(res.outputs["masks"], np.array([[6.0], [14.0]]) + s)
    assert "generated_ids" not in res.outputs and res.generated_ids == []
    assert "decode" not in res.timings_ms and "decode_steps" not in res.timings_ms
    assert set(res.timings_ms) == {"s1", "s2", "prefill", "head", "dec2"}
    assert all(ms >= 0 for ms in res.timings_ms.values())
    assert set(res.feeds) == {"s1", "s2", "prefill", "head", "dec2"}
    assert res.feeds["s2"]["x"] is res.tensors["s1.sum"]
    assert res.feeds["head"]["seg_hidden"] is host["seg_rows"]
    assert set(res.feeds["dec2"]) == {"seg_embeddings", "img"}


def test_generate_loop_collects_seg_and_stops_on_eos(make_toy_layout, toy_graphs):
    host = _host()  # no seg_rows: generate mode does not read it
    with _pipeline(make_toy_layout(seg=7, eos=9), toy_graphs) as pipe:
        res = pipe.run(host, "generate", record=True)
    assert res.generated_ids == [[6, 7, 8, 9]]
    np.testing.assert_array_equal(res.outputs["generated_ids"], [[6, 7, 8, 9]])  # [B, T]
    assert res.outputs["generated_ids"].dtype == np.int64
    # token 7 came from the first decode step: cache of 3 prompt rows + the fed token 6
    np.testing.assert_array_equal(res.tensors["loop.seg_hidden"], [[7, 4]])
    cache = pipe.kv.buffers["prefill"]["past"]  # written in place: 3 prompt rows, then one row per step
    assert cache.shape == (1, 1, 3 + 9, 1) and pipe.kv.length["prefill"].tolist() == [6]
    np.testing.assert_array_equal(cache[0, 0, :6, 0], [3, 5, 1, 6, 7, 8])
    assert res.timings_ms["decode_steps"] == 3 and res.timings_ms["decode"] >= 0
    np.testing.assert_array_equal(res.outputs["y"], host["a"])  # s2.x comes from host.a in generate
    np.testing.assert_array_equal(res.outputs["emb"], [[7, 4, 11]])
    np.testing.assert_array_equal(res.outputs["masks"], 22 + 11 * host["a"])
    first = res.feeds["step_prefill"]  # the first step's feed, as it was then
    np.testing.assert_array_equal(first["ids"], [[6]])
    np.testing.assert_array_equal(first["past_len"], [3])
    np.testing.assert_array_equal(first["past"][0, 0, :4, 0], [3, 5, 1, 0])


def test_generate_stops_at_max_new_tokens(make_toy_layout, toy_graphs):
    with _pipeline(make_toy_layout(seg=7, eos=100, max_new_tokens=10), toy_graphs) as pipe:
        full = pipe.run(_host(), "generate")
        short = pipe.run(_host(), "generate", max_new_tokens=2)
        one = pipe.run(_host(), "generate", max_new_tokens=1)
    assert full.generated_ids == [list(range(6, 16))] and full.timings_ms["decode_steps"] == 9
    assert pipe.kv.buffers["prefill"]["past"].shape == (1, 1, 3, 1)  # the last run's (max_new_tokens 1) capacity
    assert short.generated_ids == [[6, 7]] and short.timings_ms["decode_steps"] == 1
    np.testing.assert_array_equal(short.tensors["loop.seg_hidden"], [[7, 4]])
    assert one.generated_ids == [[6]] and one.timings_ms["decode_steps"] == 0 and "decode" not in one.timings_ms
    assert one.tensors["loop.seg_hidden"].shape == (0, 2)


def test_decode_ids_for_one_run_leave_the_layout_alone(make_toy_layout, toy_graphs):
    """A run given its own stop and [SEG] ids (serving's warm-up) decodes by them; the layout, and so the next
    run, keeps the artifact's."""
    layout = make_toy_layout(seg=7, eos=9, max_new_tokens=10)
    with _pipeline(layout, toy_graphs) as pipe:
        other = pipe.run(_host(), "generate", max_new_tokens=5, decode_ids=DecodeIds(stop_token_ids=(), seg_token_id=8))
        assert pipe.layout is layout and layout.loop.stop_token_ids == (9,) and layout.loop.seg_token_id == 7
        own = pipe.run(_host(), "generate")
    assert other.generated_ids == [[6, 7, 8, 9, 10]] and other.timings_ms["decode_steps"] == 4  # 9 did not stop it
    np.testing.assert_array_equal(other.tensors["loop.seg_hidden"], [[8, 5]])  # 8 was the [SEG], 7 was not
    assert own.generated_ids == [[6, 7, 8, 9]]
    np.testing.assert_array_equal(own.tensors["loop.seg_hidden"], [[7, 4]])
    assert DecodeIds.of(layout.loop) == DecodeIds((9,), 7)


@pytest.mark.parametrize("bad", [0, 11])
def test_max_new_tokens_out_of_range(make_toy_layout, toy_graphs, bad):
    with _pipeline(make_toy_layout(max_new_tokens=10), toy_graphs) as pipe:
        with pytest.raises(InputError, match=r"max_new_tokens is .*1 to 10"):
            pipe.run(_host(), "generate", max_new_tokens=bad)


def test_seg_as_first_token_uses_prefill_hidden(make_toy_layout, toy_graphs):
    with _pipeline(make_toy_layout(seg=6, eos=7), toy_graphs) as pipe:
        res = pipe.run(_host(), "generate")
    assert res.generated_ids == [[6, 7]]
    np.testing.assert_array_equal(res.tensors["loop.seg_hidden"], [[6, 3]])  # prefill's last_hidden


def test_skip_if_empty_without_seg(make_toy_layout, toy_graphs):
    made = []
    with _pipeline(make_toy_layout(seg=100, eos=9), toy_graphs, made) as pipe:
        res = pipe.run(_host(n=5), "generate", record=True)
    assert res.generated_ids == [[6, 7, 8, 9]]
    assert res.tensors["loop.seg_hidden"].shape == (0, 2) and res.tensors["loop.seg_hidden"].dtype == np.float32
    assert res.outputs["emb"].shape == (0, 3) and res.outputs["emb"].dtype == np.float32
    assert res.outputs["masks"].shape == (0, 5)  # "n" bound from the skipped stage's feed
    assert "head" not in made and "dec2" not in made  # skipped stages never build a runner
    assert "head" not in res.timings_ms and "head" in res.feeds


def test_skip_if_empty_single_pass(make_toy_layout, toy_graphs):
    with _pipeline(make_toy_layout(), toy_graphs) as pipe:
        res = pipe.run(_host(n=3, seg_rows=np.zeros((0, 2))), "single-pass")
    assert res.outputs["emb"].shape == (0, 3) and res.outputs["masks"].shape == (0, 3)


def test_runners_made_once_and_closed(make_toy_layout, toy_graphs):
    made = []
    pipe = _pipeline(make_toy_layout(), toy_graphs, made)
    pipe.run(_host(seg_rows=[[1, 2]]), "single-pass")
    pipe.run(_host(seg_rows=[[1, 2]]), "single-pass")
    pipe.run(_host(), "generate")
    assert sorted(made) == ["dec2", "head", "prefill", "s1", "s2"]  # the decode step reuses prefill's runner
    runners = list(pipe.runners.values())
    assert all(r.is_active for r in runners)
    pipe.close()
    assert not any(r.is_active for r in runners) and pipe.runners == {}


def test_missing_and_unexpected_host_inputs(make_toy_layout, toy_graphs):
    with _pipeline(make_toy_layout(), toy_graphs) as pipe:
        with pytest.raises(InputError, match=r"missing seg_rows.*takes: a float32 \[1, n\]"):
            pipe.run(_host(), "single-pass")
        with pytest.raises(InputError, match="unexpected zzz"):
            pipe.run({**_host(seg_rows=[[1, 2]]), "zzz": np.zeros(1)}, "single-pass")
        with pytest.raises(InputError, match="mode 'chat' is not in this artifact"):
            pipe.run(_host(), "chat")


def test_dim_out_of_range_reaches_the_caller(make_toy_layout, toy_graphs):
    with _pipeline(make_toy_layout(), toy_graphs) as pipe:
        with pytest.raises(InputError, match=r"stage 's1' input 'a': dim 'n' is 9, outside the exported range \[1, 8\]"):
            pipe.run(_host(n=9, seg_rows=[[1, 2]]), "single-pass")


def test_decode_cache_outgrows_its_profile(make_toy_layout, toy_graphs):
    from graphs.stages import DimRange

    layout = make_toy_layout(eos=100, dims={"n": DimRange(1, 4, 8), "len": DimRange(1, 3, 16),
                                            "num_seg": DimRange(1, 1, 4), "cache": DimRange(1, 4, 5)})
    made = []
    with _pipeline(layout, toy_graphs, made) as pipe:
        with pytest.raises(InputError, match=r"stage 'prefill': its KV cache needs 3 prompt rows \+ 9 generated = 12 "
                                             r"rows, more than the exported 5 \(cache\); shorten the text"):
            pipe.run(_host(), "generate")
    assert "prefill" not in made  # refused before the block ran


def test_given_tensors_and_a_stage_subset(make_toy_layout, toy_graphs):
    """`stages` runs part of a mode's sequence; `given` supplies what the skipped stages made (an image encoding):
    host inputs only the skipped stages read are then not required, and the outputs equal one full run."""
    host = _host(seg_rows=[[1, 2]])
    with _pipeline(make_toy_layout(), toy_graphs) as pipe:
        full = pipe.run(host, "generate")
        first = pipe.run({"a": host["a"], "b": host["b"]}, "generate", stages={"s1"})
        assert set(first.timings_ms) == {"s1"} and "s1.sum" in first.tensors
        rest = pipe.run({"ids": host["ids"], "row_lens": host["row_lens"], "a": host["a"]}, "generate", given={"s1.sum": first.tensors["s1.sum"]},
                        stages={"s2", "prefill", "head", "dec2"})
        assert "s1" not in rest.timings_ms and rest.generated_ids == full.generated_ids
        for name, value in full.outputs.items():
            np.testing.assert_array_equal(rest.outputs[name], value)
        with pytest.raises(InputError, match="missing b"):
            pipe.run({"a": host["a"], "ids": host["ids"], "row_lens": host["row_lens"]}, "generate", stages={"s1"})
