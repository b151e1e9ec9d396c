"""Tolerance checks on Polygraphy's comparator, with the numbers a parity report needs (llm.c `check_tensor`).

    compare(outputs, reference, atol={"": 1e-3, "masks": 1e-2}, rtol=1e-3)  -> Comparison (truthy iff all passed)

Pass/fail is Polygraphy's `SimpleCompareFunc` elementwise check: an element fails when it exceeds
*both* atol and rtol * |expected|. Integer and bool outputs compare exactly. Per output we add
max/mean/p99 absolute error, max relative error, the smallest atol that would have passed at this
rtol, the share of the atol budget used, and the first mismatching elements.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from graphs.errors import InputError
from graphs.tolerance import abs_rel, mismatches

_MAX_MISMATCHES = 5


@dataclass
class OutputStats:
    name: str
    passed: bool
    atol: float
    rtol: float
    shape: tuple[int, ...] = ()
    max_abs: float = 0.0
    mean_abs: float = 0.0
    p99_abs: float = 0.0
    max_rel: float = 0.0
    passing_atol: float = 0.0      # the smallest atol that passes at this rtol (Polygraphy's elementwise rule)
    budget_used_pct: float = 0.0   # max_abs / atol * 100
    worst_index: tuple[int, ...] = ()
    first_mismatches: list[tuple[tuple[int, ...], float, float]] = field(default_factory=list)  # (index, got, expected)
    reason: str = ""               # why it failed without a numeric comparison (shape, dtype, missing)

    def format(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        if self.reason:
            return f"{verdict} {self.name}: {self.reason}"
        line = (f"{verdict} {self.name} {list(self.shape)}: max_abs {self.max_abs:.3g} mean {self.mean_abs:.3g} "
                f"p99 {self.p99_abs:.3g} max_rel {self.max_rel:.3g} | atol {self.atol:g} rtol {self.rtol:g} "
                f"({self.budget_used_pct:.0f}% of atol used; would pass at atol {self.passing_atol:.3g})")
        if self.first_mismatches:
            shown = ", ".join(f"{list(i)}: got {g:.6g} expected {e:.6g}" for i, g, e in self.first_mismatches)
            line += f"\n    first mismatches: {shown}"
        return line


@dataclass
class Comparison:
    outputs: dict[str, OutputStats]
    unmatched: list[str] = field(default_factory=list)  # outputs with no reference (not compared)

    def __bool__(self) -> bool:
        return all(s.passed for s in self.outputs.values())

    @property
    def passed(self) -> bool:
        return bool(self)

    @property
    def max_abs(self) -> float:
        vals = [s.max_abs for s in self.outputs.values() if not s.reason]
        return float(np.max(vals)) if vals else 0.0  # NaN if any output has NaN errors

    def failed(self) -> list[str]:
        return [n for n, s in self.outputs.items() if not s.passed]

    def to_dict(self) -> dict:
        return {"passed": bool(self), "max_abs": self.max_abs, "unmatched": list(self.unmatched),
                "outputs": {n: _jsonable(asdict(s)) for n, s in self.outputs.items()}}

    def format(self) -> str:
        lines = [s.format() for s in self.outputs.values()]
        if self.unmatched:
            lines.append(f"not compared (no reference): {', '.join(self.unmatched)}")
        n_fail = len(self.failed())
        lines.append(f"{'PASSED' if self else 'FAILED'}: {len(self.outputs) - n_fail}/{len(self.outputs)} outputs "
                     f"within tolerance")
        return "\n".join(lines)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _tol(tol: float | dict[str, float], name: str, what: str) -> float:
    if not isinstance(tol, dict):
        return float(tol)
    if name in tol:
        return float(tol[name])
    if "" in tol:
        return float(tol[""])
    raise InputError(f"{what} has no entry for output {name!r} and no default (\"\" key): {tol}")


def _kind(a: np.ndarray) -> str:
    return {"f": "float", "i": "int", "u": "int", "b": "bool"}.get(a.dtype.kind, a.dtype.kind)


def _structural(name: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> OutputStats | None:
    """A failed OutputStats when the arrays cannot be compared elementwise; an empty pass; else None."""
    if _kind(got) != _kind(ref):
        return OutputStats(name, False, atol, rtol, tuple(got.shape),
                           reason=f"dtype {got.dtype} ({_kind(got)}) vs reference {ref.dtype} ({_kind(ref)})")
    if got.shape != ref.shape:
        return OutputStats(name, False, atol, rtol, tuple(got.shape),
                           reason=f"shape {list(got.shape)} vs reference {list(ref.shape)}")
    if got.size == 0:
        return OutputStats(name, True, atol, rtol, tuple(got.shape))
    return None


def _stats(name: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float, passed: bool) -> OutputStats:
    diff, rel = abs_rel(got, ref)
    nan = np.isnan(diff)
    bad = mismatches(got, ref, atol, rtol)
    over_rtol = np.isnan(rel) | (rel > rtol)
    if nan.any():
        passing = float("inf")
    else:
        passing = float(diff[over_rtol].max()) if over_rtol.any() else 0.0
    max_abs = float(np.nan if nan.any() else diff.max())
    worst = np.unravel_index(int(np.nanargmax(diff)) if not nan.all() else 0, diff.shape)
    first = []
    for flat in np.flatnonzero(bad)[:_MAX_MISMATCHES]:
        idx = np.unravel_index(int(flat), diff.shape)
        first.append((tuple(int(i) for i in idx), float(got[idx]), float(ref[idx])))
    return OutputStats(
        name, passed, atol, rtol, tuple(got.shape), max_abs=max_abs, mean_abs=float(diff.mean()),
        p99_abs=float(np.quantile(diff, 0.99)) if not nan.any() else float("nan"),
        max_rel=float(np.nan if nan.any() else rel.max()), passing_atol=passing,
        budget_used_pct=(max_abs / atol * 100 if atol > 0 else (0.0 if max_abs == 0 else float("inf"))),
        worst_index=tuple(int(i) for i in worst), first_mismatches=first)


def _polygraphy_verdicts(outputs: dict, reference: dict, atol: dict, rtol: dict) -> dict[str, bool]:
    """Per-output pass/fail from Polygraphy's comparator, its logging silenced."""
    from polygraphy.comparator import Comparator, IterationResult, RunResults
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    results = RunResults()
    results.append(("outputs", [IterationResult(outputs, runner_name="outputs")]))
    results.append(("reference", [IterationResult(reference, runner_name="reference")]))
    func = SimpleCompareFunc(atol=atol, rtol=rtol, check_shapes=True, check_error_stat="elemwise")
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        acc = Comparator.compare_accuracy(results, compare_func=func)
    verdicts: dict[str, bool] = {}
    for accuracy in acc:
        for iterations in accuracy.values():
            for it in iterations:
                verdicts.update({n: bool(r) for n, r in it.items()})
    return verdicts


def compare(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], atol: float | dict[str, float],
            rtol: float | dict[str, float]) -> Comparison:
    """Compare every reference output with the same-named output.

    Args:
        outputs (dict[str, np.ndarray]): the backend under test, name -> array.
        reference (dict[str, np.ndarray]): the reference, name -> array; decides which outputs are checked.
        atol (float | dict[str, float]): absolute tolerance, or per output with "" as the default key.
        rtol (float | dict[str, float]): relative tolerance (a fraction of |reference|), same convention.

    Returns:
        Comparison: truthy iff every reference output is present and within tolerance. Integer and
        bool outputs must match exactly whatever the tolerances.
    """
    stats: dict[str, OutputStats] = {}
    numeric: dict[str, tuple[np.ndarray, np.ndarray, float, float]] = {}
    for name, ref in reference.items():
        ref = np.asarray(ref)
        exact = _kind(ref) in ("int", "bool")
        a_tol, r_tol = (0.0, 0.0) if exact else (_tol(atol, name, "atol"), _tol(rtol, name, "rtol"))
        if name not in outputs:
            stats[name] = OutputStats(name, False, a_tol, r_tol, reason="missing from the outputs")
            continue
        got = np.asarray(outputs[name])
        early = _structural(name, got, ref, a_tol, r_tol)
        if early is not None:
            stats[name] = early
        else:
            numeric[name] = (got, ref, a_tol, r_tol)
            stats[name] = None  # keeps the reference's order
    if numeric:
        verdicts = _polygraphy_verdicts(
            {n: v[0] for n, v in numeric.items()}, {n: v[1] for n, v in numeric.items()},
            {n: v[2] for n, v in numeric.items()}, {n: v[3] for n, v in numeric.items()})
        for name, (got, ref, a_tol, r_tol) in numeric.items():
            stats[name] = _stats(name, got, ref, a_tol, r_tol, verdicts[name])
    unmatched = [n for n in outputs if n not in reference]
    return Comparison(outputs=stats, unmatched=unmatched)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of one shape; 1.0 when both are empty.

    Args:
        a (np.ndarray): bool mask, any shape (e.g. [K, H, W]).
        b (np.ndarray): bool mask, the same shape.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise InputError(f"mask_iou: shapes differ: {list(a.shape)} vs {list(b.shape)}")
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union
