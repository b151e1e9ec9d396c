"""ACCM's exportable pieces: picks, caption mapper, GPT-2 with a static KV cache, beam step, selector.

`csprt export --schedule accm-36 --accm DIR` traces them through `accm_stage_wrapper`, which gives each the I/O
graphs/accm_layout.py declares (a leading dim of 1, int64 flags); `export_graph` is for one-off graphs (tests).

    accm_vision     clip_pixels [1, 3, S, S] -> image_embeds [N, H] (LISA's projector over every token), cls_attn [N]
                    (merged, last layer), patch_embeds [N, P] (CLIP's visual_projection per patch): replaces `vision`
    accm_clip_text  question_ids [1, q] (CLIP tokens) -> text_embeds [1, P]
    accm_picks      cls_attn [N], text_embeds [1, P], patch_embeds [N, P] -> image_indices [budget] (ascending)
    accm_mapper     question_ids [1, q], kept_out [M, P] -> token_ids, row_embeds, use_embeds  [1, q + 20(, D)]
    accm_gpt2       token_ids [B, rows], row_embeds [B, rows, D], use_embeds [B, rows], past_len [1],
                    past_{key,value}_<l> [B, H, cache, hd] -> logp [B, V] (last row), {key,value}_<l> [B, H, rows, hd]
                    (the LLM blocks' contract: the host writes the new rows at past_len; prefill B = 1,
                    decode B = beams with rows = 1)
    accm_beam_step  logp [beams, V], scores, lengths [beams], stopped [beams] bool, stop_id [1]
                    -> token, source, scores, lengths, stopped  (the host reorders the caches by source)
    accm_selector   candidate_ids [C, "selector_len"] (LongCLIP tokens, EOT the highest id, padded with it)
                    -> probs [C]

The host loop that drives accm_gpt2 and accm_beam_step is `graphs.accm_loop.beam_loop`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from exporter.accm.beam import beam_step, log_probs
from exporter.accm.picks import merged_cls_attention, pick_indices_static


class AccmVisionGraph(nn.Module):
    """LISA's CLIP tower and projector with what ACCM reads from the same forward (module docstring)."""

    def __init__(self, model, visual_projection: nn.Module):
        super().__init__()
        self.tower, self.projector, self.visual_projection = model.vision_tower, model.mm_projector, visual_projection
        self.select_layer = model.shape.vision.select_layer

    def forward(self, clip_pixels):
        out = self.tower(pixel_values=clip_pixels, output_hidden_states=True)
        image_embeds = self.projector(out.hidden_states[self.select_layer][0, 1:])             # [N, H]
        cls_attn = merged_cls_attention(self.tower, out.hidden_states[-2])                    # [N]
        patch = self.visual_projection(self.tower.post_layernorm(out.last_hidden_state)[0, 1:])  # [N, P]
        return image_embeds, cls_attn, patch


class ClipTextGraph(nn.Module):
    """CLIP's text tower on the question: [1, q] ids -> [1, P] projected embedding (the text picks' query)."""

    def __init__(self, clip_text: nn.Module):
        super().__init__()
        self.clip_text = clip_text

    def forward(self, question_ids):
        return self.clip_text(input_ids=question_ids).text_embeds


class PicksGraph(nn.Module):
    """ACCM's picks as one weightless graph (`pick_indices_static`)."""

    def __init__(self, budget: int, n_text: int):
        super().__init__()
        self.budget, self.n_text = budget, n_text

    def forward(self, cls_attn, text_embeds, patch_embeds):
        return pick_indices_static(cls_attn, text_embeds, patch_embeds, self.budget, self.n_text)


class MapperGraph(nn.Module):
    """The caption prefill's rows: the question's ids, then the mapper's 20 rows over the tokens pruned away.

    `use_embeds` says which rows are given as embeddings (the mapper's) and which as ids (the question's, embedded
    by accm_gpt2, whose `wte` is also its tied LM head: every weight lives in one graph).
    """

    def __init__(self, mapper: nn.Module):
        super().__init__()
        self.mapper = mapper

    def forward(self, question_ids, kept_out):
        rows = self.mapper(kept_out[None])                                             # [1, 20, D]
        pad_ids = torch.zeros((1, rows.shape[1]), dtype=question_ids.dtype, device=rows.device)
        q_rows = torch.zeros_like(question_ids, dtype=rows.dtype)[..., None].expand(-1, -1, rows.shape[2])
        use = torch.cat([torch.zeros_like(question_ids), torch.ones_like(pad_ids)], dim=1)
        return torch.cat([question_ids, pad_ids], 1), torch.cat([q_rows, rows], 1), use


class Gpt2CacheGraph(nn.Module):
    """GPT-2 (embeddings, blocks, final norm, tied LM head) over new rows against a static KV cache.

    Rows sit at positions past_len + 0..rows-1; they attend to the cache's first past_len rows and causally to
    each other; only their own K/V come out. The blocks' submodules are transformers' own; only the attention
    is written out, because it reads a preallocated cache.
    """

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, token_ids, row_embeds, use_embeds, past_len, *past):
        t = self.gpt.transformer
        x = torch.where(use_embeds[..., None] > 0, row_embeds, t.wte(token_ids))       # [B, rows, D]
        b, rows, d = x.shape
        heads = self.gpt.config.n_head
        hd = d // heads
        ar = torch.arange(rows, device=x.device)
        x = x + t.wpe(past_len + ar)[None]
        cache_ok = torch.arange(past[0].shape[2], device=x.device)[None] < past_len     # [1, cache]
        allowed = torch.cat([cache_ok.expand(rows, -1), ar[None] <= ar[:, None]], dim=1)  # [rows, cache + rows]
        bias = torch.where(allowed, 0.0, torch.finfo(x.dtype).min).to(x.dtype)
        new = []
        for i, blk in enumerate(t.h):
            q, k, v = (z.reshape(b, rows, heads, hd).transpose(1, 2) for z in blk.attn.c_attn(blk.ln_1(x)).split(d, -1))
            keys, values = torch.cat([past[2 * i], k], 2), torch.cat([past[2 * i + 1], v], 2)
            att = torch.softmax((q @ keys.transpose(-1, -2)) / hd**0.5 + bias, dim=-1)
            x = x + blk.attn.c_proj((att @ values).transpose(1, 2).reshape(b, rows, d))
            x = x + blk.mlp(blk.ln_2(x))
            new += [k, v]
        return (log_probs(self.gpt.lm_head(t.ln_f(x[:, -1]))), *new)


class BeamStepGraph(nn.Module):
    """One ranking step of the beam search (`exporter.accm.beam.beam_step`), weightless."""

    def __init__(self, beams: int):
        super().__init__()
        self.beams = beams

    def forward(self, logp, scores, lengths, stopped, stop_id):
        return beam_step(logp, scores, lengths, stopped, stop_id, self.beams)


class SelectorGraph(nn.Module):
    """LongCLIP's text features of each candidate, then ACCM's selector: [C, L] ids -> [C] probabilities.

    The pooled row is each candidate's first highest id (EOT; padding with EOT leaves it first), as LongCLIP's
    encode_text takes `text.argmax(-1)`.
    """

    def __init__(self, longclip_text: nn.Module, selector: nn.Module):
        super().__init__()
        self.longclip_text, self.selector = longclip_text, selector

    def forward(self, candidate_ids):
        tm = self.longclip_text.text_model
        x = tm.embeddings(input_ids=candidate_ids)                                  # [C, L, W]
        n = candidate_ids.shape[1]
        causal = torch.full((n, n), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)
        x = tm.encoder(inputs_embeds=x, attention_mask=causal[None, None]).last_hidden_state
        x = tm.final_layer_norm(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), candidate_ids.argmax(-1)]  # [C, W]
        return self.selector(self.longclip_text.text_projection(pooled))


# -- the artifact's stages (graphs/accm_layout.py): the graphs above with the layout's I/O -----------------------

class VisionStage(nn.Module):
    """accm_vision: clip_pixels [1, 3, S, S] -> image_embeds [1, N, H], cls_attn [1, N] fp32, patch_embeds [1, N, P]."""

    def __init__(self, model, visual_projection: nn.Module):
        super().__init__()
        if next(model.parameters()).device.type == "meta":  # exporter.streaming's twin: record, never compute
            visual_projection = nn.Linear(visual_projection.in_features, visual_projection.out_features,
                                          bias=visual_projection.bias is not None, device="meta")
        self.parts = AccmVisionGraph(model, visual_projection)

    def forward(self, clip_pixels):
        image_embeds, cls_attn, patch = self.parts(clip_pixels)
        return image_embeds[None], cls_attn.float()[None], patch[None]


class PicksStage(nn.Module):
    """accm_picks: the picks, the first LLM stage's rows and the caption model's input, weightless.

    (image_embeds [1, N, H], cls_attn [1, N], text_embeds [1, P], patch_embeds [1, N, P])
    -> image_hidden [1, budget, H], image_indices [1, budget] ascending, kept_out [N - budget, P] ascending
    """

    def __init__(self, budget: int, n_text: int):
        super().__init__()
        self.budget, self.n_text = budget, n_text

    def forward(self, image_embeds, cls_attn, text_embeds, patch_embeds):
        idx = pick_indices_static(cls_attn[0], text_embeds, patch_embeds[0], self.budget, self.n_text)  # [budget]
        n = cls_attn.shape[1]
        order = torch.arange(n, device=idx.device)
        picked = torch.zeros(n, dtype=torch.long, device=idx.device).scatter(0, idx, 1)
        rest = (picked * 2 * n + order)[None].topk(n - self.budget, dim=-1, largest=False).indices[0]  # the others
        return image_embeds[:, idx], idx[None], patch_embeds[0, rest]


class BeamStepStage(nn.Module):
    """accm_beam_step with `stopped` as int64 (0/1) in and out: the manifest's dtypes are float and int64."""

    def __init__(self, beams: int):
        super().__init__()
        self.beams = beams

    def forward(self, logp, scores, lengths, stopped, stop_id):
        token, source, scores, lengths, stopped = beam_step(logp, scores, lengths, stopped > 0, stop_id, self.beams)
        return token, source, scores, lengths, stopped.long()


class OneOutput(nn.Module):
    """A one-output graph as a stage wrapper: its outputs as a tuple, as every stage wrapper returns them."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return (self.inner(*args),)


def accm_stage_wrapper(model, accm, schedule, spec) -> nn.Module:
    """The wrapper module of one ACCM stage (graphs/accm_layout.py), in eval mode.

    Args:
        model (LisaModel): LISA (its vision tower and projector feed accm_vision; the other stages ignore it).
        accm (AccmModels): ACCM's models.
        schedule (Schedule): the ACCM schedule (the picks' budget and text picks).
        spec (StageSpec): the stage.
    """
    kind = spec.kind
    if kind == "accm_vision":
        w = VisionStage(model, accm.visual_projection)
    elif kind == "accm_clip_text":
        w = OneOutput(ClipTextGraph(accm.clip_text))
    elif kind == "accm_picks":
        w = PicksStage(schedule.stages[0].budget, schedule.accm.text_picks)
    elif kind == "accm_mapper":
        w = MapperGraph(accm.caption.clip_project)
    elif kind == "accm_gpt2":
        w = Gpt2CacheGraph(accm.caption.gpt)
    elif kind == "accm_beam_step":
        w = BeamStepStage(schedule.accm.beams)
    elif kind == "accm_selector":
        w = OneOutput(SelectorGraph(accm.longclip_text, accm.selector))
    else:
        raise AssertionError(f"unknown ACCM stage kind {kind!r}")
    return w.eval()


def export_graph(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                 dynamic: tuple | None = None, opset: int = 18) -> Path:
    """torch.onnx.export (dynamo) into `path`, exporter chatter silenced; returns `path`.

    `dynamic` has one entry per argument; for a `forward(a, b, *rest)` the entries past the named ones are grouped
    into one tuple, as torch.export matches `*rest`.
    """
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())
    if dynamic is not None and any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        fixed = sum(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
        dynamic = (*dynamic[:fixed], tuple(dynamic[fixed:]))
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), args, dynamo=True, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic, opset_version=opset)
    program.save(str(path))
    return path
