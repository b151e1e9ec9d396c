"""Image loading and result writing, numpy + PIL only (the ONNX Runtime side imports this without torch).

Loading always yields uint8 RGB [H, W, 3], the array LISA's `cv2.imread` + `cvtColor(BGR2RGB)` gives:
- EXIF orientation is applied, so the mask lines up with what viewers show.
- Alpha is dropped, not composited: cv2's default `IMREAD_COLOR` drops it too, so results match LISA.
- Grayscale (1-bit, L, LA) is replicated to three channels; 16-bit grayscale is scaled to 8 bits
  (v / 257, rounded, so 65535 -> 255) rather than clipped; CMYK and palette images go through PIL's RGB conversion.
- Animated files (GIF, WebP) use their first frame.
Every failure raises `InputError` with the file's name and what to do about it.

Writers are atomic: a temp file in the destination directory, then `os.replace`, so a reader never sees half a PNG.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from graphs.atomic import atomic_path
from graphs.errors import InputError
from graphs.preprocessing import check_aspect_ratio

# 64 MP (8192 x 8192): far above anything SAM (1024) or CLIP (224/336) can use, and ~200 MB as RGB.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# Encoded bytes read from a file at most: a 64 MP image is under ~200 MB even as an uncompressed PNG or BMP.
MAX_IMAGE_FILE_BYTES = 256 * 2**20

_FIX = "pass a readable JPEG, PNG or WebP image"
# What PIL raises on corrupt or truncated data during open() or load(); it is not consistent.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Load an image file as uint8 RGB.

    Args:
        path (str or PathLike): the image file (anything PIL opens: JPEG, PNG, WebP, GIF, BMP, TIFF ...).

    Returns:
        np.ndarray: uint8, shape [H, W, 3], RGB, EXIF orientation applied.

    Raises:
        InputError: missing path, a directory or other non-regular file (device, FIFO, socket), empty,
            unreadable or over `MAX_IMAGE_FILE_BYTES` file, truncated data, more than `MAX_IMAGE_PIXELS`
            pixels, or an aspect ratio over `graphs.preprocessing.MAX_ASPECT_RATIO`.
    """
    p = Path(path)
    name = str(p)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever. The checks run on
        # the opened descriptor (fstat), so the file cannot be swapped between the check and the read.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(f"image {name}: no such file; check the path") from None
    except OSError as e:
        raise InputError(f"image {name}: cannot open ({e.strerror or e}); check the path and its permissions") from None
    st = os.fstat(fd)
    problem = ("is a directory" if stat.S_ISDIR(st.st_mode)
               # /dev/zero never ends and /dev/stdin may block: only regular files are read.
               else "not a regular file (a device, pipe or socket)" if not stat.S_ISREG(st.st_mode) else "")
    if problem or st.st_size > MAX_IMAGE_FILE_BYTES:
        os.close(fd)
        raise (InputError(f"image {name}: {problem}; {_FIX} file") if problem else _file_too_large(name, st.st_size))
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(MAX_IMAGE_FILE_BYTES + 1)  # bounded even if the file grows while we read
        except OSError as e:
            raise InputError(f"image {name}: cannot read ({e.strerror or e}); check its permissions") from None
    if len(data) > MAX_IMAGE_FILE_BYTES:
        raise _file_too_large(name, len(data))
    return decode_image_bytes(data, name=name)


def decode_image_bytes(data: bytes, name: str = "request") -> np.ndarray:
    """Decode encoded image bytes (e.g. an upload) as uint8 RGB; same rules as `load_image`.

    Args:
        data (bytes): the encoded file contents.
        name (str): what to call the image in error messages. Defaults to "request".

    Returns:
        np.ndarray: uint8, shape [H, W, 3], RGB, EXIF orientation applied.
    """
    if not data:
        raise InputError(f"image {name}: file is empty (0 bytes); {_FIX}")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is stricter than PIL's warning threshold.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # header only, nothing decoded yet
            if w * h > MAX_IMAGE_PIXELS:
                raise _too_large(name, w, h)
            if w < 1 or h < 1:
                raise InputError(f"image {name}: header says {w}x{h}, an empty image; {_FIX}")
            check_aspect_ratio(h, w, f"image {name}")  # EXIF rotation keeps the ratio
            img.load()  # force a full decode now so truncated files fail here, not later
            img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:
        raise InputError(f"image {name}: too large to decode safely ({e}); downscale it below "
                         f"{MAX_IMAGE_PIXELS // 2**20} megapixels") from e
    except UnidentifiedImageError as e:
        raise InputError(f"image {name}: not an image format PIL can read; {_FIX}") from e
    except _DECODE_ERRORS as e:
        raise InputError(f"image {name}: corrupt or truncated image data ({e}); re-export or re-download it") from e
    return _to_rgb(img, name)


def _file_too_large(name: str, size: int) -> InputError:
    return InputError(f"image {name}: {size} bytes or more, over the limit of {MAX_IMAGE_FILE_BYTES} bytes; "
                      "re-encode it (JPEG, PNG or WebP) or downscale it")


def _too_large(name: str, w: int, h: int) -> InputError:
    return InputError(f"image {name}: {w}x{h} is {w * h / 2**20:.1f} megapixels, above the "
                      f"{MAX_IMAGE_PIXELS // 2**20} MP limit; downscale it first")


def _to_rgb(img: Image.Image, name: str) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3]."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # PIL's own I -> L conversion clips at 255, which turns most 16-bit images white.
        v = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.rint(v / 257.0), 0, 255).astype(np.uint8)  # [H, W]
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode == "F":
        gray = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode != "RGB":
        # RGBA/LA/P: alpha dropped (see module docstring); CMYK/YCbCr/L/1: PIL's RGB conversion.
        try:
            img = img.convert("RGB")
        except ValueError as e:
            raise InputError(f"image {name}: unsupported color mode {img.mode}; {_FIX} in RGB or grayscale") from e
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _check_mask(mask: np.ndarray, hw: tuple[int, int] | None = None) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"mask: expected a 2-D [H, W] array, got shape {tuple(mask.shape)}")
    if hw is not None and mask.shape != tuple(hw):
        raise InputError(f"mask: shape {tuple(mask.shape)} does not match the image's (H, W) {tuple(hw)}")
    return mask.astype(bool)


def mask_png_bytes(mask: np.ndarray) -> bytes:
    """A binary mask as the bytes of an 8-bit grayscale PNG with values 0 and 255: `csprt run`'s mask.png and the
    servers' `mask_png` output are these bytes.

    Args:
        mask (np.ndarray): bool (or 0/1) [H, W]; True = object.
    """
    buf = io.BytesIO()
    Image.fromarray(_check_mask(mask).astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_mask_png(mask: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a binary mask as an 8-bit grayscale PNG with values 0 and 255 (`mask_png_bytes`), atomically.

    Args:
        mask (np.ndarray): bool (or 0/1) [H, W]; True = object.
        path (str or PathLike): destination; parent directories are created.

    Returns:
        Path: the written file.
    """
    data = mask_png_bytes(mask)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """Bool masks [K, H, W] -> the servers' `masks_packed`: np.packbits in C order, big bit order, uint8
    [ceil(K*H*W / 8)] (`unpack_masks` with the shape inverts it)."""
    return np.packbits(np.asarray(masks, dtype=bool).reshape(-1))


def unpack_masks(packed: np.ndarray, shape) -> np.ndarray:
    """Inverse of `pack_masks`: `packed` and the masks' (K, H, W) -> bool [K, H, W]."""
    k, h, w = (int(s) for s in shape)
    return np.unpackbits(np.asarray(packed, np.uint8).reshape(-1), count=k * h * w).reshape(k, h, w).astype(bool)


def write_overlay_png(image: np.ndarray, mask: np.ndarray, path: str | os.PathLike,
                      color: tuple[int, int, int] = (255, 0, 0), alpha: float = 0.5) -> Path:
    """Write the image with the mask tinted: masked pixels become (1 - alpha) * pixel + alpha * color.

    Args:
        image (np.ndarray): uint8 RGB [H, W, 3].
        mask (np.ndarray): bool (or 0/1) [H, W].
        path (str or PathLike): destination; parent directories are created.
        color (tuple[int, int, int]): tint RGB. Defaults to red.
        alpha (float): tint strength in [0, 1]. Defaults to 0.5.

    Returns:
        Path: the written file.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"overlay: expected a uint8 RGB image [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"overlay: alpha must be in [0, 1], got {alpha}")
    m = _check_mask(mask, image.shape[:2])
    out = image.copy()
    tint = np.asarray(color, dtype=np.float32)
    out[m] = np.rint((1.0 - alpha) * image[m].astype(np.float32) + alpha * tint).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(out, mode="RGB")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
