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
from exporter.reference import KVStore
from graphs.schedule import Schedule
from graphs.stages import StageSpec


def _causal_mask(t_new: int, t_past, dtype: torch.dtype, device) -> torch.Tensor:
    """[1, 1, T, past + T] additive mask: new row i sees every past row and new rows <= i.

    Built from aranges so both lengths stay symbolic in the graph (no Trilu on a constant size).
    """
    rows = torch.arange(t_new, device=device)[:, None] + t_past  # [T, 1] absolute row index
    cols = torch.arange(t_past + t_new, device=device)[None, :]  # [1, past + T]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(cols > rows, torch.finfo(dtype).min, zero)[None, None]


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


class LlmStage(nn.Module):
    """One schedule stage: its entry op, then its decoder layers over [prefix | image rows | suffix].

    Inputs and outputs follow `graphs.stages.build_layout` (see its docstring for the layout).
    """

    def __init__(self, model: LisaModel, schedule: Schedule, index: int, spec: StageSpec, seg_token_id: int):
        super().__init__()
        self.model, self.schedule, self.spec = model, schedule, spec
        self.index, self.stage = index, schedule.stages[index]
        self.seg_token_id = seg_token_id
        self.n = model.shape.num_image_tokens
        self.in_names = [t.name for t in spec.inputs]
        self.out_names = [t.name for t in spec.outputs]
        stages = schedule.stages
        self.next_prunes = index + 1 < len(stages) and stages[index + 1].op == "prune"

    def _embed(self, ids):
        return self.model.llm.model.embed_tokens(ids)[None]  # [1, len, H]

    def _entry(self, x: dict):
        """(prefix [1,P,H], image rows [1,b,H], their indices [b], suffix [1,S,H]) entering this stage."""
        if self.index == 0:
            return self._embed(x["prefix_ids"]), x["image_hidden"], x["image_indices"], self._embed(x["suffix_ids"])
        img, idx = x["image_hidden"], x["image_indices"]
        if self.stage.op == "scatter":
            img = selection.scatter_tokens(img[0], x["image_embeds"], idx, x["assign"], self.schedule.scatter_mode)[None]
            idx = torch.arange(self.n, device=img.device)
        elif self.stage.op == "prune":
            keep = selection.topk_sorted(x["image_scores"], self.stage.budget)
            img, idx = img[:, keep], idx[keep]
        return x["prefix_hidden"], img, idx, x["suffix_hidden"]

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
        row = (t - s - 1) + first
        return torch.where(is_seg.sum() > 0, row, last[0])[None]

    def forward(self, *args):
        x = dict(zip(self.in_names, args))
        m = self.model
        prefix, img, idx, suffix = self._entry(x)
        h = torch.cat([prefix, img, suffix], dim=1)  # [1, T, H]
        p, s, t = prefix.shape[1], suffix.shape[1], h.shape[1]
        dev = h.device
        pos = torch.cat([torch.arange(p, device=dev), p + idx, torch.arange(s, device=dev) + (p + self.n)])[None]
        cos, sin = m.llm.model.rotary_emb(h, pos)
        mask = _causal_mask(t, 0, h.dtype, dev)
        kv = KVStore() if any(n.startswith("present_") for n in self.out_names) else None
        scores = None
        for layer_idx in self.stage.layers:
            layer = m.decoder_layers[layer_idx]
            if self.next_prunes and layer_idx == self.stage.end - 1:
                rows = self._query_rows(t, s, x.get("suffix_ids"), dev)
                scores = selection.query_attention(layer, h, cos, sin, mask, rows)[p:p + img.shape[1]]
            h = layer(h, attention_mask=mask, position_ids=pos, past_key_values=kv, position_embeddings=(cos, sin))
        out = {"prefix_hidden_out": h[:, :p], "image_hidden_out": h[:, p:t - s], "suffix_hidden_out": h[:, t - s:],
               "image_indices_out": idx, "image_scores": scores}
        if "next_token" in self.out_names:
            last = m.llm.model.norm(h[:, -1])  # [1, H]
            out["last_hidden"] = last
            out["next_token"] = torch.argmax(m.llm.lm_head(last), dim=-1)  # [1]
            out["next_position"] = torch.zeros(1, dtype=torch.long, device=dev) + (p + self.n + s)
        if kv is not None:
            for layer_idx in self.stage.layers:
                out[f"present_key_{layer_idx}"] = kv.keys[layer_idx]
                out[f"present_value_{layer_idx}"] = kv.values[layer_idx]
        return tuple(out[name] for name in self.out_names)


class DecodeStage(nn.Module):
    """One greedy decode step over every decoder layer, each with its own stage's cache.

    token_ids [T], position [1], past_{key,value}_<l> [1, kv, past_<stage>, hd]
      -> next_token [1], last_hidden [1, H], next_position [1], present_{key,value}_<l>.
    """

    def __init__(self, model: LisaModel, schedule: Schedule, spec: StageSpec):
        super().__init__()
        self.model, self.schedule, self.spec = model, schedule, spec
        self.in_names = [t.name for t in spec.inputs]
        self.out_names = [t.name for t in spec.outputs]

    def forward(self, *args):
        x = dict(zip(self.in_names, args))
        m = self.model
        ids, start = x["token_ids"], x["position"]
        h = m.llm.model.embed_tokens(ids)[None]  # [1, T, H]
        t = h.shape[1]
        pos = (start + torch.arange(t, device=h.device))[None]  # [1, T]
        cos, sin = m.llm.model.rotary_emb(h, pos)
        kv = KVStore()
        for st in self.schedule.stages:
            past = x[f"past_key_{st.start}"].shape[2]  # every layer of a stage caches the same rows
            mask = _causal_mask(t, past, h.dtype, h.device)
            for layer_idx in st.layers:
                kv.keys[layer_idx], kv.values[layer_idx] = x[f"past_key_{layer_idx}"], x[f"past_value_{layer_idx}"]
                h = m.decoder_layers[layer_idx](h, attention_mask=mask, position_ids=pos, past_key_values=kv,
                                                position_embeddings=(cos, sin))
        last = m.llm.model.norm(h[:, -1])
        out = {"next_token": torch.argmax(m.llm.lm_head(last), dim=-1), "last_hidden": last,
               "next_position": start + t}
        for layer_idx in range(len(m.decoder_layers)):
            out[f"present_key_{layer_idx}"] = kv.keys[layer_idx]
            out[f"present_value_{layer_idx}"] = kv.values[layer_idx]
        return tuple(out[name] for name in self.out_names)


class SegGatherStage(nn.Module):
    """suffix_hidden [1, S, H], seg_rows [K] -> seg_hidden [K, H]: final norm of the rows predicting each [SEG].

    The host passes the rows (from its own tokenisation) so K is an input dim: a data-dependent count
    in the graph would need NonZero, which TensorRT-RTX does not import.
    """

    def __init__(self, model: LisaModel):
        super().__init__()
        self.model = model

    def forward(self, suffix_hidden, seg_rows):
        return (self.model.llm.model.norm(suffix_hidden[0][seg_rows]),)


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
    elif spec.kind == "llm":
        w = LlmStage(model, schedule, [s.name for s in schedule.stages].index(spec.name), spec, seg_token_id)
    elif spec.kind == "decode":
        w = DecodeStage(model, schedule, spec)
    elif spec.kind == "seg_gather":
        w = SegGatherStage(model)
    elif spec.kind == "seg_head":
        w = SegHeadStage(model)
    elif spec.kind == "sam_encoder":
        w = SamEncoderStage(model)
    elif spec.kind == "sam_decoder":
        w = SamDecoderStage(model)
    else:
        raise AssertionError(f"unknown stage kind {spec.kind!r}")
    return w.eval()
