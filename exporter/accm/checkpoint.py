"""Load ACCM's released files in their own layouts, offline, with one clear error per problem.

An ACCM directory (docs/accm.md) holds what ACCM's clip_encoder.py loads from its own paths:

    caption_model.pt   ClipCaptionModel state dict (torch.save): clip_project.* (the mapper) and gpt.* (GPT-2,
                       fine-tuned end to end)            <- ACCM's coco_prefix-009.pt
    selector.pt        TransformerSelector state dict: transformer_encoder.layers.{i}.*, head.*
                                                         <- ACCM's llava-RL_prefix-019.pt
    gpt2/              GPT-2 as an HF directory: config.json, vocab.json, merges.txt (its weights are overridden by
                       caption_model.pt's gpt.*, as ACCM's load_state_dict does)
    longclip/          LongCLIP-L's text tower as an HF CLIP directory (248 positions) with its tokenizer
    accm_config.json   optional, csprt's: mapper/selector sizes when they are not ACCM's (tiny models only)

The CLIP text tower for the text picks (and `visual_projection` for the per-patch embeddings) come from the
full CLIP directory LISA's `mm_vision_tower` names (openai/clip-vit-large-patch14 holds the text tower, both
projections and the tokenizer); `load_accm` takes it as `clip_dir` (the tiny one is `<accm>/clip`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from exporter.accm.model import CaptionModel, Selector
from exporter.checkpoint import read_weight_file, tensor_problem
from graphs.accm import LONGCLIP_POSITIONS, AccmShape, TextTowerShape
from graphs.checkpoint_config import read_json
from graphs.errors import CheckpointError

CAPTION_FILE = "caption_model.pt"
SELECTOR_FILE = "selector.pt"
GPT2_DIR = "gpt2"
LONGCLIP_DIR = "longclip"
CLIP_DIR = "clip"          # where make-tiny puts the full CLIP directory; real runs name LISA's CLIP directory
CONFIG_FILE = "accm_config.json"
_SIZE_FIELDS = ("mapper_layers", "mapper_heads", "mapper_mlp_ratio", "prefix_length",
                "selector_layers", "selector_heads", "selector_ffn")
# Causal-mask buffers older transformers saved with GPT-2; they hold no weights.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_MAX_LISTED = 20


@dataclass
class AccmModels:
    """Everything ACCM adds to a LISA run, loaded and in eval mode."""

    shape: AccmShape
    caption: CaptionModel
    selector: Selector
    clip_text: torch.nn.Module        # CLIPTextModelWithProjection: the question for the text picks
    visual_projection: torch.nn.Linear  # CLIP's, applied to every patch of the last layer (post-LN)
    longclip_text: torch.nn.Module    # CLIPTextModelWithProjection with 248 positions: the selector's features
    gpt_tokenizer: object
    clip_tokenizer: object
    longclip_tokenizer: object


def check_state(state: dict[str, torch.Tensor], module: torch.nn.Module, path: Path, what: str) -> None:
    """Raise one CheckpointError listing every missing, mis-shaped, wrongly typed, non-finite and unexpected key."""
    expected = module.state_dict()
    problems = []
    for name, want in expected.items():
        got = state.get(name)
        if got is None:
            problems.append(f"missing: {name} (expected shape {tuple(want.shape)})")
        elif got.shape != want.shape:
            problems.append(f"wrong shape: {name} expected {tuple(want.shape)}, found {tuple(got.shape)}")
        elif why := tensor_problem(name, got, want.dtype):
            problems.append(why)
    problems += [f"unexpected: {k}" for k in sorted(state) if k not in expected and not k.endswith(_IGNORED_SUFFIXES)]
    if problems:
        listed = problems[:_MAX_LISTED] + ([f"... and {len(problems) - _MAX_LISTED} more"]
                                           if len(problems) > _MAX_LISTED else [])
        raise CheckpointError(f"{what} {path} does not match ACCM's layout ({len(problems)} problem(s)):\n  "
                              + "\n  ".join(listed))


def _read_pt(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path} (ACCM's released state dict; see docs/accm.md for the file names)")
    return read_weight_file(path)


def accm_shape(accm_dir: Path, clip_dir: Path) -> AccmShape:
    """Sizes from the HF configs (GPT-2, LongCLIP, CLIP) plus accm_config.json's mapper/selector sizes (ACCM's own
    when there is no such file, as in ACCM's release)."""
    sizes = {}
    if (accm_dir / CONFIG_FILE).is_file():
        cfg = read_json(accm_dir / CONFIG_FILE, "ACCM config")
        sizes = {k: int(cfg[k]) for k in _SIZE_FIELDS if k in cfg}
    gpt = read_json(accm_dir / GPT2_DIR / "config.json", "GPT-2 config")
    clip = read_json(clip_dir / "config.json", "CLIP config")
    if "text_config" not in clip or "projection_dim" not in clip:
        raise CheckpointError(f"CLIP directory {clip_dir} holds no text tower (its config.json has no text_config); "
                              "ACCM's text picks need the full CLIP model, e.g. openai/clip-vit-large-patch14")
    try:
        return AccmShape(
            clip_projection=int(clip["projection_dim"]), gpt_layers=int(gpt["n_layer"]), gpt_hidden=int(gpt["n_embd"]),
            gpt_heads=int(gpt["n_head"]), gpt_vocab=int(gpt["vocab_size"]), gpt_positions=int(gpt["n_positions"]),
            clip_text=_text_shape(clip["text_config"], int(clip["projection_dim"])),
            longclip_text=_longclip_shape(accm_dir / LONGCLIP_DIR), **sizes)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"an ACCM config under {accm_dir} or {clip_dir} lacks a field or has a bad value: {exc}") from None


def _text_shape(cfg: dict, projection: int) -> TextTowerShape:
    return TextTowerShape(layers=int(cfg["num_hidden_layers"]), hidden=int(cfg["hidden_size"]),
                          heads=int(cfg["num_attention_heads"]), intermediate=int(cfg["intermediate_size"]),
                          positions=int(cfg["max_position_embeddings"]), projection=projection,
                          vocab=int(cfg["vocab_size"]))


def _longclip_shape(path: Path) -> TextTowerShape:
    cfg = read_json(path / "config.json", "LongCLIP config")
    text = cfg.get("text_config", cfg)
    shape = _text_shape(text, int(cfg.get("projection_dim", text.get("projection_dim", 0))))
    if shape.positions != LONGCLIP_POSITIONS:
        raise CheckpointError(f"LongCLIP text tower {path} has {shape.positions} positions, expected {LONGCLIP_POSITIONS} "
                              "(LongCLIP-L's stretched positional embedding); is this a plain CLIP directory?")
    return shape


def load_caption_model(path: Path, shape: AccmShape, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> CaptionModel:
    """ACCM's caption model from its `.pt` state dict (clip_project.* and gpt.*), checked key by key."""
    state = _read_pt(path, "ACCM caption model")
    model = CaptionModel(shape)
    check_state(state, model, path, "ACCM caption model")
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)})
    return model.to(device, dtype).eval()


def load_selector(path: Path, shape: AccmShape, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> Selector:
    """ACCM's selector from its `.pt` state dict (transformer_encoder.* and head.*), checked key by key."""
    state = _read_pt(path, "ACCM selector")
    model = Selector(shape)
    check_state(state, model, path, "ACCM selector")
    model.load_state_dict(state)
    return model.to(device, dtype).eval()


def load_text_tower(path: Path, what: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A CLIP text tower with its projection (transformers' CLIPTextModelWithProjection) from an HF directory.

    A full CLIP directory loads too (its vision weights are left aside, as CLIPTextModelWithProjection does in ACCM).
    """
    from transformers import CLIPTextModelWithProjection
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists the vision weights a full CLIP dir also holds
    try:
        tower, info = CLIPTextModelWithProjection.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                                  output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as exc:  # a missing dir, corrupt weights: transformers raises many kinds
        raise CheckpointError(f"cannot load the {what} from {path}: {type(exc).__name__}: {exc}") from None
    finally:
        hf_logging.set_verbosity(level)
    bad = [f"missing: {k}" for k in info.get("missing_keys", [])]
    bad += [f"wrong shape: {m[0]} expected {tuple(m[2])}, found {tuple(m[1])}" if isinstance(m, tuple) and len(m) == 3
            else f"wrong shape: {m}" for m in info.get("mismatched_keys", [])]
    if bad:
        raise CheckpointError(f"{what} {path} does not match its config.json: {'; '.join(sorted(bad)[:_MAX_LISTED])}")
    for name, p in tower.named_parameters():
        if why := tensor_problem(name, p, p.dtype):
            raise CheckpointError(f"{what} {path}: {why}")
    return tower.to(device).eval()


def load_visual_projection(clip_dir: Path, shape: AccmShape, vision_hidden: int, dtype: torch.dtype = torch.float32,
                           device: str | torch.device = "cpu") -> torch.nn.Linear:
    """CLIP's `visual_projection.weight` [projection, vision hidden] from the CLIP directory's weight file."""
    from graphs.checkpoint_config import find_weight_files

    key, want = "visual_projection.weight", (shape.clip_projection, vision_hidden)
    for f in find_weight_files(clip_dir):
        state = read_weight_file(f)
        if key in state:
            w = state[key]
            if tuple(w.shape) != want:
                raise CheckpointError(f"wrong shape: {key} in {f} expected {want} (projection, LISA's CLIP width), "
                                      f"found {tuple(w.shape)}")
            if why := tensor_problem(f"{key} in {f}", w, torch.float32):
                raise CheckpointError(why)
            proj = torch.nn.Linear(vision_hidden, shape.clip_projection, bias=False)
            with torch.no_grad():
                proj.weight.copy_(w)
            return proj.to(device, dtype).eval()
    raise CheckpointError(f"missing: {key} in {clip_dir}; ACCM's per-patch embeddings need the full CLIP model "
                          "(e.g. openai/clip-vit-large-patch14), not a vision-only tower")


def _tokenizer(cls_name: str, path: Path, what: str):
    import transformers

    need = ("vocab.json", "merges.txt")
    absent = [f for f in need if not (path / f).is_file()]
    if absent:
        raise CheckpointError(f"{what} tokenizer files missing in {path}: {', '.join(absent)}")
    try:
        return getattr(transformers, cls_name).from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load the {what} tokenizer from {path}: {type(exc).__name__}: {exc}") from None


def load_accm(accm_dir: str | os.PathLike, clip_dir: str | os.PathLike | None = None, vision_hidden: int | None = None,
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> AccmModels:
    """Load every ACCM model from an ACCM directory and LISA's full CLIP directory, offline.

    Args:
        accm_dir (path): the ACCM directory (module docstring).
        clip_dir (path | None): the full CLIP directory (text tower, projections, tokenizer). Defaults to
            `<accm_dir>/clip`.
        vision_hidden (int | None): LISA's CLIP width, checked against `visual_projection`. Defaults to the CLIP
            config's vision hidden size.
        dtype (torch.dtype): parameter dtype. Defaults to float32.
        device (str | torch.device): target device. Defaults to "cpu".

    Raises:
        CheckpointError: a missing or corrupt file, or weights that do not match ACCM's layout.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    accm = Path(accm_dir)
    if not accm.is_dir():
        raise CheckpointError(f"ACCM directory not found: {accm} (make a tiny one with `csprt make-tiny OUT --accm`)")
    clip = Path(clip_dir) if clip_dir is not None else accm / CLIP_DIR
    if not clip.is_dir():
        raise CheckpointError(f"CLIP directory not found: {clip}; ACCM's text picks need LISA's full CLIP directory "
                              "(openai/clip-vit-large-patch14 with its text tower)")
    shape = accm_shape(accm, clip)
    if vision_hidden is None:
        vision_hidden = int(read_json(clip / "config.json", "CLIP config").get("vision_config", {}).get("hidden_size", 0))
    return AccmModels(
        shape=shape,
        caption=load_caption_model(accm / CAPTION_FILE, shape, dtype, device),
        selector=load_selector(accm / SELECTOR_FILE, shape, dtype, device),
        clip_text=load_text_tower(clip, "CLIP text tower", dtype, device),
        visual_projection=load_visual_projection(clip, shape, vision_hidden, dtype, device),
        longclip_text=load_text_tower(accm / LONGCLIP_DIR, "LongCLIP text tower", dtype, device),
        gpt_tokenizer=_tokenizer("GPT2Tokenizer", accm / GPT2_DIR, "GPT-2"),
        clip_tokenizer=_tokenizer("CLIPTokenizer", clip, "CLIP"),
        longclip_tokenizer=_tokenizer("CLIPTokenizer", accm / LONGCLIP_DIR, "LongCLIP"),
    )


def size_config(shape: AccmShape) -> dict:
    """accm_config.json's contents for `shape` (what make-tiny writes)."""
    return {k: v for k, v in dataclasses.asdict(shape).items() if k in _SIZE_FIELDS}
