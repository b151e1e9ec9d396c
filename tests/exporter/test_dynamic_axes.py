"""Named token axes are really dynamic: each LLM stage graph at several text lengths, decode at several past lengths.

Feeds come from a real pipeline run (`record=True`) and are cut to other lengths; ONNX Runtime must
match the stage's torch wrapper on each.
"""

from __future__ import annotations

import numpy as np
import pytest

from exporter.export import sample_image
from exporter.tiny import SEG_QUERY


@pytest.fixture(scope="module")
def recorded(export_tiny, tiny_ckpt):
    from engines.session import ArtifactSession
    from exporter.checkpoint import load_checkpoint

    session = ArtifactSession(export_tiny("csp", "both"))
    feeds = {}
    for mode in ("single-pass", "generate"):
        feeds[mode] = session.segment(sample_image(), SEG_QUERY, mode=mode, max_new_tokens=4, record=True).pipeline.feeds
    model = load_checkpoint(tiny_ckpt, attn="eager").model
    yield session, feeds, model
    session.close()


def _compare(session, model, stage, feed, atol=1e-4):
    from exporter.torch_runner import TorchStageRunner

    art = session.artifact
    got = session.pipeline.runner(stage).infer(feed)
    with TorchStageRunner(stage, art.layout.dims, model, art.schedule, art.manifest["tokenizer"]["seg_token_id"]) as r:
        want = r.infer(feed)
    for name, ref in want.items():
        assert got[name].shape == ref.shape, (stage.name, name)
        if ref.dtype.kind == "i":
            np.testing.assert_array_equal(got[name], ref, err_msg=f"{stage.name}.{name}")
        else:
            np.testing.assert_allclose(got[name], ref, atol=atol, rtol=0, err_msg=f"{stage.name}.{name}")
    return got


def _cut_text(feed: dict, prefix: int, suffix: int) -> dict:
    """The same request with the text cut to `prefix` + `suffix` tokens (the suffix keeps its end, so [SEG] stays)."""
    out = {}
    for name, value in feed.items():
        if name == "prefix_ids":
            out[name] = value[:prefix]
        elif name == "suffix_ids":
            out[name] = value[-suffix:]
        elif name == "prefix_hidden":
            out[name] = value[:, :prefix]
        elif name == "suffix_hidden":
            out[name] = value[:, -suffix:]
        else:
            out[name] = value
    return out


@pytest.mark.parametrize("mode", ["single-pass", "generate"])
def test_each_llm_stage_runs_at_three_text_lengths(recorded, mode):
    session, feeds, model = recorded
    llm_stages = [s for s in session.artifact.layout.stages if s.kind == "llm"]
    assert len(llm_stages) == 3
    p = feeds[mode]["llm_0"]["prefix_ids"].shape[0]
    s = feeds[mode]["llm_0"]["suffix_ids"].shape[0]
    lengths = [(p, s), (max(2, p // 3), max(3, s // 2)), (5, 2)]
    assert len({lp for lp, _ in lengths}) == len({ls for _, ls in lengths}) == 3
    for stage in llm_stages:
        for lp, ls in lengths:
            out = _compare(session, model, stage, _cut_text(feeds[mode][stage.name], lp, ls))
            assert out["prefix_hidden_out"].shape[1] == lp and out["suffix_hidden_out"].shape[1] == ls


def test_decode_runs_at_several_past_lengths(recorded):
    session, feeds, model = recorded
    stage = session.artifact.layout.stage("decode")
    feed = feeds["generate"]["decode"]
    full = {name: v.shape[2] for name, v in feed.items() if name.startswith("past_")}
    pasts = set()
    for cut in (0, 7, 40):
        cut_feed = {name: (v[:, :, : max(1, v.shape[2] - cut)] if name.startswith("past_") else v)
                    for name, v in feed.items()}
        out = _compare(session, model, stage, cut_feed)
        for name in full:
            layer = name.rsplit("_", 1)[1]
            kind = "key" if "_key_" in name else "value"
            assert out[f"present_{kind}_{layer}"].shape[2] == cut_feed[name].shape[2] + 1
        pasts.add(tuple(cut_feed[n].shape[2] for n in sorted(full)))
    assert len(pasts) == 3


def test_stage_graph_dims_are_named(export_tiny):
    """The manifest's named dims appear by name on the graphs' inputs (not s0, s1 from the tracer)."""
    import onnx

    from graphs.manifest import load_artifact

    art = load_artifact(export_tiny("csp", "both"))
    for stage in art.layout.stages:
        model = onnx.load(str(art.graph_path(stage.name)), load_external_data=False)
        graph_dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
        for t in stage.inputs:
            assert graph_dims[t.name] == list(t.shape), (stage.name, t.name)
