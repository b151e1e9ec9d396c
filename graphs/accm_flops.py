"""FLOPs of ACCM's own models per request (graphs.flops convention: multiply-accumulates, norms and softmax left out).

    accm_vision           what the accm_vision stage runs besides LISA's vision tower and projector (graphs.flops
                          "vision" and "projector"): the last CLIP layer (LISA's features stop one layer earlier),
                          visual_projection of every patch, the merged CLS attention row
    accm_clip_text        CLIP's text tower over the question
    accm_picks            the question's similarity to every projected patch
    accm_mapper           Linear over the N - budget tokens pruned away, then the mapper's layers over them
                          plus the 20 prefix rows
    accm_caption_prefill  GPT-2 over question + 20 prefix rows, LM head on the last row
    accm_caption_decode   every later token for each of the 3 beams against its KV cache, LM head per row;
                          an upper bound: all 67 tokens (a caption usually stops at "." much earlier)
    accm_selector         LongCLIP's text tower over each candidate padded to 248 tokens (as longclip.tokenize
                          pads and ACCM encodes), then the selector's layers over the candidates

Each component is named after the stage (graphs/accm_layout.py) that computes it; the caption's GPT-2 (stage
accm_gpt2) is split into its prefill and decode. The caption's LLM tokens (the schedule's `accm.caption_budget`)
are counted by `graphs.flops` as text.
"""

from __future__ import annotations

from graphs.accm import AccmShape, TextTowerShape
from graphs.flops import _vit_block
from graphs.shapes import ModelShape

# Tokens of a short question ("What is the man on the left holding?") under GPT-2's and CLIP's BPEs.
QUESTION_TOKENS = 16
ACCM_COMPONENTS = ("accm_vision", "accm_clip_text", "accm_picks", "accm_mapper", "accm_caption_prefill",
                   "accm_caption_decode", "accm_selector")


def _text_tower(t: TextTowerShape, n: int) -> int:
    """A CLIP text tower over n tokens, and the projection of its pooled row."""
    return t.layers * _vit_block(n, t.hidden, t.intermediate) + t.hidden * t.projection


def accm_flops(shape: ModelShape, budget: int, beams: int, max_tokens: int, accm: AccmShape = AccmShape(),
               question_tokens: int = QUESTION_TOKENS) -> dict[str, int]:
    """FLOPs of each ACCM component for one request (module docstring).

    Args:
        shape (ModelShape): the LISA model (its CLIP tower and N).
        budget (int): visual tokens the LLM keeps (the rest go to the mapper).
        beams (int): beam width.
        max_tokens (int): caption tokens per beam (the decode's upper bound).
        accm (AccmShape): ACCM's model sizes. Defaults to the released ones.
        question_tokens (int): question tokens for CLIP's text tower and GPT-2. Defaults to QUESTION_TOKENS.
    """
    v, n = shape.vision, shape.num_image_tokens
    skipped_layers = -1 - v.select_layer if v.select_layer < 0 else v.layers - v.select_layer
    vision = (skipped_layers * _vit_block(n + 1, v.hidden, v.intermediate) + n * v.hidden * accm.clip_projection
              + (n + 1) ** 2 * v.hidden)
    clip_text = _text_tower(accm.clip_text, question_tokens)
    picks = n * accm.clip_projection
    d, rows = accm.gpt_hidden, n - budget + accm.prefix_length
    mapper = ((n - budget) * accm.clip_projection * d
              + accm.mapper_layers * _vit_block(rows, d, accm.mapper_mlp_ratio * d))
    t0 = question_tokens + accm.prefix_length
    head = d * accm.gpt_vocab
    prefill = accm.gpt_layers * _vit_block(t0, d, 4 * d) + head
    decode = 0
    for step in range(1, max_tokens):  # one row per beam; it attends over t0 + step cached positions
        per_layer = 4 * d * d + 2 * (t0 + step) * d + 2 * d * 4 * d
        decode += beams * (accm.gpt_layers * per_layer + head)
    s = accm.selector_dim
    selector = (beams * _text_tower(accm.longclip_text, accm.longclip_text.positions)
                + accm.selector_layers * _vit_block(beams, s, accm.selector_ffn) + beams * s)
    return dict(zip(ACCM_COMPONENTS, (vision, clip_text, picks, mapper, prefill, decode, selector)))

