"""engines.compare: the numbers a parity report shows, Polygraphy's verdicts, and clean failures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engines.compare import compare, mask_iou
from graphs.errors import InputError


def test_statistics_on_known_arrays():
    ref = np.zeros(100, np.float64)
    got = np.arange(100) * 1e-3  # |error| = 0, 0.001, ..., 0.099
    c = compare({"x": got}, {"x": ref}, atol=0.1, rtol=0.0)
    s = c.outputs["x"]
    assert c and s.passed
    assert s.max_abs == pytest.approx(0.099)
    assert s.mean_abs == pytest.approx(0.0495)
    assert s.p99_abs == pytest.approx(np.quantile(got, 0.99))
    assert s.passing_atol == pytest.approx(0.099)  # rtol 0: the largest error
    assert s.budget_used_pct == pytest.approx(99.0)
    assert s.worst_index == (99,) and s.first_mismatches == []
    assert c.max_abs == pytest.approx(0.099)

    c = compare({"x": got}, {"x": ref}, atol=0.0505, rtol=0.0)
    s = c.outputs["x"]
    assert not c and not s.passed
    assert [m[0] for m in s.first_mismatches] == [(51,), (52,), (53,), (54,), (55,)]
    assert s.first_mismatches[0][1:] == pytest.approx((0.051, 0.0))


def test_passing_atol_accounts_for_rtol():
    ref = np.array([1.0, 100.0])
    got = np.array([1.1, 101.0])  # abs error [0.1, 1.0], rel error [0.1, 0.01]
    c = compare({"x": got}, {"x": ref}, atol=0.11, rtol=0.05)
    s = c.outputs["x"]
    # element 1 is within rtol, so only element 0 needs atol: an element fails only if it exceeds both
    assert c and s.passing_atol == pytest.approx(0.1)
    assert s.max_abs == pytest.approx(1.0) and s.max_rel == pytest.approx(0.1)
    assert s.budget_used_pct == pytest.approx(1.0 / 0.11 * 100)
    c = compare({"x": got}, {"x": ref}, atol=0.09, rtol=0.05)
    assert not c and c.outputs["x"].first_mismatches == [((0,), pytest.approx(1.1), 1.0)]
    assert compare({"x": got}, {"x": ref}, atol=0.0, rtol=0.2).outputs["x"].passing_atol == 0.0


def test_per_output_tolerances_with_default_key():
    ref = {"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)}
    out = {"a": np.full(4, 1e-4, np.float32), "b": np.full(4, 0.5, np.float32)}
    c = compare(out, ref, atol={"": 1e-3, "b": 1.0}, rtol={"": 0.0})
    assert c and c.outputs["a"].atol == 1e-3 and c.outputs["b"].atol == 1.0
    c = compare(out, ref, atol={"": 1e-3}, rtol=0.0)
    assert not c and c.failed() == ["b"] and c.outputs["a"].passed
    with pytest.raises(InputError, match=r"atol has no entry for output 'a' and no default"):
        compare(out, ref, atol={"b": 1.0}, rtol=0.0)


def test_integers_compare_exactly():
    ref = np.array([1, 2, 3], np.int64)
    assert compare({"ids": ref.copy()}, {"ids": ref}, atol=10.0, rtol=10.0)
    c = compare({"ids": np.array([1, 2, 4], np.int64)}, {"ids": ref}, atol=10.0, rtol=10.0)
    assert not c and c.outputs["ids"].atol == 0.0
    assert c.outputs["ids"].first_mismatches == [((2,), 4.0, 3.0)]
    assert compare({"ids": ref.astype(np.int32)}, {"ids": ref}, atol=0, rtol=0)  # same kind, other width
    assert not compare({"m": np.array([True, False])}, {"m": np.array([True, True])}, atol=1.0, rtol=1.0)


def test_shape_dtype_and_missing_fail_cleanly():
    ref = {"x": np.zeros((2, 3), np.float32), "ids": np.zeros(3, np.int64), "gone": np.zeros(1, np.float32)}
    out = {"x": np.zeros((3, 2), np.float32), "ids": np.zeros(3, np.float32), "extra": np.zeros(1)}
    c = compare(out, ref, atol=1.0, rtol=1.0)
    assert not c and set(c.failed()) == {"x", "ids", "gone"}
    assert c.outputs["x"].reason == "shape [3, 2] vs reference [2, 3]"
    assert "float32 (float) vs reference int64 (int)" in c.outputs["ids"].reason
    assert c.outputs["gone"].reason == "missing from the outputs"
    assert c.unmatched == ["extra"]
    assert "FAIL x: shape [3, 2]" in c.format() and "not compared (no reference): extra" in c.format()


def test_empty_half_precision_and_nan():
    assert compare({"e": np.zeros((0, 4), np.float32)}, {"e": np.zeros((0, 4), np.float32)}, atol=0, rtol=0)
    half = compare({"h": np.ones(3, np.float16)}, {"h": np.ones(3, np.float32) + 1e-4}, atol=1e-3, rtol=0)
    assert half and half.outputs["h"].max_abs == pytest.approx(1e-4, rel=1e-3)
    c = compare({"n": np.array([1.0, np.nan])}, {"n": np.array([1.0, 2.0])}, atol=1.0, rtol=1.0)
    assert not c and c.outputs["n"].passing_atol == float("inf") and np.isnan(c.outputs["n"].max_abs)


def test_report_formats(capsys):
    c = compare({"x": np.array([1.0, 2.5]), "y": np.ones(2)}, {"x": np.array([1.0, 2.0]), "y": np.ones(2)},
                atol=0.1, rtol=0.0)
    assert capsys.readouterr() == ("", "")  # Polygraphy's logger is silenced
    text = c.format()
    assert "FAIL x [2]: max_abs 0.5" in text and "would pass at atol 0.5" in text
    assert "[1]: got 2.5 expected 2" in text and "PASS y" in text and "FAILED: 1/2" in text
    d = json.loads(json.dumps(c.to_dict()))
    assert d["passed"] is False and d["outputs"]["x"]["first_mismatches"] == [[[1], 2.5, 2.0]]
    assert d["outputs"]["y"]["passed"] is True and d["max_abs"] == 0.5


def test_mask_iou():
    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    assert mask_iou(a, b) == 1.0
    a[0, :2] = True  # 8 pixels
    b[0, 1:3] = True  # 8 pixels, 4 shared
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(a, a) == 1.0 and mask_iou(a, np.zeros_like(a)) == 0.0
    with pytest.raises(InputError, match="shapes differ"):
        mask_iou(a, b[0])
