"""`csprt run CHECKPOINT --schedule accm-36 --accm DIR`: a mask, and result.json with the candidates and the choice."""

import json
import re
import shutil

import pytest

from exporter.export import sample_image
from tests.cli_io import call, error_lines


@pytest.fixture(scope="module")
def cat_png(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "cat.png"
    Image.fromarray(sample_image()).save(path)
    return path


def test_run_accm_writes_mask_and_captions(tiny_accm, cat_png, tmp_path):
    ckpt, accm = tiny_accm
    rc, out, err = call(["run", str(ckpt), "--schedule", "accm-36", "--accm", str(accm), "--image", str(cat_png),
                         "--query", "Where is the cat?", "--out", str(tmp_path), "--json"])
    assert rc == 0, err
    result = json.loads(out)
    assert json.loads((tmp_path / "result.json").read_text()) == result
    a = result["accm"]
    assert len(a["candidates"]) == 3 and a["caption"] == a["candidates"][a["chosen"]]
    assert result["image_tokens_per_layer"] == [4] * 4 and len(a["picks"]) == 4
    assert (tmp_path / "mask.png").is_file() and result["schedule"]["accm"]["text_picks"] == 2


@pytest.mark.parametrize("schedule,accm,match", [
    ("accm-36", None, "needs ACCM's models: pass --accm DIR"),
    ("csp", "accm", "--accm goes with an ACCM schedule"),
    ("accm-18", "broken", "ACCM caption model not found: .*caption_model.pt"),
])
def test_run_accm_bad_input_is_one_line(tiny_accm, cat_png, tmp_path, schedule, accm, match):
    ckpt, accm_dir = tiny_accm
    argv = ["run", str(ckpt), "--schedule", schedule, "--image", str(cat_png), "--query", "Where is the cat?",
            "--out", str(tmp_path / "out")]
    if accm == "accm":
        argv += ["--accm", str(accm_dir)]
    elif accm == "broken":  # an ACCM directory without its caption model
        broken = tmp_path / "accm"
        shutil.copytree(accm_dir, broken)
        (broken / "caption_model.pt").unlink()
        argv += ["--accm", str(broken)]
    rc, _, err = call(argv)
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1, err
    assert re.search(match, lines[0]), lines[0]
