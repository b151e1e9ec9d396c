"""FLOPs accounting for a model shape under a token schedule (`csprt flops`).

Every count here uses the **FastV convention**: one multiply-accumulate of a matmul counts as one
"FLOP" (FastV, Chen et al. 2024, and the LVLM_CSP paper report FLOPs this way). A decoder layer
over n tokens, hidden d, FFN width m costs

    fastv:   4 n d^2 + 2 n^2 d + 2 n d m    (Q, K, V, O projections; QK^T and AV; a 2-matrix FFN)
    swiglu:  4 n d^2 + 2 n^2 d + 3 n d m    (LLaMA's FFN has gate, up and down matrices)

Not counted, as in FastV: norms, softmax, RoPE, residual adds, the embedding lookup, and the
`lm_head`. The lm_head is left out because single-pass mode (the default, and the paper's
measurement) needs only the hidden state before `[SEG]`, not logits; the `[SEG]` head
(`text_hidden_fcs`, one token) is negligible and left out too. The LLM numbers follow the formula
exactly (grouped-query attention is not special-cased). The vision tower, projector and SAM counts
are documented approximations in the same MAC convention; their MLPs have two matrices, so both
conventions give the same number for them.

Pure Python (no torch): the CLI answers instantly and any side can import it.
"""

from __future__ import annotations

import math

from graphs.errors import ToolchainError, internal_error
from graphs.schedule import Schedule
from graphs.shapes import ModelShape

CONVENTIONS = ("fastv", "swiglu")
# FFN matrices per convention: FastV's paper formula counts 2, LLaMA's SwiGLU FFN has 3.
_FFN_MATRICES = {"fastv": 2, "swiglu": 3}
# The single-pass LISA prompt without the image (llava_v1 template + a short query + "[SEG].")
# is roughly 40 tokens.
DEFAULT_TEXT_TOKENS = 40
# SAM's mask decoder: 1 IoU token + 4 mask tokens (3 multimask outputs + 1) + 1 sparse prompt
# (the [SEG] embedding); no points or boxes in LISA.
_SAM_DECODER_TOKENS = 1 + 4 + 1
_SAM_MASK_TOKENS = 4
_COMPONENTS = ("vision", "projector", "llm", "llm_image_tokens", "sam_encoder", "sam_decoder", "total")
# The FLOPs components each stage kind computes (the entry ops and heads are negligible and not counted);
# accm_vision runs LISA's vision tower and projector too (graphs/accm_flops.py counts only what it adds).
STAGE_KIND_COMPONENTS = {"vision": ("vision", "projector"), "sam_encoder": ("sam_encoder",),
                         "llm": ("llm",), "sam_decoder": ("sam_decoder",),
                         "accm_vision": ("vision", "projector", "accm_vision")}


def llm_layer_flops(n: int, d: int, m: int, convention: str = "fastv") -> int:
    """FLOPs of one LLM decoder layer, FastV convention: `4nd^2 + 2n^2d + k*n*d*m`.

    Args:
        n: tokens the layer sees (text plus image tokens).
        d: hidden size.
        m: FFN intermediate size.
        convention: "fastv" (k=2, the paper's formula) or "swiglu" (k=3). Defaults to "fastv".
    """
    if convention not in _FFN_MATRICES:
        raise ToolchainError(f"unknown FLOPs convention {convention!r}; choose one of: {', '.join(CONVENTIONS)}")
    return 4 * n * d * d + 2 * n * n * d + _FFN_MATRICES[convention] * n * d * m


def llm_flops(shape: ModelShape, image_tokens_per_layer: list[int], text_tokens: int) -> dict[str, int]:
    """LLM FLOPs summed over decoder layers, in both conventions.

    Args:
        shape: the model; its `llm` block gives d and m.
        image_tokens_per_layer: image tokens at each decoder layer (one entry per layer; all zeros
            gives the text-only cost).
        text_tokens: text tokens present at every layer.
    """
    d, m = shape.llm.hidden, shape.llm.intermediate
    return {c: sum(llm_layer_flops(text_tokens + k, d, m, c) for k in image_tokens_per_layer) for c in CONVENTIONS}


def _attention(n_q: int, n_kv: int, d_in: int, d_int: int) -> int:
    """Attention block: q/out projections over n_q rows, k/v over n_kv, then QK^T and AV.

    With n_q == n_kv == n and d_int == d_in == d this is the `4nd^2 + 2n^2d` of the layer formula.
    """
    return 2 * n_q * d_in * d_int + 2 * n_kv * d_in * d_int + 2 * n_q * n_kv * d_int


def _vit_block(n: int, d: int, m: int) -> int:
    """A pre-norm ViT block with a plain 2-matrix MLP: `4nd^2 + 2n^2d + 2ndm`."""
    return _attention(n, n, d, d) + 2 * n * d * m


def vision_flops(shape: ModelShape) -> int:
    """CLIP vision tower up to the selected hidden state.

    Counts the patch-embedding conv and the encoder layers that `hidden_states[select_layer]`
    needs (LISA's -2 skips the last layer), each over num_patches + 1 tokens (CLS included).

    Args:
        shape: the model; its `vision` block is used.
    """
    v = shape.vision
    layers_run = v.layers + 1 + v.select_layer if v.select_layer < 0 else v.select_layer
    n = v.num_tokens + 1
    patch_embed = v.num_tokens * 3 * v.patch_size**2 * v.hidden
    return patch_embed + layers_run * _vit_block(n, v.hidden, v.intermediate)


def projector_flops(shape: ModelShape) -> int:
    """`mm_projector`: one Linear(Dv, H) over the N image tokens, n*Dv*H MACs (CLS dropped).

    Args:
        shape: the model.
    """
    return shape.num_image_tokens * shape.vision.hidden * shape.llm.hidden


def sam_encoder_flops(shape: ModelShape) -> int:
    """SAM ViT image encoder + neck, approximated.

    Tokens: the g x g patch grid (g = image_size / patch_size; 64 x 64 for ViT-H at 1024). Global
    blocks attend over all g^2 tokens. Windowed blocks pad the grid to a multiple of the window
    (SAM pads before attention, so q/k/v/out run on the padded grid) and attend within each
    window^2-token window. Decomposed relative-position terms add ~n*(h+w)*d per block. The neck
    is a 1x1 conv to out_chans and a 3x3 conv out_chans -> out_chans (LayerNorms not counted).

    Args:
        shape: the model; its `sam` block is used.
    """
    s = shape.sam
    g, d, w = s.embed_grid, s.hidden, s.window
    n = g * g
    total = n * 3 * s.patch_size**2 * d  # patch-embedding conv
    for i in range(s.layers):
        if i in s.global_attn or w <= 0:
            attn, n_attn, side = _attention(n, n, d, d), n, g
        else:
            gp = math.ceil(g / w) * w
            windows = (gp // w) ** 2
            attn, n_attn, side = windows * _attention(w * w, w * w, d, d), gp * gp, w
        rel_pos = n_attn * 2 * side * d  # q . R_h and q . R_w, each side x head_dim per head
        total += attn + rel_pos + 2 * n * d * s.mlp_dim
    c = s.out_chans
    total += n * d * c + n * c * c * 9  # neck: 1x1 conv, 3x3 conv
    return total


def sam_decoder_flops(shape: ModelShape) -> int:
    """SAM prompt encoder (~0) + mask decoder, approximated.

    The prompt encoder only adds positional encodings and a learned "no mask" embedding: counted
    as 0. The mask decoder's two-way transformer works on t = 6 tokens and k = g^2 image tokens at
    dim c = out_chans; per layer: token self-attention, token->image cross-attention (internal dim
    c/2), the token MLP, and image->token cross-attention (c/2); then a final token->image
    attention. Upscaling is two stride-2 transposed convs (c -> c/4 -> c/8), then 4 hypernetwork
    MLPs (c, c, c/8) and the mask product. The IoU head and the final bilinear resize are left out.

    Args:
        shape: the model; its `sam` block is used.
    """
    s = shape.sam
    t, k, c = _SAM_DECODER_TOKENS, s.embed_grid**2, s.out_chans
    layer = (
        _attention(t, t, c, c)
        + _attention(t, k, c, c // 2)
        + 2 * t * c * s.decoder_mlp
        + _attention(k, t, c, c // 2)
    )
    total = s.decoder_layers * layer + _attention(t, k, c, c // 2)
    c4, c8 = c // 4, c // 8
    total += k * c * c4 * 4 + (4 * k) * c4 * c8 * 4  # transposed convs, kernel 2 stride 2
    total += _SAM_MASK_TOKENS * (2 * c * c + c * c8)  # hypernetwork MLPs
    total += _SAM_MASK_TOKENS * c8 * (16 * k)  # masks = hyper_in @ upscaled embedding (4x grid)
    return total


def _pct_saved(value: int, baseline: int) -> float:
    return 100.0 * (1.0 - value / baseline) if baseline else 0.0


def flops_report(shape: ModelShape, schedule: Schedule, text_tokens: int = DEFAULT_TEXT_TOKENS) -> dict:
    """FLOPs of one single-pass forward under `schedule`, per component, in both conventions.

    "Image-token FLOPs" are the LLM FLOPs with the image tokens minus those of the text alone; the
    reductions compare with the `full` schedule (every image token at every layer) at the same
    shape and text length.

    Args:
        shape: the model's dimensions.
        schedule: a schedule resolved for this shape (L decoder layers, N image tokens).
        text_tokens: text tokens in the prompt besides the image. Defaults to DEFAULT_TEXT_TOKENS.

    Returns:
        A JSON-ready dict with keys schedule, shape, n_layers, n_image_tokens, text_tokens,
        tokens_per_layer, avg_image_tokens_per_layer, image_token_reduction_pct,
        image_token_flops_reduction_pct, llm_flops_reduction_pct, total_flops_reduction_pct,
        conventions, and flops (component -> {"fastv": int, "swiglu": int}).
    """
    if text_tokens < 1:
        raise ToolchainError(f"text_tokens must be >= 1 (the prompt has at least the [SEG] token), got {text_tokens}")
    L, N = shape.llm.layers, shape.num_image_tokens
    schedule.check_against(L, N)
    per_layer = schedule.tokens_per_layer()
    caption = schedule.accm.caption_budget if schedule.accm else 0  # ACCM's caption: text at every layer
    llm = llm_flops(shape, per_layer, text_tokens + caption)
    llm_full = llm_flops(shape, [N] * L, text_tokens)
    text_only = llm_flops(shape, [0] * L, text_tokens + caption)
    image = {c: llm[c] - text_only[c] for c in CONVENTIONS}
    text_full = llm_flops(shape, [0] * L, text_tokens) if caption else text_only
    image_full = {c: llm_full[c] - text_full[c] for c in CONVENTIONS}

    same = {"vision": vision_flops(shape), "projector": projector_flops(shape),
            "sam_encoder": sam_encoder_flops(shape), "sam_decoder": sam_decoder_flops(shape)}
    if schedule.accm is not None:
        from graphs.accm_flops import accm_flops

        a = schedule.accm
        same.update(accm_flops(shape, schedule.stages[0].budget, a.beams, a.max_caption_tokens))
    flops = {name: {c: value for c in CONVENTIONS} for name, value in same.items()}
    flops["llm"], flops["llm_image_tokens"] = llm, image
    flops["total"] = {c: sum(same.values()) + llm[c] for c in CONVENTIONS}
    total_full = sum(v for k, v in same.items() if k in _COMPONENTS) + llm_full["fastv"]
    image_only = _image_only_kinds(shape, schedule)
    skipped = {c: sum(flops[comp][c] for kind in image_only.values() for comp in _components(kind))
               for c in CONVENTIONS}
    return {
        "schedule": schedule.name,
        "shape": shape.to_dict(),
        "n_layers": L,
        "n_image_tokens": N,
        "text_tokens": text_tokens,
        **({"caption_tokens": caption} if schedule.accm else {}),
        "tokens_per_layer": per_layer,
        "avg_image_tokens_per_layer": schedule.avg_image_tokens(),
        "image_token_reduction_pct": schedule.reduction_pct(),
        # Headline numbers use the paper's (fastv) convention.
        "image_token_flops_reduction_pct": _pct_saved(image["fastv"], image_full["fastv"]),
        "llm_flops_reduction_pct": _pct_saved(llm["fastv"], llm_full["fastv"]),
        "total_flops_reduction_pct": _pct_saved(flops["total"]["fastv"], total_full),
        "conventions": {
            "fastv": "4nd^2 + 2n^2d + 2ndm per LLM layer (FastV paper; multiply-accumulates)",
            "swiglu": "4nd^2 + 2n^2d + 3ndm per LLM layer (LLaMA's 3-matrix FFN)",
        },
        "flops": {name: flops[name] for name in (*_COMPONENTS[:-1], *[k for k in flops if k not in _COMPONENTS], "total")},
        # A further question about an image already encoded (ArtifactSession.encode_image, the serve cache)
        # skips the image-only stages, derived from the layout's wiring (graphs.image_encoding).
        "cached_question": {"image_only_stages": list(image_only), "skipped_flops": skipped,
                            "skipped_pct": 100.0 * skipped["fastv"] / flops["total"]["fastv"]},
    }


def _image_only_kinds(shape: ModelShape, schedule: Schedule) -> dict[str, str]:
    """Image-only stage name -> kind, from the single-pass layout of `schedule` at `shape` (the manifest's names)."""
    from graphs.image_encoding import image_only_stages
    from graphs.stages import LayoutOptions, build_layout

    accm = None
    if schedule.accm is not None:  # ACCM's released model sizes, as accm_flops counts them; no id changes a name
        from graphs.accm import AccmShape
        from graphs.accm_layout import AccmLayoutInfo

        accm = AccmLayoutInfo(AccmShape(), stop_id=0)
    layout = build_layout(schedule, shape, LayoutOptions(), seg_token_id=0, stop_token_ids=(), accm=accm)
    return {name: layout.stage(name).kind for name in image_only_stages(layout)}


def _components(kind: str) -> tuple[str, ...]:
    """The FLOPs components an image-only stage of `kind` computes (STAGE_KIND_COMPONENTS)."""
    if kind not in STAGE_KIND_COMPONENTS:
        raise internal_error(f"an image-only stage of kind {kind!r} has no FLOPs components; "
                             "add it to graphs.flops.STAGE_KIND_COMPONENTS")
    return STAGE_KIND_COMPONENTS[kind]
