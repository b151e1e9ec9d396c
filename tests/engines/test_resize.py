"""graphs.preprocessing.resize_bilinear_np against torch's F.interpolate, and the host mask path against LISA's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exporter.preprocess import postprocess_masks
from graphs.errors import InputError
from graphs.preprocessing import resize_bilinear_np

SIZES_IN = [(7, 9), (64, 64), (256, 256), (1, 1), (5, 1), (33, 17)]
SIZES_OUT = [(1, 1), (3, 5), (13, 7), (64, 64), (100, 37), (599, 853), (2, 1000)]


@pytest.mark.parametrize("in_hw", SIZES_IN, ids=lambda s: f"in{s[0]}x{s[1]}")
def test_matches_torch(in_hw):
    x = 5 * np.random.default_rng(0).standard_normal((3, *in_hw)).astype(np.float32)
    for out_hw in SIZES_OUT:
        want = F.interpolate(torch.from_numpy(x)[:, None], out_hw, mode="bilinear", align_corners=False)[:, 0]
        got = resize_bilinear_np(x, out_hw)
        assert got.dtype == np.float32 and got.shape == (3, *out_hw)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0, err_msg=f"{in_hw} -> {out_hw}")


@pytest.mark.parametrize("resized_hw,original_hw", [((96, 128), (300, 401)), ((128, 85), (451, 300)),
                                                    ((128, 128), (64, 64)), ((1, 128), (1, 2000)),
                                                    ((77, 128), (77, 128))],
                         ids=["landscape-up", "portrait-up", "square-down", "1-row", "same-size"])
def test_host_mask_path_matches_postprocess_masks(resized_hw, original_hw):
    """The graph upsamples low-res logits to S x S; the host crops and resizes. Together: LISA's postprocess_masks."""
    s = 128
    low_res = torch.from_numpy(3 * np.random.default_rng(1).standard_normal((2, 32, 32)).astype(np.float32))
    want = postprocess_masks(low_res, resized_hw, original_hw, sam_size=s).numpy()
    padded = F.interpolate(low_res[:, None], (s, s), mode="bilinear", align_corners=False)[:, 0].numpy()  # in-graph
    h, w = resized_hw
    got = resize_bilinear_np(padded[:, :h, :w], original_hw)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_rejects_bad_shapes():
    with pytest.raises(InputError, match=r"expected maps \[K, h, w\]"):
        resize_bilinear_np(np.zeros((4, 4), np.float32), (2, 2))
    with pytest.raises(InputError, match="cannot resize"):
        resize_bilinear_np(np.zeros((1, 4, 4), np.float32), (0, 2))
