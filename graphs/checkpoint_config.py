"""A checkpoint's configuration from its JSON files alone (no torch): the shape, the config and the CLIP dir.

Both the loader (`exporter.checkpoint`) and config-only tools (`csprt flops`, early checks in
`csprt run`) read checkpoints through here, so they agree on every error message.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from graphs.errors import CheckpointError
from graphs.preprocessing import default_clip_processor_config
from graphs.shapes import ModelShape


@dataclass(frozen=True)
class CheckpointConfig:
    ckpt_dir: Path
    config: dict       # the checkpoint's config.json
    clip_dir: Path
    shape: ModelShape


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
    """The CLIP directory: `vision_tower` if given, else config `mm_vision_tower` if it is a local dir.

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
    raise CheckpointError(
        f"config.json names vision tower {named!r}, which is not a local directory "
        f"(relative to {ckpt_dir} or the working directory): pass --vision-tower DIR (a CLIP model directory)")


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
    shape = ModelShape.from_hf_configs(config, read_json(clip_dir / "config.json", "CLIP config"))
    return CheckpointConfig(ckpt_dir=ckpt, config=config, clip_dir=clip_dir, shape=shape)


def read_clip_processor_config(clip_dir: Path, shape: ModelShape) -> dict:
    """The CLIP directory's `preprocessor_config.json`, or CLIP's defaults at the model's image size."""
    path = clip_dir / "preprocessor_config.json"
    if path.is_file():
        return read_json(path, "CLIP image processor config")
    return default_clip_processor_config(shape.vision.image_size)
