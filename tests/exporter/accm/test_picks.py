"""ACCM's token picks, each rule against an independent computation of what clip_encoder.py does."""

import numpy as np
import pytest
import torch

from exporter.accm.picks import merge_picks, merged_cls_attention, outlier_picks, pick_tokens, text_picks


def test_outliers_above_q3_plus_1p5_iqr_as_numpy_computes_them():
    rng = np.random.default_rng(0)
    attn = rng.random(64).astype(np.float32) * 0.01
    attn[[5, 17, 40]] = [0.5, 0.3, 0.2]
    q1, q3 = np.percentile(attn, 25), np.percentile(attn, 75)
    want = set(np.where(attn > q3 + 1.5 * (q3 - q1))[0].tolist())
    assert want >= {5, 17, 40}
    assert set(outlier_picks(torch.from_numpy(attn))) == want
    assert outlier_picks(torch.full((64,), 1 / 64)) == []


@pytest.mark.parametrize("outliers,text,budget,n,want", [
    ([1, 5, 9], [2, 5, 30], 3, 64, [5, 9, 30]),        # over budget: the highest indices of the ascending union
    ([3], [10], 5, 16, [3, 10, 0, 6, 12]),             # under: grid of step ceil(16 / 3) = 6
    ([0], [6], 4, 16, [0, 6, 8, 1]),                   # grid 0, 8 minus what is there, then the lowest rest
    ([4, 2], [], 2, 16, [2, 4]),                       # exactly the budget
])
def test_merge_trims_or_fills_as_accm(outliers, text, budget, n, want):
    got = merge_picks(outliers, text, budget, n)
    assert got == want and len(set(got)) == budget


def test_text_picks_are_the_farthest_patches():
    patches = torch.eye(6, 4)[:, :4] + 0.01  # patch i points along axis i (i < 4); patches 4, 5 are nearly isotropic
    patches[5] = -patches[0]                 # opposite of patch 0
    text = patches[0:1] * 3.0                # the question aligned with patch 0
    assert text_picks(text, patches, 1) == [5]
    assert text_picks(text, patches, 6)[-1] == 0  # the nearest is ranked last


def test_merged_cls_attention_equals_accms_hooks(accm_models, lisa):
    """ACCM hooks the last layer's q_proj and k_proj and takes softmax(q k^T C^-1/2) over the full width."""
    tower = lisa.model.vision_tower
    got = {}
    layer = tower.encoder.layers[-1].self_attn
    hooks = [layer.q_proj.register_forward_hook(lambda m, i, o: got.__setitem__("q", o)),
             layer.k_proj.register_forward_hook(lambda m, i, o: got.__setitem__("k", o))]
    pixels = torch.randn(1, 3, lisa.shape.vision.image_size, lisa.shape.vision.image_size)
    try:
        with torch.no_grad():
            out = tower(pixel_values=pixels, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    c = lisa.shape.vision.hidden
    want = torch.softmax(got["q"] @ got["k"].transpose(-2, -1) * c**-0.5, dim=-1)[0, 0, 1:]
    with torch.no_grad():
        assert torch.allclose(merged_cls_attention(tower, out.hidden_states[-2]), want, atol=1e-6)


def test_pick_tokens_partitions_the_grid():
    torch.manual_seed(0)
    p = pick_tokens(torch.rand(64), torch.randn(1, 8), torch.randn(64, 8), budget=6, n_text=2)
    assert len(p.indices) == 6 and set(p.text) <= set(p.indices) | set(p.kept_out)
    assert sorted(p.indices + p.kept_out) == list(range(64)) and p.kept_out == sorted(p.kept_out)


def _case(seed, n, p=8):
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(n, generator=g) * 0.01
    k = int(torch.randint(0, 12, (1,), generator=g))
    attn[torch.randperm(n, generator=g)[:k]] += torch.rand(k, generator=g)  # 0..11 outliers
    return attn, torch.randn(1, p, generator=g), torch.randn(n, p, generator=g)


@pytest.mark.parametrize("n,budget,n_text", [(64, 4, 2), (64, 2, 1), (256, 16, 9), (256, 8, 5), (64, 12, 3)])
def test_static_picks_equal_the_reference(n, budget, n_text):
    from exporter.accm.picks import pick_indices_static

    for seed in range(20):
        attn, text, patches = _case(seed, n)
        want = pick_tokens(attn, text, patches, budget, n_text).sorted_indices
        assert pick_indices_static(attn, text, patches, budget, n_text).tolist() == want, seed
