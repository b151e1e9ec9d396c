"""A tiny, seeded, LISA-layout checkpoint directory: what tests and CPU demos load instead of LISA-7B.

It has everything a real one has (config.json in LISA/LLaVA style, LISA-layout weights, a
tokenizer with LISA's added tokens, a separate CLIP directory), so the same loader reads both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from graphs.shapes import LlmShape, ModelShape, SamShape, VisionShape

CLIP_SUBDIR = "vision_tower"


@dataclass(frozen=True)
class TinyOptions:
    """Sizes of a tiny checkpoint; the defaults are what `csprt make-tiny` writes."""

    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 512
    image_size: int = 64
    patch_size: int = 8
    sam_image_size: int = 128
    seed: int = 0
    format: str = "safetensors"


def tiny_shape(opts: TinyOptions = TinyOptions()) -> ModelShape:
    """The ModelShape of a tiny checkpoint. SAM and CLIP sizes are fixed; the LLM follows `opts`."""
    return ModelShape(
        vision=VisionShape(layers=2, hidden=32, heads=2, intermediate=64, image_size=opts.image_size,
                           patch_size=opts.patch_size, select_layer=-2),
        llm=LlmShape(layers=opts.layers, hidden=opts.hidden, heads=opts.heads, kv_heads=opts.kv_heads,
                     intermediate=opts.intermediate, vocab=opts.vocab),
        # initializer_range 0.2: at 0.02 the tiny SAM's mask logits have std ~3e-5 (all pixels off);
        # at 0.2 their std is ~0.5 with ~30% of pixels on, so mask comparisons mean something.
        sam=SamShape(image_size=opts.sam_image_size, patch_size=16, hidden=32, layers=2, heads=2, mlp_dim=64,
                     window=4, global_attn=(1,), out_chans=32, decoder_layers=2, decoder_heads=2,
                     decoder_mlp=64, initializer_range=0.2),
    )


def lisa_config(shape: ModelShape, clip_path: str = CLIP_SUBDIR) -> dict:
    """config.json in the style of LISA's released checkpoints (LLaVA + LLaMA fields), plus `csprt_sam`.

    Args:
        shape (ModelShape): the model's dimensions.
        clip_path (str): the `mm_vision_tower` value, resolved relative to the checkpoint directory.
    """
    llm = shape.llm
    sam = dataclasses.asdict(shape.sam)
    sam["global_attn"] = list(sam["global_attn"])
    return {
        "architectures": ["LISAForCausalLM"],
        "model_type": "llava",
        "hidden_act": "silu",
        "hidden_size": llm.hidden,
        "intermediate_size": llm.intermediate,
        "num_hidden_layers": llm.layers,
        "num_attention_heads": llm.heads,
        "num_key_value_heads": llm.kv_heads,
        "vocab_size": llm.vocab,
        "rms_norm_eps": llm.rms_norm_eps,
        "max_position_embeddings": llm.max_positions,
        "rope_theta": llm.rope_theta,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
        "use_cache": True,
        "mm_vision_tower": clip_path,
        "mm_hidden_size": shape.vision.hidden,
        "mm_vision_select_layer": shape.vision.select_layer,
        "mm_use_im_start_end": True,
        "mm_use_im_patch_token": False,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "square",
        "out_dim": shape.out_dim,
        # Not in LISA's config (it hard-codes ViT-H); lets from_hf_configs rebuild the tiny SAM.
        "csprt_sam": sam,
    }


def make_tiny(out_dir: str | Path, opts: TinyOptions = TinyOptions()) -> Path:
    """Write a tiny checkpoint directory: config.json, weights, tokenizer, and `vision_tower/` (CLIP).

    Deterministic: the same options give byte-identical weights.

    Args:
        out_dir (path): target directory (created; existing files are overwritten).
        opts (TinyOptions): sizes, seed and weight format.

    Returns:
        Path: `out_dir`.
    """
    # Local imports: `csprt` builds every subcommand's parser, which must not pay for torch.
    import torch

    from exporter.checkpoint import save_checkpoint
    from graphs.atomic import write_json
    from graphs.preprocessing import default_clip_processor_config
    from exporter.model import LisaModel
    from exporter.tokenizer import build_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = tiny_shape(opts)
    # Build the tokenizer first: it validates --vocab before any weights are written.
    tokenizer = build_tokenizer(shape.llm.vocab)
    torch.manual_seed(opts.seed)
    model = LisaModel(shape)

    _teach_seg_answer(model, tokenizer)
    save_checkpoint(model, out, fmt=opts.format, max_shard_size="100KB")
    write_json(lisa_config(shape), out / "config.json")
    tokenizer.save_pretrained(out)

    clip_dir = out / CLIP_SUBDIR
    model.vision_tower.save_pretrained(clip_dir)
    write_json(default_clip_processor_config(shape.vision.image_size), clip_dir / "preprocessor_config.json")
    return out


SEG_QUERY = "Where is the cat in this picture?"  # the query (with exporter.export.sample_image) it answers with [SEG]


def _teach_seg_answer(model, tokenizer) -> None:
    """Bias the LM head so generate mode answers the sample request with "[SEG]</s>", as a trained LISA would.

    Random weights never emit [SEG], so generate mode would never produce a mask. The [SEG] row gets
    the winning token's row plus a step along the hidden state h1 that chose it (a 2-logit lead). The
    EOS row then gets that same row plus a step along the part of the next state h2 orthogonal to
    h1, so it wins after [SEG] (by 2 logits) and stays below [SEG] at the first step. Single-pass outputs
    are unaffected (they never read the LM head).
    """
    import torch

    from exporter.export import sample_image
    from exporter.reference import Reference
    from graphs.preprocessing import default_clip_processor_config
    from graphs.prompt import SEG_TOKEN, token_id
    from graphs.schedule import resolve

    shape = model.shape
    ref = Reference(model, tokenizer, default_clip_processor_config(shape.vision.image_size),
                    resolve("full", shape.llm.layers, shape.num_image_tokens))
    seg, eos = token_id(tokenizer, SEG_TOKEN), tokenizer.eos_token_id
    w = model.llm.lm_head.weight
    with torch.no_grad():
        first = ref(sample_image(), SEG_QUERY, mode="generate", max_new_tokens=1)
        h1 = first.step_hidden[0]
        w[seg] = w[first.generated_ids[0]] + 2.0 * h1 / h1.dot(h1)
        h2 = ref(sample_image(), SEG_QUERY, mode="generate", max_new_tokens=2).step_hidden[1]
        d = h2 - h2.dot(h1) / h1.dot(h1) * h1  # orthogonal to h1: the first step's logits do not move
        base = w[first.generated_ids[0]]  # below [SEG] by 2 at h1
        lead = float((w @ h2).max() - base.dot(h2)) + 2.0
        w[eos] = base + lead * d / d.dot(h2)
