"""exporter.preprocess: LISA's CLIP/SAM preprocessing and mask postprocessing, checked against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from exporter.preprocess import binarize, clip_pixels, default_clip_processor_config, postprocess_masks, sam_pixels
from graphs.errors import InputError
from graphs.preprocessing import CLIP_MEAN, CLIP_STD, SAM_PIXEL_MEAN, SAM_PIXEL_STD, sam_resize_hw

SHAPES = [(300, 451), (451, 300), (64, 64), (1, 1), (2000, 37)]
SHAPE_IDS = ["landscape", "portrait", "square", "1x1", "tall"]


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- CLIP --------------------------------------------------------------------------------------------------------

def _clip_by_hand(image: np.ndarray, s: int) -> np.ndarray:
    """Shortest edge -> s (bicubic, long edge truncated as transformers does), center crop, /255, CLIP mean/std."""
    h, w = image.shape[:2]
    if w <= h:
        new_w, new_h = s, int(s * h / w)
    else:
        new_h, new_w = s, int(s * w / h)
    x = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - s) // 2, (new_w - s) // 2
    x = x[top:top + s, left:left + s]
    x = (x.astype(np.float64) / 255).astype(np.float32)
    x = (x - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    return x.transpose(2, 0, 1)[None]


@pytest.mark.parametrize("size", [224, 336])
@pytest.mark.parametrize("hw", SHAPES, ids=SHAPE_IDS)
def test_clip_pixels_matches_hand_computation(hw, size):
    image = _rgb(*hw)
    out = clip_pixels(image, default_clip_processor_config(size))
    assert out.dtype == torch.float32 and tuple(out.shape) == (1, 3, size, size)
    np.testing.assert_allclose(out.numpy(), _clip_by_hand(image, size), atol=1e-5, rtol=0)


def test_clip_pixels_real_photo_and_hub_style_config():
    skdata = pytest.importorskip("skimage.data")
    image = skdata.astronaut()  # [512, 512, 3]
    # The keys openai/clip-vit-large-patch14's preprocessor_config.json carries, extras included.
    cfg = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
           "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
           "image_std": list(CLIP_STD), "resample": 3, "size": 224}
    out = clip_pixels(image, cfg)
    assert tuple(out.shape) == (1, 3, 224, 224)
    np.testing.assert_allclose(out.numpy(), _clip_by_hand(image, 224), atol=1e-5, rtol=0)


def test_default_clip_config_values():
    cfg = default_clip_processor_config(336)
    assert cfg["size"] == {"shortest_edge": 336} and cfg["crop_size"] == {"height": 336, "width": 336}
    assert cfg["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert cfg["image_std"] == [0.26862954, 0.26130258, 0.27577711]
    assert cfg["resample"] == Image.Resampling.BICUBIC


# --- SAM ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("hw", "expect"), [((480, 640), (768, 1024)), ((640, 480), (1024, 768)),
                                            ((1, 1), (1024, 1024)), ((3, 1000), (3, 1024)),
                                            ((333, 1000), (341, 1024))])
def test_sam_resize_hw(hw, expect):
    assert sam_resize_hw(hw, 1024) == expect  # 333 * 1.024 = 340.99 -> int(x + 0.5) = 341


def _sam_lisa_style(image: np.ndarray, sam_size: int) -> torch.Tensor:
    """LISA chat.py: apply_image (PIL bilinear), torch uint8 - float32 mean / std, F.pad bottom/right."""
    h, w = sam_resize_hw(image.shape[:2], sam_size)
    resized = np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    x = torch.from_numpy(resized).permute(2, 0, 1).contiguous()
    x = (x - torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1)) / torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1)
    return F.pad(x, (0, sam_size - w, 0, sam_size - h))[None]


@pytest.mark.parametrize("hw", SHAPES, ids=SHAPE_IDS)
def test_sam_pixels_shape_padding_and_values(hw):
    image = _rgb(*hw)
    pixels, (h, w) = sam_pixels(image)
    assert pixels.dtype == torch.float32 and tuple(pixels.shape) == (1, 3, 1024, 1024)
    assert max(h, w) == 1024 and (h, w) == sam_resize_hw(hw)
    assert (pixels[..., h:, :] == 0).all() and (pixels[..., :, w:] == 0).all()  # padded after normalising
    torch.testing.assert_close(pixels, _sam_lisa_style(image, 1024), atol=0, rtol=0)


def test_sam_pixels_landscape_vs_portrait_orientation():
    land, (lh, lw) = sam_pixels(_rgb(300, 600), sam_size=64)
    port, (ph, pw) = sam_pixels(_rgb(600, 300), sam_size=64)
    assert (lh, lw) == (32, 64) and (ph, pw) == (64, 32)
    assert (land[..., 32:, :] == 0).all() and (land[..., :32, :] != 0).any()
    assert (port[..., :, 32:] == 0).all() and (port[..., :, :32] != 0).any()


def test_sam_pixels_constant_image_normalises_exactly():
    image = np.broadcast_to(np.array([123, 116, 103], np.uint8), (50, 80, 3)).copy()
    pixels, (h, w) = sam_pixels(image, sam_size=40)
    expect = (np.float32([123, 116, 103]) - np.float32(SAM_PIXEL_MEAN)) / np.float32(SAM_PIXEL_STD)
    for c in range(3):
        assert torch.all(pixels[0, c, :h, :w] == float(expect[c]))


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                                 np.zeros((4, 4, 4), np.uint8), np.zeros((0, 4, 3), np.uint8)],
                         ids=["gray", "float", "rgba", "empty"])
def test_preprocess_rejects_non_rgb_uint8(bad):
    with pytest.raises(InputError):
        sam_pixels(bad)
    with pytest.raises(InputError):
        clip_pixels(bad, default_clip_processor_config(224))


# --- postprocess -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(480, 640), (640, 480), (1, 1), (37, 2000)],
                         ids=["landscape", "portrait", "1x1", "wide"])
def test_postprocess_returns_original_size(hw):
    image = _rgb(*hw)
    _, resized = sam_pixels(image)
    logits = torch.randn(3, 256, 256)
    out = postprocess_masks(logits, resized, hw, 1024)
    assert out.dtype == torch.float32 and tuple(out.shape) == (3, *hw)
    assert binarize(out).dtype == torch.bool and binarize(out).shape == out.shape


def test_postprocess_round_trips_a_synthetic_mask():
    """A box drawn in original-image coordinates, pushed into SAM's low-res frame, comes back at the same place."""
    H, W, S, low = 480, 640, 1024, 256
    h, w = sam_resize_hw((H, W), S)  # (768, 1024)
    truth = torch.zeros(H, W, dtype=torch.bool)
    truth[100:300, 200:500] = True
    # Into SAM's frame: resize to (h', w'), pad to S, downsample to 256 (what the mask decoder's grid means).
    frame = torch.full((1, 1, S, S), -10.0)
    frame[..., :h, :w] = F.interpolate(truth[None, None].float() * 20 - 10, (h, w), mode="bilinear",
                                       align_corners=False)
    low_res = F.interpolate(frame, (low, low), mode="bilinear", align_corners=False)[:, 0]  # [1, 256, 256]
    mask = binarize(postprocess_masks(low_res, (h, w), (H, W), S))[0]
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.98
    assert not mask[:90].any() and not mask[:, :190].any()  # nothing leaks from the padding side


def test_postprocess_constant_logits_stay_constant():
    out = postprocess_masks(torch.full((2, 256, 256), 2.5), (768, 1024), (480, 640), 1024)
    assert torch.all(out == 2.5)


def test_postprocess_matches_lisa_formula():
    logits = torch.randn(2, 256, 256, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(logits[:, None], (1024, 1024), mode="bilinear", align_corners=False)
    ref = F.interpolate(ref[..., :683, :1024], (400, 600), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(postprocess_masks(logits, (683, 1024), (400, 600)), ref, atol=0, rtol=0)


def test_postprocess_rejects_bad_shapes():
    with pytest.raises(InputError, match=r"\[K, h, w\]"):
        postprocess_masks(torch.zeros(1, 1, 256, 256), (768, 1024), (480, 640))
    with pytest.raises(InputError, match="sam_size"):
        postprocess_masks(torch.zeros(1, 256, 256), (768, 2048), (480, 640))
