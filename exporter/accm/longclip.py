"""LongCLIP-L's released `longclip-L.pt` (OpenAI CLIP layout) -> the HF text-tower directory csprt reads.

    token_embedding.weight                          -> text_model.embeddings.token_embedding.weight
    positional_embedding[:20] ++ positional_embedding_res[20:]   (LongCLIP's mask1 / mask2, model_longclip.py)
                                                    -> text_model.embeddings.position_embedding.weight  [248, W]
    transformer.resblocks.{i}.attn.in_proj_{weight,bias}   -> self_attn.{q,k,v}_proj (split in three)
    transformer.resblocks.{i}.attn.out_proj.*        -> self_attn.out_proj.*
    transformer.resblocks.{i}.ln_1 / ln_2.*          -> layer_norm1 / layer_norm2
    transformer.resblocks.{i}.mlp.c_fc / c_proj.*    -> mlp.fc1 / mlp.fc2
    ln_final.*                                      -> text_model.final_layer_norm.*
    text_projection [W, E] (x @ P)                  -> text_projection.weight = P^T

OpenAI CLIP's text blocks use QuickGELU and W / 64 heads; the pooled row is the EOT token's, the highest id
(transformers' legacy `eos_token_id = 2` rule does the same). The visual half is left out: ACCM's selector
only encodes text.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from exporter.checkpoint import read_weight_file
from graphs.accm import LONGCLIP_POSITIONS
from graphs.errors import CheckpointError

LONGCLIP_SHORT_POSITIONS = 20  # model_longclip.py: mask1[:20] = 1 (CLIP's own positions), mask2[20:] = 1


def _need(state: dict, key: str, path: Path) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"missing: {key} in {path}; is this LongCLIP's longclip-L.pt (OpenAI CLIP layout)?")
    return state[key]


def longclip_text_state(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """HF CLIPTextModelWithProjection tensors and config fields from LongCLIP's OpenAI-layout state dict."""
    width = _need(state, "ln_final.weight", path).shape[0]
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    pe, pe_res = _need(state, "positional_embedding", path), _need(state, "positional_embedding_res", path)
    if pe.shape[0] != LONGCLIP_POSITIONS or pe_res.shape != pe.shape:
        raise CheckpointError(f"{path}: positional_embedding {tuple(pe.shape)} and positional_embedding_res "
                              f"{tuple(pe_res.shape)} must both be [{LONGCLIP_POSITIONS}, {width}] (LongCLIP's)")
    s = LONGCLIP_SHORT_POSITIONS
    out = {"text_model.embeddings.token_embedding.weight": _need(state, "token_embedding.weight", path),
           "text_model.embeddings.position_embedding.weight": torch.cat([pe[:s], pe_res[s:]]),
           "text_model.final_layer_norm.weight": state["ln_final.weight"],
           "text_model.final_layer_norm.bias": _need(state, "ln_final.bias", path),
           "text_projection.weight": _need(state, "text_projection", path).t().contiguous()}
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for part, (w, b) in zip("qkv", zip(_need(state, src + "attn.in_proj_weight", path).chunk(3),
                                           _need(state, src + "attn.in_proj_bias", path).chunk(3))):
            out[dst + f"self_attn.{part}_proj.weight"], out[dst + f"self_attn.{part}_proj.bias"] = w, b
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            for kind in ("weight", "bias"):
                out[dst + f"{b}.{kind}"] = _need(state, src + f"{a}.{kind}", path)
    config = {"vocab_size": out["text_model.embeddings.token_embedding.weight"].shape[0], "hidden_size": width,
              "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] if layers else 4 * width,
              "num_hidden_layers": layers, "num_attention_heads": width // 64, "max_position_embeddings": pe.shape[0],
              "projection_dim": state["text_projection"].shape[1], "hidden_act": "quick_gelu",
              "layer_norm_eps": 1e-5, "eos_token_id": 2}
    return {k: v.float().contiguous() for k, v in out.items()}, config


def convert_longclip(pt_path: str | os.PathLike, out_dir: str | os.PathLike,
                     tokenizer_dir: str | os.PathLike) -> Path:
    """Write `out_dir` (an ACCM directory's `longclip/`) from `longclip-L.pt` and CLIP's tokenizer files.

    Args:
        pt_path (path): LongCLIP's released state dict.
        out_dir (path): the HF directory to write.
        tokenizer_dir (path): a CLIP directory with vocab.json and merges.txt (LongCLIP uses CLIP's BPE).
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    pt, out, tok = Path(pt_path), Path(out_dir), Path(tokenizer_dir)
    if not pt.is_file():
        raise CheckpointError(f"LongCLIP checkpoint not found: {pt}")
    missing = [f for f in ("vocab.json", "merges.txt") if not (tok / f).is_file()]
    if missing:
        raise CheckpointError(f"CLIP tokenizer files missing in {tok}: {', '.join(missing)}")
    state, config = longclip_text_state(read_weight_file(pt), pt)
    model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{pt} does not convert cleanly: missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    model.save_pretrained(out)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if (tok / name).is_file():
            shutil.copyfile(tok / name, out / name)
    return out
