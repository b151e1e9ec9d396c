"""One traceable `nn.Module` per stage graph, reusing the real submodules.

Each wrapper's positional arguments are its StageSpec inputs in order, and it returns a tuple in
the StageSpec's output order, so the spec's names become the ONNX names. Selection ops come from
`exporter.selection`, the same functions the reference runs. What differs from the reference is
only how things are written: shapes are read from tensors (P, S, T stay symbolic) and choices
that depend on data are arithmetic selects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from exporter import selection
from exporter.model import LisaModel
from graphs.schedule import Schedule
from graphs.stages import StageSpec


class VisionStage(nn.Module):
    """clip_pixels [, instance_masks] -> image_embeds, image_hidden, image_indices [, assign]."""

    def __init__(self, model: LisaModel, schedule: Schedule, spec: StageSpec):
        super().__init__()
        self.model, self.schedule, self.spec = model, schedule, spec
        self.first = schedule.stages[0]
        self.want_cls = self.first.op == "cluster" and schedule.cluster_method == "cls_attention"

    def forward(self, clip_pixels, instance_masks=None):
        _, emb, cls_attn = self.model.vision_features(clip_pixels, with_cls_attention=self.want_cls)
        emb = emb[0]  # [N, H]
        idx = selection.first_stage_indices(self.schedule, self.first, emb, cls_attn, self.model.shape.vision.grid,
                                            instance_masks)
        out = [emb, emb[idx][None], idx]
        if self.first.op == "cluster":
            out.append(selection.assign_to_representatives(emb, idx))
        return tuple(out)


class EmbedStage(nn.Module):
    """prefix_ids [P], suffix_ids [S] -> prefix_embeds [1, P, H], suffix_embeds [1, S, H].

    The only graph holding embed_tokens. A decode step feeds its token as both (one row each).
    """

    def __init__(self, model: LisaModel):
        super().__init__()
        self.model = model

    def forward(self, prefix_ids, suffix_ids):
        embed = self.model.llm.model.embed_tokens
        return embed(prefix_ids)[None], embed(suffix_ids)[None]


class EntryStage(nn.Module):
    """Schedule stage i's entry op, weightless: the rows [prefix | image rows | suffix] its block sees.

    entry_0: prefix_embeds, suffix_embeds, image_hidden, image_indices [, suffix_ids]
    entry_i: block_hidden (block i-1's rows), image_indices [, image_embeds, assign | row_scores],
             prefix_ids, suffix_ids
      -> hidden [1, T, H], positions [T] (RoPE: image rows keep P + index), image_indices_out [b]
         [, query_rows: rows whose attention ranks image rows for the next stage's pruning]
         [, next_position (entry_0): P + N + S]
    """

    def __init__(self, model: LisaModel, schedule: Schedule, index: int, spec: StageSpec, seg_token_id: int):
        super().__init__()
        self.schedule, self.spec, self.index = schedule, spec, index
        self.stage = schedule.stages[index]
        self.seg_token_id = seg_token_id
        self.n = model.shape.num_image_tokens
        self.in_names = [t.name for t in spec.inputs]
        self.out_names = [t.name for t in spec.outputs]

    def _split(self, x: dict):
        """(prefix [1,P,H], image rows [1,b,H], their indices [b], suffix [1,S,H]) entering this stage."""
        if self.index == 0:
            return x["prefix_embeds"], x["image_hidden"], x["image_indices"], x["suffix_embeds"]
        h = x["block_hidden"]
        p, s = x["prefix_ids"].shape[0], x["suffix_ids"].shape[0]
        t = h.shape[1]
        img, idx = h[:, p:t - s], x["image_indices"]
        if self.stage.op == "scatter":
            img = selection.scatter_tokens(img[0], x["image_embeds"], idx, x["assign"],
                                           self.schedule.scatter_mode)[None]
            idx = torch.arange(self.n, device=h.device)
        elif self.stage.op == "prune":
            keep = selection.topk_sorted(x["row_scores"][p:t - s], self.stage.budget)
            img, idx = img[:, keep], idx[keep]
        return h[:, :p], img, idx, h[:, t - s:]

    def _query_rows(self, t, s, suffix_ids, device):
        """Rows whose attention ranks image tokens for the next stage's pruning (reference `_query_rows`)."""
        query = self.schedule.prune_query
        if query == "mean":
            return torch.arange(t, device=device)
        last = torch.full((1,), t - 1, dtype=torch.long, device=device)
        if query == "last":
            return last
        # "seg": the row before the first [SEG] of the suffix (single-pass prompt); with none (generate
        # prompt), the last prompt row. An arithmetic select, not a branch on the data.
        is_seg = (suffix_ids == self.seg_token_id).to(torch.int64)
        first = selection.argmax_1d(is_seg)
        row = (t - s - 1) + first  # graphs.prompt.PromptIds.seg_rows, in-graph
        return torch.where(is_seg.sum() > 0, row, last[0])[None]

    def forward(self, *args):
        x = dict(zip(self.in_names, args))
        prefix, img, idx, suffix = self._split(x)
        h = torch.cat([prefix, img, suffix], dim=1)  # [1, T, H]
        p, s, t = prefix.shape[1], suffix.shape[1], h.shape[1]
        dev = h.device
        text_pos = torch.arange(s, device=dev) + (p + self.n)
        out = {"hidden": h, "image_indices_out": idx,
               "positions": torch.cat([torch.arange(p, device=dev), p + idx, text_pos])}
        if "query_rows" in self.out_names:
            out["query_rows"] = self._query_rows(t, s, x.get("suffix_ids"), dev)
        if "next_position" in self.out_names:
            out["next_position"] = torch.zeros(1, dtype=torch.long, device=dev) + (p + self.n + s)
        return tuple(out[name] for name in self.out_names)


def block_mask(rows: int, capacity, past_len: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """[1, 1, T, C + T] additive mask over [cache (C rows, the first past_len valid) | the T new rows (causal)].

    Built from aranges so T and C stay symbolic; one shape serves every decode step of a request.
    """
    r = torch.arange(rows, device=device)[:, None]                    # [T, 1]
    c = torch.arange(capacity + rows, device=device)[None, :]         # [1, C + T]
    seen = ((c < capacity) & (c < past_len)) | ((c >= capacity) & ((c - capacity) <= r))  # no bool Where in ORT
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(seen, zero, torch.finfo(dtype).min)[None, None]


def block_layer(layer, h, cos, sin, past_k, past_v, mask):
    """One LLaMA decoder layer attending over a static cache plus its new rows, without copying the cache.

    The scores against the cache and against the new rows are two matmuls, concatenated ([.., C + T], not
    the cache), and grouped-query heads are a reshape of Q (no repeat of K/V). transformers' own layer
    would concatenate the cache with the new rows, a copy of the whole cache per layer and step.

    Args:
        h (Tensor): [1, T, H] the layer's input rows.
        past_k, past_v (Tensor): [1, kv_heads, C, hd] the cache (rows >= past_len are masked).
        mask (Tensor): [1, 1, T, C + T] from `block_mask`.

    Returns:
        (h [1, T, H], new keys [1, kv_heads, T, hd], new values [1, kv_heads, T, hd])
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    x = layer.input_layernorm(h)
    t, hd, kvh = x.shape[1], attn.head_dim, past_k.shape[1]
    q = attn.q_proj(x).view(1, t, -1, hd).transpose(1, 2)  # [1, heads, T, hd]
    k = attn.k_proj(x).view(1, t, kvh, hd).transpose(1, 2)  # [1, kv, T, hd]
    v = attn.v_proj(x).view(1, t, kvh, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    g = q.shape[1] // kvh
    qg = q.reshape(1, kvh, g * t, hd)  # head kvh_i * g + j -> rows j * T .. of group kvh_i (repeat_kv's order)
    scores = torch.cat([qg @ past_k.transpose(-1, -2), qg @ k.transpose(-1, -2)], dim=-1) * attn.scaling
    scores = scores.view(1, kvh, g, t, -1) + mask[:, :, None]  # [1, kv, g, T, C + T]
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype).view(1, kvh, g * t, -1)
    cap = past_k.shape[2]
    out = probs[..., :cap] @ past_v + probs[..., cap:] @ v  # [1, kv, g*T, hd]
    out = out.view(1, kvh * g, t, hd).transpose(1, 2).reshape(1, t, kvh * g * hd)
    h = h + attn.o_proj(out)
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, k, v


class BlockStage(nn.Module):
    """One schedule stage's decoder layers over rows and a static cache; prefill and decode alike.

    hidden [1, T, H], positions [T] [, query_rows [R]], past_len [1], past_{key,value}_<l> [1, kv, C, hd]
      -> hidden_out [1, T, H], {key,value}_<l> [1, kv, T, hd] [, row_scores [T]] [, next_token [1], last_hidden [1, H]]
    The last block applies the final norm (hidden_out is post-norm) and lm_head on the last row.
    """

    def __init__(self, model: LisaModel, schedule: Schedule, index: int, spec: StageSpec):
        super().__init__()
        self.model, self.spec = model, spec
        self.stage = schedule.stages[index]
        self.in_names = [t.name for t in spec.inputs]
        self.out_names = [t.name for t in spec.outputs]

    def forward(self, *args):
        x = dict(zip(self.in_names, args))
        m = self.model
        h, pos, past_len = x["hidden"], x["positions"][None], x["past_len"]
        t, dev = h.shape[1], h.device
        cos, sin = m.llm.model.rotary_emb(h, pos)
        cap = x[f"past_key_{self.stage.start}"].shape[2]
        mask = block_mask(t, cap, past_len, h.dtype, dev)
        out = {}
        for layer_idx in self.stage.layers:
            layer = m.decoder_layers[layer_idx]
            if "row_scores" in self.out_names and layer_idx == self.stage.end - 1:
                # Prefill semantics (the reference's): attention among this call's rows only.
                out["row_scores"] = selection.query_attention(layer, h, cos, sin, mask[..., cap:], x["query_rows"])
            h, out[f"key_{layer_idx}"], out[f"value_{layer_idx}"] = block_layer(
                layer, h, cos, sin, x[f"past_key_{layer_idx}"], x[f"past_value_{layer_idx}"], mask)
        if "next_token" in self.out_names:
            h = m.llm.model.norm(h)
            out["last_hidden"] = h[:, -1]  # [1, H]
            # Greedy, lowest id on ties on every backend (TensorRT documents no ArgMax tie order).
            out["next_token"] = selection.first_argmax(m.llm.lm_head(h[:, -1]), dim=-1)  # [1]
        out["hidden_out"] = h
        return tuple(out[name] for name in self.out_names)


class SegGatherStage(nn.Module):
    """hidden [1, T, H] (post-norm), suffix_ids [S], seg_rows [K] -> seg_hidden [K, H]: the rows predicting each [SEG].

    Weightless (the last block applied the final norm). The host passes the rows (from its own
    tokenisation) so K is an input dim: a data-dependent count in the graph would need NonZero,
    which TensorRT-RTX does not import.
    """

    def forward(self, hidden, suffix_ids, seg_rows):
        return (hidden[0][hidden.shape[1] - suffix_ids.shape[0] + seg_rows],)


class SegHeadStage(nn.Module):
    """seg_hidden [K, H] (final post-norm rows) -> seg_embeddings [K, out_dim]."""

    def __init__(self, model: LisaModel):
        super().__init__()
        self.model = model

    def forward(self, seg_hidden):
        return (self.model.seg_head(seg_hidden),)


class SamEncoderStage(nn.Module):
    """sam_pixels [1, 3, S, S] -> image_embeddings [1, C, g, g]."""

    def __init__(self, model: LisaModel):
        super().__init__()
        self.model = model

    def forward(self, sam_pixels):
        return (self.model.sam_image_embeddings(sam_pixels),)


class SamDecoderStage(nn.Module):
    """image_embeddings [1, C, g, g], seg_embeddings [K, C] -> low_res_masks [K, 4g, 4g], masks [K, S, S].

    `masks` is upsampled to SAM's padded input size (the first half of LISA's postprocess); the host
    crops the padding and resizes to the original image.
    """

    def __init__(self, model: LisaModel):
        super().__init__()
        self.model = model

    def forward(self, image_embeddings, seg_embeddings):
        low_res = self.model.sam_decode(image_embeddings, seg_embeddings)  # [K, 4g, 4g]
        size = self.model.shape.sam.image_size
        up = F.interpolate(low_res.float()[:, None], (size, size), mode="bilinear", align_corners=False)[:, 0]
        return low_res, up.to(low_res.dtype)


def make_wrapper(model: LisaModel, schedule: Schedule, spec: StageSpec, seg_token_id: int) -> nn.Module:
    """The wrapper module of one stage, in eval mode."""
    if spec.kind == "vision":
        w = VisionStage(model, schedule, spec)
    elif spec.kind == "embed":
        w = EmbedStage(model)
    elif spec.kind == "entry":
        w = EntryStage(model, schedule, int(spec.name.split("_")[-1]), spec, seg_token_id)
    elif spec.kind == "llm":  # a block, or a decode step running one (graph_name)
        w = BlockStage(model, schedule, [s.name for s in schedule.stages].index(spec.graph_name), spec)
    elif spec.kind == "seg_gather":
        w = SegGatherStage()
    elif spec.kind == "seg_head":
        w = SegHeadStage(model)
    elif spec.kind == "sam_encoder":
        w = SamEncoderStage(model)
    elif spec.kind == "sam_decoder":
        w = SamDecoderStage(model)
    else:
        raise AssertionError(f"unknown stage kind {spec.kind!r}")
    return w.eval()
