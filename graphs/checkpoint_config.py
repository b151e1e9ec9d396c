"""A checkpoint's configuration from its JSON files and weight headers alone (no torch): the shape, the config,
the weight files and where CLIP comes from.

Both the loader (`exporter.checkpoint`) and config-only tools (`csprt flops`, early checks in
`csprt run`) read checkpoints through here, so they agree on every error message.

Where CLIP comes from, in order: `--vision-tower DIR`; `mm_vision_tower` when it names a local directory;
the checkpoint's own weights when they embed the tower (`model.vision_tower[.vision_tower].vision_model.*`,
geometry read from the weight shapes: then `clip_dir` is the checkpoint directory itself). Otherwise
`mm_vision_tower` is a Hub id (LISA's `openai/clip-vit-large-patch14`) and the error names the flag.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from graphs.errors import CheckpointError
from graphs.preprocessing import default_clip_processor_config
from graphs.shapes import ModelShape
from graphs.weight_index import weight_shapes

# (index file, single file) per weight format, in load preference order.
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
# LISA v0 ships SAM and the [SEG] head beside the LLaVA base weights, as its chat.py loads them.
V0_EXTRA_FILES = ("pytorch_model-visual_model.bin", "pytorch_model-text_hidden_fcs.bin")
# Embedded CLIP, as LLaVA v1 (`CLIPVisionTower` wrapper) and the first LLaVA saved it; `vision_model.*` follows.
CLIP_KEY_PREFIXES = ("model.vision_tower.vision_tower.", "model.vision_tower.")


@dataclass(frozen=True)
class CheckpointConfig:
    ckpt_dir: Path
    config: dict       # the checkpoint's config.json
    clip_dir: Path
    shape: ModelShape
    clip_in_weights: bool = False  # CLIP comes from the checkpoint's own weights (clip_dir == ckpt_dir)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or a CheckpointError naming `what` and the file."""
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what} {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object")
    return data


def resolve_clip_dir(ckpt_dir: Path, config: dict, vision_tower: str | os.PathLike | None) -> Path:
    """The CLIP directory: `vision_tower` if given, else config `mm_vision_tower` if it is a local dir, else the
    checkpoint directory itself when its weights embed the tower.

    A relative `mm_vision_tower` is tried against the checkpoint directory, then the working directory.
    """
    if vision_tower is not None:
        path = Path(vision_tower)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"vision tower {path} is not a CLIP directory (no config.json)")
        return path
    named = config.get("mm_vision_tower") or config.get("vision_tower")
    if isinstance(named, str):
        for candidate in (ckpt_dir / named, Path(named)):
            if (candidate / "config.json").is_file():
                return candidate
    if embedded_clip_shapes(ckpt_dir):
        return ckpt_dir
    if isinstance(named, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", named) and not Path(named).exists():
        raise CheckpointError(
            f"config.json names the Hub model {named!r} as its vision tower and the weights do not include it; csprt "
            f"never downloads: pass --vision-tower DIR, a local copy of {named} (a CLIP directory with config.json "
            f"and weights, e.g. from `huggingface-cli download {named} --local-dir DIR`)")
    raise CheckpointError(
        f"config.json names vision tower {named!r}, which is not a local directory "
        f"(relative to {ckpt_dir} or the working directory): pass --vision-tower DIR (a CLIP model directory)")


def find_weight_files(ckpt_dir: Path) -> list[Path]:
    """The weight files of a checkpoint: safetensors index > model.safetensors > bin index > pytorch_model.bin,
    plus LISA v0's `pytorch_model-visual_model.bin` and `pytorch_model-text_hidden_fcs.bin` when present."""
    extra = [ckpt_dir / f for f in V0_EXTRA_FILES if (ckpt_dir / f).is_file()]
    looked_for = []
    for index_name, single_name in WEIGHT_LAYOUTS:
        index_path = ckpt_dir / index_name
        looked_for += [index_name, single_name]
        if index_path.is_file():
            weight_map = read_json(index_path, "weight index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"weight index {index_path} has no 'weight_map'")
            files = [ckpt_dir / f for f in sorted(set(weight_map.values()))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise CheckpointError(f"weight index {index_path} names missing shard(s): {', '.join(absent)}")
            return files + [f for f in extra if f not in files]
        if (ckpt_dir / single_name).is_file():
            return [ckpt_dir / single_name] + extra
    raise CheckpointError(f"no weights in {ckpt_dir}: looked for {', '.join(looked_for)}")


def embedded_clip_shapes(ckpt_dir: Path) -> dict[str, tuple[int, ...]]:
    """{`vision_model.*` name: shape} of a CLIP tower embedded in the checkpoint's weights ({} when there is none).

    With an index, only the shards that hold `model.vision_tower.*` keys are read (their headers only).
    """
    try:
        files = find_weight_files(ckpt_dir)
    except CheckpointError:
        return {}
    index = next((ckpt_dir / i for i, _ in WEIGHT_LAYOUTS if (ckpt_dir / i).is_file()), None)
    if index is not None:
        weight_map = read_json(index, "weight index")["weight_map"]
        files = sorted({ckpt_dir / f for k, f in weight_map.items() if k.startswith(CLIP_KEY_PREFIXES[1])})
    found = {}
    for path in files:
        for key, shape in weight_shapes(path).items():
            prefix = next((p for p in CLIP_KEY_PREFIXES if key.startswith(p + "vision_model.")), None)
            if prefix:
                found[key[len(prefix):]] = shape
    return found


def clip_config_from_shapes(shapes: dict[str, tuple[int, ...]], config: dict) -> dict:
    """A CLIPVisionConfig dict for an embedded tower, from its weight shapes.

    Heads are not in the shapes: OpenAI's CLIP towers all have 64-dim heads (ViT-L/14: 1024 / 64 = 16), unless the
    config's `csprt_clip` block (written by `csprt make-tiny` only) says otherwise.
    """
    try:
        hidden, _, patch, _ = shapes["vision_model.embeddings.patch_embedding.weight"]
        positions = shapes["vision_model.embeddings.position_embedding.weight"][0]
        intermediate = shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as exc:
        raise CheckpointError(f"the checkpoint's embedded CLIP weights lack model.vision_tower...{exc.args[0]}: "
                              "pass --vision-tower DIR (a CLIP model directory) instead") from None
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k)))
    grid = math.isqrt(positions - 1)
    extra = config.get("csprt_clip") or {}
    return {"model_type": "clip_vision_model", "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": extra.get("num_attention_heads", max(1, hidden // 64)),
            "image_size": grid * patch, "patch_size": patch, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def read_clip_config(clip_dir: Path) -> dict:
    """The CLIP vision config: `clip_dir/config.json`, or, when `clip_dir` is a LISA checkpoint whose weights embed
    the tower, the config its weight shapes give."""
    config = read_json(clip_dir / "config.json", "CLIP config")
    if _is_lisa_config(config):
        return clip_config_from_shapes(embedded_clip_shapes(clip_dir), config)
    return config.get("vision_config", config)


def clip_is_embedded(clip_dir: Path) -> bool:
    """True when `clip_dir` (as `resolve_clip_dir` returned it) is the checkpoint itself: CLIP is in its weights."""
    return _is_lisa_config(read_json(Path(clip_dir) / "config.json", "CLIP config"))


def _is_lisa_config(config: dict) -> bool:
    return "mm_vision_tower" in config or config.get("model_type") == "llava"


def read_checkpoint_config(ckpt_dir: str | os.PathLike, vision_tower: str | os.PathLike | None = None) -> CheckpointConfig:
    """Read config.json, find the CLIP directory, and derive the model shape.

    Args:
        ckpt_dir (path): the LISA checkpoint directory.
        vision_tower (path, optional): the CLIP directory. Defaults to the config's `mm_vision_tower`.
    """
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt}; pass a LISA checkpoint directory "
                              "(`csprt make-tiny DIR` writes a tiny one)")
    config = read_json(ckpt / "config.json", "checkpoint config")
    clip_dir = resolve_clip_dir(ckpt, config, vision_tower)
    shape = ModelShape.from_hf_configs(config, read_clip_config(clip_dir))
    return CheckpointConfig(ckpt_dir=ckpt, config=config, clip_dir=clip_dir, shape=shape,
                            clip_in_weights=clip_dir == ckpt)


def read_clip_processor_config(clip_dir: Path, shape: ModelShape) -> dict:
    """The CLIP directory's `preprocessor_config.json`, or CLIP's defaults at the model's image size."""
    path = clip_dir / "preprocessor_config.json"
    if path.is_file():
        return read_json(path, "CLIP image processor config")
    return default_clip_processor_config(shape.vision.image_size)
