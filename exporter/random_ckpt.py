"""Random-weight LISA checkpoints of any shape (LISA-7B included), written one tensor at a time.

The directory is laid out exactly as `exporter.tiny.make_tiny` lays out a tiny one (and as LISA's
released checkpoints are): config.json, LISA-layout safetensors (sharded with
`model.safetensors.index.json` when over `shard_bytes`, as HF does), the tokenizer, and a separate
CLIP directory `vision_tower/` with its own config, weights and preprocessor config.

    LisaModel on `meta` (names and shapes only, no memory)
        --keys.module_state_to_lisa--> LISA key -> shape
        --per tensor: draw, write, drop--> model-0000i-of-0000n.safetensors

Peak memory is one tensor (LISA-7B: the 32004 x 4096 embedding, 262 MB in fp16), never a shard.
Values (for speed runs and export tests, not accuracy; speed does not depend on them): matrices
normal(0, 0.02) (SAM: its `initializer_range`), norm weights 1, every other vector 0. Each tensor
draws from its own generator seeded by (seed, name), so a tensor's values do not depend on the
others. Unlike `make_tiny`, the LM head is not taught to answer [SEG] (that needs a forward pass).
"""

from __future__ import annotations

import copy
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Callable

import torch

from graphs.shapes import ModelShape

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SHARD_BYTES = 2 * 10**9  # HF's "2GB"
_ST_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}
_STD = 0.02


def write_random_checkpoint(shape: ModelShape, out_dir: str | os.PathLike, dtype: str = "fp16", seed: int = 0,
                            shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a random-weight LISA checkpoint directory of `shape` without holding the model in memory.

    Args:
        shape (ModelShape): dimensions, e.g. `graphs.shapes.SHAPES["lisa-7b"]`.
        out_dir (path): target directory (created; existing files are overwritten).
        dtype (str): "fp16" or "fp32", the stored weight dtype (and config.json's torch_dtype).
            Defaults to "fp16".
        seed (int): generator seed. Defaults to 0.
        shard_bytes (int): most bytes per weight file; more makes a sharded checkpoint with an index.
            Defaults to 2 GB (HF's "2GB").

    Returns:
        Path: `out_dir`.
    """
    from exporter import keys
    from exporter.checkpoint import build_meta
    from exporter.tiny import CLIP_SUBDIR, lisa_config
    from exporter.tokenizer import build_tokenizer
    from graphs.atomic import write_json
    from graphs.errors import ToolchainError
    from graphs.preprocessing import default_clip_processor_config

    if dtype not in DTYPES:
        raise ToolchainError(f"unknown weight dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(shape.llm.vocab)  # validates the vocab before any weights are written
    meta = build_meta(shape)
    kinds = _init_kinds(meta, shape)
    torch_dtype = DTYPES[dtype]

    def make(module_name: str) -> Callable[[tuple[int, ...]], torch.Tensor]:
        return lambda size: _random_tensor(module_name, size, kinds[module_name], torch_dtype, seed)

    state = meta.state_dict()
    lisa_names = keys.module_state_to_lisa({n: n for n in state})  # LISA key -> module name
    lisa = {key: (tuple(state[name].shape), make(name)) for key, name in lisa_names.items()}
    write_safetensors_sharded(lisa, out, torch_dtype, shard_bytes)
    config = lisa_config(shape, CLIP_SUBDIR)  # the CLIP directory written below
    config["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
    write_json(config, out / "config.json")
    tokenizer.save_pretrained(out)

    clip_dir = out / CLIP_SUBDIR
    tower = meta.vision_tower
    clip = {name: (tuple(t.shape), make(f"vision_tower.{name}")) for name, t in tower.state_dict().items()}
    write_safetensors_sharded(clip, clip_dir, torch_dtype, shard_bytes)
    clip_cfg = copy.deepcopy(tower.config)
    clip_cfg.architectures, clip_cfg.dtype = ["CLIPVisionModel"], config["torch_dtype"]
    write_json(json.loads(clip_cfg.to_json_string(use_diff=True)), clip_dir / "config.json")  # as save_pretrained
    write_json(default_clip_processor_config(shape.vision.image_size), clip_dir / "preprocessor_config.json")
    return out


def _init_kinds(model: torch.nn.Module, shape: ModelShape) -> dict[str, tuple[str, float]]:
    """state_dict name -> ("normal", std) | ("ones", 0) | ("zeros", 0), decided by the owning module's type."""
    kinds = {}
    for mod_name, module in model.named_modules():
        is_norm = "Norm" in type(module).__name__  # LayerNorm, LlamaRMSNorm, SamLayerNorm
        for leaf, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            std = shape.sam.initializer_range if name.startswith("sam.") else _STD
            if is_norm:
                kinds[name] = ("ones", 0.0) if leaf == "weight" else ("zeros", 0.0)
            else:
                kinds[name] = ("normal", std) if p.ndim >= 2 else ("zeros", 0.0)
    # A shared parameter is listed once by named_modules; give its other names the same kind.
    for name, _ in model.named_parameters(remove_duplicate=False):
        kinds.setdefault(name, ("normal", _STD))
    return kinds


def _random_tensor(name: str, size: tuple[int, ...], kind: tuple[str, float], dtype: torch.dtype,
                   seed: int) -> torch.Tensor:
    how, std = kind
    if how == "ones":
        return torch.ones(size, dtype=dtype)
    if how == "zeros":
        return torch.zeros(size, dtype=dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(size, dtype=torch.float32).normal_(0.0, std, generator=gen).to(dtype)


# --- safetensors, streamed ------------------------------------------------------------------------

def write_safetensors_sharded(tensors: dict[str, tuple[tuple[int, ...], Callable]], out: Path, dtype: torch.dtype,
                              shard_bytes: int, prefix: str = "model") -> list[Path]:
    """Write `tensors` as HF does: `<prefix>.safetensors`, or shards + `<prefix>.safetensors.index.json`.

    Shards fill greedily in the given order; a tensor larger than `shard_bytes` gets a shard of its own
    (as `huggingface_hub.split_torch_state_dict_into_shards`).

    Args:
        tensors (dict): key -> (shape, make), where make(shape) returns the tensor; called once, when written.
        out (Path): directory (created).
        dtype (torch.dtype): every tensor's dtype.
        shard_bytes (int): most bytes per file.
        prefix (str): file name stem. Defaults to "model".

    Returns:
        list[Path]: files written (weights, then the index if sharded).
    """
    from graphs.atomic import write_json

    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    used = 0
    for key, (size, _) in tensors.items():
        nbytes = _numel(size) * itemsize
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    out.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        path = out / f"{prefix}.safetensors"
        write_safetensors(path, {k: tensors[k] for k in shards[0]}, dtype)
        return [path]
    written, weight_map = [], {}
    for i, names in enumerate(shards, start=1):
        path = out / f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path, {k: tensors[k] for k in names}, dtype)
        weight_map.update({k: path.name for k in names})
        written.append(path)
    total = sum(_numel(size) * itemsize for size, _ in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    written.append(write_json(index, out / f"{prefix}.safetensors.index.json"))
    return written


def write_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], Callable]], dtype: torch.dtype) -> Path:
    """One safetensors file, header first, then each tensor made, written and dropped in turn (atomic).

    The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a
    JSON header {key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} padded
    with spaces to a multiple of 8, then the tensors' bytes back to back in header order.
    """
    from graphs.atomic import atomic_path

    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, (size, _) in tensors.items():
        end = offset + _numel(size) * itemsize
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(size), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, (size, make) in tensors.items():
            t = make(size)
            if tuple(t.shape) != tuple(size) or t.dtype != dtype:
                raise AssertionError(f"{key}: made {tuple(t.shape)} {t.dtype}, header says {size} {dtype}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
    return path


def _numel(size: tuple[int, ...]) -> int:
    n = 1
    for d in size:
        n *= d
    return n
