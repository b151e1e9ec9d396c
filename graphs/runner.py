"""One runner interface for every backend (Polygraphy `BaseRunner` style): `infer(feed) -> outputs`.

The base class, not each backend, checks a feed against the stage spec and times the call:

    feed {name: ndarray} --bind_dims--> named dims {"prefix_len": 37, ...}   (or InputError)
                         --_infer----> {output name: ndarray}                (backend: torch / onnxruntime / tensorrt)

`bind_dims` is a plain function so the TensorRT runner reuses it to pick a profile and set shapes.
Subclasses implement only `_activate`, `_infer` and `_deactivate`. No torch here.
"""

from __future__ import annotations

import time

import numpy as np

from graphs.dims import is_named
from graphs.errors import InputError
from graphs.stages import DimRange, StageSpec, TensorSpec

# How to get a named dim back into its exported range: the export flag that bounds it.
_DIM_HINTS = {
    "prefix_len": "shorten the text or re-export with a larger --max-text-len",
    "suffix_len": "shorten the text or re-export with a larger --max-text-len",
    "num_seg": "re-export with a larger --max-seg",
    "instances": "pass fewer instance masks or re-export with a larger --max-instances",
}
_PAST_HINT = "shorten the text or generate fewer tokens, or re-export with a larger --max-text-len / --max-new-tokens"


def _dim_hint(name: str) -> str:
    if name in _DIM_HINTS:
        return _DIM_HINTS[name]
    if name.startswith(("rows_", "query_")):
        return _DIM_HINTS["prefix_len"]
    return _PAST_HINT if name.startswith(("past_", "cache_")) else "re-export with larger bounds"


is_plain_dim = is_named  # a named dim ("prefix_len"), not a static int or an expression (graphs/dims.py)


def _check_names(stage: StageSpec, feed: dict) -> None:
    want = [t.name for t in stage.inputs]
    missing = [n for n in want if n not in feed]
    extra = sorted(n for n in feed if n not in want)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"unexpected {', '.join(map(repr, extra))}")
        raise InputError(f"stage {stage.name!r}: feed is {'; '.join(parts)}; it takes exactly: {', '.join(want)}")


def _check_tensor(stage: StageSpec, spec: TensorSpec, value) -> None:
    what = f"stage {stage.name!r} input {spec.name!r}"
    if not isinstance(value, np.ndarray):
        raise InputError(f"{what}: expected a numpy array, got {type(value).__name__}")
    if value.dtype.name != spec.dtype:
        raise InputError(f"{what}: dtype is {value.dtype.name}, expected {spec.dtype}")
    if value.ndim != len(spec.shape):
        raise InputError(f"{what}: shape {value.shape} has rank {value.ndim}, expected rank {len(spec.shape)} "
                         f"{_shape_str(spec.shape)}")
    for axis, (dim, size) in enumerate(zip(spec.shape, value.shape)):
        if isinstance(dim, int) and size != dim:
            raise InputError(f"{what}: axis {axis} is {size}, expected {dim} (shape {value.shape}, "
                             f"expected {_shape_str(spec.shape)})")


def _shape_str(shape: tuple) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def bind_dims(stage: StageSpec, feed: dict[str, np.ndarray], dims: dict[str, DimRange]) -> dict[str, int]:
    """Check `feed` against `stage`'s inputs and return the size of every plain named dim.

    Checks the exact set of input names, each array's dtype, rank and static dims, that a named dim
    has one size across inputs, and that a dim listed in `dims` lies in its exported [min, max].
    Expression dims ("prefix_len + 16 + suffix_len") are not checked.

    Args:
        stage (StageSpec): the stage whose inputs the feed must match.
        feed (dict[str, np.ndarray]): input name -> array.
        dims (dict[str, DimRange]): the artifact's named-dim profiles.

    Returns:
        dict[str, int]: named dim -> size, e.g. {"prefix_len": 37, "suffix_len": 12}.

    Raises:
        InputError: naming the stage, input, dim and the valid range.
    """
    _check_names(stage, feed)
    bound: dict[str, int] = {}
    seen_in: dict[str, str] = {}
    for spec in stage.inputs:
        value = feed[spec.name]
        _check_tensor(stage, spec, value)
        for dim, size in zip(spec.shape, value.shape):
            if not is_plain_dim(dim):
                continue
            if dim in bound and bound[dim] != size:
                raise InputError(
                    f"stage {stage.name!r} input {spec.name!r}: dim {dim!r} is {size}, but input "
                    f"{seen_in[dim]!r} has it as {bound[dim]}; inputs sharing a named dim must agree")
            bound.setdefault(dim, size)
            seen_in.setdefault(dim, spec.name)
            rng = dims.get(dim)
            if rng is not None and not rng.min <= size <= rng.max:
                raise InputError(
                    f"stage {stage.name!r} input {spec.name!r}: dim {dim!r} is {size}, outside the exported "
                    f"range [{rng.min}, {rng.max}]; {_dim_hint(dim)}")
    return bound


class BaseRunner:
    """Runs one stage. Use as a context manager; `infer` checks the feed and times the call.

    Args:
        stage (StageSpec): the stage this runner executes (its I/O names, dtypes and shapes).
        dims (dict[str, DimRange]): the artifact's named-dim profiles (`Layout.dims`).
    """

    def __init__(self, stage: StageSpec, dims: dict[str, DimRange]):
        self.stage = stage
        self.dims = dims
        self.name = stage.name
        self.is_active = False
        self.last_ms: float | None = None  # wall time of the last `infer`, feed checks excluded
        self.last_dims: dict[str, int] = {}

    # -- lifecycle ------------------------------------------------------------------------------
    def activate(self) -> None:
        if not self.is_active:
            self._activate()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            try:
                self._deactivate()
            finally:
                self.is_active = False

    def __enter__(self) -> "BaseRunner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # -- interface ------------------------------------------------------------------------------
    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self.stage.inputs

    def output_specs(self) -> tuple[TensorSpec, ...]:
        return self.stage.outputs

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the stage on `feed` (input name -> array) and return output name -> array.

        Raises:
            InputError: the feed does not match the stage spec (see `bind_dims`).
        """
        if not self.is_active:
            raise RuntimeError(f"runner for stage {self.name!r} is not active; use it in a `with` block "
                               "or call activate() first")
        self.last_dims = bind_dims(self.stage, feed, self.dims)
        t0 = time.perf_counter()
        out = self._infer(feed)
        self.last_ms = 1e3 * (time.perf_counter() - t0)
        return out

    # -- backends implement ---------------------------------------------------------------------
    def _activate(self) -> None:
        """Load the model or engine (once)."""

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _deactivate(self) -> None:
        """Release what `_activate` loaded."""
