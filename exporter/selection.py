"""Token-selection ops, written to trace into static ONNX graphs.

Every op returns indices in original (ascending) order and uses only fixed-size tensor ops:
fixed-iteration loops unrolled at trace time, TopK / Gather / where, no data-dependent control
flow. The reference forward and the export wrappers call these same functions, so the graph
computes exactly what the reference does.

Shapes: N image tokens, D feature dim, k the budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graphs.errors import InputError, ScheduleError


# Ties. ONNX breaks TopK/ArgMax ties by lower index, torch.topk documents no order, and TensorRT documents none
# for either. So no selection here leans on a backend's tie order: argmax is "the first index holding the
# maximum" (ReduceMax, Equal, Where, ReduceMin: exact on every backend), and TopK only ever sees distinct keys
# (each score's rank in a total order, lower index first on equal scores). Scores are float32 (fp16 graphs too).
# TensorRT's TopK and reductions want rank >= 2, so 1-D vectors get a leading axis of 1 first.


_NOT_MAX = float(2**24)  # above any index; float32 represents every integer up to it exactly


def first_argmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Index of the largest element along `dim`, the lowest index on ties, on every backend alike.

    Args:
        x (Tensor): scores of any rank >= 2 (float; compared in float32).
        dim (int): the axis to reduce. Defaults to -1.

    Returns:
        Tensor: int64 indices, `x`'s shape without `dim`.
    """
    # NaN ranks lowest, so an all-NaN row still gives a valid index (0) rather than none.
    x = torch.nan_to_num(x.float(), nan=float("-inf"))
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    idx = torch.arange(x.shape[dim], dtype=torch.float32, device=x.device).reshape(shape)  # exact below 2**24
    at_max = x == x.amax(dim=dim, keepdim=True)
    # A constant, not the (possibly dynamic) length, for "not here": no symbolic size becomes a value in the graph.
    return torch.where(at_max, idx, _NOT_MAX).amin(dim=dim).to(torch.int64)


def argmax_1d(x: torch.Tensor) -> torch.Tensor:
    """Index of the largest element of a vector [N] (the lowest on ties), as a 0-d tensor."""
    return first_argmax(x[None], dim=-1)[0]


def rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """[N] float32 rank of each score in descending order, lower index first on equal scores: a permutation of
    0..N-1, so a TopK over -rank has no ties to break. N x N comparisons: 65k at N = 256."""
    s = scores.float()
    pos = torch.arange(s.shape[0], dtype=torch.float32, device=s.device)
    # ahead[a, b]: b comes before a.
    ahead = (s[None, :] > s[:, None]) | ((s[None, :] == s[:, None]) & (pos[None, :] < pos[:, None]))
    return ahead.to(torch.float32).sum(dim=1)


def sort_indices(idx: torch.Tensor) -> torch.Tensor:
    """[k] indices in ascending order (kept tokens stay in original order)."""
    return torch.sort(idx[None], dim=-1).values[0]


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[N] scores -> [k] indices of the k largest (lower index first on ties), ascending."""
    return sort_indices(torch.topk(-rank_desc(scores)[None], k, dim=-1).indices[0])


def uniform_indices(n: int, k: int, device=None) -> torch.Tensor:
    """Index i * floor(N / k) for i < k."""
    return torch.arange(k, device=device) * (n // k)


def random_indices(n: int, k: int, seed: int, device=None) -> torch.Tensor:
    """k distinct indices drawn with a fixed seed: a constant of the graph."""
    gen = torch.Generator().manual_seed(seed)
    return sort_indices(torch.randperm(n, generator=gen)[:k]).to(device)


def kmeans_indices(feats: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """Spherical k-means: `iters` Lloyd steps on unit features from a uniform init, then the
    distinct token nearest each centroid.

    Args:
        feats (Tensor): [N, D] token features.
        k (int): number of representatives.
        iters (int): Lloyd iterations (unrolled).
    """
    f = F.normalize(feats.float(), dim=-1)  # [N, D]
    n = f.shape[0]
    centroids = f[uniform_indices(n, k, f.device)]  # [k, D]
    for _ in range(iters):
        assign = first_argmax(f @ centroids.T, dim=-1)  # [N]
        onehot = F.one_hot(assign, k).to(f.dtype)  # [N, k]
        counts = onehot.sum(dim=0)[:, None]  # [k, 1]
        means = F.normalize(onehot.T @ f, dim=-1)
        # An empty cluster keeps its centroid: arithmetic select instead of data-dependent control flow.
        centroids = torch.where(counts > 0, means, centroids)
    return _nearest_distinct(f, centroids)


def _nearest_distinct(f: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """For each centroid in turn, the most similar token not yet taken. [k] ascending."""
    sim = f @ centroids.T  # [N, k]
    taken = torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
    picks = []
    for j in range(centroids.shape[0]):
        # Taken tokens drop below any cosine (>= -1) so each centroid gets a distinct token.
        idx = argmax_1d(sim[:, j] - 4.0 * taken)
        taken = taken + F.one_hot(idx, f.shape[0]).to(f.dtype)
        picks.append(idx)
    return sort_indices(torch.stack(picks))


def seg_first_indices(instance_masks: torch.Tensor, k: int) -> torch.Tensor:
    """Representatives allocated over host-supplied instance masks (the paper's `seg_first`).

    Instance i (of M) with |M_i| tokens gets q_i = max(1, floor(k |M_i| / sum |M_j|)) tokens, spread
    evenly over its tokens in raster order. The totals are then trimmed or padded to exactly k
    by a priority: an instance's j-th pick ranks j / q_i (so trimming drops the last picks
    first), unpicked instance tokens rank after all picks, background tokens last.
    A token in several masks belongs to the first.

    Args:
        instance_masks (Tensor): [M, N] bool or 0/1, instance masks at token-grid resolution.
        k (int): number of representatives.
    """
    # float32 throughout (TensorRT has no float64): every value is a small integer, exact below 2**24.
    m = instance_masks.to(torch.float32)
    n = m.shape[1]
    in_any = m.amax(dim=0) > 0  # [N]
    owner = first_argmax(m, dim=0)  # [N]: first instance containing the token
    own = F.one_hot(owner, m.shape[0]).to(torch.float32) * in_any[:, None].to(torch.float32)  # [N, M]
    counts = own.sum(dim=0)  # [M]
    quota = torch.clamp(torch.floor(k * counts / counts.sum().clamp(min=1.0)), min=1.0) * (counts > 0)
    rank = ((torch.cumsum(own, dim=0) - 1.0) * own).sum(dim=1)  # [N] rank within own instance
    c = (own * counts).sum(dim=1).clamp(min=1.0)
    q = (own * quota).sum(dim=1).clamp(min=1.0)
    bucket = torch.floor(rank * q / c)
    picked = (torch.floor((rank + 1.0) * q / c) > bucket) & in_any
    pos = torch.arange(n, dtype=torch.float32, device=m.device)
    # Priority as an exact fraction num/den: picks bucket/q, other instance tokens 1 + rank/c, background 2 + pos/n.
    num = torch.where(picked, bucket, torch.where(in_any, c + rank, 2.0 * n + pos))
    den = torch.where(picked, q, torch.where(in_any, c, torch.full_like(pos, float(n))))
    # Total order by cross-multiplication (no float ties), lower index first on equal priority.
    mine, theirs = num[:, None] * den[None, :], num[None, :] * den[:, None]  # [N, N]: a's and b's side of pa < pb
    ahead = (theirs < mine) | ((theirs == mine) & (pos[None, :] < pos[:, None]))  # [a, b]: b goes before a
    # Ranks are distinct already: TopK has no ties to break.
    return sort_indices(torch.topk(-ahead.to(torch.float32).sum(dim=1)[None], k, dim=-1).indices[0])


def kcenter_indices(feats: torch.Tensor, grid: int, k: int, lam: float) -> torch.Tensor:
    """EVTP spatial k-center: greedy farthest-point selection.

    Distance (1 - lam) * |f_i - f_j| + lam * |p_i - p_j| over unit projector features f and grid
    coordinates p in [0, 1]^2; seeded by the token nearest the feature mean.

    Args:
        feats (Tensor): [N, D] projector features, N = grid * grid in raster order.
        grid (int): tokens per side.
        k (int): tokens to keep.
        lam (float): weight of the spatial term.
    """
    f = F.normalize(feats.float(), dim=-1)
    n = f.shape[0]
    ids = torch.arange(n, device=f.device)
    p = torch.stack([ids // grid, ids % grid], dim=-1).to(f.dtype) / max(grid - 1, 1)  # [N, 2]
    # The spatial term elementwise, not through cdist's |a|^2 + |b|^2 - 2ab: the grid's many equal distances then
    # round identically on every backend (two-term sums and sqrt are exactly rounded), so its ties stay exact ties.
    dp = p[:, None, :] - p[None, :, :]  # [N, N, 2]
    dist = (1.0 - lam) * torch.cdist(f, f) + lam * torch.sqrt(dp[..., 0] * dp[..., 0] + dp[..., 1] * dp[..., 1])
    seed = argmax_1d(-torch.linalg.vector_norm(f - f.mean(dim=0, keepdim=True), dim=-1))
    min_d = dist[seed]
    picks = [seed]
    for _ in range(k - 1):
        nxt = argmax_1d(min_d)
        min_d = torch.minimum(min_d, dist[nxt])
        picks.append(nxt)
    return sort_indices(torch.stack(picks))


def assign_to_representatives(feats: torch.Tensor, rep_idx: torch.Tensor) -> torch.Tensor:
    """[N] position (0..k-1) of each token's nearest representative by cosine; reps map to themselves."""
    f = F.normalize(feats.float(), dim=-1)
    assign = first_argmax(f @ f[rep_idx].T, dim=-1)  # [N]
    return assign.scatter(0, rep_idx, torch.arange(rep_idx.shape[0], device=rep_idx.device))


def scatter_tokens(h_rep: torch.Tensor, emb: torch.Tensor, rep_idx: torch.Tensor, assign: torch.Tensor,
                   mode: str) -> torch.Tensor:
    """All N image tokens re-enter at their original positions.

    Args:
        h_rep (Tensor): [k, H] representatives' hidden states after the cluster layers.
        emb (Tensor): [N, H] all projected image embeddings (the LLM input).
        rep_idx (Tensor): [k] representative indices.
        assign (Tensor): [N] each token's representative, as a position in rep_idx.
        mode (str): "delta": e_i + (h_rep - e_rep); "copy": h_rep; "embedding": e_i.
    Returns:
        Tensor: [N, H]; representatives always carry their own h_rep.
    """
    if mode == "delta":
        out = emb + (h_rep - emb[rep_idx])[assign]
    elif mode == "copy":
        out = h_rep[assign]
    elif mode == "embedding":
        out = emb
    else:
        raise ValueError(f"unknown scatter mode {mode!r}")
    return out.index_copy(0, rep_idx, h_rep)


def query_attention(layer, hidden_in: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                    query_rows: torch.Tensor) -> torch.Tensor:
    """Softmax attention of chosen query rows in one decoder layer, mean over heads and rows.

    Recomputes the layer's Q/K (input norm, projections, RoPE) rather than asking transformers for
    attention weights, so it works with any attention implementation and traces to plain ops.

    Args:
        layer: a transformers LlamaDecoderLayer.
        hidden_in (Tensor): [1, T, H] the layer's input hidden states.
        cos, sin (Tensor): [1, T, head_dim] rotary embeddings for these rows.
        mask (Tensor): [1, 1, T, T] additive attention mask.
        query_rows (Tensor): [R] rows whose attention is averaged.
    Returns:
        Tensor: [T] attention paid to each key row.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    x = layer.input_layernorm(hidden_in)
    t = x.shape[1]
    q = attn.q_proj(x).view(1, t, -1, attn.head_dim).transpose(1, 2)  # [1, heads, T, hd]
    k = attn.k_proj(x).view(1, t, -1, attn.head_dim).transpose(1, 2)  # [1, kv_heads, T, hd]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
    q = q[:, :, query_rows]  # [1, heads, R, hd]
    scores = (q @ k.transpose(-1, -2)).float() * attn.scaling + mask[:, :, query_rows].float()
    probs = torch.softmax(scores, dim=-1)  # [1, heads, R, T]
    return probs.mean(dim=(0, 1, 2))


def first_stage_indices(schedule, stage, feats: torch.Tensor, cls_attn: torch.Tensor | None, grid: int,
                        instance_masks: torch.Tensor | None) -> torch.Tensor:
    """Original indices of the image tokens the schedule's first stage sees (its entry op).

    Args:
        schedule (Schedule): supplies the clustering knobs.
        stage (Stage): the first stage; op "all", "cluster" or "kcenter".
        feats (Tensor): [N, H] projected image tokens.
        cls_attn (Tensor | None): [1, N] CLS attention (cluster_method "cls_attention").
        grid (int): tokens per side of the CLIP grid.
        instance_masks (Tensor | None): [M, grid, grid] masks (cluster_method "seg_first").
    Returns:
        Tensor: [budget] int64, ascending.
    """
    n = feats.shape[0]
    if stage.op == "accm":
        raise ScheduleError(f"schedule {schedule.name!r} starts with ACCM's picks, which need ACCM's own models: "
                            "run it with exporter.accm.reference.AccmReference (docs/accm.md)")
    if stage.op == "all":
        return torch.arange(n, device=feats.device)
    if stage.op == "kcenter":
        return kcenter_indices(feats, grid, stage.budget, schedule.kcenter_lambda)
    method = schedule.cluster_method
    if method == "uniform":
        return uniform_indices(n, stage.budget, feats.device)
    if method == "random":
        return random_indices(n, stage.budget, schedule.seed, feats.device)
    if method == "cls_attention":
        return topk_sorted(cls_attn[0], stage.budget)
    if method == "kmeans":
        return kmeans_indices(feats, stage.budget, schedule.kmeans_iters)
    if method == "seg_first":
        if instance_masks is None:
            raise InputError("cluster_method 'seg_first' needs instance masks at token-grid resolution; "
                             "pass instance_masks or choose another cluster_method")
        return seg_first_indices(instance_masks.reshape(-1, grid * grid), stage.budget)
    raise AssertionError(f"unhandled cluster method {method}")
