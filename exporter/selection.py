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


def _batched(x: torch.Tensor, rank: int):
    """(x with a leading batch axis, whether one was added): the ops below take [B, ...] or one request's [...]."""
    return (x[None], True) if x.dim() == rank else (x, False)


def _unbatched(x: torch.Tensor, added: bool) -> torch.Tensor:
    return x[0] if added else x


def rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """[B, N] (or [N]) float32 rank of each score in descending order, lower index first on equal scores: a
    permutation of 0..N-1 per row, so a TopK over -rank has no ties to break. N x N comparisons: 65k at N = 256."""
    s, added = _batched(scores.float(), 1)
    pos = torch.arange(s.shape[-1], dtype=torch.float32, device=s.device)
    # ahead[b, a, c]: c comes before a.
    a, c = s[:, :, None], s[:, None, :]
    ahead = (c > a) | ((c == a) & (pos[None, None, :] < pos[None, :, None]))
    return _unbatched(ahead.to(torch.float32).sum(dim=-1), added)


def sort_indices(idx: torch.Tensor) -> torch.Tensor:
    """[B, k] (or [k]) indices in ascending order (kept tokens stay in original order)."""
    x, added = _batched(idx, 1)
    return _unbatched(torch.sort(x, dim=-1).values, added)


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B, N] (or [N]) scores -> [B, k] indices of the k largest (lower index first on ties), ascending."""
    x, added = _batched(scores, 1)
    return _unbatched(sort_indices(torch.topk(-rank_desc(x), k, dim=-1).indices), added)


def uniform_indices(n: int, k: int, device=None) -> torch.Tensor:
    """Index i * floor(N / k) for i < k."""
    return torch.arange(k, device=device) * (n // k)


def random_indices(n: int, k: int, seed: int, device=None) -> torch.Tensor:
    """k distinct indices drawn with a fixed seed: a constant of the graph."""
    gen = torch.Generator().manual_seed(seed)
    return sort_indices(torch.randperm(n, generator=gen)[:k]).to(device)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], idx [B, k] -> [B, k, D]: each request's rows (a batched `x[idx]`)."""
    return torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[-1]))


def kmeans_indices(feats: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """Spherical k-means: `iters` Lloyd steps on unit features from a uniform init, then the
    distinct token nearest each centroid.

    Args:
        feats (Tensor): [B, N, D] (or [N, D]) token features.
        k (int): number of representatives.
        iters (int): Lloyd iterations (unrolled).
    """
    x, added = _batched(feats, 2)
    f = F.normalize(x.float(), dim=-1)  # [B, N, D]
    n = f.shape[1]
    centroids = f[:, uniform_indices(n, k, f.device)]  # [B, k, D]
    for _ in range(iters):
        assign = first_argmax(f @ centroids.transpose(1, 2), dim=-1)  # [B, N]
        onehot = F.one_hot(assign, k).to(f.dtype)  # [B, N, k]
        counts = onehot.sum(dim=1)[:, :, None]  # [B, k, 1]
        means = F.normalize(onehot.transpose(1, 2) @ f, dim=-1)
        # An empty cluster keeps its centroid: arithmetic select instead of data-dependent control flow.
        centroids = torch.where(counts > 0, means, centroids)
    return _unbatched(_nearest_distinct(f, centroids), added)


def _nearest_distinct(f: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """For each centroid in turn, the most similar token not yet taken. f [B, N, D], centroids [B, k, D] -> [B, k]."""
    sim = f @ centroids.transpose(1, 2)  # [B, N, k]
    taken = torch.zeros(f.shape[:2], dtype=f.dtype, device=f.device)  # [B, N]
    picks = []
    for j in range(centroids.shape[1]):
        # Taken tokens drop below any cosine (>= -1) so each centroid gets a distinct token.
        idx = first_argmax(sim[:, :, j] - 4.0 * taken, dim=-1)  # [B]
        taken = taken + F.one_hot(idx, f.shape[1]).to(f.dtype)
        picks.append(idx)
    return sort_indices(torch.stack(picks, dim=-1))


def seg_first_indices(instance_masks: torch.Tensor, k: int) -> torch.Tensor:
    """Representatives allocated over host-supplied instance masks (the paper's `seg_first`).

    Instance i (of M) with |M_i| tokens gets q_i = max(1, floor(k |M_i| / sum |M_j|)) tokens, spread
    evenly over its tokens in raster order. The totals are then trimmed or padded to exactly k
    by a priority: an instance's j-th pick ranks j / q_i (so trimming drops the last picks
    first), unpicked instance tokens rank after all picks, background tokens last.
    A token in several masks belongs to the first. An all-zero mask changes nothing (a batch pads
    requests with fewer instances with empty masks).

    Args:
        instance_masks (Tensor): [B, M, N] (or [M, N]) bool or 0/1, instance masks at token-grid resolution.
        k (int): number of representatives.
    """
    # float32 throughout (TensorRT has no float64): every value is a small integer, exact below 2**24.
    m, added = _batched(instance_masks.to(torch.float32), 2)
    n = m.shape[2]
    in_any = m.amax(dim=1) > 0  # [B, N]
    owner = first_argmax(m, dim=1)  # [B, N]: first instance containing the token
    own = F.one_hot(owner, m.shape[1]).to(torch.float32) * in_any[:, :, None].to(torch.float32)  # [B, N, M]
    counts = own.sum(dim=1, keepdim=True)  # [B, 1, M]
    total = counts.sum(dim=2, keepdim=True).clamp(min=1.0)  # [B, 1, 1]
    quota = torch.clamp(torch.floor(k * counts / total), min=1.0) * (counts > 0)  # [B, 1, M]
    rank = ((torch.cumsum(own, dim=1) - 1.0) * own).sum(dim=2)  # [B, N] rank within own instance
    c = (own * counts).sum(dim=2).clamp(min=1.0)
    q = (own * quota).sum(dim=2).clamp(min=1.0)
    bucket = torch.floor(rank * q / c)
    picked = (torch.floor((rank + 1.0) * q / c) > bucket) & in_any
    pos = torch.arange(n, dtype=torch.float32, device=m.device)[None].expand_as(rank)
    # Priority as an exact fraction num/den: picks bucket/q, other instance tokens 1 + rank/c, background 2 + pos/n.
    num = torch.where(picked, bucket, torch.where(in_any, c + rank, 2.0 * n + pos))
    den = torch.where(picked, q, torch.where(in_any, c, torch.full_like(pos, float(n))))
    # Total order by cross-multiplication (no float ties), lower index first on equal priority.
    mine, theirs = num[:, :, None] * den[:, None, :], num[:, None, :] * den[:, :, None]  # [B, N, N]
    ahead = (theirs < mine) | ((theirs == mine) & (pos[:, None, :] < pos[:, :, None]))  # [b, a, c]: c before a
    # Ranks are distinct already: TopK has no ties to break.
    return _unbatched(sort_indices(torch.topk(-ahead.to(torch.float32).sum(dim=2), k, dim=-1).indices), added)


def kcenter_indices(feats: torch.Tensor, grid: int, k: int, lam: float) -> torch.Tensor:
    """EVTP spatial k-center: greedy farthest-point selection.

    Distance (1 - lam) * |f_i - f_j| + lam * |p_i - p_j| over unit projector features f and grid
    coordinates p in [0, 1]^2; seeded by the token nearest the feature mean.

    Args:
        feats (Tensor): [B, N, D] (or [N, D]) projector features, N = grid * grid in raster order.
        grid (int): tokens per side.
        k (int): tokens to keep.
        lam (float): weight of the spatial term.
    """
    x, added = _batched(feats, 2)
    f = F.normalize(x.float(), dim=-1)  # [B, N, D]
    n = f.shape[1]
    ids = torch.arange(n, device=f.device)
    p = torch.stack([ids // grid, ids % grid], dim=-1).to(f.dtype) / max(grid - 1, 1)  # [N, 2]
    # The spatial term elementwise, not through cdist's |a|^2 + |b|^2 - 2ab: the grid's many equal distances then
    # round identically on every backend (two-term sums and sqrt are exactly rounded), so its ties stay exact ties.
    dp = p[:, None, :] - p[None, :, :]  # [N, N, 2]
    dist = (1.0 - lam) * torch.cdist(f, f) + lam * torch.sqrt(dp[..., 0] * dp[..., 0] + dp[..., 1] * dp[..., 1])
    seed = first_argmax(-torch.linalg.vector_norm(f - f.mean(dim=1, keepdim=True), dim=-1), dim=-1)  # [B]
    min_d = _row(dist, seed)  # [B, N]
    picks = [seed]
    for _ in range(k - 1):
        nxt = first_argmax(min_d, dim=-1)
        min_d = torch.minimum(min_d, _row(dist, nxt))
        picks.append(nxt)
    return _unbatched(sort_indices(torch.stack(picks, dim=-1)), added)


def _row(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, M], idx [B] -> [B, M]: row idx[b] of each request's matrix."""
    return torch.gather(x, 1, idx[:, None, None].expand(-1, 1, x.shape[2]))[:, 0]


def assign_to_representatives(feats: torch.Tensor, rep_idx: torch.Tensor) -> torch.Tensor:
    """[B, N] (or [N]) position (0..k-1) of each token's nearest representative by cosine; reps map to themselves.

    Args:
        feats (Tensor): [B, N, D] (or [N, D]).
        rep_idx (Tensor): [B, k] (or [k]) representative indices.
    """
    x, added = _batched(feats, 2)
    idx = rep_idx[None] if added else rep_idx
    f = F.normalize(x.float(), dim=-1)
    assign = first_argmax(f @ gather_rows(f, idx).transpose(1, 2), dim=-1)  # [B, N]
    ar = torch.arange(idx.shape[1], device=idx.device)[None].expand_as(idx)
    return _unbatched(assign.scatter(1, idx, ar), added)


def scatter_tokens(h_rep: torch.Tensor, emb: torch.Tensor, rep_idx: torch.Tensor, assign: torch.Tensor,
                   mode: str) -> torch.Tensor:
    """All N image tokens re-enter at their original positions.

    Args:
        h_rep (Tensor): [B, k, H] (or [k, H]) representatives' hidden states after the cluster layers.
        emb (Tensor): [B, N, H] (or [N, H]) all projected image embeddings (the LLM input).
        rep_idx (Tensor): [B, k] (or [k]) representative indices.
        assign (Tensor): [B, N] (or [N]) each token's representative, as a position in rep_idx.
        mode (str): "delta": e_i + (h_rep - e_rep); "copy": h_rep; "embedding": e_i.
    Returns:
        Tensor: [B, N, H] (or [N, H]); representatives always carry their own h_rep.
    """
    h, added = _batched(h_rep, 2)
    if added:
        emb, rep_idx, assign = emb[None], rep_idx[None], assign[None]
    if mode == "delta":
        out = emb + gather_rows(h - gather_rows(emb, rep_idx), assign)
    elif mode == "copy":
        out = gather_rows(h, assign)
    elif mode == "embedding":
        out = emb
    else:
        raise ValueError(f"unknown scatter mode {mode!r}")
    out = out.scatter(1, rep_idx[:, :, None].expand(-1, -1, h.shape[-1]), h)
    return _unbatched(out, added)


def query_attention(layer, hidden_in: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                    query_rows: torch.Tensor, row_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of chosen query rows in one decoder layer, mean over heads and rows.

    Recomputes the layer's Q/K (input norm, projections, RoPE) rather than asking transformers for
    attention weights, so it works with any attention implementation and traces to plain ops.

    Args:
        layer: a transformers LlamaDecoderLayer.
        hidden_in (Tensor): [B, T, H] the layer's input hidden states.
        cos, sin (Tensor): [B, T, head_dim] rotary embeddings for these rows.
        mask (Tensor): [B, 1, T, T] additive attention mask.
        query_rows (Tensor): [B, R] (or [R]) rows whose attention is averaged.
        row_lens (Tensor | None): [B] each request's real rows: query rows at or past it (right padding) are left
            out of the mean. Defaults to None (every query row counts).
    Returns:
        Tensor: [B, T] (or [T] for [R] query rows) attention paid to each key row.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rows, added = _batched(query_rows, 1)
    attn = layer.self_attn
    x = layer.input_layernorm(hidden_in)
    b, t = x.shape[0], x.shape[1]
    q = attn.q_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)  # [B, heads, T, hd]
    k = attn.k_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)  # [B, kv_heads, T, hd]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
    heads, hd = q.shape[1], q.shape[3]
    q = torch.gather(q, 2, rows[:, None, :, None].expand(-1, heads, -1, hd))  # [B, heads, R, hd]
    m = torch.gather(mask, 2, rows[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))  # [B, 1, R, T]
    scores = (q @ k.transpose(-1, -2)).float() * attn.scaling + m.float()
    probs = torch.softmax(scores, dim=-1).mean(dim=1)  # [B, R, T]
    if row_lens is None:
        return _unbatched(probs.mean(dim=1), added)
    w = (rows < row_lens[:, None]).to(torch.float32)  # [B, R]: real query rows
    return (probs * w[:, :, None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp(min=1.0)


def first_stage_indices(schedule, stage, feats: torch.Tensor, cls_attn: torch.Tensor | None, grid: int,
                        instance_masks: torch.Tensor | None) -> torch.Tensor:
    """Original indices of the image tokens the schedule's first stage sees (its entry op), per request.

    Args:
        schedule (Schedule): supplies the clustering knobs.
        stage (Stage): the first stage; op "all", "cluster" or "kcenter".
        feats (Tensor): [B, N, H] (or [N, H]) projected image tokens.
        cls_attn (Tensor | None): [B, N] CLS attention (cluster_method "cls_attention").
        grid (int): tokens per side of the CLIP grid.
        instance_masks (Tensor | None): [B, M, grid, grid] (or [M, grid, grid]) masks (cluster_method "seg_first").
    Returns:
        Tensor: [B, budget] (or [budget]) int64, ascending.
    """
    if stage.op == "accm":
        raise ScheduleError(f"schedule {schedule.name!r} starts with ACCM's picks, which need ACCM's own models: "
                            "run it with exporter.accm.reference.AccmReference (docs/accm.md)")
    x, added = _batched(feats, 2)
    b, n = x.shape[0], x.shape[1]

    def constant(idx):  # the same indices for every request
        return _unbatched(idx[None].expand(b, -1), added)

    if stage.op == "all":
        return constant(torch.arange(n, device=x.device))
    if stage.op == "kcenter":
        return _unbatched(kcenter_indices(x, grid, stage.budget, schedule.kcenter_lambda), added)
    method = schedule.cluster_method
    if method == "uniform":
        return constant(uniform_indices(n, stage.budget, x.device))
    if method == "random":
        return constant(random_indices(n, stage.budget, schedule.seed, x.device))
    if method == "cls_attention":
        return _unbatched(topk_sorted(cls_attn, stage.budget), added)
    if method == "kmeans":
        return _unbatched(kmeans_indices(x, stage.budget, schedule.kmeans_iters), added)
    if method == "seg_first":
        if instance_masks is None:
            raise InputError("cluster_method 'seg_first' needs instance masks at token-grid resolution; "
                             "pass instance_masks or choose another cluster_method")
        m = instance_masks[None] if added else instance_masks
        return _unbatched(seg_first_indices(m.reshape(b, m.shape[1], grid * grid), stage.budget), added)
    raise AssertionError(f"unhandled cluster method {method}")
