"""engines.ort_runner: sessions from .onnx files (with external data), spec checks and clear load errors."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from engines.ort_runner import OrtRunner
from graphs.errors import ArtifactError, InputError, ToolchainError
from graphs.stages import DimRange, StageSpec, TensorSpec

STAGE = StageSpec("affine", "vision", (TensorSpec("x", "float32", ("rows", 3), "host.x"),),
                  (TensorSpec("y", "float32", ("rows", 3)),))
DIMS = {"rows": DimRange(1, 2, 4)}


def _affine(path, save_onnx, external_data=False):
    w = numpy_helper.from_array(np.arange(9, dtype=np.float32).reshape(3, 3), "w")  # raw data: can go external
    bias = numpy_helper.from_array(np.array([1, 2, 3], np.float32), "bias")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "bias"], ["y"])]
    return save_onnx(path, STAGE, nodes, [w, bias], external_data=external_data)


@pytest.mark.parametrize("external_data", [False, True], ids=["inline", "external-data"])
def test_runs_and_matches_numpy(tmp_path, save_onnx, external_data):
    path = _affine(tmp_path / "affine.onnx", save_onnx, external_data)
    if external_data:
        assert (tmp_path / "affine.onnx.data").is_file()
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    with OrtRunner(STAGE, DIMS, path, intra_op_threads=1) as runner:
        out = runner.infer({"x": x})
        assert runner.last_dims == {"rows": 2} and runner.last_ms >= 0
        assert runner.input_specs() == STAGE.inputs
    assert set(out) == {"y"} and out["y"].dtype == np.float32
    np.testing.assert_allclose(out["y"], x @ np.arange(9, dtype=np.float32).reshape(3, 3) + [1, 2, 3], rtol=1e-6)
    assert runner.session is None and not runner.is_active


def test_feed_is_checked_before_onnxruntime(tmp_path, save_onnx):
    path = _affine(tmp_path / "affine.onnx", save_onnx)
    with OrtRunner(STAGE, DIMS, path) as runner:
        with pytest.raises(InputError, match=r"dim 'rows' is 5, outside the exported range \[1, 4\]"):
            runner.infer({"x": np.zeros((5, 3), np.float32)})
        with pytest.raises(InputError, match="dtype is float64, expected float32"):
            runner.infer({"x": np.zeros((2, 3))})


@pytest.mark.parametrize("content", [b"this is not an onnx model", b""], ids=["garbage", "empty"])
def test_corrupt_file_is_a_clear_error(tmp_path, content):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(content)
    runner = OrtRunner(STAGE, DIMS, bad)
    with pytest.raises(ArtifactError, match=r"stage 'affine'.*broken\.onnx.*re-run csprt export") as info:
        runner.activate()
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no onnxruntime traceback
    assert not runner.is_active


def test_missing_file_and_missing_external_data(tmp_path, save_onnx):
    with pytest.raises(ArtifactError, match="does not exist"):
        OrtRunner(STAGE, DIMS, tmp_path / "nope.onnx").activate()
    path = _affine(tmp_path / "affine.onnx", save_onnx, external_data=True)
    (tmp_path / "affine.onnx.data").unlink()
    with pytest.raises(ArtifactError, match="affine.onnx"):
        OrtRunner(STAGE, DIMS, path).activate()


def test_graph_that_does_not_match_the_spec(tmp_path, save_onnx):
    other = StageSpec("affine", "vision", (TensorSpec("x", "float32", ("rows", 3)),),
                      (TensorSpec("z", "float32", ("rows", 3)),))
    path = save_onnx(tmp_path / "other.onnx", other, [helper.make_node("Identity", ["x"], ["z"])])
    with pytest.raises(ArtifactError, match=r"spec outputs it lacks: \['y'\]"):
        OrtRunner(STAGE, DIMS, path).activate()


def test_unused_spec_input_is_not_fed(tmp_path, save_onnx):
    """Exporters drop graph inputs nothing reads; the spec still lists them and the runner still checks them."""
    spec = StageSpec("two", "vision", (TensorSpec("x", "float32", (2,)), TensorSpec("unused", "int64", (1,))),
                     (TensorSpec("y", "float32", (2,)),))
    graph_spec = StageSpec("two", "vision", spec.inputs[:1], spec.outputs)
    path = save_onnx(tmp_path / "two.onnx", graph_spec, [helper.make_node("Neg", ["x"], ["y"])])
    with OrtRunner(spec, {}, path) as runner:
        out = runner.infer({"x": np.ones(2, np.float32), "unused": np.zeros(1, np.int64)})
    np.testing.assert_array_equal(out["y"], [-1, -1])


def test_cuda_without_onnxruntime_gpu(tmp_path, save_onnx):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    path = _affine(tmp_path / "affine.onnx", save_onnx)
    with pytest.raises(ToolchainError, match="needs onnxruntime-gpu"):
        OrtRunner(STAGE, DIMS, path, device="cuda").activate()


def test_unknown_device():
    with pytest.raises(ToolchainError, match="choose one of: cpu, cuda"):
        OrtRunner(STAGE, DIMS, "x.onnx", device="tpu")
