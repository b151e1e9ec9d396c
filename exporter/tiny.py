"""A tiny, seeded checkpoint in the format LISA publishes: what tests and CPU demos load instead of LISA-7B.

By default it is a faithful replica of a LISA v1 release (xinlai/LISA-7B-v1 style):

    config.json                     LISA's fields: model_type llava, architectures LISAForCausalLM, mm_vision_tower
                                    "openai/clip-vit-large-patch14", torch_dtype, mm_use_im_start_end, out_dim,
                                    vocab_size = SentencePiece pieces + 4 added tokens (+ csprt_sam/csprt_clip: the tiny
                                    SAM and CLIP geometry, which LISA hard-codes as ViT-H and reads from the Hub)
    pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json    shards as save_pretrained wrote them (bfloat16
                                    as LISA ships them; `weights="fp32"` for float32, see TinyOptions.weights)
    tokenizer.model, tokenizer_config.json (LlamaTokenizer), special_tokens_map.json, added_tokens.json

with the CLIP tower embedded in the weights (`model.vision_tower.vision_tower.vision_model.*`, as LLaVA v1 saves
it), so it runs without --vision-tower. Options: `layout="v0"` (a LLaVA base checkpoint plus
pytorch_model-visual_model.bin and pytorch_model-text_hidden_fcs.bin, as LISA v0's chat.py loads them),
`clip="separate"` (no CLIP weights: the tower goes to its own directory, `<out>-clip`, for --vision-tower),
`clip="local"` (the tower in `<out>/vision_tower/`, named by a relative mm_vision_tower: csprt's earlier layout),
`tokenizer="bpe"` (the older byte-level BPE tokenizer.json), `format` (safetensors and unsharded layouts).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

from graphs.shapes import LlmShape, ModelShape, SamShape, VisionShape

CLIP_SUBDIR = "vision_tower"
CLIP_HUB_ID = "openai/clip-vit-large-patch14"  # what LISA's configs name as mm_vision_tower
TOKENIZERS = ("sentencepiece", "bpe")
LAYOUTS = ("v1", "v0")
CLIPS = ("embedded", "separate", "local")
LLM_WEIGHTS = ("random", "trained-like")
WEIGHT_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


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
    format: str = "bin-sharded"
    tokenizer: str = "sentencepiece"
    layout: str = "v1"
    clip: str = "embedded"
    # LISA ships bfloat16, so the tiny does too ("fp32" for full-precision values); graphs.tolerance's fp16
    # sam_decoder tolerance was measured on bf16-valued weights.
    weights: str = "bf16"
    # "trained-like": LLM weights with a trained model's quantization hazards (`trained_like_llm`), for checking
    # quantized artifacts; "random" (the default) leaves the initializer's Gaussian weights.
    llm_weights: str = "random"


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


def lisa_config(shape: ModelShape, clip_path: str = CLIP_HUB_ID, layout: str = "v1",
                torch_dtype: str = "bfloat16") -> dict:
    """config.json as LISA's releases have it (v1: LISAForCausalLM; v0: the LLaVA base's LlavaLlamaForCausalLM,
    without out_dim), plus `csprt_sam` and `csprt_clip` (the tiny SAM and CLIP geometry; real ones need neither).

    Args:
        shape (ModelShape): the model's dimensions.
        clip_path (str): the `mm_vision_tower` value (a Hub id, or a directory relative to the checkpoint).
        layout (str): "v1" or "v0". Defaults to "v1".
        torch_dtype (str): the weights' dtype. Defaults to "bfloat16", as LISA's releases.
    """
    llm = shape.llm
    sam = dataclasses.asdict(shape.sam)
    sam["global_attn"] = list(sam["global_attn"])
    config = {
        "_name_or_path": "csprt/tiny-lisa",
        "architectures": ["LISAForCausalLM" if layout == "v1" else "LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": llm.hidden,
        "initializer_range": 0.02,
        "intermediate_size": llm.intermediate,
        "max_position_embeddings": llm.max_positions,
        "max_sequence_length": llm.max_positions,
        "num_attention_heads": llm.heads,
        "num_hidden_layers": llm.layers,
        "num_key_value_heads": llm.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.31.0",
        "use_cache": False,
        "vocab_size": llm.vocab,
        "mm_hidden_size": shape.vision.hidden,
        "mm_use_im_start_end": True,
        "mm_vision_select_layer": shape.vision.select_layer,
        "mm_vision_tower": clip_path,
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }
    if layout == "v1":
        config.update({"freeze_mm_mlp_adapter": True, "image_aspect_ratio": "square", "image_grid_pinpoints": None,
                       "mm_use_im_patch_token": False, "mm_vision_select_feature": "patch", "out_dim": shape.out_dim,
                       "pretrain_mm_mlp_adapter": None, "train_mask_decoder": True, "vision_tower": clip_path})
    else:
        config["sep_image_conv_front"] = False
    # Not in LISA's config (it hard-codes SAM ViT-H and CLIP ViT-L/14): lets csprt rebuild the tiny ones.
    config["csprt_sam"] = sam
    config["csprt_clip"] = {"num_attention_heads": shape.vision.heads}
    return config


def _choose(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")


def make_tiny(out_dir: str | Path, opts: TinyOptions = TinyOptions()) -> Path:
    """Write a tiny checkpoint directory in LISA's published format (see the module docstring).

    Deterministic: the same options give the same weights and tokenizer. A failure (bad option, full disk)
    removes the directories this call created, so no empty or half-written checkpoint is left behind.

    Args:
        out_dir (path): target directory (created; existing files are overwritten).
        opts (TinyOptions): sizes, seed, weight format, tokenizer, layout and where CLIP goes.

    Returns:
        Path: `out_dir`.
    """
    out = Path(out_dir)
    created = [d for d in (out, separate_clip_dir(out)) if not d.exists()]
    try:
        return _make_tiny(out, opts)
    except BaseException:
        for d in created:
            shutil.rmtree(d, ignore_errors=True)
        raise


def _make_tiny(out: Path, opts: TinyOptions) -> Path:
    # Local imports: `csprt` builds every subcommand's parser, which must not pay for torch.
    import torch

    from exporter.checkpoint import FORMATS, save_checkpoint
    from exporter.model import LisaModel
    from exporter.tokenizer import LISA_ADDED_TOKENS, build_tokenizer, write_sentencepiece_tokenizer
    from graphs.atomic import write_json
    from graphs.preprocessing import default_clip_processor_config

    _choose("tokenizer", opts.tokenizer, TOKENIZERS)
    _choose("layout", opts.layout, LAYOUTS)
    _choose("CLIP placement", opts.clip, CLIPS)
    _choose("weight format", opts.format, FORMATS)
    _choose("weight dtype", opts.weights, tuple(WEIGHT_DTYPES))
    dtype = getattr(torch, WEIGHT_DTYPES[opts.weights])
    out.mkdir(parents=True, exist_ok=True)
    shape = tiny_shape(opts)
    # The tokenizer first: it validates --vocab before any weights are written.
    if opts.tokenizer == "sentencepiece":
        write_sentencepiece_tokenizer(out, shape.llm.vocab, LISA_ADDED_TOKENS[opts.layout])
    else:
        build_tokenizer(shape.llm.vocab).save_pretrained(out)
    from exporter.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(out, shape.llm.vocab)
    _choose("LLM weight distribution", opts.llm_weights, LLM_WEIGHTS)
    torch.manual_seed(opts.seed)
    model = LisaModel(shape)
    if opts.llm_weights == "trained-like":
        trained_like_llm(model, opts.seed)
    with torch.no_grad():  # the values the file will hold (bfloat16 as LISA ships them), taught below on those
        for p in model.parameters():
            p.copy_(p.to(dtype).float())

    _teach_seg_answer(model, tokenizer)
    embedded = opts.clip == "embedded"
    save_checkpoint(model, out, fmt=opts.format, max_shard_size="100KB", include_clip=embedded, layout=opts.layout,
                    dtype=dtype)
    local = opts.clip == "local"
    write_json(lisa_config(shape, CLIP_SUBDIR if local else CLIP_HUB_ID, opts.layout, WEIGHT_DTYPES[opts.weights]),
               out / "config.json")
    if not embedded:
        clip_dir = out / CLIP_SUBDIR if local else separate_clip_dir(out)
        model.vision_tower.save_pretrained(clip_dir)
        write_json(default_clip_processor_config(shape.vision.image_size), clip_dir / "preprocessor_config.json")
    return out


def trained_like_llm(model, seed: int = 0, df: float = 5.0, outlier_scale: float = 8.0) -> None:
    """Give the LLM's weights, in place, what makes a trained LLaMA hard to quantize and random weights easy.

    Gaussian init weights quantize unlike trained ones: they have no tails and no outlier channels, so any
    method looks lossless. Here, (1) every decoder Linear and the LM head are redrawn from a Student-t with `df`
    degrees of freedom (trained LLaMA weights are heavy-tailed; kurtosis 9 at df 5, against a Gaussian's 3) at the
    same standard deviation, so a per-channel or per-block scale is set by a few large weights; (2) a few hidden
    channels (1 in 32, at least 2) get `outlier_scale` times the RMSNorm gain in every layer, so the activations
    entering the Linears have the few huge channels of real LLMs ("massive activations", LLM.int8()), which is
    what per-tensor activation scales (int8 / fp8 Q/DQ) lose precision to. Seeded: the same seed, the same weights.

    Args:
        model (LisaModel): the freshly initialised model.
        seed (int): generator seed. Defaults to 0.
        df (float): Student-t degrees of freedom (an integer: the chi-square is a sum of squares). Defaults to 5.
        outlier_scale (float): gain of the outlier channels. Defaults to 8.
    """
    import torch

    gen = torch.Generator().manual_seed(10_000 + seed)
    hidden = model.shape.llm.hidden
    outliers = torch.randperm(hidden, generator=gen)[: max(2, hidden // 32)]
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if p.ndim == 2 and "embed_tokens" not in name:  # decoder Linears and lm_head
                z = torch.randn(p.shape, generator=gen)
                chi2 = (torch.randn((int(df), *p.shape), generator=gen) ** 2).sum(0)
                t = z / torch.sqrt(chi2 / df)
                p.copy_(t * (p.std() / t.std()))
            elif name.endswith("layernorm.weight"):
                p[outliers] *= outlier_scale


def separate_clip_dir(out_dir: str | Path) -> Path:
    """Where `make_tiny(..., clip="separate")` writes the CLIP directory: beside the checkpoint, `<out>-clip`."""
    out = Path(out_dir)
    return out.parent / f"{out.name}-clip"


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
