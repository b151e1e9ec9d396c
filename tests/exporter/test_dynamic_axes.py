"""Named token axes are really dynamic: entry_0 at several text lengths, each block at several row counts (prefill),
and at several cache capacities and valid lengths (decode steps).

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


def test_entry_runs_at_three_text_lengths(recorded):
    session, feeds, model = recorded
    stage = session.artifact.layout.stage("entry_0")
    feed = feeds["single-pass"]["entry_0"]
    p, s = feed["prefix_embeds"].shape[1], feed["suffix_embeds"].shape[1]
    for lp, ls in [(p, s), (max(2, p // 3), max(3, s // 2)), (5, 2)]:
        cut = {**feed, "prefix_embeds": feed["prefix_embeds"][:, :lp], "suffix_embeds": feed["suffix_embeds"][:, -ls:]}
        cut["suffix_lens"] = np.full_like(feed["suffix_lens"], ls)
        if "suffix_ids" in cut:
            cut["suffix_ids"] = feed["suffix_ids"][:, -ls:]
        out = _compare(session, model, stage, cut)
        assert out["hidden"].shape[1] == lp + feed["image_hidden"].shape[1] + ls


@pytest.mark.parametrize("mode", ["single-pass", "generate"])
def test_each_block_runs_at_three_row_counts(recorded, mode):
    session, feeds, model = recorded
    blocks = [s for s in session.artifact.layout.stages if s.kind == "llm"]
    assert len(blocks) == 3
    for stage in blocks:
        feed = feeds[mode][stage.name]
        t = feed["hidden"].shape[1]
        for rows in (t, t // 2, 3):
            cut = {**feed, "hidden": feed["hidden"][:, :rows], "positions": feed["positions"][:, :rows],
                   "row_lens": np.minimum(feed["row_lens"], rows)}
            if "query_rows" in cut:
                cut["query_rows"] = np.minimum(feed["query_rows"], rows - 1)
            out = _compare(session, model, stage, cut)
            assert out["hidden_out"].shape[1] == rows and out[f"key_{stage.layers[0]}"].shape[2] == rows


def test_decode_step_runs_at_several_cache_lengths(recorded):
    """A decode step (one row) over caches of other capacities and valid lengths: only the new row comes out."""
    session, feeds, model = recorded
    for step in session.artifact.layout.loop.steps[1:]:
        feed = feeds["generate"][step.name]
        valid = int(feed["past_len"][0])
        caps = set()
        for cap, n in ((feed[step.cache[0][0]].shape[2], valid), (valid + 1, valid), (valid, valid - 7)):
            cut = {k: (v[:, :, :cap] if k.startswith("past_key") or k.startswith("past_value") else v)
                   for k, v in feed.items()}
            cut["past_len"] = np.asarray([n], dtype=np.int64)
            out = _compare(session, model, step, cut)
            assert out[f"key_{step.layers[0]}"].shape[2] == 1
            caps.add(cap)
        assert len(caps) == 3
