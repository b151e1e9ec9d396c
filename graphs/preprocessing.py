"""LISA's image preprocessing, in numpy + PIL so the torch exporter and the ONNX Runtime side share it.

    image uint8 [H, W, 3] --+-- CLIP processor: resize shortest edge S (bicubic), center crop S, /255, CLIP mean/std
                            |       -> [1, 3, S, S] float32                                   (clip_pixels_np)
                            +-- SAM: resize longest side 1024 (PIL bilinear), SAM mean/std, pad bottom/right 0
                                    -> [1, 3, 1024, 1024] float32 and the resized (h', w')    (sam_pixels_np)

Postprocessing (bilinear upsampling of the mask logits) stays in torch (`exporter/preprocess.py`): a numpy
twin of `F.interpolate` differs from it in the last bits and sometimes by 1e-3 where float rounding picks a
different source pixel, so it would not be one implementation.

No torch and no transformers here: the CLIP processor is rebuilt in PIL + numpy (`clip_pixels_np`), held
bit for bit to transformers' `CLIPImageProcessorPil` by the tests.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from graphs.errors import InputError

# segment-anything `Sam.pixel_mean` / `pixel_std`, on the 0-255 scale (LISA copies them unchanged).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
SAM_IMAGE_SIZE = 1024

# OpenAI CLIP normalisation on the 0-1 scale (transformers `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_RESAMPLE_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as stored in preprocessor_config.json


def default_clip_processor_config(image_size: int = 224) -> dict:
    """The `preprocessor_config.json` of openai/clip-vit-large-patch14(-336) with the size swapped in.

    Args:
        image_size (int): the CLIP input side S (224 for ViT-L/14, 336 for ViT-L/14-336). Defaults to 224.
    """
    return {
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": CLIP_RESAMPLE_BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
        "image_processor_type": "CLIPImageProcessor",
    }


def check_rgb_uint8(image: np.ndarray, what: str = "image") -> None:
    """Raise InputError unless `image` is a uint8 [H, W, 3] array (what `graphs.imageio.load_image` returns)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"{what}: expected a uint8 RGB array [H, W, 3], got {got}; "
                         "load it with graphs.imageio.load_image")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InputError(f"{what}: image is empty ({image.shape[0]}x{image.shape[1]})")
    check_aspect_ratio(int(image.shape[0]), int(image.shape[1]), what)


# CLIP resizes the *shortest* side to 224, so a 1 x 10^6 strip would become a 224 x 2.2*10^8 image (150 GB) before
# its crop, and SAM's longest-side resize rounds the short side of anything past 2048:1 to 0 rows. 1000:1 leaves
# SAM one row and CLIP a 50 MP (150 MB) intermediate, far beyond any panorama a segmentation prompt is about.
MAX_ASPECT_RATIO = 1000


def check_aspect_ratio(h: int, w: int, what: str = "image") -> None:
    """Raise InputError when the longer side is over MAX_ASPECT_RATIO times the shorter (before any resize)."""
    if max(h, w) > MAX_ASPECT_RATIO * min(h, w):
        raise InputError(f"{what}: {w}x{h} has an aspect ratio of {max(h, w) / min(h, w):.0f}:1, over the "
                         f"{MAX_ASPECT_RATIO}:1 limit; crop it to the region of interest first")


def clip_pixels_np(image: np.ndarray, processor_config: dict) -> np.ndarray:
    """CLIP pixel values exactly as LISA computes them (`CLIPImageProcessor.preprocess`), in PIL and numpy.

    The steps and their arithmetic are transformers' PIL backend (`CLIPImageProcessorPil`): shortest edge to
    `size` with `int(size * long / short)` for the other (PIL, the config's resample), center crop (zero padding
    when smaller), `x.astype(float64) * rescale_factor` cast to float32, then `(x - mean) / std` in float32.
    tests/graphs/test_clip_preprocessing.py holds it to transformers' own output, bit for bit; the runtime never
    imports transformers (nor, through it, torch).

    Args:
        image (np.ndarray): uint8 RGB image, shape [H, W, 3].
        processor_config (dict): a CLIP `preprocessor_config.json` as a dict, e.g. from
            `default_clip_processor_config(224)`.

    Returns:
        np.ndarray: float32, shape [1, 3, S, S] with S the config's crop size.
    """
    check_rgb_uint8(image)
    cfg = clip_processor_settings(processor_config)
    x = image
    if cfg["do_resize"]:
        x = np.asarray(Image.fromarray(x).resize(_clip_resize_wh(x.shape[:2], cfg["size"]), resample=cfg["resample"]))
    x = np.moveaxis(x, -1, 0)  # [3, H, W]
    if cfg["do_center_crop"]:
        x = _center_crop(x, cfg["crop_size"])
    if cfg["do_rescale"]:
        x = (x.astype(np.float64) * cfg["rescale_factor"]).astype(np.float32)
    if cfg["do_normalize"]:
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        mean, std = np.array(cfg["image_mean"], dtype=x.dtype), np.array(cfg["image_std"], dtype=x.dtype)
        x = ((x.T - mean) / std).T
    return np.ascontiguousarray(x[None], dtype=np.float32)


def clip_processor_settings(config: dict) -> dict:
    """A CLIP processor config with transformers' defaults filled in and its older int forms (`size: 224`,
    `crop_size: 224`) read as transformers reads them; InputError naming the key for what it cannot mean."""
    defaults = default_clip_processor_config(224)
    cfg = {k: config.get(k, defaults[k]) for k in defaults}
    size, crop = cfg["size"], cfg["crop_size"]
    cfg["size"] = {"shortest_edge": size} if isinstance(size, int) else size
    cfg["crop_size"] = {"height": crop, "width": crop} if isinstance(crop, int) else crop
    ok = (isinstance(cfg["size"], dict) and set(cfg["size"]) in ({"shortest_edge"}, {"height", "width"})
          and all(isinstance(v, int) and v > 0 for v in cfg["size"].values())
          and isinstance(cfg["crop_size"], dict) and set(cfg["crop_size"]) == {"height", "width"}
          and all(isinstance(v, int) and v > 0 for v in cfg["crop_size"].values())
          and cfg["resample"] in range(6) and all(len(cfg[k]) == 3 for k in ("image_mean", "image_std")))
    if not ok:
        raise InputError(f"CLIP preprocessor config: size {size!r}, crop_size {crop!r}, resample {cfg['resample']!r}, "
                         f"mean {cfg['image_mean']!r}, std {cfg['image_std']!r} are not a CLIP image processor's "
                         "(expected size {shortest_edge} or {height, width}, crop_size {height, width}, a PIL resample "
                         "0-5, 3 means and stds); re-export from a checkpoint with CLIP's preprocessor_config.json")
    return cfg


def _clip_resize_wh(hw: tuple[int, int], size: dict) -> tuple[int, int]:
    """PIL (width, height) of transformers' `get_resize_output_image_size(default_to_square=False)`."""
    if "shortest_edge" not in size:
        return size["width"], size["height"]
    h, w = hw
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def _center_crop(x: np.ndarray, crop: dict) -> np.ndarray:
    """transformers' `center_crop` on [C, H, W]: top-left at ((H - h) // 2, (W - w) // 2), zero padding around
    an image smaller than the crop."""
    (c, h0, w0), h, w = x.shape, crop["height"], crop["width"]
    top, left = (h0 - h) // 2, (w0 - w) // 2
    if top >= 0 and left >= 0:
        return x[:, top:top + h, left:left + w]
    nh, nw = max(h, h0), max(w, w0)
    out = np.zeros((c, nh, nw), dtype=x.dtype)
    tp, lp = -(-(nh - h0) // 2), -(-(nw - w0) // 2)  # ceil
    out[:, tp:tp + h0, lp:lp + w0] = x
    top, left = top + tp, left + lp
    return out[:, max(0, top):min(nh, top + h), max(0, left):min(nw, left + w)]


def sam_resize_hw(hw: tuple[int, int], sam_size: int = SAM_IMAGE_SIZE) -> tuple[int, int]:
    """segment-anything `ResizeLongestSide.get_preprocess_shape`: the longest side becomes `sam_size`.

    Args:
        hw (tuple[int, int]): original (height, width).
        sam_size (int): SAM's square input side. Defaults to 1024.

    Returns:
        tuple[int, int]: resized (height, width); rounding is segment-anything's `int(x * scale + 0.5)`.
    """
    h, w = hw
    scale = sam_size * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def sam_pixels_np(image: np.ndarray, sam_size: int = SAM_IMAGE_SIZE) -> tuple[np.ndarray, tuple[int, int]]:
    """SAM pixel values as LISA computes them: ResizeLongestSide, normalise, then zero-pad bottom/right.

    Args:
        image (np.ndarray): uint8 RGB image, shape [H, W, 3].
        sam_size (int): SAM's square input side. Defaults to 1024.

    Returns:
        tuple[np.ndarray, tuple[int, int]]: float32 pixels of shape [1, 3, sam_size, sam_size], and the
        resized (h', w') that `postprocess_masks` crops back to.
    """
    check_rgb_uint8(image)
    new_h, new_w = sam_resize_hw(image.shape[:2], sam_size)
    # PIL bilinear on uint8, as segment-anything's `resize(to_pil_image(image), target_size)` does.
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))  # [h', w', 3]
    mean = np.asarray(SAM_PIXEL_MEAN, dtype=np.float32)
    std = np.asarray(SAM_PIXEL_STD, dtype=np.float32)
    # float32 throughout, like torch's uint8 - float32 tensor promotion in LISA's `preprocess`.
    normed = (resized.astype(np.float32) - mean) / std  # [h', w', 3]
    out = np.zeros((1, 3, sam_size, sam_size), dtype=np.float32)
    # Padding after normalising, as LISA does: the pad region is 0, not -mean/std.
    out[0, :, :new_h, :new_w] = normed.transpose(2, 0, 1)
    return out, (new_h, new_w)


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights along one axis, as torch's CPU `upsample_bilinear2d` computes them.

    align_corners=False: half-pixel centres, src = scale * (dst + 0.5) - 0.5 with the float32
    scale = in / out, clamped at 0; the upper tap is clamped to the edge. torch's compiled kernel
    fuses the multiply-add (one rounding), which float64 arithmetic rounded once to float32 reproduces.
    """
    if in_size == out_size:  # torch copies rather than interpolates
        idx = np.arange(out_size)
        return idx, idx, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    src = (scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)  # truncation == floor here (src >= 0)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


def resize_bilinear_np(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a stack of maps, matching `F.interpolate(mode="bilinear", align_corners=False)`.

    No antialiasing (as torch's default), so downsizing samples rather than averages, like LISA's
    `postprocess_masks`. Agrees with torch to float32 rounding (~1e-6 relative).

    Args:
        x (np.ndarray): float maps, shape [K, h, w].
        out_hw (tuple[int, int]): output (H, W).

    Returns:
        np.ndarray: float32, shape [K, H, W].
    """
    if x.ndim != 3:
        raise InputError(f"resize_bilinear_np: expected maps [K, h, w], got shape {tuple(x.shape)}")
    out_h, out_w = (int(v) for v in out_hw)
    if out_h < 1 or out_w < 1 or x.shape[1] < 1 or x.shape[2] < 1:
        raise InputError(f"resize_bilinear_np: cannot resize {tuple(x.shape[1:])} to {(out_h, out_w)}")
    x = x.astype(np.float32, copy=False)
    r0, r1, rw0, rw1 = _linear_taps(x.shape[1], out_h)
    c0, c1, cw0, cw1 = _linear_taps(x.shape[2], out_w)
    top, bottom = x[:, r0], x[:, r1]  # [K, H, w]
    # Row blend of column blends, the order torch's generic N-d kernel nests them in.
    top = top[:, :, c0] * cw0 + top[:, :, c1] * cw1  # [K, H, W]
    bottom = bottom[:, :, c0] * cw0 + bottom[:, :, c1] * cw1
    return (top * rw0[:, None] + bottom * rw1[:, None]).astype(np.float32, copy=False)
