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
        _, emb, cls_attn = self.model.vision_features(clip_pixels, with_cls_attention=self.want_cls)  # emb [B, N, H]
        idx = selection.first_stage_indices(self.schedule, self.first, emb, cls_attn, self.model.shape.vision.grid,
                                            instance_masks)  # [B, b]
        out = [emb, selection.gather_rows(emb, idx), idx]
        if self.first.op == "cluster":
            out.append(selection.assign_to_representatives(emb, idx))
        return tuple(out)


class EmbedStage(nn.Module):
    """prefix_ids [B, P], suffix_ids [B, S] -> prefix_embeds [B, P, H], suffix_embeds [B, S, H].

    The only graph holding embed_tokens. A decode step feeds its tokens [B, 1] as both (one row each).
    """

    def __init__(self, model: LisaModel):
        super().__init__()
        self.model = model

    def forward(self, prefix_ids, suffix_ids):
        embed = self.model.llm.model.embed_tokens
        return embed(prefix_ids), embed(suffix_ids)


class EntryStage(nn.Module):
    """Schedule stage i's entry op, weightless: the rows [prefix | image rows | suffix] its block sees, per request.

    entry_0: prefix_embeds, suffix_embeds, image_hidden, image_indices [, suffix_ids], suffix_lens
    entry_i: block_hidden (block i-1's rows), image_indices [, image_embeds, assign | row_scores],
             prefix_ids, suffix_ids, suffix_lens
      -> hidden [B, T, H], positions [B, T] (RoPE: image rows keep P + index), image_indices_out [B, b],
         row_lens [B] (P + b + each request's suffix length: the rows past it are right padding)
         [, query_rows [B, R]: rows whose attention ranks image rows for the next stage's pruning]
         [, next_position [B] (entry_0): P + N + S_b]
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
        """(prefix [B,P,H], image rows [B,b,H], their indices [B,b], suffix [B,S,H]) entering this stage."""
        if self.index == 0:
            return x["prefix_embeds"], x["image_hidden"], x["image_indices"], x["suffix_embeds"]
        h = x["block_hidden"]
        p, s = x["prefix_ids"].shape[1], x["suffix_ids"].shape[1]
        t = h.shape[1]
        img, idx = h[:, p:t - s], x["image_indices"]
        if self.stage.op == "scatter":
            img = selection.scatter_tokens(img, x["image_embeds"], idx, x["assign"], self.schedule.scatter_mode)
            idx = torch.arange(self.n, device=h.device)[None].expand(h.shape[0], -1)
        elif self.stage.op == "prune":
            keep = selection.topk_sorted(x["row_scores"][:, p:t - s], self.stage.budget)  # [B, k]
            img, idx = selection.gather_rows(img, keep), torch.gather(idx, 1, keep)
        return h[:, :p], img, idx, h[:, t - s:]

    def _query_rows(self, t, s, suffix_ids, row_lens, device):
        """[B, R] rows whose attention ranks image tokens for the next stage's pruning (reference `_query_rows`)."""
        query = self.schedule.prune_query
        b = row_lens.shape[0]
        if query == "mean":  # rows past a request's length are left out of the mean by the block (row_lens)
            return torch.arange(t, device=device)[None].expand(b, -1)
        last = (row_lens - 1)[:, None]  # each request's last real row
        if query == "last":
            return last
        # "seg": the row before the first [SEG] of the request's suffix (single-pass prompt); with none (generate
        # prompt), its last prompt row. Padding ids never count: an arithmetic select, not a branch on the data.
        real = torch.arange(s, device=device)[None] < (row_lens - (t - s))[:, None]  # [B, S]
        is_seg = ((suffix_ids == self.seg_token_id) & real).to(torch.int64)
        first = selection.first_argmax(is_seg, dim=-1)  # [B]
        row = (t - s - 1) + first  # graphs.prompt.PromptIds.seg_rows, in-graph
        return torch.where(is_seg.sum(dim=-1) > 0, row, last[:, 0])[:, None]

    def forward(self, *args):
        x = dict(zip(self.in_names, args))
        prefix, img, idx, suffix = self._split(x)
        h = torch.cat([prefix, img, suffix], dim=1)  # [B, T, H]
        b, p, s, t = h.shape[0], prefix.shape[1], suffix.shape[1], h.shape[1]
        dev = h.device
        text_pos = torch.arange(s, device=dev) + (p + self.n)
        pos = torch.cat([torch.arange(p, device=dev)[None].expand(b, -1), p + idx, text_pos[None].expand(b, -1)], 1)
        lens = x["suffix_lens"]
        row_lens = lens + (p + img.shape[1])
        out = {"hidden": h, "image_indices_out": idx, "positions": pos, "row_lens": row_lens}
        if "query_rows" in self.out_names:
            out["query_rows"] = self._query_rows(t, s, x.get("suffix_ids"), row_lens, dev)
        if "next_position" in self.out_names:
            out["next_position"] = lens + (p + self.n)
        return tuple(out[name] for name in self.out_names)


def block_mask(rows: int, capacity, past_len: torch.Tensor, row_lens: torch.Tensor, dtype: torch.dtype,
               device) -> torch.Tensor:
    """[B, 1, T, C + T] additive mask over [cache (C rows, request b's first past_len[b] valid) | the T new rows].

    New rows are causal and, per request, only its first row_lens[b] count as keys: right padding (and a
    finished request's decode row, row_lens 0) is never attended to, and with causal attention a real row
    never sees a padded one anyway. Built from aranges so T and C stay symbolic; one shape serves every
    decode step of a batch.
    """
    r = torch.arange(rows, device=device)[:, None]                    # [T, 1]
    c = torch.arange(capacity + rows, device=device)[None, :]         # [1, C + T]
    past, lens = past_len[:, None, None], row_lens[:, None, None]     # [B, 1, 1]
    new = c - capacity
    seen = ((c < capacity) & (c < past)) | ((c >= capacity) & (new <= r) & (new < lens))  # no bool Where in ORT
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(seen, zero, torch.finfo(dtype).min)[:, None]


def block_layer(layer, h, cos, sin, past_k, past_v, mask):
    """One LLaMA decoder layer attending over a static cache plus its new rows, without copying the cache.

    The scores against the cache and against the new rows are two matmuls, concatenated ([.., C + T], not
    the cache), and grouped-query heads are a reshape of Q (no repeat of K/V). transformers' own layer
    would concatenate the cache with the new rows, a copy of the whole cache per layer and step.

    Args:
        h (Tensor): [B, T, H] the layer's input rows.
        past_k, past_v (Tensor): [B, kv_heads, C, hd] the cache (rows >= past_len are masked).
        mask (Tensor): [B, 1, T, C + T] from `block_mask`.

    Returns:
        (h [B, T, H], new keys [B, kv_heads, T, hd], new values [B, kv_heads, T, hd])
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    x = layer.input_layernorm(h)
    b, t, hd, kvh = x.shape[0], x.shape[1], attn.head_dim, past_k.shape[1]
    q = attn.q_proj(x).view(b, t, -1, hd).transpose(1, 2)  # [B, heads, T, hd]
    k = attn.k_proj(x).view(b, t, kvh, hd).transpose(1, 2)  # [B, kv, T, hd]
    v = attn.v_proj(x).view(b, t, kvh, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    g = q.shape[1] // kvh
    qg = q.reshape(b, kvh, g * t, hd)  # head kvh_i * g + j -> rows j * T .. of group kvh_i (repeat_kv's order)
    scores = torch.cat([qg @ past_k.transpose(-1, -2), qg @ k.transpose(-1, -2)], dim=-1) * attn.scaling
    scores = scores.view(b, kvh, g, t, -1) + mask[:, :, None]  # [B, kv, g, T, C + T]
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype).view(b, kvh, g * t, -1)
    cap = past_k.shape[2]
    out = probs[..., :cap] @ past_v + probs[..., cap:] @ v  # [B, kv, g*T, hd]
    out = out.view(b, kvh * g, t, hd).transpose(1, 2).reshape(b, t, kvh * g * hd)
    h = h + attn.o_proj(out)
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, k, v


class BlockStage(nn.Module):
    """One schedule stage's decoder layers over rows and a static cache; prefill and decode alike, batched.

    hidden [B, T, H], positions [B, T], row_lens [B] [, query_rows [B, R]], past_len [B],
    past_{key,value}_<l> [B, kv, C, hd]
      -> hidden_out [B, T, H], {key,value}_<l> [B, kv, T, hd] [, row_scores [B, T]] [, next_token [B], last_hidden [B, H]]
    The last block applies the final norm (hidden_out is post-norm) and lm_head on each request's last real row.
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
        h, pos, past_len, row_lens = x["hidden"], x["positions"], x["past_len"], x["row_lens"]
        t, dev = h.shape[1], h.device
        cos, sin = m.llm.model.rotary_emb(h, pos)
        cap = x[f"past_key_{self.stage.start}"].shape[2]
        mask = block_mask(t, cap, past_len, row_lens, h.dtype, dev)
        out = {}
        for layer_idx in self.stage.layers:
            layer = m.decoder_layers[layer_idx]
            if "row_scores" in self.out_names and layer_idx == self.stage.end - 1:
                # Prefill semantics (the reference's): attention among this call's rows only.
                out["row_scores"] = selection.query_attention(layer, h, cos, sin, mask[..., cap:], x["query_rows"],
                                                              row_lens)
            h, out[f"key_{layer_idx}"], out[f"value_{layer_idx}"] = block_layer(
                layer, h, cos, sin, x[f"past_key_{layer_idx}"], x[f"past_value_{layer_idx}"], mask)
        if "next_token" in self.out_names:
            h = m.llm.model.norm(h)
            last = (row_lens - 1).clamp(min=0)  # each request's last real row (a finished decode row: 0, ignored)
            out["last_hidden"] = torch.gather(h, 1, last[:, None, None].expand(-1, 1, h.shape[2]))[:, 0]  # [B, H]
            # Greedy, lowest id on ties on every backend (TensorRT documents no ArgMax tie order).
            out["next_token"] = selection.first_argmax(m.llm.lm_head(out["last_hidden"]), dim=-1)  # [B]
        out["hidden_out"] = h
        return tuple(out[name] for name in self.out_names)


class SegGatherStage(nn.Module):
    """hidden [B, T, H] (post-norm), suffix_ids [B, S], seg_rows [K], seg_batch [K] -> seg_hidden [K, H].

    The rows predicting each [SEG], flat over the batch: row seg_rows[k] of request seg_batch[k]'s suffix.
    Weightless (the last block applied the final norm). The host passes the rows (from its own
    tokenisation) so K is an input dim: a data-dependent count in the graph would need NonZero,
    which TensorRT-RTX does not import.
    """

    def forward(self, hidden, suffix_ids, seg_rows, seg_batch):
        b, t, h = hidden.shape
        flat = seg_batch * t + (t - suffix_ids.shape[1]) + seg_rows  # [K] rows of hidden as [B * T, H]
        return (hidden.reshape(b * t, h)[flat],)


class SegHeadStage(nn.Module):
    """seg_hidden [K, H] (final post-norm rows) -> seg_embeddings [K, out_dim]."""

    def __init__(self, model: LisaModel):
        super().__init__()
        self.model = model

    def forward(self, seg_hidden):
        return (self.model.seg_head(seg_hidden),)


class SamEncoderStage(nn.Module):
    """sam_pixels [B, 3, S, S] -> image_embeddings [B, C, g, g]."""

    def __init__(self, model: LisaModel):
        super().__init__()
        self.model = model

    def forward(self, sam_pixels):
        return (self.model.sam_image_embeddings(sam_pixels),)


class SamDecoderStage(nn.Module):
    """image_embeddings [B, C, g, g], seg_embeddings [K, C], seg_batch [K] -> low_res_masks [K, 4g, 4g], masks [K, S, S].

    Mask k decodes request seg_batch[k]'s image embedding. `masks` is upsampled to SAM's padded input size (the first half of LISA's postprocess); the host
    crops the padding and resizes to the original image.
    """

    def __init__(self, model: LisaModel):
        super().__init__()
        self.model = model

    def forward(self, image_embeddings, seg_embeddings, seg_batch):
        low_res = self.model.sam_decode(image_embeddings.index_select(0, seg_batch), seg_embeddings)  # [K, 4g, 4g]
        size = self.model.shape.sam.image_size
        up = F.interpolate(low_res.float()[:, None], (size, size), mode="bilinear", align_corners=False)[:, 0]
        return low_res, up.to(low_res.dtype)


def make_wrapper(model: LisaModel, schedule: Schedule, spec: StageSpec, seg_token_id: int, accm=None) -> nn.Module:
    """The wrapper module of one stage, in eval mode (`accm`: ACCM's models, for an ACCM stage)."""
    if spec.kind.startswith("accm_"):
        from exporter.accm.export import accm_stage_wrapper

        if accm is None:
            raise AssertionError(f"stage {spec.name!r} is ACCM's: make_wrapper needs its models (accm=)")
        return accm_stage_wrapper(model, accm, schedule, spec)
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
