"""Selection ops: exact sizes, original order, the documented semantics."""

import pytest
import torch

from exporter import selection


def _is_sorted_distinct(idx, n):
    vals = idx.tolist()
    return vals == sorted(set(vals)) and all(0 <= v < n for v in vals)


def test_uniform_is_strided():
    assert selection.uniform_indices(256, 64).tolist() == list(range(0, 256, 4))


def test_random_is_seeded_and_distinct():
    a = selection.random_indices(64, 16, seed=3)
    assert torch.equal(a, selection.random_indices(64, 16, seed=3))
    assert not torch.equal(a, selection.random_indices(64, 16, seed=4))
    assert _is_sorted_distinct(a, 64) and len(a) == 16


def test_topk_sorted_keeps_original_order():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.05])
    assert selection.topk_sorted(scores, 2).tolist() == [1, 3]


def test_kmeans_picks_one_token_per_well_separated_cluster():
    torch.manual_seed(0)
    centers = torch.eye(8)[:4] * 10  # 4 orthogonal directions
    feats = torch.cat([c + 0.01 * torch.randn(16, 8) for c in centers])  # tokens grouped by cluster
    perm = torch.randperm(64)
    idx = selection.kmeans_indices(feats[perm], 4, iters=5)
    assert _is_sorted_distinct(idx, 64) and len(idx) == 4
    clusters = {int(perm[i]) // 16 for i in idx}
    assert clusters == {0, 1, 2, 3}


def test_kmeans_returns_distinct_tokens_even_with_duplicate_features():
    feats = torch.ones(10, 4)  # every centroid is nearest the same token
    idx = selection.kmeans_indices(feats, 5, iters=2)
    assert _is_sorted_distinct(idx, 10) and len(idx) == 5


def test_kcenter_spreads_over_the_grid_with_spatial_weight():
    grid = 8
    feats = torch.ones(grid * grid, 4)  # identical features: only the spatial term separates tokens
    idx = selection.kcenter_indices(feats, grid, 4, lam=1.0)
    corners = {0, grid - 1, grid * (grid - 1), grid * grid - 1}
    assert len(idx) == 4 and len(set(idx.tolist()) & corners) >= 3


def test_kcenter_seed_is_nearest_the_mean():
    torch.manual_seed(1)
    feats = torch.randn(16, 8)
    idx = selection.kcenter_indices(feats, 4, 1, lam=0.0)
    f = torch.nn.functional.normalize(feats, dim=-1)
    assert idx.tolist() == [int(torch.argmin((f - f.mean(0)).norm(dim=-1)))]


@pytest.mark.parametrize("k", [4, 7, 16])
def test_seg_first_allocates_by_area_and_returns_exactly_k(k):
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[0, :48] = True  # 3/4 of the area
    masks[1, 48:56] = True  # 1/8
    idx = selection.seg_first_indices(masks, k)
    assert _is_sorted_distinct(idx, 64) and len(idx) == k
    in0 = sum(1 for i in idx.tolist() if i < 48)
    in1 = sum(1 for i in idx.tolist() if 48 <= i < 56)
    assert in1 >= 1 and in0 >= in1  # every instance gets a token, the larger one more


def test_seg_first_small_instances_each_get_one():
    masks = torch.zeros(5, 64, dtype=torch.bool)
    for i in range(5):
        masks[i, i * 3] = True  # five one-token instances
    idx = selection.seg_first_indices(masks, 8)
    assert {0, 3, 6, 9, 12} <= set(idx.tolist()) and len(idx) == 8


def test_assign_maps_representatives_to_themselves():
    torch.manual_seed(0)
    feats = torch.randn(32, 8)
    reps = torch.tensor([0, 5, 9, 20])
    assign = selection.assign_to_representatives(feats, reps)
    assert assign[reps].tolist() == [0, 1, 2, 3]
    f = torch.nn.functional.normalize(feats, dim=-1)
    assert torch.equal(assign, (f @ f[reps].T).argmax(-1).index_copy(0, reps, torch.arange(4)))


@pytest.mark.parametrize("mode", ["delta", "copy", "embedding"])
def test_scatter_modes(mode):
    torch.manual_seed(0)
    emb, reps = torch.randn(6, 3), torch.tensor([1, 4])
    assign = torch.tensor([0, 0, 0, 1, 1, 1])
    h_rep = torch.randn(2, 3)
    out = selection.scatter_tokens(h_rep, emb, reps, assign, mode)
    assert torch.equal(out[reps], h_rep)  # representatives carry exactly their own hidden state
    i = 3  # a non-representative in cluster 1
    expected = {"delta": emb[i] + h_rep[1] - emb[4], "copy": h_rep[1], "embedding": emb[i]}[mode]
    assert torch.allclose(out[i], expected)
