"""The reference forward: `full` equals the plain unpruned composition; every preset's per-layer
image-token counts (counted from tensors) equal the schedule's."""

import dataclasses

import numpy as np
import pytest
import torch

from exporter.checkpoint import load_checkpoint
from exporter.preprocess import clip_pixels, postprocess_masks, sam_pixels
from exporter.reference import Reference
from graphs.errors import InputError
from graphs.schedule import PRESETS, resolve

QUERY = "Where is the cat in this picture?"


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    return load_checkpoint(tiny_ckpt)


@pytest.fixture(scope="module")
def image():
    from skimage import data

    return data.chelsea()  # 300x451 RGB photo shipped with scikit-image


def _reference(loaded, name, **knobs):
    shape = loaded.shape
    sched = resolve(name, shape.llm.layers, shape.num_image_tokens, **knobs)
    return Reference(loaded.model, loaded.tokenizer, loaded.image_processor_config, sched)


def _plain_composition(loaded, image, ids):
    """Unpruned LISA by hand: HF Llama on the spliced sequence, head, SAM. No schedule code involved."""
    m = loaded.model
    emb = m.vision_features(clip_pixels(image, loaded.image_processor_config))[1]  # [1, N, H]
    embed = m.llm.model.embed_tokens
    spliced = torch.cat([embed(torch.tensor([ids.prefix])), emb, embed(torch.tensor([ids.suffix]))], dim=1)
    return spliced


@torch.no_grad()
def test_full_single_pass_equals_plain_composition(loaded, image):
    ref = _reference(loaded, "full")
    out = ref(image, QUERY, mode="single-pass")
    ids = ref.prompt(QUERY, "single-pass")
    m = loaded.model
    spliced = _plain_composition(loaded, image, ids)
    final = m.llm.model(inputs_embeds=spliced).last_hidden_state  # post-norm
    n = m.shape.num_image_tokens
    rows = [len(ids.prefix) + n + j - 1 for j in ids.seg_suffix_positions()]
    seg = m.seg_head(final[0, rows])
    sam_in, resized = sam_pixels(image, m.shape.sam.image_size)
    low = m.sam_decode(m.sam_image_embeddings(sam_in), seg)
    logits = postprocess_masks(low, resized, image.shape[:2], m.shape.sam.image_size)

    assert out.seg_embeddings.shape == seg.shape == (1, m.shape.out_dim)
    assert (out.seg_embeddings - seg).abs().max() <= 1e-5
    assert (out.low_res_logits - low).abs().max() <= 1e-5
    assert (out.mask_logits - logits).abs().max() <= 1e-5
    assert out.masks.shape == (1, *image.shape[:2])
    on = out.masks.mean()
    assert 0.0 < on < 1.0, f"tiny model gives a degenerate mask ({on:.3f} of pixels on)"
    assert final.abs().mean() > 0.1  # hidden states are not near zero


@torch.no_grad()
def test_full_generate_ids_equal_hf_generate(loaded, image):
    ref = _reference(loaded, "full")
    out = ref(image, QUERY, mode="generate", max_new_tokens=8)
    ids = ref.prompt(QUERY, "generate")
    spliced = _plain_composition(loaded, image, ids)
    hf = loaded.model.llm.generate(inputs_embeds=spliced, attention_mask=torch.ones(spliced.shape[:2], dtype=torch.long),
                                   max_new_tokens=8, do_sample=False)
    assert out.generated_ids == hf[0].tolist()
    assert len(out.generated_ids) >= 1


@pytest.mark.parametrize("mode", ["single-pass", "generate"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_image_tokens_per_layer_match_schedule(loaded, image, name, mode):
    ref = _reference(loaded, name)
    out = ref(image, QUERY, mode=mode, max_new_tokens=3)
    expected = ref.schedule.tokens_per_layer()
    assert out.image_tokens_per_layer == expected
    if mode == "generate":
        assert out.kv_image_tokens_per_layer == expected  # each layer's cache holds only its stage's tokens
    for stage in ref.schedule.stages:
        idx = out.stage_indices[stage.name]
        assert len(idx) == stage.budget and idx == sorted(set(idx))


@pytest.mark.parametrize("method", ["uniform", "random", "cls_attention", "kmeans"])
@pytest.mark.parametrize("scatter", ["delta", "copy", "embedding"])
def test_every_cluster_method_and_scatter_mode_runs(loaded, image, method, scatter):
    ref = _reference(loaded, "csp", cluster_method=method, scatter_mode=scatter)
    out = ref(image, QUERY)
    assert out.image_tokens_per_layer == ref.schedule.tokens_per_layer()
    assert torch.isfinite(out.mask_logits).all()


def test_seg_first_uses_instance_masks(loaded, image):
    ref = _reference(loaded, "csp", cluster_method="seg_first")
    grid = loaded.shape.vision.grid
    masks = np.zeros((2, grid, grid), dtype=bool)
    masks[0, : grid // 2] = True
    masks[1, grid // 2 :, : grid // 2] = True
    out = ref(image, QUERY, instance_masks=masks)
    first = out.stage_indices["llm_0"]
    assert len(first) == ref.schedule.stages[0].budget
    covered = masks.any(axis=0).reshape(-1)
    assert covered[first].all()  # with two instances covering 3/4 of the grid, every pick lies inside one
    with pytest.raises(InputError, match="instance masks"):
        ref(image, QUERY)


def test_pruning_changes_the_result_but_not_the_shapes(loaded, image):
    full = _reference(loaded, "full")(image, QUERY)
    csp = _reference(loaded, "csp")(image, QUERY)
    assert csp.seg_embeddings.shape == full.seg_embeddings.shape
    assert not torch.equal(csp.seg_embeddings, full.seg_embeddings)


def test_prune_query_variants_pick_different_tokens(loaded, image):
    picks = {q: _reference(loaded, "fastv", prune_query=q)(image, QUERY).stage_indices["llm_1"]
             for q in ("seg", "last", "mean")}
    assert len({tuple(v) for v in picks.values()}) >= 2


def test_empty_query_is_an_input_error(loaded, image):
    with pytest.raises(InputError, match="empty"):
        _reference(loaded, "full")(image, "   ")


def test_schedule_for_another_model_is_refused(loaded):
    sched = resolve("csp", 32, 256)
    with pytest.raises(Exception, match="resolved for L=32"):
        Reference(loaded.model, loaded.tokenizer, loaded.image_processor_config, sched)


@pytest.mark.parametrize("name,knobs", [("csp", {}), ("evtp", {}), ("csp", {"prune_query": "mean"})],
                         ids=["csp", "evtp", "csp-mean-query"])
@torch.no_grad()
def test_batched_reference_equals_each_request_alone(loaded, image, name, knobs):
    """Reference.batch: right-padded suffixes, per-request selections and [SEG] rows; masks equal to alone."""
    ref = _reference(loaded, name, **knobs)
    images = [image, np.ascontiguousarray(image[::-1]), np.ascontiguousarray(image[:, ::-1])]
    queries = [QUERY, "Where?", "What is at the far left side of the picture, below the cat's ear?"]
    batch = ref.batch(images, queries)
    for im, q, got in zip(images, queries, batch):
        alone = ref(im, q, mode="single-pass")
        assert got.stage_indices == alone.stage_indices
        assert np.array_equal(got.masks, alone.masks)
        torch.testing.assert_close(got.seg_hidden, alone.seg_hidden, atol=1e-5, rtol=0)


@torch.no_grad()
def test_batched_generate_equals_each_request_alone(loaded, image):
    """Reference.batch in generate mode: greedy decode for the batch with a per-request stop (one request stops
    at step 1, one runs 20 steps); ids, every step's hidden state and the masks equal each request alone."""
    ref = _reference(loaded, "csp")  # cluster, scatter and a prune: every per-request selection
    images = [image, np.ascontiguousarray(image[::-1]), np.ascontiguousarray(image[:, ::-1])]
    queries = [QUERY, "Where?", "What is at the far left side of the picture, below the cat's ear?"]
    # the tiny model answers "[SEG]</s>": no stop token, so the limits alone decide where each request stops
    ids = [dataclasses.replace(ref.prompt(q, "generate"), eos_token_id=-1) for q in queries]
    assert len({len(i.suffix) for i in ids}) == 3  # right padding differs per request
    limits = [1, 20, 7]
    batch = ref.batch(images, ids, mode="generate", max_new_tokens=limits)
    assert [len(b.generated_ids) for b in batch] == limits
    for im, q, limit, got in zip(images, ids, limits, batch):
        alone = ref(im, q, mode="generate", max_new_tokens=limit)
        assert got.generated_ids == alone.generated_ids and got.answer == alone.answer
        assert got.stage_indices == alone.stage_indices
        assert got.kv_image_tokens_per_layer == alone.kv_image_tokens_per_layer
        # each step's hidden state: a padded cache row seen by a decode step would move these by ~0.4
        torch.testing.assert_close(got.step_hidden, alone.step_hidden, atol=1e-5, rtol=0)
        assert got.masks.shape == alone.masks.shape and np.array_equal(got.masks, alone.masks)
    seg = ids[0].seg_token_id
    assert [len(b.masks) for b in batch] == [b.generated_ids.count(seg) for b in batch]
    # with the stop token, each request stops at its own "</s>" and the others go on
    eos = ref.prompt(QUERY, "generate").eos_token_id
    stopped = ref.batch(images, queries, mode="generate", max_new_tokens=[1, 20, 20])
    assert stopped[0].generated_ids == batch[0].generated_ids
    for im, q, got in zip(images[1:], queries[1:], stopped[1:]):
        assert got.generated_ids == ref(im, q, mode="generate", max_new_tokens=20).generated_ids
        assert got.generated_ids[-1] == eos and len(got.generated_ids) < 20


def test_batched_reference_limits_are_one_per_request(loaded, image):
    with pytest.raises(InputError, match="2 limits for 3 requests"):
        _reference(loaded, "csp").batch([image] * 3, [QUERY] * 3, mode="generate", max_new_tokens=[1, 2])
