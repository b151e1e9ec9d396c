"""Selection on planted exact ties: torch, ONNX Runtime (and TensorRT-RTX's parser) agree, lower index first."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import pytest
import torch

from exporter import selection
from graphs.onnx_checks import check_trt_ops

N, D, K, GRID = 36, 4, 5, 6  # N > 25: torch.cdist then takes its exportable matmul path


class _Ties(torch.nn.Module):
    def forward(self, scores, rows, feats):
        return (selection.topk_sorted(scores, K), selection.first_argmax(rows, dim=-1),
                selection.first_argmax(rows, dim=0), selection.kmeans_indices(feats, K, 2),
                selection.kcenter_indices(feats, GRID, K, 0.5),
                selection.assign_to_representatives(feats, selection.uniform_indices(N, K)))


def _planted():
    scores = torch.tensor([3, 1, 3, 2, 3, 3, 0, 2, 3, 1, 2, 2] * 3, dtype=torch.float32)  # fifteen 3s for 5 slots
    rows = torch.tensor([[1, 4, 4, 0], [7, 7, 7, 7], [7, 2, 9, 9], [5, 5, 1, 5]], dtype=torch.float32)
    feats = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]] * (N // 2), dtype=torch.float32)  # two directions, 18 copies each
    return scores, rows, feats


def test_ties_go_to_the_lower_index():
    scores, rows, feats = _planted()
    assert selection.topk_sorted(scores, K).tolist() == [0, 2, 4, 5, 8]  # the other ten 3s lose on index
    assert selection.first_argmax(rows, dim=-1).tolist() == [1, 0, 2, 0]
    assert selection.first_argmax(rows, dim=0).tolist() == [1, 1, 2, 2]  # column 0: rows 1 and 2 tie
    assert selection.argmax_1d(torch.tensor([2.0, 5.0, 5.0])).item() == 1
    assert selection.first_argmax(torch.full((1, 3), float("nan")), dim=-1).tolist() == [0]  # a valid index


def test_rank_is_a_permutation_even_with_ties():
    r = selection.rank_desc(torch.tensor([1.0, 1.0, 2.0, 1.0]))
    assert r.tolist() == [1.0, 2.0, 0.0, 3.0]


@pytest.fixture(scope="module")
def ties_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("ties") / "ties.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Ties(), _planted(), str(path), dynamo=True, opset_version=18,
                          input_names=["scores", "rows", "feats"], verbose=False)
    return path


def test_onnxruntime_equals_torch_on_exact_ties(ties_onnx):
    import onnxruntime as ort

    expected = [t.numpy() for t in _Ties()(*_planted())]
    sess = ort.InferenceSession(str(ties_onnx), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: t.numpy() for n, t in zip(("scores", "rows", "feats"), _planted())})
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)
    check_trt_ops(onnx.load(str(ties_onnx)), "ties.onnx")  # only ops TensorRT imports, in forms it takes


@pytest.mark.trt
def test_tensorrt_parses_the_tie_safe_graph(ties_onnx):
    from engines.build import CaptureLogger, NetworkFromOnnx
    from engines.trt import load_trt

    trt = load_trt("auto")[0]
    builder, network, parser = NetworkFromOnnx(trt, ties_onnx, CaptureLogger(trt), "ties")()
    assert network.num_outputs == 6
