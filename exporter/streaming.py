"""Export-time weights, one stage at a time: a `LisaModel` whose parameters stay on `meta` until a stage needs them.

    checkpoint + CLIP dir --WeightSource--> tensors by LisaModel name, read one at a time
                                            (safetensors: safe_open, memory-mapped; .bin: loaded whole)
    StagedWeights.model: LisaModel, every parameter on meta, buffers (rotary, position ids) on CPU
    per stage:  names = weights.used_by(wrapper on the all-meta twin, feed)   # no data, no FLOPs
                weights.hold(names)          # read what is missing, put the rest back on meta
                run / trace / save / check
    weights.hold(())

Which parameters a stage needs is not listed by hand: `used_by` runs the stage wrapper once on an
all-meta copy of the model (`build_meta`) with meta inputs, recording every parameter that reaches a
torch function. Meta tensors carry shapes only, so this costs Python time, not FLOPs.

`.bin` (pickle) files cannot be read lazily: `WeightSource` loads them whole, once, as
`load_checkpoint` does, so such an export holds the whole checkpoint plus one stage's parameters.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from exporter import keys
from exporter.checkpoint import _check_keys, _empty_construction, find_weight_files, read_weight_file, weight_problem
from exporter.model import LisaModel
from graphs.checkpoint_config import clip_is_embedded, read_clip_config
from graphs.errors import CheckpointError

CLIP_PREFIX = "vision_tower."


# --- reading ----------------------------------------------------------------------------------------

class WeightSource:
    """The tensors of a LISA checkpoint and its CLIP directory by `LisaModel.state_dict()` name, read on demand.

    Only headers are read here; `read` returns one tensor.

    Args:
        ckpt_dir (Path): LISA checkpoint directory (any of the four HF weight layouts).
        clip_dir (Path): CLIP directory (`CLIPVisionModel` or full `CLIPModel` weights).
    """

    def __init__(self, ckpt_dir: Path, clip_dir: Path):
        self.ckpt_dir, self.clip_dir = ckpt_dir, clip_dir
        self._whole: dict[Path, dict[str, torch.Tensor]] = {}  # .bin files, loaded whole
        lisa = self._scan(find_weight_files(ckpt_dir))
        self._where, self.unknown = keys.lisa_state_to_module(lisa)  # module name -> (file, key, shape)
        if not clip_is_embedded(clip_dir):  # else CLIP is in the checkpoint's weights, mapped by `keys` above
            self._where = {k: v for k, v in self._where.items() if not k.startswith(CLIP_PREFIX)}
            for key, entry in self._scan(find_weight_files(clip_dir)).items():
                self._where[CLIP_PREFIX + key] = entry

    def _scan(self, files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
        found = {}
        for path in files:
            if path.suffix != ".safetensors":
                self._whole[path] = read_weight_file(path)
                found.update({k: (path, k, tuple(v.shape)) for k, v in self._whole[path].items()})
                continue
            try:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    found.update({k: (path, k, tuple(f.get_slice(k).get_shape())) for k in f.keys()})
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"weights file {path} is corrupt or truncated "
                                      f"({type(exc).__name__}: {exc})") from None
        return found

    def check(self, model: nn.Module) -> None:
        """Raise CheckpointError unless every state_dict entry of `model` is here with its shape."""
        expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(CLIP_PREFIX)}
        found = {k: torch.empty(e[2], device="meta") for k, e in self._where.items() if not k.startswith(CLIP_PREFIX)}
        _check_keys(expected, found, self.unknown, self.ckpt_dir)
        bad = [f"{k[len(CLIP_PREFIX):]} (expected {tuple(v.shape)}"
               + (f", found {self._where[k][2]})" if k in self._where else ", missing)")
               for k, v in model.state_dict().items()
               if k.startswith(CLIP_PREFIX) and (k not in self._where or self._where[k][2] != tuple(v.shape))]
        if bad:
            raise CheckpointError(f"CLIP directory {self.clip_dir} lacks or mis-shapes weights: {', '.join(bad[:20])}")

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor `name` in `dtype`; a safetensors tensor stays memory-mapped when no cast is needed."""
        path, key, _ = self._where[name]
        if path in self._whole:
            t = self._whole[path][key]
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                t = f.get_tensor(key)
        why = weight_problem(name, t, dtype)
        if why:  # checked as each tensor is first read: the streaming export never holds the whole model
            raise CheckpointError(f"checkpoint {self.ckpt_dir}: {why}")
        return t.to(dtype)


# --- the model ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside is moved to `meta` at once; buffers stay where they were built."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _clip_tower(clip_dir: Path):
    """An empty `CLIPVisionModel` from the CLIP directory's own config (as `from_pretrained` builds it)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    try:
        cfg = (CLIPVisionConfig(**read_clip_config(clip_dir)) if clip_is_embedded(clip_dir)
               else CLIPVisionConfig.from_pretrained(clip_dir, local_files_only=True))
    except Exception as exc:
        raise CheckpointError(f"cannot load CLIP vision tower config from {clip_dir}: {exc}") from None
    cfg._attn_implementation = "eager"  # LisaModel reads CLS attention probabilities, which only eager returns
    return CLIPVisionModel(cfg)


def _build(shape, clip_dir: Path, attn: str, dtype: torch.dtype, device: str) -> LisaModel:
    with _empty_construction(dtype, device):
        model = LisaModel(shape, attn=attn)
        model.vision_tower = _clip_tower(clip_dir)
    return model.eval()


class _RecordState(TorchFunctionMode):
    """Records which of `names_by_id`'s tensors reach a torch function (as an argument or `self`)."""

    def __init__(self, names_by_id: dict[int, str]):
        super().__init__()
        self.names_by_id, self.used = names_by_id, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for x in pytree.tree_leaves((args, kwargs)):
            name = self.names_by_id.get(id(x)) if isinstance(x, torch.Tensor) else None
            if name:
                self.used.add(name)
        if func is torch.Tensor.__getitem__:
            # A 0-d integer tensor index reads its value (.item()), which a meta tensor has none of; any
            # row gives the same shape, so index with 0 (EVTP's `dist[seed]`).
            args = (args[0], pytree.tree_map(_meta_scalar_to_zero, args[1]))
        return func(*args, **kwargs)


def _meta_scalar_to_zero(x):
    if isinstance(x, torch.Tensor) and x.is_meta and x.ndim == 0 and not x.is_floating_point():
        return 0
    return x


@dataclass
class HoldStats:
    """What `StagedWeights.hold` had in memory: per call, the stage label and its parameter count."""

    history: list[tuple[str, int, int]] = field(default_factory=list)  # (label, tensors held, bytes held)
    reads: int = 0  # tensors read from the source

    @property
    def peak_tensors(self) -> int:
        return max((n for _, n, _ in self.history), default=0)

    @property
    def peak_bytes(self) -> int:
        return max((b for _, _, b in self.history), default=0)


class StagedWeights:
    """A `LisaModel` that holds only the parameters of the stage at hand; the rest stay on meta.

    Args:
        shape (ModelShape): the checkpoint's dimensions.
        ckpt_dir (Path): LISA checkpoint directory.
        clip_dir (Path): CLIP directory.
        dtype (torch.dtype): parameter dtype (the export precision).
        attn (str): LLaMA attention implementation. Defaults to "eager" (what export traces).

    Raises:
        CheckpointError: missing, corrupt or mis-shaped weights (checked from the headers, up front).
    """

    def __init__(self, shape, ckpt_dir: Path, clip_dir: Path, dtype: torch.dtype, attn: str = "eager"):
        self.source = WeightSource(ckpt_dir, clip_dir)
        with _parameters_on_meta():
            self.model = _build(shape, clip_dir, attn, dtype, "cpu")
        self._twin = _build(shape, clip_dir, attn, dtype, "meta")  # for `used_by`: every tensor on meta
        self.source.check(self.model)
        # Shared parameters (SAM's positional embedding) have several names: one canonical name each.
        self._slots: dict[str, list[tuple[nn.Module, str]]] = {}
        first_name: dict[int, str] = {}
        canonical: dict[str, str] = {}
        modules = dict(self.model.named_modules())
        for name, p in self.model.named_parameters(remove_duplicate=False):
            canonical[name] = first_name.setdefault(id(p), name)
            mod, _, leaf = name.rpartition(".")
            self._slots.setdefault(canonical[name], []).append((modules[mod], leaf))
        self._twin_names = {id(p): canonical[name] for name, p in self._twin.named_parameters(remove_duplicate=False)}
        self.held: set[str] = set()
        self.stats = HoldStats()

    def used_by(self, make_wrapper, args: tuple) -> set[str]:
        """Canonical names of the parameters a stage's forward touches.

        Args:
            make_wrapper (callable): model -> the stage's wrapper module (called with the meta twin).
            args (tuple): the stage's feed (only shapes and dtypes matter).
        """
        recorder = _RecordState(self._twin_names)
        wrapper = make_wrapper(self._twin)
        with recorder, torch.no_grad():
            wrapper(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
        return recorder.used

    def hold(self, names: set[str] | tuple = (), label: str = "") -> None:
        """Make exactly `names` real (read from the checkpoint); put every other held parameter back on meta."""
        names = set(names)
        for name in sorted(self.held - names):
            p = self._param(name)
            self._set(name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))
        for name in sorted(names - self.held):  # in the parameter's own dtype, as load_state_dict copies
            self._set(name, nn.Parameter(self.source.read(name, self._param(name).dtype), requires_grad=False))
            self.stats.reads += 1
        self.held = names
        nbytes = sum(self._param(n).numel() * self._param(n).element_size() for n in names)
        self.stats.history.append((label, len(names), nbytes))

    def _param(self, name: str) -> torch.Tensor:
        module, leaf = self._slots[name][0]
        return module._parameters[leaf]

    def _set(self, name: str, param: nn.Parameter) -> None:
        for module, leaf in self._slots[name]:
            module._parameters[leaf] = param

    @property
    def total_tensors(self) -> int:
        return len(self._slots)
