"""ACCM (arXiv 2508.01236) caption compensation: its sizes, texts and host-side rules (no torch).

ACCM prunes to a handful of visual tokens and gives the LLM a question-conditioned caption of what it
pruned. Per request (behaviour from ASGO-MM/ACCM at 50f1bd8, cited per point in docs/accm.md):

    pixels -> CLIP --+-- last layer q/k, CLS row (heads merged) -> outliers above Q3 + 1.5 IQR --+
                     |                                                                          +-> picks (budget)
    query -> CLIP text tower -> distance to per-patch projected embeddings -> top-k ------------+
                     +-- projected embeddings of the tokens NOT picked -> mapper (20 prefix rows)
    GPT-2 wte(query) ++ prefix -> GPT-2 beam search (3 beams, <= 67 tokens, stop at ".") -> 3 captions
    "Question: {q}  Supplemental information for questions: {caption}" x3 -> LongCLIP text -> selector -> argmax
    "additional information: {caption}" -> LLM tokenizer (no BOS) -> after the image and its newline

This module holds what both sides need: the sizes (`AccmShape`, for FLOPs and the tiny models), the
fixed texts, and the splice rule (`splice_position`).
"""

from __future__ import annotations

from dataclasses import dataclass

# clip_encoder.py: generate_beam(..., beam_size=3); decoding_scheme.py: entry_length=67, stop_token='.'.
BEAMS = 3
MAX_CAPTION_TOKENS = 67
STOP_TEXT = "."
# clip_encoder.py: ClipCaptionModel(prefix_length=20, ...).
PREFIX_LENGTH = 20
# llava_arch.py: prefix = 'additional information: '.
SPLICE_PREFIX = "additional information: "
# clip_encoder.py: the selector's text per candidate.
SELECTOR_QUESTION = "Question: "
SELECTOR_SUPPLEMENT = "  Supplemental information for questions: "
# clip_encoder.py removes LLaVA's evaluation instructions from the question before the selector sees it.
SELECTOR_STRIP = ("\nAnswer with the option's letter from the given choices directly.",
                  "\nAnswer the question using a single word or phrase.")
CLIP_TEXT_POSITIONS = 77      # clip_encoder.py truncates the question to 77 tokens, EOS last
LONGCLIP_POSITIONS = 248      # longclip.tokenize(..., truncate=True): context length 248
# ACCM's (visual tokens of 576, text picks) pairs, clip_encoder.py l.152-153: (144, 70), (72, 40), (36, 20), (18, 12).
ACCM_GRID_TOKENS = 576
CAPTION_BUDGET = 96  # LLM tokens for the splice: 67 GPT-2 tokens of English are about 85 LLaMA tokens


@dataclass(frozen=True)
class TextTowerShape:
    layers: int = 12
    hidden: int = 768
    heads: int = 12
    intermediate: int = 3072
    positions: int = 77
    projection: int = 768
    vocab: int = 49408


@dataclass(frozen=True)
class AccmShape:
    """Sizes of ACCM's own models. Defaults are the released ones (GPT-2 124M, LongCLIP-L, CLIP ViT-L/14's text tower)."""

    clip_projection: int = 768     # the mapper's input: CLIP's projected patch embeddings (prefix_size=768)
    gpt_layers: int = 12
    gpt_hidden: int = 768
    gpt_heads: int = 12
    gpt_vocab: int = 50257
    gpt_positions: int = 1024
    mapper_layers: int = 4         # ClipCaptionModel(num_layers=4), TransformerMapper: 8 heads, mlp_ratio 2
    mapper_heads: int = 8
    mapper_mlp_ratio: int = 2
    prefix_length: int = PREFIX_LENGTH
    selector_layers: int = 4       # TransformerSelector(embedding_dim=768, num_layers=4, num_heads=8, dim_feedforward=1536)
    selector_heads: int = 8
    selector_ffn: int = 1536
    clip_text: TextTowerShape = TextTowerShape()
    longclip_text: TextTowerShape = TextTowerShape(positions=LONGCLIP_POSITIONS)

    @property
    def selector_dim(self) -> int:
        return self.longclip_text.projection


def selector_text(question: str, caption: str) -> str:
    """One selector candidate as ACCM writes it (clip_encoder.py): question stripped, LLaVA's eval suffixes removed."""
    text = SELECTOR_QUESTION + question.strip() + SELECTOR_SUPPLEMENT
    for s in SELECTOR_STRIP:
        text = text.replace(s, "")
    return text + caption


def splice_text(caption: str) -> str:
    """The text ACCM inserts into the LLM prompt (llava_arch.py)."""
    return SPLICE_PREFIX + caption


def splice_position(suffix: list[int], head: list[int], decode) -> int:
    """Index in the prompt's `suffix` ids (the ids after the image tokens) where the caption goes.

    ACCM inserts at the image's index + 3 in LLaVA's ids (llava_arch.py): past the image and the two
    ids of the newline after it ("▁", "<0x0A>"), before the question. LISA's image is followed by
    `<im_end>`, then the newline, and the newline's ids depend on the tokenizer, so the rule is written
    on the text: the first position whose decoded `suffix[:j]` holds the newline. A tokenizer that
    drops the newline (csprt's tiny SentencePiece has no byte fallback) gives none; then the caption
    goes after `head`, the ids of the text from the image to its newline, when the suffix starts with
    them. The system message sits before the image and never moves this position.

    Args:
        suffix (list[int]): ids after the image tokens.
        head (list[int]): ids of the text after the image up to and including its newline ("<im_end>\n").
        decode: ids -> text (the LLM tokenizer's decode, special tokens kept).
    """
    for j in range(1, len(suffix) + 1):
        if "\n" in decode(suffix[:j]):
            return j
    if head and suffix[:len(head)] == head:
        return len(head)
    from graphs.errors import InputError

    raise InputError("the prompt has no newline after the image, where ACCM puts its caption; "
                     "use LISA's llava_v1 template (<im_end>\\n before the question)")
