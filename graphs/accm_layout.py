"""The ACCM part of an artifact's layout: its seven graphs as stages and its four host steps.

    host.clip_pixels -> accm_vision -> image_embeds, cls_attn, patch_embeds ----------------------------+
    [accm_question: query -> CLIP ids, GPT-2 ids]  (host step: the host owns ACCM's tokenizers)          |
    accm_question.clip_ids -> accm_clip_text -> text_embeds -> accm_picks <-----------------------------+
        -> image_hidden, image_indices (the first LLM stage's rows: entry_0 reads them), kept_out
    accm_question.gpt_ids, accm_picks.kept_out -> accm_mapper -> token_ids, row_embeds, use_embeds
    [accm_captions: beam search, runs accm_gpt2 (static KV cache) and accm_beam_step] -> candidate_ids
    [accm_selector_text: GPT-2 ids -> text -> "Question: ..." -> LongCLIP ids] -> accm_selector -> probs
    [accm_splice: argmax -> "additional information: {caption}" -> LLM ids (no BOS), spliced into the
        suffix after the image and its newline] -> suffix_ids, suffix_lens, seg_rows -> embed, entry_i, seg_gather

Batch: every ACCM graph runs one request (leading dim 1), so an ACCM artifact exports with --max-batch 1 and
a host runs ACCM requests one at a time (docs/accm.md, "Artifact").
"""

from __future__ import annotations

from dataclasses import dataclass

from graphs.accm import (LONGCLIP_POSITIONS, SELECTOR_QUESTION, SELECTOR_STRIP, SELECTOR_SUPPLEMENT, SPLICE_PREFIX,
                         AccmShape)
from graphs.stages import DimRange, HostStep, LayoutOptions, StageSpec, TensorSpec
from graphs.schedule import Schedule
from graphs.shapes import ModelShape

ACCM_DIR = "accm"  # the artifact's ACCM tokenizer files: accm/gpt2, accm/clip, accm/longclip
TOKENIZER_DIRS = {"gpt2": "gpt2", "clip": "clip", "longclip": "longclip"}
ACCM_STAGE_KINDS = ("accm_vision", "accm_clip_text", "accm_picks", "accm_mapper", "accm_gpt2", "accm_beam_step",
                    "accm_selector")
HOST_STEP_KINDS = ("accm_question", "accm_beam_search", "accm_selector_text", "accm_splice")


@dataclass(frozen=True)
class AccmLayoutInfo:
    """What the layout needs to know of ACCM's models besides the schedule."""

    shape: AccmShape
    stop_id: int         # GPT-2's id of "." (the caption's stop token)


@dataclass(frozen=True)
class AccmPart:
    image_stages: list[StageSpec]   # read only the image: replace `vision`
    query_stages: list[StageSpec]   # after sam_encoder, before embed
    host_steps: tuple[HostStep, ...]
    dims: dict[str, DimRange]
    sources: dict[str, str]         # what the LLM side reads from ACCM instead of vision / the host
    outputs: dict[str, str]


def tokenizer_dir(name: str) -> str:
    """The artifact-relative directory of one of ACCM's tokenizers ("gpt2", "clip", "longclip")."""
    return f"{ACCM_DIR}/{TOKENIZER_DIRS[name]}"


def accm_layout_part(schedule: Schedule, shape: ModelShape, opts: LayoutOptions, info: AccmLayoutInfo,
                     host: dict[str, TensorSpec]) -> AccmPart:
    """ACCM's stages, host steps, dims and sources (module docstring)."""
    a, knobs, first = info.shape, schedule.accm, schedule.stages[0]
    f = {"fp32": "float32", "fp16": "float16"}[opts.precision]
    n, h, p = shape.num_image_tokens, shape.llm.hidden, a.clip_projection
    d, heads = a.gpt_hidden, a.gpt_heads
    hd = d // heads
    beams, max_tokens, prefix = knobs.beams, knobs.max_caption_tokens, a.prefix_length
    q_max = min(opts.max_text_len, a.gpt_positions - prefix - max_tokens)
    dims = {
        "clip_question_len": DimRange(1, 16, a.clip_text.positions),
        "gpt_question_len": DimRange(1, 16, q_max),
        "caption_batch": DimRange(1, beams, beams),               # the prefill's 1, then the beams
        "caption_rows": DimRange(1, 1, q_max + prefix),           # the prefill's rows, then 1 a step
        "caption_cache": DimRange(1, 16 + prefix + max_tokens, q_max + prefix + max_tokens),
        "caption_len": DimRange(1, 8, max_tokens),
        "selector_len": DimRange(1, 32, min(a.longclip_text.positions, LONGCLIP_POSITIONS)),
    }
    pix = host["clip_pixels"].shape
    vision = StageSpec("accm_vision", "accm_vision", (TensorSpec("clip_pixels", f, (1, *pix[1:]), "host.clip_pixels"),),
                       (TensorSpec("image_embeds", f, (1, n, h)), TensorSpec("cls_attn", "float32", (1, n)),
                        TensorSpec("patch_embeds", f, (1, n, p))))
    clip_text = StageSpec("accm_clip_text", "accm_clip_text",
                          (TensorSpec("question_ids", "int64", (1, "clip_question_len"), "accm_question.clip_ids"),),
                          (TensorSpec("text_embeds", f, (1, p)),))
    picks = StageSpec("accm_picks", "accm_picks",
                      (TensorSpec("image_embeds", f, (1, n, h), "accm_vision.image_embeds"),
                       TensorSpec("cls_attn", "float32", (1, n), "accm_vision.cls_attn"),
                       TensorSpec("text_embeds", f, (1, p), "accm_clip_text.text_embeds"),
                       TensorSpec("patch_embeds", f, (1, n, p), "accm_vision.patch_embeds")),
                      (TensorSpec("image_hidden", f, (1, first.budget, h)),
                       TensorSpec("image_indices", "int64", (1, first.budget)),  # ascending
                       TensorSpec("kept_out", f, (n - first.budget, p))))          # every other token, ascending
    rows = f"gpt_question_len + {prefix}"
    mapper = StageSpec("accm_mapper", "accm_mapper",
                       (TensorSpec("question_ids", "int64", (1, "gpt_question_len"), "accm_question.gpt_ids"),
                        TensorSpec("kept_out", f, (n - first.budget, p), "accm_picks.kept_out")),
                       (TensorSpec("token_ids", "int64", (1, rows)), TensorSpec("row_embeds", f, (1, rows, d)),
                        TensorSpec("use_embeds", "int64", (1, rows))))
    cb, cr = "caption_batch", "caption_rows"
    g_in = [TensorSpec("token_ids", "int64", (cb, cr), "accm_captions.feed"),
            TensorSpec("row_embeds", f, (cb, cr, d), "accm_captions.feed"),
            TensorSpec("use_embeds", "int64", (cb, cr), "accm_captions.feed"),
            TensorSpec("past_len", "int64", (1,), "accm_captions.feed")]
    g_out = [TensorSpec("logp", "float32", (cb, a.gpt_vocab))]
    for layer in range(a.gpt_layers):
        for k in ("key", "value"):
            g_in.append(TensorSpec(f"past_{k}_{layer}", f, (cb, heads, "caption_cache", hd), "accm_captions.feed"))
            g_out.append(TensorSpec(f"{k}_{layer}", f, (cb, heads, cr, hd)))
    gpt2 = StageSpec("accm_gpt2", "accm_gpt2", tuple(g_in), tuple(g_out))
    step = StageSpec("accm_beam_step", "accm_beam_step",
                     (TensorSpec("logp", "float32", (beams, a.gpt_vocab), "accm_captions.feed"),
                      TensorSpec("scores", "float32", (beams,), "accm_captions.feed"),
                      TensorSpec("lengths", "float32", (beams,), "accm_captions.feed"),
                      TensorSpec("stopped", "int64", (beams,), "accm_captions.feed"),
                      TensorSpec("stop_id", "int64", (1,), "accm_captions.feed")),
                     (TensorSpec("token", "int64", (beams,)), TensorSpec("source", "int64", (beams,)),
                      TensorSpec("scores_out", "float32", (beams,)), TensorSpec("lengths_out", "float32", (beams,)),
                      TensorSpec("stopped_out", "int64", (beams,))))
    selector = StageSpec("accm_selector", "accm_selector",
                         (TensorSpec("candidate_ids", "int64", (beams, "selector_len"),
                                     "accm_selector_text.selector_ids"),),
                         (TensorSpec("probs", "float32", (beams,)),))

    B = "batch"
    single = "single-pass" in opts.modes
    tok = {"gpt2": tokenizer_dir("gpt2"), "clip": tokenizer_dir("clip"), "longclip": tokenizer_dir("longclip")}
    question = HostStep(
        "accm_question", "accm_question", before="accm_clip_text", inputs=(),
        outputs=(TensorSpec("clip_ids", "int64", (1, "clip_question_len")),
                 TensorSpec("gpt_ids", "int64", (1, "gpt_question_len"))),
        params={"text": "the request's query", "clip_tokenizer": tok["clip"], "gpt2_tokenizer": tok["gpt2"],
                "clip": "special tokens (BOS, EOS), truncated to clip_question_len's max",
                "gpt2": "no special tokens; longer than gpt_question_len's max is an error"})
    captions = HostStep(
        "accm_captions", "accm_beam_search", before="accm_selector",
        inputs=(TensorSpec("token_ids", "int64", (1, rows), "accm_mapper.token_ids"),
                TensorSpec("row_embeds", f, (1, rows, d), "accm_mapper.row_embeds"),
                TensorSpec("use_embeds", "int64", (1, rows), "accm_mapper.use_embeds")),
        outputs=(TensorSpec("candidate_ids", "int64", (beams, "caption_len")),  # -1 past each caption's end
                 TensorSpec("beam_scores", "float32", (beams,))),
        runs=("accm_gpt2", "accm_beam_step"),
        params={"graph": "accm_gpt2", "step": "accm_beam_step", "beams": beams, "max_tokens": max_tokens,
                "stop_id": info.stop_id, "layers": a.gpt_layers, "heads": heads, "head_dim": hd,
                "loop": "graphs/accm_loop.py beam_loop: prefill on accm_mapper's rows (cache past_len 0), caches "
                        "tiled to the beams; per token accm_beam_step, caches reordered by its source, then "
                        "accm_gpt2 on each beam's token (one row, written at past_len); ranked by score / length"})
    selector_text = HostStep(
        "accm_selector_text", "accm_selector_text", before="accm_selector",
        inputs=(TensorSpec("candidate_ids", "int64", (beams, "caption_len"), "accm_captions.candidate_ids"),),
        outputs=(TensorSpec("selector_ids", "int64", (beams, "selector_len")),),
        params={"gpt2_tokenizer": tok["gpt2"], "longclip_tokenizer": tok["longclip"],
                "template": SELECTOR_QUESTION + "{question}" + SELECTOR_SUPPLEMENT + "{caption}",
                "question": "the query stripped, with these removed", "strip": list(SELECTOR_STRIP),
                "caption": "GPT-2 decode of the candidate's ids",
                "ids": "special tokens, padded to the longest with the tokenizer's pad token, truncated to "
                       "selector_len's max"})
    s_in = [TensorSpec("probs", "float32", (beams,), "accm_selector.probs"),
            TensorSpec("candidate_ids", "int64", (beams, "caption_len"), "accm_captions.candidate_ids"),
            TensorSpec("suffix_ids", "int64", (B, "suffix_len"), "host.suffix_ids"),
            TensorSpec("suffix_lens", "int64", (B,), "host.suffix_lens")]
    s_out = [TensorSpec("suffix_ids", "int64", (B, "suffix_len")), TensorSpec("suffix_lens", "int64", (B,)),
             TensorSpec("chosen", "int64", (1,))]
    if single:
        s_in.append(TensorSpec("seg_rows", "int64", ("num_seg",), {"single-pass": "host.seg_rows"}))
        s_out.append(TensorSpec("seg_rows", "int64", ("num_seg",)))
    splice = HostStep(
        "accm_splice", "accm_splice", before="embed", inputs=tuple(s_in), outputs=tuple(s_out),
        params={"chosen": "argmax of probs (the first on a tie)", "gpt2_tokenizer": tok["gpt2"],
                "tokenizer": "tokenizer", "template": SPLICE_PREFIX + "{caption}", "bos": False,
                "position": "in the suffix, right after the image's <im_end> and its newline, before the query",
                "caption_budget": knobs.caption_budget, "seg_rows": "shifted by the spliced ids"})
    sources = {"image_hidden": "accm_picks.image_hidden", "image_indices": "accm_picks.image_indices",
               "suffix_ids": "accm_splice.suffix_ids", "suffix_lens": "accm_splice.suffix_lens",
               "seg_rows": "accm_splice.seg_rows"}
    outputs = {"accm_candidate_ids": "accm_captions.candidate_ids", "accm_beam_scores": "accm_captions.beam_scores",
               "accm_selector_probs": "accm_selector.probs", "accm_chosen": "accm_splice.chosen",
               "accm_picks": "accm_picks.image_indices"}
    return AccmPart(image_stages=[vision], query_stages=[clip_text, picks, mapper, gpt2, step, selector],
                    host_steps=(question, captions, selector_text, splice), dims=dims, sources=sources,
                    outputs=outputs)
