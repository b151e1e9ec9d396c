"""graphs.preprocessing.clip_pixels_np (PIL + numpy) against transformers' CLIPImageProcessorPil, bit for bit,
and the runtime's preprocessing importing neither transformers nor torch."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphs.errors import InputError
from graphs.preprocessing import clip_pixels_np, default_clip_processor_config

ROOT = Path(__file__).resolve().parents[2]
SIZES = [(64, 96), (300, 451), (451, 300), (17, 5), (1, 900), (224, 224), (7, 7), (333, 334)]
CONFIGS = {
    "vit-l-224": default_clip_processor_config(224),
    "tiny-64": default_clip_processor_config(64),
    "vit-l-336": default_clip_processor_config(336),
    "int-sizes": {**default_clip_processor_config(224), "size": 224, "crop_size": 224},  # older configs
    "square-resize-padded-crop": {**default_clip_processor_config(32), "size": {"height": 20, "width": 40},
                                  "crop_size": {"height": 32, "width": 32}, "resample": 2},
}


def _transformers(image: np.ndarray, config: dict) -> np.ndarray:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = CLIPImageProcessorPil(**config)(images=image, input_data_format="channels_last", return_tensors="np")
    return np.ascontiguousarray(out["pixel_values"], dtype=np.float32)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_bit_for_bit_with_transformers(config):
    rng = np.random.default_rng(0)
    for hw in SIZES:
        image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        got, want = clip_pixels_np(image, CONFIGS[config]), _transformers(image, CONFIGS[config])
        assert got.dtype == np.float32 and got.shape == want.shape, (hw, got.shape, want.shape)
        assert np.array_equal(got, want), (config, hw, float(np.abs(got - want).max()))


@pytest.mark.parametrize("edit, needle", [({"size": {"longest_edge": 5}}, "size {'longest_edge': 5}"),
                                          ({"crop_size": -3}, "crop_size -3"), ({"resample": 9}, "resample 9"),
                                          ({"image_mean": [0.5]}, "mean [0.5]")])
def test_a_config_it_cannot_read_is_one_line(edit, needle):
    with pytest.raises(InputError, match="CLIP preprocessor config") as info:
        clip_pixels_np(np.zeros((8, 8, 3), np.uint8), {**default_clip_processor_config(8), **edit})
    assert needle in str(info.value)


def test_runtime_preprocessing_imports_no_transformers_or_torch(tmp_path):
    code = ("import sys, numpy as np\n"
            "sys.modules['transformers'] = None; sys.modules['torch'] = None\n"
            "from engines.host import HostIO\n"
            "from graphs.preprocessing import clip_pixels_np, default_clip_processor_config\n"
            "x = clip_pixels_np(np.zeros((30, 20, 3), np.uint8), default_clip_processor_config(224))\n"
            "assert x.shape == (1, 3, 224, 224)\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_served_request_imports_no_transformers_or_torch(export_tiny, tmp_path):
    """What `csprt serve` runs (load, warm-up with a decode step, one request) with transformers and torch
    unimportable: the runtime needs neither (startup time: README, Serving)."""
    code = ("import sys, numpy as np\n"
            "sys.modules['transformers'] = None; sys.modules['torch'] = None\n"
            "from engines.serving import load_session\n"
            f"s = load_session({str(export_tiny())!r})\n"
            "seg = s.segment(np.zeros((40, 30, 3), np.uint8), 'Where is the cat?', mode='generate', max_new_tokens=2)\n"
            "s.close()\n"
            "print('ok', len(seg.generated_ids))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]
