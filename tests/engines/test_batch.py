"""Batched inference: a batch of requests gives each request what it gets alone (fp32: masks and ids equal; fp16:
ids equal, masks within graphs.tolerance.BATCH_TOLERANCES).

One session on the shared tiny `csp` artifact (both modes, exported once per test session; its fp16 twin too).
Requests differ in query length (so suffixes are right-padded), in image (so per-request selections differ) and in
[SEG] rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engines.compare import mask_iou
from engines.pipeline import Pipeline
from engines.session import ArtifactSession, runner_factory
from exporter.export import sample_image
from graphs.errors import InputError
from graphs.tolerance import BATCH_TOLERANCES

QUERIES = ("Where is the cat?", "What is on the left side of the red disc in this picture, near the top?", "The disc")


@pytest.fixture(scope="module")
def session(export_tiny):
    with ArtifactSession(export_tiny("csp", "both"), threads=1) as s:
        yield s


@pytest.fixture(scope="module")
def session_fp16(export_tiny):
    with ArtifactSession(export_tiny("csp", "both", "fp16"), threads=1) as s:
        yield s


@pytest.fixture(scope="module")
def images():
    img = sample_image()
    return [img, np.ascontiguousarray(img[::-1]), np.ascontiguousarray(img[:, ::-1])]


def _seg_feed(session, images, queries, seg_rows_per_request, pad_id=0):
    """The host feed of a batch, with [SEG] rows chosen per request (0, 1 or several): rows of its own suffix."""
    host = session.host
    qfeed, ids = host.query_batch(list(queries), "single-pass", pad_id=pad_id)
    ifeed, _, _ = host.image_batch(list(images))
    rows, owner = [], []
    for b, want in enumerate(seg_rows_per_request):
        last = ids[b].seg_rows()[0]  # the row before the prompt's [SEG]
        picked = [last - j for j in range(want)][::-1]
        rows += picked
        owner += [b] * want
    feed = {**qfeed, **ifeed, "seg_rows": np.asarray(rows, np.int64), "seg_batch": np.asarray(owner, np.int64)}
    return feed


def test_batch_of_three_with_0_1_2_seg_rows_equals_each_request_alone(session, images):
    counts = (0, 1, 2)
    batch = session.pipeline.run(_seg_feed(session, images, QUERIES, counts), "single-pass")
    masks, owner = batch.outputs["masks"], batch.outputs["seg_batch"]
    assert owner.tolist() == [1, 2, 2] and masks.shape[0] == 3
    assert batch.tensors["host.suffix_ids"].shape[1] == max(len(i) for i in
                                                            [session.host.query_inputs(q, "single-pass")[1].suffix
                                                             for q in QUERIES])
    for b, want in enumerate(counts):
        alone = session.pipeline.run(_seg_feed(session, images[b:b + 1], QUERIES[b:b + 1], (want,)), "single-pass")
        mine = masks[owner == b]
        if want == 0:
            assert "masks" not in alone.outputs or alone.outputs["masks"].shape[0] == 0
            assert mine.shape[0] == 0
            continue
        ref = alone.outputs["masks"]
        assert mine.shape == ref.shape
        np.testing.assert_allclose(mine, ref, atol=1e-4, rtol=0)  # batched GEMMs round in another order
        assert np.array_equal(mine > 0, ref > 0)  # fp32: the masks themselves are equal
        # the selections each request made (its own image) are its own
        for name in ("vision.image_indices", "entry_2.image_indices_out"):
            assert np.array_equal(batch.tensors[name][b], alone.tensors[name][0])


@pytest.mark.parametrize("mode", ["single-pass", "generate"])
def test_segment_batch_equals_segment(session, images, mode):
    batch = session.segment_batch(images, list(QUERIES), mode=mode, max_new_tokens=6)
    assert len(batch) == 3
    for image, query, got in zip(images, QUERIES, batch):
        alone = session.segment(image, query, mode=mode, max_new_tokens=6)
        assert got.generated_ids == alone.generated_ids and got.answer == alone.answer
        assert got.masks.shape == alone.masks.shape and got.masks.shape[1:] == image.shape[:2]
        assert np.array_equal(got.masks, alone.masks)
        np.testing.assert_allclose(got.mask_logits, alone.mask_logits, atol=1e-4, rtol=0)
        assert got.image_tokens_per_layer == alone.image_tokens_per_layer


def test_encodings_and_images_mix_in_one_batch(session, images):
    enc = session.encode_image(images[1])
    mixed = session.segment_batch([images[0], enc, images[2]], list(QUERIES))
    plain = session.segment_batch(images, list(QUERIES))
    for a, b in zip(mixed, plain):
        assert np.array_equal(a.masks, b.masks)


def test_padding_contents_change_no_output(session, images):
    counts = (1, 1, 2)
    a = session.pipeline.run(_seg_feed(session, images, QUERIES, counts, pad_id=0), "single-pass")
    b = session.pipeline.run(_seg_feed(session, images, QUERIES, counts, pad_id=7), "single-pass")
    pads = a.tensors["host.suffix_ids"] != b.tensors["host.suffix_ids"]
    assert pads.sum() > 0  # the padding really differs
    for name in ("masks", "low_res_masks", "seg_embeddings"):
        assert np.array_equal(a.outputs[name], b.outputs[name]), name
    # generate mode: the ids too
    host = session.host
    gens = []
    for pad in (0, 7):
        qfeed, _ = host.query_batch(list(QUERIES), "generate", pad_id=pad)
        ifeed, _, _ = host.image_batch(list(images))
        gens.append(session.pipeline.run({**qfeed, **ifeed}, "generate", max_new_tokens=4).generated_ids)
    assert gens[0] == gens[1]


def test_generate_batch_one_request_stops_at_step_1_another_runs_20(session, images):
    art = session.artifact
    layout = dataclasses.replace(art.layout, loop=dataclasses.replace(art.layout.loop, stop_token_ids=(), max_seg=None))
    host = session.host
    with Pipeline(layout, runner_factory(art, threads=1)) as pipe:
        def run(b_images, queries, limits):
            qfeed, _ = host.query_batch(list(queries), "generate")
            ifeed, _, _ = host.image_batch(list(b_images))
            return pipe.run({**qfeed, **ifeed}, "generate", max_new_tokens=limits)

        both = run(images[:2], QUERIES[:2], [1, 20])
        assert [len(g) for g in both.generated_ids] == [1, 20]
        assert both.timings_ms["decode_steps"] == 19
        assert both.outputs["generated_ids"].shape == (2, 20) and (both.outputs["generated_ids"][0, 1:] == -1).all()
        for b, limit in enumerate((1, 20)):
            alone = run(images[b:b + 1], QUERIES[b:b + 1], [limit])
            assert both.generated_ids[b] == alone.generated_ids[0]
        # each request's [SEG] rows became its own masks
        owner = both.outputs.get("seg_batch", np.zeros(0, np.int64))
        seg = host.tokenizer.convert_tokens_to_ids("[SEG]")
        assert owner.tolist() == [b for b, g in enumerate(both.generated_ids) for t in g if t == seg]


def test_batch_over_the_exported_maximum_names_max_batch(session, images):
    n = session.max_batch + 1
    with pytest.raises(InputError, match="--max-batch") as err:
        session.segment_batch([images[0]] * n, ["Where is the cat?"] * n)
    assert f"a batch of {n} requests" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("mode", ["single-pass", "generate"])
def test_fp16_batch_masks_match_each_request_alone(session_fp16, images, mode):
    """fp16: a request's result in a batch of 3 (different query lengths and images) against the same request
    alone, on one fp16 artifact: ids equal, mask IoU and mask logits within BATCH_TOLERANCES."""
    tol, s = BATCH_TOLERANCES["fp16"], session_fp16
    assert s.artifact.precision == "fp16"
    batch = s.segment_batch(images, list(QUERIES), mode=mode, max_new_tokens=6)
    for image, query, got in zip(images, QUERIES, batch):
        alone = s.segment(image, query, mode=mode, max_new_tokens=6)
        assert got.generated_ids == alone.generated_ids and got.answer == alone.answer
        assert got.masks.shape == alone.masks.shape and got.masks.shape[0] >= 1
        assert mask_iou(got.masks, alone.masks) >= tol["mask_iou_min"]
        assert np.abs(got.mask_logits - alone.mask_logits).max() <= tol["mask_logits_atol"]
