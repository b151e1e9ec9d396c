"""Tensor names and shapes of checkpoint weight files without torch and without reading the data.

    model.safetensors                the 8-byte header length, then the JSON header: {name: {dtype, shape, offsets}}
    pytorch_model*.bin (torch.save)  a zip whose `*/data.pkl` pickles the dict; tensors are calls of
                                     torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...), read
                                     here by an unpickler that builds only the sizes (storages stay references)

Config-only tools (`graphs.checkpoint_config`) use it to see whether a checkpoint embeds the CLIP tower and
with what geometry, before anything loads a tensor.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

from graphs.errors import CheckpointError


class _Storage:
    """A stand-in for a torch storage class or storage reference: the unpickler never touches the data."""

    def __init__(self, *args):
        self.args = args


def _rebuild_tensor(storage, offset, size, stride, *rest) -> tuple[int, ...]:
    return tuple(int(s) for s in size)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *rest) -> tuple[int, ...]:
    return data


class _ShapeUnpickler(pickle.Unpickler):
    """Unpickles a torch.save'd state dict into {name: shape}; refuses every class it does not expect."""

    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _Storage
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in a state dict")

    def persistent_load(self, pid):
        return _Storage(*pid)


def bin_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a torch.save'd (zip format) state dict, read from its pickle alone."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            state = _ShapeUnpickler(z.open(pkl)).load()
    except (OSError, zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise CheckpointError(f"weights file {path} is corrupt or not a torch.save zip archive "
                              f"({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, tuple) for v in state.values()):
        raise CheckpointError(f"weights file {path} is corrupt: expected a dict of tensors")
    return dict(state)


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} from a safetensors file's JSON header."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as exc:
        raise CheckpointError(f"weights file {path} is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of one weight file, safetensors or `.bin`."""
    return safetensors_shapes(path) if path.suffix == ".safetensors" else bin_shapes(path)
