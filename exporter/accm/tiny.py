"""Tiny, seeded ACCM files in ACCM's released layouts (`csprt make-tiny OUT --accm` writes them to OUT/accm).

    accm/caption_model.pt   torch.save(ClipCaptionModel state dict): clip_project.*, gpt.*
    accm/selector.pt        torch.save(TransformerSelector state dict)
    accm/gpt2/              GPT-2 (save_pretrained) + a byte-level BPE vocab.json / merges.txt
    accm/longclip/          CLIPTextModelWithProjection, 248 positions (save_pretrained) + CLIP tokenizer files
    accm/clip/              the full CLIP model (CLIPModel) whose vision tower IS the tiny LISA's, + tokenizer files:
                            stands in for openai/clip-vit-large-patch14, which LISA's tiny embeds only half of
    accm/accm_config.json   the tiny mapper/selector sizes (ACCM's real ones need no such file)

The tiny GPT-2 is taught to end captions early (a trained one ends at "." within a sentence): its final
LayerNorm gets a bias and the "." row of its (tied) embedding a step along it, a lead of a few logits.
"""

from __future__ import annotations

import json
from pathlib import Path

from graphs.accm import LONGCLIP_POSITIONS, AccmShape, TextTowerShape

ACCM_SUBDIR = "accm"
_CORPUS = ("a cat sits on a red sofa near the window. two dogs run across the green grass in the park. "
           "a man holds an umbrella on a rainy street. the kitchen has a white table and wooden chairs. "
           "where is the cat? what is on the table? a plate of food with a fork and a knife.")
_STOP_LEAD = 1.0  # logits "." gains on average: captions end within a few tokens, not at 67


def tiny_accm_shape(gpt_vocab: int, clip_vocab: int) -> AccmShape:
    text = TextTowerShape(layers=2, hidden=32, heads=2, intermediate=64, positions=77, projection=16, vocab=clip_vocab)
    return AccmShape(clip_projection=16, gpt_layers=2, gpt_hidden=32, gpt_heads=2, gpt_vocab=gpt_vocab,
                     gpt_positions=256, mapper_layers=2, mapper_heads=8, mapper_mlp_ratio=2, selector_layers=2,
                     selector_heads=8, selector_ffn=64, clip_text=text,
                     longclip_text=TextTowerShape(layers=2, hidden=32, heads=2, intermediate=64,
                                                  positions=LONGCLIP_POSITIONS, projection=32, vocab=clip_vocab))


def write_gpt2_tokenizer(out: Path) -> None:
    """A byte-level BPE trained on a few sentences, in GPT-2's vocab.json + merges.txt format."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([_CORPUS], vocab_size=320, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_model(str(out))


def write_clip_tokenizer(out: Path) -> None:
    """CLIP's tokenizer files with a byte alphabet and no merges (every word spelled out), as CLIPTokenizer reads them."""
    chars = _byte_alphabet()
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPEs (GPT-2, CLIP) use for the bytes 0..255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _text_config(t: TextTowerShape, tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=t.vocab, hidden_size=t.hidden, intermediate_size=t.intermediate,
                          num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.positions,
                          projection_dim=t.projection, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def make_tiny_accm(ckpt_dir: str | Path, vision_tower, seed: int = 0) -> Path:
    """Write tiny ACCM files into `<ckpt_dir>/accm` for the tiny LISA whose CLIP vision tower is `vision_tower`.

    Args:
        ckpt_dir (path): the tiny LISA checkpoint directory.
        vision_tower (CLIPVisionModel): its vision tower (copied into the full CLIP model).
        seed (int): generator seed. Defaults to 0.

    Returns:
        Path: the ACCM directory.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's per-shard bar: noise for three tiny files
    try:
        return _write(Path(ckpt_dir) / ACCM_SUBDIR, vision_tower, seed)
    finally:
        hf_logging.enable_progress_bar()


def _write(out: Path, vision_tower, seed: int) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer, GPT2Tokenizer

    from exporter.accm.checkpoint import (CAPTION_FILE, CLIP_DIR, CONFIG_FILE, GPT2_DIR, LONGCLIP_DIR, SELECTOR_FILE,
                                          size_config)
    from exporter.accm.model import CaptionModel, Selector
    from graphs.atomic import write_json
    from graphs.preprocessing import default_clip_processor_config

    write_gpt2_tokenizer(out / GPT2_DIR)
    for d in (CLIP_DIR, LONGCLIP_DIR):
        write_clip_tokenizer(out / d)
    gpt_tok = GPT2Tokenizer.from_pretrained(out / GPT2_DIR)
    clip_tok = CLIPTokenizer.from_pretrained(out / CLIP_DIR)
    shape = tiny_accm_shape(len(gpt_tok), len(clip_tok))

    torch.manual_seed(seed)
    caption = CaptionModel(shape)
    _teach_stop(caption, gpt_tok.encode(".")[0])
    caption.gpt.save_pretrained(out / GPT2_DIR)
    _save(caption.state_dict(), out / CAPTION_FILE)
    _save(Selector(shape).state_dict(), out / SELECTOR_FILE)
    CLIPTextModelWithProjection(_text_config(shape.longclip_text, clip_tok)).save_pretrained(out / LONGCLIP_DIR)

    vcfg = vision_tower.config.to_dict()
    clip = CLIPModel(CLIPConfig(text_config=_text_config(shape.clip_text, clip_tok).to_dict(), vision_config=vcfg,
                                projection_dim=shape.clip_projection))
    clip.vision_model.load_state_dict(vision_tower.state_dict())
    clip.save_pretrained(out / CLIP_DIR)
    write_json(default_clip_processor_config(vision_tower.config.image_size), out / CLIP_DIR / "preprocessor_config.json")
    write_json(size_config(shape), out / CONFIG_FILE)
    return out


def _save(state: dict, path: Path) -> None:
    """torch.save to a file object: the archive's inner folder is then "archive", not the temp file's random name,
    so the same seed gives the same bytes."""
    import torch

    from graphs.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def _teach_stop(caption, stop_id: int) -> None:
    import torch

    gpt = caption.gpt
    with torch.no_grad():
        b = torch.randn(gpt.config.n_embd)
        b = b / b.norm()
        gpt.transformer.ln_f.bias.copy_(b)
        gpt.transformer.wte.weight[stop_id] += _STOP_LEAD * b  # h . w gains ~ LEAD * |b|^2 = LEAD


def make_tiny_accm_for(ckpt_dir: str | Path, vision_tower_dir: str | Path | None = None, seed: int = 0) -> Path:
    """`make_tiny_accm` for a tiny LISA checkpoint on disk: its CLIP vision tower is read from it.

    Args:
        ckpt_dir (path): the tiny LISA checkpoint.
        vision_tower_dir (path | None): its CLIP directory when not embedded (make-tiny --clip separate).
        seed (int): generator seed. Defaults to 0.
    """
    from exporter.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt_dir, vision_tower_dir)
    return make_tiny_accm(ckpt_dir, loaded.model.vision_tower, seed=seed)
