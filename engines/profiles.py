"""Optimization profiles of a stage engine, from the manifest's named dims. Pure functions, no TensorRT.

    dims = apply_overrides(layout.dims, parse_shapes(["suffix_len=1:32:128"], layout.dims))
    stage_profiles(stage, dims)   # [{"suffix_ids": InputShapes(min=(1,), opt=(32,), max=(128,)), ...}]
    stage_profiles(block, dims, decode=layout.decodes(block.name))   # [prefill, decode]
    call_profile(profiles, {"hidden": (1, 1, 4096), ...})           # 1: a one-row call takes the decode profile

Each input dim is a static int (fixed in min/opt/max) or a named dim (a key of `dims`, e.g.
"batch" (requests per call: min 1, opt `--opt-batch`, max `--max-batch`), "prefix_len", "rows_llm_0",
"cache_llm_0", and "num_seg", the batch's [SEG] rows, data-dependent upstream but bounded by the export). Expression dims ("prefix_len + 16 + suffix_len") appear only on outputs.

One profile per engine, except a block that a decode loop runs (`Layout.decodes`): profile 0
"prefill" spans rows 1 to the prompt maximum and its static cache from 1 to its capacity (as a
single-pass block's one profile does); profile 1 "decode" is the same with rows exactly 1, so
TensorRT tunes the one-row step's kernels for that shape. `call_profile` picks per call: the fitting
profile with the smallest max (a one-row call: decode), with no read of past_len (which lives on the
device). An engine built before the decode profile has one and still runs: every call takes profile 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from graphs.dims import is_named
from graphs.errors import ArtifactError, InputError, ToolchainError
from graphs.stages import DimRange, StageSpec, rows_dim

# Why each engine has its profiles; recorded in every sidecar and manifest engine entry.
PROFILES_NOTE = {
    "llm": ("one profile for prefill and decode: rows_<block> spans 1 (a decode step) to the longest prompt and "
            "cache_<block> the static KV cache's capacity (a single-pass artifact's block never decodes)"),
    "llm-decode": ("two profiles: 0 prefill (rows_<block> 1 to the longest prompt, cache_<block> 1 to the static KV "
                   "cache's capacity) and 1 decode (rows_<block> exactly 1, the same cache range); the runner takes "
                   "profile 1 for one-row calls, one execution context per profile"),
}
_OTHER_NOTE = "one profile: the same graph and shapes serve single-pass and generate mode"
PREFILL, DECODE = "prefill", "decode"  # profile names of a decoded block's engine, in profile order
DECODE_ROWS = 1  # rows of a decode step: the decode profile's rows_<block> min = opt = max

# The export flags that bound each named dim: what to re-export with when an override asks for more.
_EXPORT_FLAG = {"prefix_len": "--max-text-len", "suffix_len": "--max-text-len", "num_seg": "--max-seg (or --max-batch)",
                "instances": "--max-instances", "batch": "--max-batch"}


@dataclass(frozen=True)
class InputShapes:
    """min/opt/max shape of one engine input."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: dict) -> "InputShapes":
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))


Profile = dict[str, InputShapes]  # input name -> shapes


def profiles_note(stage: StageSpec, decode: bool = False) -> str:
    """Why `stage`'s engine has its optimization profiles (for the sidecar's "profiles_note").

    Args:
        stage (StageSpec): the stage.
        decode (bool): a decode loop runs its graph (`Layout.decodes`). Defaults to False.
    """
    if decode and stage.cache:
        return PROFILES_NOTE["llm-decode"]
    return PROFILES_NOTE.get(stage.kind, _OTHER_NOTE)


def profile_names(stage: StageSpec, decode: bool = False) -> list[str]:
    """Names of `stage`'s engine profiles in order (the sidecar's "profile_names"): ["prefill", "decode"] for a
    decoded block, else ["all"]."""
    return [PREFILL, DECODE] if decode and stage.cache else ["all"]


def _reexport_hint(name: str) -> str:
    if name in _EXPORT_FLAG:
        return f"re-export with a larger {_EXPORT_FLAG[name]}"
    if name.startswith(("past_", "cache_")):
        return "re-export with a larger --max-text-len or --max-new-tokens"
    if name.startswith("rows_"):
        return "re-export with a larger --max-text-len"
    return "re-export with larger bounds"


def parse_shapes(items, dims: dict[str, DimRange]) -> dict[str, DimRange]:
    """Parse `--shapes NAME=min:opt:max` items into named-dim overrides, checked against the export.

    An override may narrow a dim's exported range (smaller buffers, a better-tuned opt), never widen
    it: the graphs and every runner's input checks are bounded by the export.

    Args:
        items (Iterable[str] | None): e.g. ["suffix_len=1:32:128", "num_seg=1:1:4"].
        dims (dict[str, DimRange]): the artifact's named dims (`Layout.dims`).

    Returns:
        dict[str, DimRange]: dim name -> override. Empty when `items` is None or empty.

    Raises:
        ToolchainError: "--shapes <item>: <what is wrong>", naming valid dims or the exported range.
    """
    out: dict[str, DimRange] = {}
    for item in items or ():
        where = f"--shapes {item}"
        name, sep, spec = str(item).partition("=")
        name = name.strip()
        if not sep or not name:
            raise ToolchainError(f"{where}: expected NAME=min:opt:max, e.g. suffix_len=1:32:128")
        if name not in dims:
            raise ToolchainError(f"{where}: {name!r} is not a named dim of this artifact; it has: "
                                 f"{', '.join(dims)}")
        if name in out:
            raise ToolchainError(f"{where}: {name!r} is given twice")
        parts = spec.split(":")
        try:
            lo, opt, hi = (int(p) for p in parts)
        except ValueError:
            raise ToolchainError(f"{where}: expected three integers min:opt:max, got {spec!r}") from None
        if not 0 <= lo <= opt <= hi:
            raise ToolchainError(f"{where}: needs 0 <= min <= opt <= max, got min {lo}, opt {opt}, max {hi}")
        exported = dims[name]
        if lo < exported.min:
            raise ToolchainError(f"{where}: min {lo} is below the exported min {exported.min} of {name!r} "
                                 f"(exported range [{exported.min}, {exported.max}])")
        if hi > exported.max:
            raise ToolchainError(f"{where}: max {hi} is above the exported max {exported.max} of {name!r} "
                                 f"(exported range [{exported.min}, {exported.max}]); {_reexport_hint(name)}")
        out[name] = DimRange(lo, opt, hi)
    return out


def apply_overrides(dims: dict[str, DimRange], overrides: dict[str, DimRange] | None) -> dict[str, DimRange]:
    """`dims` with `overrides` (from `parse_shapes`) replacing their entries."""
    return {**dims, **(overrides or {})}


def input_shapes(stage: StageSpec, name: str, dims: dict[str, DimRange]) -> InputShapes:
    """min/opt/max of input `name` of `stage`: static ints fixed, named dims from `dims`.

    Raises:
        ArtifactError: the input uses an expression dim or a dim `dims` lacks (a manifest problem).
    """
    spec = stage.input(name)
    lo, opt, hi = [], [], []
    for dim in spec.shape:
        if isinstance(dim, int):
            r = DimRange(dim, dim, dim)
        elif is_named(dim) and dim in dims:
            r = dims[dim]
        else:
            what = "an expression dim" if not is_named(dim) else "a dim that is not in the manifest's dims"
            raise ArtifactError(f"stage {stage.name!r} input {name!r} has {what} ({dim!r}); an engine input needs "
                                "static or named dims; re-export the artifact")
        lo.append(r.min)
        opt.append(r.opt)
        hi.append(r.max)
    return InputShapes(tuple(lo), tuple(opt), tuple(hi))


def stage_profiles(stage: StageSpec, dims: dict[str, DimRange], inputs=None, decode: bool = False) -> list[Profile]:
    """The optimization profiles of `stage`'s engine (see the module doc and `PROFILES_NOTE`).

    Args:
        stage (StageSpec): the stage.
        dims (dict[str, DimRange]): named dims, overrides applied.
        inputs (Iterable[str] | None): the graph's inputs, when it dropped some the spec lists (exporters
            drop inputs a graph never reads). Defaults to None (every spec input).
        decode (bool): a decode loop runs this graph (`Layout.decodes`): a block then gets a second, decode
            profile (rows_<block> = 1). Defaults to False.

    Returns:
        list[dict[str, InputShapes]]: [{input name: min/opt/max shapes}], in `profile_names` order.
    """
    names = [t.name for t in stage.inputs] if inputs is None else list(inputs)
    profiles = [{name: input_shapes(stage, name, dims) for name in names}]
    if decode and stage.cache:
        rows = rows_dim(stage)
        if rows in dims and dims[rows].min > DECODE_ROWS:
            r = dims[rows]
            raise ToolchainError(f"--shapes {rows}={r.min}:{r.opt}:{r.max}: min {r.min} leaves out the one-row decode "
                                 f"steps of block {stage.name!r} (generate mode); keep its min at {DECODE_ROWS}")
        step = {**dims, rows: DimRange(DECODE_ROWS, DECODE_ROWS, DECODE_ROWS)}
        profiles.append({name: input_shapes(stage, name, step) for name in names})
    return profiles


def fits(shape, p: InputShapes) -> bool:
    """True when `shape` lies within `p`'s min and max."""
    return len(shape) == len(p.min) and all(lo <= s <= hi for s, lo, hi in zip(shape, p.min, p.max))


def call_profile(profiles: list[Profile], shapes: dict[str, tuple[int, ...]]) -> int:
    """The profile a call with input `shapes` runs under: of those whose min/max hold every shape, the one with
    the smallest max (summed over inputs), first on ties. For a decoded block: a one-row call takes the decode
    profile, every other call the prefill one; an engine of one profile always takes 0.

    Raises:
        InputError: no profile fits; names the first input outside each.
    """
    misses, fitting = [], []
    for i, profile in enumerate(profiles):
        bad = [(n, s, profile[n]) for n, s in shapes.items() if n in profile and not fits(s, profile[n])]
        if not bad:
            fitting.append((sum(math.prod(p.max) for p in profile.values()), i))
            continue
        n, s, p = bad[0]
        misses.append(f"profile {i}: input {n!r} shape {tuple(s)} is outside [{p.min}, {p.max}]")
    if not fitting:
        raise InputError("no optimization profile fits the feed (" + "; ".join(misses) + ")")
    return min(fitting)[1]


def stage_dims(stage: StageSpec, dims: dict[str, DimRange]) -> dict[str, DimRange]:
    """The named dims `stage`'s inputs use, in first-use order, with their ranges from `dims`."""
    out: dict[str, DimRange] = {}
    for t in stage.inputs:
        for dim in t.shape:
            if isinstance(dim, str) and dim in dims:
                out.setdefault(dim, dims[dim])
    return out


def profiles_to_json(profiles: list[Profile]) -> list[dict]:
    return [{name: shapes.to_dict() for name, shapes in p.items()} for p in profiles]


def profiles_from_json(data: list[dict]) -> list[Profile]:
    return [{name: InputShapes.from_dict(s) for name, s in p.items()} for p in data]


def dims_to_json(dims: dict[str, DimRange]) -> dict:
    return {k: {"min": r.min, "opt": r.opt, "max": r.max} for k, r in dims.items()}
