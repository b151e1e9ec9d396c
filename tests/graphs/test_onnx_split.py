"""graphs.onnx_split on the tiny artifact's two-layer block: the pieces, chained on ONNX Runtime, give the block's
outputs bit for bit, for a prefill call and a decode step; interface shapes match what ONNX Runtime computes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphs.manifest import load_artifact
from graphs.onnx_split import block_cuts, interface_shapes, piece_model, plan_pieces, segment_bytes, tensor_types

ort = pytest.importorskip("onnxruntime")

STAGE = "llm_2"  # csp on the tiny shape: layers 2 and 3 (the only block of two layers)


@pytest.fixture(scope="module")
def block(export_tiny):
    artifact = load_artifact(export_tiny("csp", "both"))
    spec = artifact.layout.stage(STAGE)
    layers = tuple(int(o.rsplit("_", 1)[1]) for _, o in spec.cache if o.startswith("key_"))
    path = artifact.graph_path(STAGE)
    return artifact, spec, layers, onnx.load(str(path), load_external_data=False), onnx.load(str(path))


def block_feed(spec, batch, rows, cache, past_len):
    """Random inputs of the block at these sizes (also tests/engines/test_triton_repo_pieces.py's)."""
    rng = np.random.default_rng(0)
    sizes = {"batch": batch, f"rows_{STAGE}": rows, f"cache_{STAGE}": cache}
    feed = {}
    for t in spec.inputs:
        shape = tuple(d if isinstance(d, int) else sizes[d] for d in t.shape)
        feed[t.name] = (rng.standard_normal(shape).astype(np.float32) if t.dtype == "float32"
                        else np.zeros(shape, np.int64))
    feed["positions"] = np.broadcast_to(past_len + np.arange(rows), (batch, rows)).astype(np.int64).copy()
    feed["row_lens"] = np.full((batch,), rows, np.int64)
    feed["past_len"] = np.full((batch,), past_len, np.int64)
    return feed


def _run(model, feed):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {n: feed[n] for n in names})))


@pytest.mark.parametrize("batch,rows,cache,past_len", [(2, 7, 9, 0), (2, 1, 9, 5)], ids=["prefill", "decode-step"])
def test_pieces_chained_on_onnxruntime_equal_the_block(block, batch, rows, cache, past_len):
    _, spec, layers, bare, full = block
    cuts = block_cuts(bare, layers)
    pieces = plan_pieces(bare, layers, [(0, 1), (1, 2)], cuts)
    assert [p.layers for p in pieces] == [(2, 3), (3, 4)]
    # The cut is after layer 2's residual sum: rows, rotary cos/sin and the mask cross it, nothing shape-derived.
    assert len(pieces[0].interface_out) == 4 and pieces[1].interface_in == pieces[0].interface_out
    assert {"key_2", "value_2"} <= set(pieces[0].outputs) and {"key_3", "value_3", "hidden_out", "next_token"} <= set(
        pieces[1].outputs)
    assert "past_key_3" not in pieces[0].inputs and "past_key_3" in pieces[1].inputs  # each piece its layers' cache
    feed = block_feed(spec, batch, rows, cache, past_len)
    want = _run(full, feed)
    types = tensor_types(bare)
    values = dict(feed)
    for piece in pieces:
        values.update(_run(piece_model(full, piece, types), values))
    for name, ref in want.items():
        np.testing.assert_array_equal(values[name], ref, err_msg=name)  # the same ops on the same data: bit-exact
    shapes = interface_shapes(bare, {n: v.shape for n, v in feed.items()}, pieces[0].interface_out)
    assert shapes == {n: values[n].shape for n in pieces[0].interface_out}


def test_segments_cover_every_weight_once(block):
    _, _, layers, bare, _ = block
    cuts = block_cuts(bare, layers)
    sizes = segment_bytes(bare, cuts)
    assert len(sizes) == len(layers) and all(s > 0 for s in sizes)
    assert sizes[1] > sizes[0]  # the last segment also holds the final norm and lm_head
