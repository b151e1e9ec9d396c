"""graphs.runner: the feed checks every backend shares (names, dtypes, ranks, static and named dims) and the lifecycle."""

from __future__ import annotations

import numpy as np
import pytest

from graphs.errors import InputError
from graphs.runner import BaseRunner, bind_dims, is_plain_dim
from graphs.stages import DimRange, StageSpec, TensorSpec

STAGE = StageSpec(
    "llm_0", "llm",
    (TensorSpec("prefix_ids", "int64", ("prefix_len",), "host.prefix_ids"),
     TensorSpec("suffix_ids", "int64", ("suffix_len",), "host.suffix_ids"),
     TensorSpec("image_hidden", "float32", (1, 16, 8), "vision.image_hidden"),
     TensorSpec("suffix_hidden", "float32", (1, "suffix_len", 8), "host.x"),
     TensorSpec("kv", "float32", (1, "prefix_len + 16 + suffix_len", 8), "host.kv")),
    (TensorSpec("out", "float32", (1, 8)),))
DIMS = {"prefix_len": DimRange(1, 4, 32), "suffix_len": DimRange(1, 4, 256)}


def _feed(p=3, s=5, kv=None):
    return {
        "prefix_ids": np.zeros(p, np.int64),
        "suffix_ids": np.zeros(s, np.int64),
        "image_hidden": np.zeros((1, 16, 8), np.float32),
        "suffix_hidden": np.zeros((1, s, 8), np.float32),
        "kv": np.zeros((1, p + 16 + s if kv is None else kv, 8), np.float32),
    }


class SumRunner(BaseRunner):
    """A numpy backend: records its lifecycle calls."""

    def __init__(self, stage, dims):
        super().__init__(stage, dims)
        self.calls = []

    def _activate(self):
        self.calls.append("activate")

    def _infer(self, feed):
        return {"out": feed["image_hidden"].sum(axis=1)}

    def _deactivate(self):
        self.calls.append("deactivate")


def test_bind_dims_returns_named_sizes():
    assert bind_dims(STAGE, _feed(3, 5), DIMS) == {"prefix_len": 3, "suffix_len": 5}


def test_expression_dims_are_not_checked():
    assert bind_dims(STAGE, _feed(3, 5, kv=2), DIMS) == {"prefix_len": 3, "suffix_len": 5}
    assert is_plain_dim("past_llm_0") and not is_plain_dim("past_llm_0 + step_len") and not is_plain_dim(4)


def test_out_of_range_names_the_dim_range_and_fix():
    msg = ("stage 'llm_0' input 'suffix_ids': dim 'suffix_len' is 300, outside the exported range [1, 256]; "
           "shorten the text or re-export with a larger --max-text-len")
    with pytest.raises(InputError) as info:
        bind_dims(STAGE, _feed(3, 300), DIMS)
    assert str(info.value) == msg
    with pytest.raises(InputError, match=r"dim 'prefix_len' is 0, outside the exported range \[1, 32\]"):
        bind_dims(STAGE, _feed(0, 5), DIMS)


def test_inconsistent_named_dim():
    feed = _feed(3, 5)
    feed["suffix_hidden"] = np.zeros((1, 6, 8), np.float32)
    with pytest.raises(InputError, match=r"input 'suffix_hidden': dim 'suffix_len' is 6, but input 'suffix_ids' "
                                         r"has it as 5"):
        bind_dims(STAGE, feed, DIMS)


@pytest.mark.parametrize("name,value,pattern", [
    ("prefix_ids", np.zeros(3, np.int32), "input 'prefix_ids': dtype is int32, expected int64"),
    ("image_hidden", np.zeros((1, 16, 8), np.float16), "dtype is float16, expected float32"),
    ("image_hidden", np.zeros((16, 8), np.float32), r"rank 2, expected rank 3 \[1, 16, 8\]"),
    ("image_hidden", np.zeros((1, 15, 8), np.float32), "input 'image_hidden': axis 1 is 15, expected 16"),
    ("prefix_ids", [1, 2, 3], "expected a numpy array, got list"),
], ids=["int32", "float16", "rank", "static-dim", "not-an-array"])
def test_wrong_tensor(name, value, pattern):
    feed = _feed()
    feed[name] = value
    with pytest.raises(InputError, match=pattern):
        bind_dims(STAGE, feed, DIMS)


def test_missing_and_unexpected_names():
    feed = _feed()
    del feed["kv"]
    feed["kv_cache"] = np.zeros(1)
    with pytest.raises(InputError, match=r"stage 'llm_0': feed is missing 'kv'; unexpected 'kv_cache'; it takes "
                                         r"exactly: prefix_ids, suffix_ids, image_hidden, suffix_hidden, kv"):
        bind_dims(STAGE, feed, DIMS)


def test_named_dim_without_a_profile_is_bound_but_not_range_checked():
    stage = StageSpec("s", "vision", (TensorSpec("x", "float32", ("free",)),), ())
    assert bind_dims(stage, {"x": np.zeros(1000, np.float32)}, {}) == {"free": 1000}


def test_runner_lifecycle_and_timing():
    runner = SumRunner(STAGE, DIMS)
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer(_feed())
    with runner as r:
        assert r is runner and runner.is_active
        runner.activate()  # idempotent
        out = runner.infer(_feed())
        assert out["out"].shape == (1, 8)
        assert runner.last_ms is not None and runner.last_ms >= 0
        assert runner.last_dims == {"prefix_len": 3, "suffix_len": 5}
        with pytest.raises(InputError):
            runner.infer(_feed(3, 300))
    assert runner.calls == ["activate", "deactivate"] and not runner.is_active
    assert runner.input_specs() == STAGE.inputs and runner.output_specs() == STAGE.outputs
