"""ACCM's token picks before the LLM (clip_encoder.py `token_prune_merge_advanced_plus` at 50f1bd8).

    CLIP last layer: q, k of its input (heads merged, scale 1/sqrt(width)) -> softmax -> CLS row over the patches
        -> count the outliers above Q3 + 1.5 IQR -> that many top patches                    (cls picks)
    CLIP text tower(question), L2-normalised, vs the normalised per-patch projected embeddings:
        squared distance, top-k LARGEST (ACCM's `distances.topk`)                            (text picks)
    union, ascending; over budget -> keep the highest indices; under -> a uniform grid of step
        ceil(N / missing) minus what is there, then the lowest remaining indices (ACCM pads at random)

The LLM sees the picks in ascending order at their original positions (csprt's rule for every schedule);
the caption model sees every other token, ascending.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Picks:
    indices: list[int]        # the budget's tokens in ACCM's order: union (ascending), then grid, then the rest
    outliers: list[int]       # CLS-attention picks
    text: list[int]           # text picks
    kept_out: list[int]       # every other token, ascending: the caption model's input

    @property
    def sorted_indices(self) -> list[int]:
        return sorted(self.indices)


def merged_cls_attention(vision_tower, hidden_in: torch.Tensor) -> torch.Tensor:
    """The last CLIP layer's CLS-row attention over the patches, heads merged as ACCM computes it.

    ACCM hooks the last layer's q_proj and k_proj and takes softmax(q k^T / sqrt(width)) over the full
    width (not per head).

    Args:
        vision_tower: transformers' CLIPVisionModel.
        hidden_in (Tensor): [1, 1 + N, Dv] the last layer's input (`hidden_states[-2]`).

    Returns:
        Tensor: [N] float32.
    """
    last = vision_tower.encoder.layers[-1]
    x = last.layer_norm1(hidden_in)
    q, k = last.self_attn.q_proj(x).float(), last.self_attn.k_proj(x).float()
    attn = torch.softmax(q @ k.transpose(-1, -2) * x.shape[-1] ** -0.5, dim=-1)  # [1, 1+N, 1+N]
    return attn[0, 0, 1:]


def outlier_picks(cls_attn: torch.Tensor) -> list[int]:
    """Top patches by CLS attention, as many as lie above Q3 + 1.5 IQR (ACCM's `outlier_dectection`, numpy's
    linear percentiles; the count goes through ACCM's int(N * ratio))."""
    x = cls_attn.double()
    n = x.numel()
    q1, q3 = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype, device=x.device)).tolist()
    ratio = int((x > q3 + 1.5 * (q3 - q1)).sum()) / n
    count = int(n * ratio)
    return cls_attn.topk(count).indices.tolist() if count else []


def text_picks(text_embeds: torch.Tensor, patch_embeds: torch.Tensor, k: int) -> list[int]:
    """ACCM's text picks: the k patches whose normalised embedding is FARTHEST from the question's.

    Args:
        text_embeds (Tensor): [1, P] the CLIP text tower's projected question embedding.
        patch_embeds (Tensor): [N, P] per-patch projected embeddings.
        k (int): how many.
    """
    t = text_embeds.float() / text_embeds.float().norm(dim=-1, keepdim=True)
    v = patch_embeds.float() / patch_embeds.float().norm(dim=-1, keepdim=True)
    dist = (t**2).sum(1, keepdim=True) + (v**2).sum(1) - 2 * t @ v.T  # [1, N]
    return dist.topk(min(k, v.shape[0]), dim=1).indices[0].tolist()


def merge_picks(outliers: list[int], text: list[int], budget: int, n: int) -> list[int]:
    """Union trimmed or filled to `budget` indices of `n`, in ACCM's order (module docstring)."""
    union = sorted(set(outliers) | set(text))
    if len(union) > budget:
        union = union[-budget:]  # ACCM keeps the last `budget` of the ascending union
    missing = budget - len(union)
    if missing == 0:
        return union
    have = set(union)
    grid = [i for i in range(0, n, math.ceil(n / missing)) if i not in have]
    out = union + grid
    have.update(grid)
    return out + [i for i in range(n) if i not in have][:budget - len(out)]


def pick_tokens(cls_attn: torch.Tensor, text_embeds: torch.Tensor, patch_embeds: torch.Tensor, budget: int,
                n_text: int) -> Picks:
    """All of ACCM's picks for one image and question.

    Args:
        cls_attn (Tensor): [N] `merged_cls_attention`.
        text_embeds (Tensor): [1, P] the question's CLIP text embedding.
        patch_embeds (Tensor): [N, P] per-patch projected embeddings.
        budget (int): visual tokens the LLM keeps.
        n_text (int): text picks (the schedule's accm.text_picks).
    """
    n = cls_attn.numel()
    outliers = outlier_picks(cls_attn)
    text = text_picks(text_embeds, patch_embeds, n_text)
    indices = merge_picks(outliers, text, budget, n)
    chosen = set(indices)
    return Picks(indices=indices, outliers=outliers, text=text, kept_out=[i for i in range(n) if i not in chosen])


def pick_indices_static(cls_attn: torch.Tensor, text_embeds: torch.Tensor, patch_embeds: torch.Tensor, budget: int,
                        n_text: int) -> torch.Tensor:
    """The set `pick_tokens` picks, ascending, with static shapes and no data-dependent control flow (exportable).

    The same rules as masks over the N tokens (ACCM's random pad is csprt's lowest-remaining pad here too):

        outliers  cls_attn > Q3 + 1.5 IQR, quartiles by linear interpolation of the sorted values
        text      scatter of the top-k distances
        trim      of the union, keep those with at most `budget` picked at or above their index
        grid      index % ceil(N / missing) == 0 and not picked (never more than `missing` of them)
        rest      the lowest other indices, as many as are still missing
        indices   TopK of (picked * 2N - index): the picked ones, ascending

    Args:
        cls_attn (Tensor): [N] merged CLS attention.
        text_embeds (Tensor): [1, P].
        patch_embeds (Tensor): [N, P].
        budget (int): tokens kept.
        n_text (int): text picks.

    Returns:
        Tensor: [budget] int64, ascending.
    """
    n = cls_attn.shape[0]
    x = cls_attn.float()
    s = torch.sort(x[None], dim=-1).values[0]  # TopK in ONNX: 2-D, as TensorRT takes it
    q = []
    for p in (0.25, 0.75):  # numpy's linear percentile at static positions
        pos = p * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        q.append(s[lo] + (pos - lo) * (s[hi] - s[lo]))
    picked = (x > q[1] + 1.5 * (q[1] - q[0])).long()                                   # [N]
    t = text_embeds.float() / text_embeds.float().norm(dim=-1, keepdim=True)
    v = patch_embeds.float() / patch_embeds.float().norm(dim=-1, keepdim=True)
    dist = ((t**2).sum(1, keepdim=True) + (v**2).sum(1) - 2 * t @ v.T)[0]              # [N]
    top = dist[None].topk(min(n_text, n), dim=-1).indices[0]
    picked = torch.maximum(picked, torch.zeros_like(picked).scatter(0, top, 1))
    at_or_above = torch.flip(torch.cumsum(torch.flip(picked, [0]), 0), [0])
    keep = picked * (at_or_above <= budget).long()
    missing = budget - keep.sum()
    idx = torch.arange(n, device=x.device)
    step = (n + missing.clamp(min=1) - 1) // missing.clamp(min=1)
    grid = (idx % step == 0).long() * (1 - keep) * (missing > 0).long()
    still = missing - grid.sum()
    rest = (1 - keep) * (1 - grid)
    rest = rest * (torch.cumsum(rest, 0) <= still).long()
    chosen = keep + grid + rest                                                        # exactly `budget` ones
    return (chosen * 2 * n - idx)[None].topk(budget, dim=-1).indices[0]
