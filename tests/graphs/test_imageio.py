"""graphs.imageio: every input flavour loads as uint8 RGB [H, W, 3]; bad inputs raise InputError naming the file."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graphs import imageio
from graphs.errors import InputError
from graphs.atomic import write_json
from graphs.imageio import decode_image_bytes, load_image, write_mask_png, write_overlay_png


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(tmp_path, img: Image.Image, name: str, **kw) -> str:
    path = tmp_path / name
    img.save(path, **kw)
    return str(path)


# --- formats and modes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "bmp", "gif", "tiff"])
def test_formats_load_as_rgb(tmp_path, fmt):
    arr = _rgb(37, 53)
    out = load_image(_save(tmp_path, Image.fromarray(arr), f"x.{fmt}"))
    assert out.dtype == np.uint8 and out.shape == (37, 53, 3) and out.flags.c_contiguous
    if fmt in ("png", "bmp", "tiff"):  # lossless
        np.testing.assert_array_equal(out, arr)


def test_lossless_webp_round_trips(tmp_path):
    arr = _rgb(20, 30)
    np.testing.assert_array_equal(load_image(_save(tmp_path, Image.fromarray(arr), "x.webp", lossless=True)), arr)


def test_real_photo_jpeg_round_trip(tmp_path):
    skdata = pytest.importorskip("skimage.data")
    arr = skdata.chelsea()  # [300, 451, 3]
    out = load_image(_save(tmp_path, Image.fromarray(arr), "cat.jpg", quality=95))
    assert out.shape == arr.shape
    assert np.abs(out.astype(int) - arr).mean() < 3  # JPEG q95 is close, not exact


def test_grayscale_replicated(tmp_path):
    g = np.random.default_rng(1).integers(0, 256, (11, 7), dtype=np.uint8)
    out = load_image(_save(tmp_path, Image.fromarray(g, mode="L"), "g.png"))
    assert out.shape == (11, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_grayscale_alpha_drops_alpha(tmp_path):
    g = np.full((5, 6), 77, np.uint8)
    a = np.zeros((5, 6), np.uint8)
    out = load_image(_save(tmp_path, Image.merge("LA", [Image.fromarray(g), Image.fromarray(a)]), "la.png"))
    assert out.shape == (5, 6, 3) and (out == 77).all()


def test_one_bit(tmp_path):
    bits = np.zeros((9, 10), bool)
    bits[2:5, 3:8] = True
    out = load_image(_save(tmp_path, Image.fromarray(bits), "b.png"))
    assert out.shape == (9, 10, 3)
    np.testing.assert_array_equal(out[..., 0], np.where(bits, 255, 0))


def test_sixteen_bit_grayscale_scaled_not_clipped(tmp_path):
    v = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(v)  # mode I;16
    out = load_image(_save(tmp_path, img, "g16.png"))
    assert out.shape == (1, 4, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])


def test_rgba_drops_alpha(tmp_path):
    rgb = _rgb(8, 9)
    rgba = np.concatenate([rgb, np.zeros((8, 9, 1), np.uint8)], axis=2)  # fully transparent
    out = load_image(_save(tmp_path, Image.fromarray(rgba, mode="RGBA"), "a.png"))
    np.testing.assert_array_equal(out, rgb)  # colours kept, like cv2.imread's IMREAD_COLOR


def test_palette_with_transparency(tmp_path):
    img = Image.fromarray(_rgb(12, 13)).quantize(16)
    img.info["transparency"] = 0
    path = _save(tmp_path, img, "p.png", transparency=0)
    out = load_image(path)
    np.testing.assert_array_equal(out, np.asarray(Image.open(path).convert("RGB")))


def test_cmyk_jpeg(tmp_path):
    out = load_image(_save(tmp_path, Image.fromarray(_rgb(10, 14)).convert("CMYK"), "c.jpg"))
    assert out.shape == (10, 14, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("hw", [(1, 1), (1, 300), (300, 1), (17, 1000)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_tiny_and_extreme_aspect(tmp_path, hw):
    arr = _rgb(*hw)
    np.testing.assert_array_equal(load_image(_save(tmp_path, Image.fromarray(arr), "t.png")), arr)


def test_exif_orientation_applied(tmp_path):
    arr = _rgb(4, 6)  # stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(_save(tmp_path, Image.fromarray(arr), "o.jpg", exif=exif, quality=100))
    assert out.shape == (6, 4, 3)


def test_first_frame_of_animation(tmp_path):
    frames = [Image.fromarray(np.full((5, 5, 3), v, np.uint8)) for v in (10, 200)]
    path = tmp_path / "anim.png"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert (load_image(path) == 10).all()


def test_decode_bytes_matches_file(tmp_path):
    path = _save(tmp_path, Image.fromarray(_rgb(6, 7)), "x.png")
    np.testing.assert_array_equal(decode_image_bytes(open(path, "rb").read()), load_image(path))


def test_accepts_pathlike(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(_rgb(3, 3)).save(path)
    assert load_image(path).shape == (3, 3, 3)


# --- errors ------------------------------------------------------------------------------------------------------

def _truncated(tmp_path, fmt: str) -> str:
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return str(path)


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "garbage", "truncated_jpeg", "truncated_png",
                                  "text_file"])
def test_bad_inputs_raise_input_error_naming_path(tmp_path, case):
    if case == "missing":
        path = str(tmp_path / "nope.jpg")
    elif case == "directory":
        path = str(tmp_path)
    elif case == "empty":
        path = str(tmp_path / "empty.png")
        open(path, "wb").close()
    elif case == "garbage":
        path = str(tmp_path / "garbage.jpg")
        open(path, "wb").write(np.random.default_rng(0).bytes(4096))
    elif case == "text_file":
        path = str(tmp_path / "notes.png")
        open(path, "w").write("hello, not an image\n")
    else:
        path = _truncated(tmp_path, case.split("_")[1].upper())
    with pytest.raises(InputError) as err:
        load_image(path)
    msg = str(err.value)
    assert path in msg and "\n" not in msg


def test_decode_bytes_errors_use_name():
    with pytest.raises(InputError, match="upload.jpg"):
        decode_image_bytes(b"", name="upload.jpg")
    with pytest.raises(InputError, match="request"):
        decode_image_bytes(b"\x89PNG\r\n\x1a\n garbage")


def test_too_many_pixels_refused_before_decode(tmp_path, monkeypatch):
    monkeypatch.setattr(imageio, "MAX_IMAGE_PIXELS", 100)
    path = _save(tmp_path, Image.fromarray(_rgb(10, 11)), "big.png")
    with pytest.raises(InputError, match="megapixels") as err:
        load_image(path)
    assert path in str(err.value) and "11x10" in str(err.value)  # width x height


def test_decompression_bomb_becomes_input_error(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # PIL raises its bomb error above 2x this
    path = _save(tmp_path, Image.fromarray(_rgb(10, 11)), "bomb.png")
    with pytest.raises(InputError, match="too large") as err:
        load_image(path)
    assert path in str(err.value)


# --- writers -----------------------------------------------------------------------------------------------------

def _no_temp_files(d) -> bool:
    return not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_write_mask_png(tmp_path):
    image_path = _save(tmp_path, Image.fromarray(_rgb(21, 34)), "in.png")
    image = load_image(image_path)
    mask = np.zeros(image.shape[:2], bool)
    mask[5:10, 3:20] = True
    out = write_mask_png(mask, tmp_path / "out" / "mask.png")
    back = Image.open(out)
    assert back.mode == "L" and back.size == Image.open(image_path).size
    arr = np.asarray(back)
    assert set(np.unique(arr)) == {0, 255}
    np.testing.assert_array_equal(arr == 255, mask)
    assert _no_temp_files(out.parent)


def test_write_overlay_png(tmp_path):
    image = _rgb(12, 15)
    mask = np.zeros((12, 15), bool)
    mask[:6] = True
    out = write_overlay_png(image, mask, tmp_path / "overlay.png", color=(255, 0, 0), alpha=0.5)
    back = np.asarray(Image.open(out))
    assert back.shape == image.shape
    np.testing.assert_array_equal(back[6:], image[6:])  # untouched outside the mask
    expect = np.rint(0.5 * image[:6].astype(np.float32) + 0.5 * np.array([255, 0, 0], np.float32))
    np.testing.assert_array_equal(back[:6], expect.astype(np.uint8))
    assert _no_temp_files(tmp_path)


def test_overlay_mask_shape_mismatch(tmp_path):
    with pytest.raises(InputError, match="does not match"):
        write_overlay_png(_rgb(4, 4), np.zeros((4, 5), bool), tmp_path / "o.png")


def test_write_json_atomic_and_replaces(tmp_path):
    path = tmp_path / "result.json"
    write_json({"old": 1}, path)
    write_json({"masks": 2, "text": "ünïcode"}, path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"masks": 2, "text": "ünïcode"}
    assert _no_temp_files(tmp_path)


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "result.json"
    write_json({"ok": True}, path)
    with pytest.raises(TypeError):
        write_json({"bad": object()}, path)
    with pytest.raises(InputError):
        write_mask_png(np.zeros((2, 2, 2)), tmp_path / "m.png")
    assert json.loads(path.read_text()) == {"ok": True}
    assert _no_temp_files(tmp_path) and not (tmp_path / "m.png").exists()


def test_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import graphs.imageio, graphs.preprocessing\n"
            "import numpy as np\n"
            "graphs.preprocessing.sam_pixels_np(np.zeros((5, 7, 3), np.uint8))\n")
    repo_root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root)


# --- bounded reads (issue 15) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("special", ["/dev/zero", "/dev/null", "fifo"])
def test_non_regular_files_refused_without_reading(tmp_path, special):
    """A device never ends and a FIFO blocks its reader: both are refused at once (the test would hang otherwise)."""
    import os
    path = special
    if special == "fifo":
        path = str(tmp_path / "pipe.png")
        os.mkfifo(path)
    with pytest.raises(InputError, match="not a regular file") as err:
        load_image(path)
    assert path in str(err.value)


def test_oversized_file_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(imageio, "MAX_IMAGE_FILE_BYTES", 1000)
    path = _save(tmp_path, Image.fromarray(_rgb(40, 40)), "big.bmp")  # ~4.9 kB
    with pytest.raises(InputError, match="over the limit of 1000 bytes") as err:
        load_image(path)
    assert path in str(err.value) and "bytes" in str(err.value)


def test_aspect_ratio_over_limit_refused_from_the_header(tmp_path):
    from graphs.preprocessing import MAX_ASPECT_RATIO, sam_pixels_np
    path = _save(tmp_path, Image.fromarray(_rgb(1, MAX_ASPECT_RATIO + 1)), "strip.png")
    with pytest.raises(InputError, match="aspect ratio"):
        load_image(path)
    with pytest.raises(InputError, match="aspect ratio"):  # arrays that bypass the file loader too
        sam_pixels_np(_rgb(MAX_ASPECT_RATIO + 1, 1))
    img, hw = sam_pixels_np(_rgb(1, MAX_ASPECT_RATIO))  # the limit itself still gives SAM a row
    assert hw[0] >= 1 and img.shape == (1, 3, 1024, 1024)
