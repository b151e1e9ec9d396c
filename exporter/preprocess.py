"""LISA's preprocessing and postprocessing as torch tensors (the reference the exported graphs are fed with).

The pixel math lives once, in numpy, in `graphs/preprocessing.py` (the ONNX Runtime side uses it without
torch); here it is only wrapped into tensors. Postprocessing is torch's `F.interpolate`, exactly as LISA's
`postprocess_masks`:

    low-res logits [K, h, w] -> bilinear to [K, S, S] -> crop [:h', :w'] (drop SAM's padding)
                             -> bilinear to [K, H, W] -> binarize: logits > 0
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from graphs.errors import InputError
from graphs.preprocessing import (
    SAM_IMAGE_SIZE,
    clip_pixels_np,
    default_clip_processor_config,
    sam_pixels_np,
)

__all__ = ["binarize", "clip_pixels", "default_clip_processor_config", "postprocess_masks", "sam_pixels"]


def clip_pixels(image: np.ndarray, processor_config: dict) -> torch.Tensor:
    """CLIP pixel values via transformers' `CLIPImageProcessorPil` (no torchvision needed).

    Args:
        image (np.ndarray): uint8 RGB image, shape [H, W, 3].
        processor_config (dict): a CLIP `preprocessor_config.json` as a dict; see
            `default_clip_processor_config`.

    Returns:
        torch.Tensor: float32, shape [1, 3, S, S].
    """
    return torch.from_numpy(clip_pixels_np(image, processor_config))


def sam_pixels(image: np.ndarray, sam_size: int = SAM_IMAGE_SIZE) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM pixel values: resize longest side to `sam_size`, normalise, zero-pad bottom/right.

    Args:
        image (np.ndarray): uint8 RGB image, shape [H, W, 3].
        sam_size (int): SAM's square input side. Defaults to 1024.

    Returns:
        tuple[torch.Tensor, tuple[int, int]]: float32 pixels [1, 3, sam_size, sam_size], and the resized (h', w').
    """
    pixels, resized_hw = sam_pixels_np(image, sam_size)
    return torch.from_numpy(pixels), resized_hw


def postprocess_masks(low_res_logits: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int],
                      sam_size: int = SAM_IMAGE_SIZE) -> torch.Tensor:
    """Upsample SAM's low-res mask logits back to the original image (LISA `postprocess_masks`).

    Args:
        low_res_logits (torch.Tensor): float mask logits, shape [K, h, w] (K masks, h = w = 256 for SAM).
        resized_hw (tuple[int, int]): (h', w') returned by `sam_pixels`, the unpadded part of the SAM input.
        original_hw (tuple[int, int]): the original image (H, W).
        sam_size (int): SAM's square input side. Defaults to 1024.

    Returns:
        torch.Tensor: float32 logits, shape [K, H, W]; `binarize` turns them into masks.
    """
    if low_res_logits.ndim != 3:
        raise InputError(f"postprocess_masks: low_res_logits must be [K, h, w], "
                         f"got shape {tuple(low_res_logits.shape)}")
    h, w = resized_hw
    if not (0 < h <= sam_size and 0 < w <= sam_size):
        raise InputError(f"postprocess_masks: resized_hw {tuple(resized_hw)} must lie within sam_size {sam_size}")
    x = low_res_logits.float().unsqueeze(1)  # [K, 1, h, w]: interpolate wants a channel dim
    x = F.interpolate(x, (sam_size, sam_size), mode="bilinear", align_corners=False)  # [K, 1, S, S]
    x = x[..., :h, :w]  # [K, 1, h', w']: drop the zero padding sam_pixels added
    x = F.interpolate(x, tuple(int(v) for v in original_hw), mode="bilinear", align_corners=False)  # [K, 1, H, W]
    return x[:, 0]


def binarize(logits: torch.Tensor) -> torch.Tensor:
    """Masks from logits, as LISA thresholds them.

    Args:
        logits (torch.Tensor): float mask logits, any shape (e.g. [K, H, W]).

    Returns:
        torch.Tensor: bool, same shape; True where logits > 0.
    """
    return logits > 0
