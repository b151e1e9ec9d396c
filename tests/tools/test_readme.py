"""The README's two commands stay true: they are the scripts CI and new users run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands():
    block = re.search(r"## Two commands\n.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_names_the_demo_and_test_scripts_and_ci_runs_the_test_one():
    assert _readme_commands() == ["bash .ci/demo", "bash .ci/test"]
    assert "bash .ci/test" in (ROOT / ".ci/run").read_text()


def test_demo_command_runs_end_to_end(tmp_path):
    # Setup is skipped (this interpreter already has everything); the rest is the README command as is.
    env = {**os.environ, "CSPRT_SKIP_SETUP": "1", "CSPRT_PYTHON": sys.executable, "DEMO_OUT": str(tmp_path)}
    proc = subprocess.run(["bash", ".ci/demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "result/result.json").read_text())
    photo = Image.open(tmp_path / "chelsea.png")
    mask = Image.open(tmp_path / "result/mask.png")
    assert mask.size == photo.size == (451, 300)
    assert result["num_seg"] == 1 and result["schedule"]["name"] == "csp"
    assert result["backend"] == "onnxruntime"  # the embedded default, from the exported artifact
    assert (tmp_path / "artifact/manifest.json").is_file()
    assert result["image_tokens_per_layer"] == [16, 64, 16, 16]  # tiny csp: cluster 1 layer, scatter 1, prune 2
    assert 0 < result["mask_area"] < photo.size[0] * photo.size[1]
