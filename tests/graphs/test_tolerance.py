"""graphs.tolerance: one rule (Polygraphy's elementwise) for the export check, validate and the comparator."""

from __future__ import annotations

import numpy as np
import pytest

from graphs.tolerance import STAGE_ATOL, STAGE_RTOL, mismatches, stage_tolerance


def test_an_element_fails_only_past_both_atol_and_rtol():
    ref = np.array([1.0, 100.0, 0.0, 1.0], dtype=np.float32)
    got = np.array([1.05, 100.5, 0.0, np.nan], dtype=np.float32)
    # 1.05: abs 0.05 > 0.01 and rel 0.05 > 0.01 -> fails; 100.5: abs 0.5 > 0.01 but rel 0.005 <= 0.01 -> passes
    assert mismatches(got, ref, atol=0.01, rtol=0.01).tolist() == [True, False, False, True]


def test_comparator_and_export_share_the_rule():
    from engines.compare import compare

    ref = {"x": np.array([100.0, 1.0], dtype=np.float32)}
    got = {"x": np.array([100.5, 1.0], dtype=np.float32)}
    assert bool(compare(got, ref, atol=0.01, rtol=0.01)) == (not mismatches(got["x"], ref["x"], 0.01, 0.01).any())


def test_stage_tolerance_is_the_manifest_shape():
    assert stage_tolerance("fp16", "llm_0") == {"atol": {"": STAGE_ATOL["fp16"]}, "rtol": {"": STAGE_RTOL["fp16"]}}
    assert stage_tolerance("fp16", "sam_decoder")["atol"][""] > STAGE_ATOL["fp16"]  # measured: see its comment


@pytest.mark.parametrize("precision, n, flips, ok", [("fp32", 256, 1, False), ("fp16", 256, 2, True),
                                                    ("fp16", 256, 3, False), ("fp16", 64, 1, True),
                                                    ("fp16", 64, 2, False)])
def test_export_integer_check_allows_fp16_near_tie_flips_and_names_the_fix(precision, n, flips, ok):
    from exporter.export import _integer_flips
    from graphs.errors import ParityError
    from graphs.stages import StageSpec

    spec = StageSpec("vision", "vision", (), ())
    ref = np.arange(n, dtype=np.int64) % 8  # n assignments: 1% of them, and always one, may flip in fp16
    out = ref.copy()
    out[:flips] = (out[:flips] + 1) % 8
    if ok:
        assert _integer_flips(spec, "assign", out, ref, precision) == flips
        return
    with pytest.raises(ParityError) as err:
        _integer_flips(spec, "assign", out, ref, precision)
    msg = str(err.value)
    assert f"{flips} of {n} integer values differ" in msg and "'vision'" in msg and "'assign'" in msg
    assert ("--precision fp32" in msg) == (precision == "fp16")
