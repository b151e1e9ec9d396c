"""Save and load LISA checkpoints (HF layout) into `LisaModel`, offline, with one clear error per problem.

A checkpoint directory holds `config.json`, the tokenizer, and LISA-layout weights in any of HF's
four layouts (single or sharded, safetensors or `.bin`). CLIP is a separate HF directory named by
`mm_vision_tower` or `--vision-tower`. Every problem the user can fix (missing file, corrupt
file, keys that do not match the config) is a `CheckpointError` saying what and where.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exporter import keys
from exporter.model import LisaModel
from graphs.atomic import atomic_path, write_json
from graphs.checkpoint_config import (V0_EXTRA_FILES, WEIGHT_LAYOUTS, find_weight_files, read_checkpoint_config,  # noqa: F401
                                     read_clip_config, read_clip_processor_config, read_json)
from graphs.errors import CheckpointError, ToolchainError
from graphs.shapes import ModelShape

FORMATS = ("safetensors", "safetensors-sharded", "bin", "bin-sharded")
_LAYOUTS = WEIGHT_LAYOUTS
_MAX_LISTED = 20

@dataclass
class LoadedCheckpoint:
    """Everything a run needs from a checkpoint directory."""

    model: LisaModel
    shape: ModelShape
    tokenizer: object  # SlowLlamaTokenizer (tokenizer.model) or JsonTokenizer (tokenizer.json)
    clip_dir: Path
    ckpt_dir: Path
    image_processor_config: dict = field(default_factory=dict)


@contextlib.contextmanager
def _empty_construction(dtype: torch.dtype, device: str | torch.device):
    """Build modules directly on `device` in `dtype` with weight init skipped (weights come next).

    Buffers computed in constructors (rotary inv_freq, position ids) are still computed, which is
    why this beats building on `meta` and materialising.
    """
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            yield
    finally:
        torch.set_default_dtype(previous)


def build_random(shape: ModelShape, attn: str = "sdpa", dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", seed: int = 0) -> LisaModel:
    """A `LisaModel` with random weights, fast at LISA-7B size (for speed runs, not accuracy).

    Matrices get normal(0, 0.02), norm weights 1 and biases 0, drawn on the target device.

    Args:
        shape (ModelShape): dimensions.
        attn (str): LLaMA attention implementation. Defaults to "sdpa".
        dtype (torch.dtype): parameter dtype. Defaults to float32.
        device (str | torch.device): where to build. Defaults to "cpu".
        seed (int): generator seed. Defaults to 0.
    """
    with _empty_construction(dtype, device):
        model = LisaModel(shape, attn=attn)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.02, generator=gen)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
    return model.eval()


def build_meta(shape: ModelShape, attn: str = "sdpa", dtype: torch.dtype = torch.float32) -> LisaModel:
    """A `LisaModel` entirely on the `meta` device: names, shapes and dtypes, no memory (LISA-7B in seconds).

    Args:
        shape (ModelShape): dimensions.
        attn (str): LLaMA attention implementation. Defaults to "sdpa".
        dtype (torch.dtype): parameter dtype. Defaults to float32.
    """
    with _empty_construction(dtype, "meta"):
        return LisaModel(shape, attn=attn).eval()


def save_checkpoint(model: LisaModel, out_dir: str | os.PathLike, fmt: str = "safetensors",
                    max_shard_size: int | str = "5GB", include_clip: bool = False, layout: str = "v1",
                    dtype: torch.dtype | None = None) -> list[Path]:
    """Write the model's LISA-layout weights exactly as HF `save_pretrained` lays them out.

    Layout v1 is one merged checkpoint (LISA's merge_lora_weights_and_save_hf_model.py); v0 is a LLaVA base
    checkpoint plus `pytorch_model-visual_model.bin` (`visual_model.*`) and `pytorch_model-text_hidden_fcs.bin`
    (`text_hidden_fcs.*`), as LISA v0's chat.py loads them. `include_clip` embeds CLIP as LLaVA v1
    (`model.vision_tower.vision_tower.vision_model.*`) or, in v0, as the first LLaVA (`model.vision_tower.vision_model.*`).

    Args:
        model (LisaModel): the model to save.
        out_dir (path): target directory (created).
        fmt (str): "safetensors", "safetensors-sharded", "bin" or "bin-sharded". Defaults to "safetensors".
        max_shard_size (int | str): shard size limit for the sharded formats. Defaults to "5GB".
        include_clip (bool): embed the CLIP tower's weights. Defaults to False.
        layout (str): "v1" or "v0". Defaults to "v1".
        dtype (torch.dtype | None): cast floating tensors to this dtype (LISA ships bfloat16). Defaults to None.

    Returns:
        list[Path]: files written (weights, then the index if sharded).
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise CheckpointError(f"unknown weight format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # contiguous clones: safetensors rejects views and shared storage, torch.save would keep both.
    state = {k: v.detach().contiguous().clone().cpu() for k, v in
             keys.module_state_to_lisa(model.state_dict(), include_clip=include_clip).items()
             if not k.endswith("position_ids")}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    extras: dict[str, dict[str, torch.Tensor]] = {}
    if layout == "v0":
        state = {k.replace("model.vision_tower.vision_tower.", "model.vision_tower.", 1): v for k, v in state.items()}
        for name, prefix in zip(V0_EXTRA_FILES, ("model.visual_model.", "model.text_hidden_fcs.")):
            extras[name] = {k[len("model."):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
    elif layout != "v1":
        raise CheckpointError(f"unknown checkpoint layout {layout!r}; choose v1 or v0")
    use_safetensors = fmt.startswith("safetensors")
    index_name, single_name = _LAYOUTS[0] if use_safetensors else _LAYOUTS[1]
    pattern = "model{suffix}.safetensors" if use_safetensors else "pytorch_model{suffix}.bin"
    sharded = fmt.endswith("-sharded")
    split = split_torch_state_dict_into_shards(state, filename_pattern=pattern,
                                               max_shard_size=max_shard_size if sharded else 2**62)
    written = []
    for filename, names in split.filename_to_tensors.items():
        shard = {n: state[n] for n in names}
        name = filename if sharded else single_name
        if use_safetensors:
            with atomic_path(out / name) as tmp:
                save_file(shard, str(tmp), metadata={"format": "pt"})
        else:
            with atomic_path(out / name) as tmp:
                torch.save(shard, tmp)
        written.append(out / name)
    if sharded:
        index = {"metadata": {"total_size": split.metadata.get("total_size",
                                                               sum(t.numel() * t.element_size() for t in state.values()))},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        write_json(index, out / index_name)
        written.append(out / index_name)
    for name, part in extras.items():
        with atomic_path(out / name) as tmp:
            torch.save(part, tmp)
        written.append(out / name)
    return written


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors or `.bin` file, on CPU; any read failure is a CheckpointError."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # safetensors, pickle and zip errors have no common base
        raise CheckpointError(f"weights file {path} is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"weights file {path} is corrupt: expected a dict of tensors")
    return state


def weight_problem(name: str, t: torch.Tensor, want: torch.dtype) -> str:
    """Why the stored tensor `name` cannot be the model's parameter of dtype `want` ("" if it can).

    A float parameter must be stored as a float (an int16 tensor has float16's byte size and would load as
    garbage numbers), an integer buffer as an integer, and every value must be finite: one NaN in a weight
    turns every mask into noise with exit 0. Cost: one read of the weights, no copy (`all_finite`).
    """
    return tensor_problem(keys.module_to_lisa(name), t, want)


def tensor_problem(label: str, t: torch.Tensor, want: torch.dtype) -> str:
    """`weight_problem` for a tensor named `label` as the user's file names it (LISA's and ACCM's loaders)."""
    if t.dtype.is_floating_point != want.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        return f"wrong dtype: {label} is stored as {t.dtype}, expected a {want} tensor"
    if t.is_floating_point() and t.device.type != "meta" and not all_finite(t):
        return f"non-finite values: {label} has {int((~torch.isfinite(t)).sum())} NaN/Inf of {t.numel()}"
    return ""


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in the float tensor `t`, found without a temporary of its size.

    `torch.isfinite(t).all()` makes an abs copy and three bool tensors of each weight's size as it is read;
    freed at once, those blocks still stayed in the process's heap: +1.7 GiB of anonymous memory while
    LISA-7B's `llm_2` traced (peak RSS 10.0 -> 8.4 GiB, issue 11). min and max are reductions (no copy)
    and propagate NaN; an Inf is the min or the max.
    """
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check_keys(expected: dict[str, torch.Size], found: dict[str, torch.Tensor], unknown: list[str],
                ckpt_dir: Path, dtypes: dict[str, torch.dtype] | None = None) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped key (LISA names)."""
    problems = []
    for name, shape in expected.items():
        if name not in found:
            problems.append(f"missing: {keys.module_to_lisa(name)} (expected shape {tuple(shape)})")
        elif found[name].shape != shape:
            problems.append(f"wrong shape: {keys.module_to_lisa(name)} expected {tuple(shape)}, "
                            f"found {tuple(found[name].shape)}")
        elif dtypes is not None and (why := weight_problem(name, found[name], dtypes[name])):
            problems.append(why)
    unexpected = unknown + [keys.module_to_lisa(n) for n in found if n not in expected]
    problems += [f"unexpected: {k}" for k in sorted(unexpected)]
    if not problems:
        return
    listed = problems[:_MAX_LISTED]
    if len(problems) > _MAX_LISTED:
        listed.append(f"... and {len(problems) - _MAX_LISTED} more")
    raise CheckpointError(
        f"checkpoint {ckpt_dir} does not match its config.json ({len(problems)} problem(s)):\n  "
        + "\n  ".join(listed))


def _load_clip(clip_dir: Path, dtype: torch.dtype, device, embedded: dict[str, torch.Tensor] | None = None):
    """CLIP from its directory, or from the checkpoint's embedded tensors (`vision_tower.*` module names)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if embedded is not None:
        with _empty_construction(dtype, device):
            tower = CLIPVisionModel(CLIPVisionConfig(**read_clip_config(clip_dir)))
        state = {k[len(keys.CLIP_MODULE_PREFIX):]: v for k, v in embedded.items()}
        expected = {k: v.shape for k, v in tower.state_dict().items() if not k.endswith("position_ids")}
        bad = [k for k, shp in expected.items() if k not in state or state[k].shape != shp]
        if bad:
            raise CheckpointError(f"the CLIP tower embedded in {clip_dir} lacks or mis-shapes "
                                  f"model.vision_tower...: {', '.join(bad[:_MAX_LISTED])}")
        tower.load_state_dict(state, strict=False)
    else:
        try:
            tower, info = CLIPVisionModel.from_pretrained(
                clip_dir, local_files_only=True, attn_implementation="eager", dtype=dtype, output_loading_info=True)
        except Exception as exc:
            raise CheckpointError(f"cannot load CLIP vision tower from {clip_dir}: {exc}") from None
        bad = list(info.get("missing_keys", [])) + [str(m) for m in info.get("mismatched_keys", [])]
        if bad:
            raise CheckpointError(f"CLIP directory {clip_dir} lacks or mis-shapes weights: {', '.join(bad[:_MAX_LISTED])}")
    # LisaModel reads CLS attention probabilities, which only eager attention returns.
    tower.config._attn_implementation = "eager"
    return tower.to(device).eval()


def load_tokenizer(ckpt_dir: Path, vocab_size: int | None = None):
    """The checkpoint's tokenizer as LISA loads it: the slow SentencePiece `LlamaTokenizer` when tokenizer.model is
    there (`exporter.tokenizer.SlowLlamaTokenizer`), else its tokenizer.json (`graphs.tokenizer.JsonTokenizer`).

    Args:
        ckpt_dir (Path): the checkpoint directory.
        vocab_size (int | None): config.json's vocab_size; when given, every token id must be below it.
    """
    from exporter.tokenizer import FAST_FILE, SP_FILE, TOKENIZER_FILES, SlowLlamaTokenizer
    from graphs.tokenizer import JsonTokenizer

    ckpt_dir = Path(ckpt_dir)
    has_fast = (ckpt_dir / FAST_FILE).is_file()
    if (ckpt_dir / SP_FILE).is_file() or not has_fast and any((ckpt_dir / f).is_file() for f in TOKENIZER_FILES):
        tokenizer = SlowLlamaTokenizer(ckpt_dir)  # names a missing tokenizer.model itself
    elif has_fast:
        try:
            tokenizer = JsonTokenizer.from_dir(ckpt_dir)
        except ToolchainError as exc:
            raise CheckpointError(f"cannot load the tokenizer from {ckpt_dir}: {exc}") from None
    else:
        raise CheckpointError(f"no tokenizer in {ckpt_dir}: expected LLaMA's {SP_FILE} with tokenizer_config.json, "
                              f"special_tokens_map.json and added_tokens.json (as LISA ships them), or a {FAST_FILE}")
    if vocab_size is not None:
        _check_tokenizer_vocab(tokenizer, vocab_size, ckpt_dir / "config.json")
    return tokenizer


def _check_tokenizer_vocab(tokenizer, vocab_size: int, config_path: Path) -> None:
    if hasattr(tokenizer, "check_vocab"):
        tokenizer.check_vocab(vocab_size, config_path)
    elif len(tokenizer) > vocab_size:
        raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens but {config_path} has vocab_size "
                              f"{vocab_size}; use the tokenizer and config.json of the same checkpoint")


def load_checkpoint(ckpt_dir: str | os.PathLike, vision_tower: str | os.PathLike | None = None,
                    attn: str = "sdpa", dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a LISA checkpoint directory (and its CLIP directory) into a `LisaModel`, offline.

    Args:
        ckpt_dir (path): directory with config.json, tokenizer files and LISA-layout weights.
        vision_tower (path | None): CLIP directory; None uses config.json's `mm_vision_tower`.
        attn (str): LLaMA attention implementation. Defaults to "sdpa".
        dtype (torch.dtype): parameter dtype. Defaults to float32.
        device (str | torch.device): target device. Defaults to "cpu".

    Raises:
        CheckpointError: missing or corrupt files, or weights that do not match config.json.
    """
    # Never reach the Hub: every file must be local (and a stray repo id must fail fast).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = read_checkpoint_config(ckpt_dir, vision_tower)
    ckpt, clip_dir, shape = cfg.ckpt_dir, cfg.clip_dir, cfg.shape

    state: dict[str, torch.Tensor] = {}
    for path in find_weight_files(ckpt):
        state.update(read_weight_file(path))
    found, unknown = keys.lisa_state_to_module(state)
    clip = {k: found.pop(k) for k in [k for k in found if k.startswith(keys.CLIP_MODULE_PREFIX)]}

    with _empty_construction(dtype, device):
        model = LisaModel(shape, attn=attn)
    params = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_tower.")}
    _check_keys({k: v.shape for k, v in params.items()}, found, unknown, ckpt, {k: v.dtype for k, v in params.items()})
    model.load_state_dict(found, strict=False)  # strictness checked above; CLIP comes next
    model.vision_tower = _load_clip(clip_dir, dtype, device, embedded=clip if cfg.clip_in_weights else None)

    processor = read_clip_processor_config(clip_dir, shape)
    return LoadedCheckpoint(model=model.eval(), shape=shape, tokenizer=load_tokenizer(ckpt, shape.llm.vocab), clip_dir=clip_dir,
                            ckpt_dir=ckpt, image_processor_config=processor)
