"""`csprt run` end to end on the make-tiny checkpoint: outputs on real photos, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.cli_io import call, error_lines
from tools import cli

REPO = Path(__file__).resolve().parents[2]
QUERY = "Where is the cat?"


@pytest.fixture(autouse=True)
def only_run(monkeypatch):
    # Register only this subcommand, so these tests do not depend on the other tools' imports.
    monkeypatch.setattr(cli, "COMMANDS", {"run": "tools.run"})






def chelsea() -> np.ndarray:
    from skimage import data

    return data.chelsea()  # 300 x 451 RGB photo


# --- happy path ------------------------------------------------------------------------------------------------


def _jpeg(path: Path) -> Path:
    path = path.with_suffix(".jpg")
    Image.fromarray(chelsea()).save(path, format="JPEG", quality=90)
    return path


def _gray_png(path: Path) -> Path:
    path = path.with_suffix(".png")
    Image.fromarray(chelsea()).convert("L").crop((40, 10, 277, 133)).save(path, format="PNG")  # 237 x 123, L
    return path


def _rgba_webp(path: Path) -> Path:
    path = path.with_suffix(".webp")
    rgb = Image.fromarray(chelsea()).resize((150, 210))  # portrait 150 x 210
    alpha = Image.linear_gradient("L").resize(rgb.size)
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    rgba.save(path, format="WEBP", lossless=True)
    return path


# (image writer, expected PIL mode of the saved input, schedule preset)
INPUTS = {
    "jpeg": (_jpeg, "RGB", "csp"),
    "gray-png": (_gray_png, "L", "csp-70"),
    "rgba-webp": (_rgba_webp, "RGBA", "fastv"),
}


@pytest.fixture(scope="module")
def runs(tiny_ckpt, tmp_path_factory):
    """One successful single-pass run per input kind: {kind: (image path, out dir, result, stdout)}."""
    root = tmp_path_factory.mktemp("run_ok")
    done = {}
    for kind, (write, mode, preset) in INPUTS.items():
        image = write(root / kind)
        with Image.open(image) as im:
            assert im.mode == mode
        out = root / f"out_{kind}"
        rc, stdout, stderr = call(["run", str(tiny_ckpt), "--image", str(image), "--query", QUERY,
                                   "--schedule", preset, "--out", str(out), "--json"])
        assert rc == 0, stderr
        assert "Traceback" not in stderr and error_lines(stderr) == [], stderr
        done[kind] = (image, out, json.loads(stdout), preset)
    return done


@pytest.mark.parametrize("kind", list(INPUTS))
def test_result_json(runs, kind):
    image, out, printed, preset = runs[kind]
    result = json.loads((out / "result.json").read_text())
    assert printed == result  # --json prints exactly what was written
    assert {"answer", "num_seg", "mask_area", "timings_ms", "schedule"} <= set(result)
    assert isinstance(result["answer"], str)
    assert isinstance(result["num_seg"], int) and result["num_seg"] >= 0
    assert result["schedule"]["name"] == preset
    assert result["timings_ms"] and all(isinstance(v, (int, float)) and v >= 0 for v in result["timings_ms"].values())
    assert result["mode"] == "single-pass" and result["backend"] == "torch"
    with Image.open(image) as im:
        assert result["image_size"] == list(im.size)
    assert len(result["mask_areas"]) == result["num_seg"]


@pytest.mark.parametrize("kind", list(INPUTS))
def test_mask_and_overlay_match_input(runs, kind):
    from graphs.imageio import load_image

    image, out, _, _ = runs[kind]
    result = json.loads((out / "result.json").read_text())
    with Image.open(image) as src, Image.open(out / "mask.png") as mask_img, Image.open(out / "overlay.png") as ov:
        assert mask_img.size == src.size and ov.size == src.size
        assert mask_img.mode == "L" and ov.mode == "RGB"
        mask = np.asarray(mask_img)
        overlay = np.asarray(ov)
    assert set(np.unique(mask).tolist()) <= {0, 255}
    assert result["mask_area"] == int((mask == 255).sum())
    assert result["mask_area"] <= sum(result["mask_areas"])
    # Outside the mask the overlay is the decoded input untouched; inside it is tinted towards red.
    rgb = load_image(image)
    outside = mask == 0
    np.testing.assert_array_equal(overlay[outside], rgb[outside])
    inside = ~outside
    if inside.any():
        assert (overlay[inside][:, 0].astype(int) >= rgb[inside][:, 0].astype(int) - 1).all()


def test_no_files_left_behind(runs):
    for _, out, _, _ in runs.values():
        assert sorted(p.name for p in out.iterdir()) == ["mask.png", "overlay.png", "result.json"]  # no temp files


def test_generate_mode(tiny_ckpt, tmp_path):
    image = _jpeg(tmp_path / "cat")
    out = tmp_path / "out"
    rc, stdout, stderr = call(["run", str(tiny_ckpt), "--image", str(image), "--query", QUERY, "--mode", "generate",
                               "--max-new-tokens", "3", "--out", str(out), "--json"])
    assert rc == 0, stderr
    result = json.loads(stdout)
    assert result["mode"] == "generate"
    assert isinstance(result["generated_ids"], list) and len(result["generated_ids"]) <= 3
    assert all(isinstance(t, int) for t in result["generated_ids"])
    with Image.open(out / "mask.png") as m:
        assert m.size == (451, 300)
        assert result["mask_area"] == int((np.asarray(m) == 255).sum())


def test_human_output(tiny_ckpt, tmp_path, capsys):
    image = _gray_png(tmp_path / "cat")
    assert cli.main(["run", str(tiny_ckpt), "--image", str(image), "--query", QUERY, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("answer: ") and "mask area:" in out and str(tmp_path / "o") in out


def test_several_queries_encode_the_image_once(export_tiny, tmp_path):
    """--query x3 on an artifact: OUT/result_<n>/, the image-only stages run for the first only, and every answer
    equals a run of that query alone, bit for bit (mask.png, ids, mask area)."""
    art, image = export_tiny("csp", "both"), _jpeg(tmp_path / "cat")
    queries = [QUERY, "What would you drink from?", QUERY]
    for mode in ("single-pass",):  # both modes, bit for bit: tests/engines/test_image_cache.py
        out = tmp_path / mode
        rc, stdout, stderr = call(["run", str(art), "--image", str(image), *sum((["--query", q] for q in queries), []),
                                   "--mode", mode, "--max-new-tokens", "4", "--out", str(out), "--json"])
        assert rc == 0, stderr
        results = json.loads(stdout)
        assert [r["query"] for r in results] == queries and sorted(p.name for p in out.iterdir()) == [
            "result_1", "result_2", "result_3"]
        assert [r["image_cache"] for r in results] == ["miss", "hit", "hit"]
        assert ["vision" in r["timings_ms"] for r in results] == [True, False, False]
        alone = tmp_path / f"{mode}-alone"
        rc, stdout, stderr = call(["run", str(art), "--image", str(image), "--query", queries[1], "--mode", mode,
                                   "--max-new-tokens", "4", "--out", str(alone), "--json"])
        assert rc == 0, stderr
        single = json.loads(stdout)
        assert (out / "result_2" / "mask.png").read_bytes() == (alone / "mask.png").read_bytes()
        assert {k: results[1][k] for k in ("answer", "generated_ids", "mask_areas")} == {
            k: single[k] for k in ("answer", "generated_ids", "mask_areas")}
        assert (out / "result_3" / "mask.png").read_bytes() == (out / "result_1" / "mask.png").read_bytes()
        assert results[0]["num_seg"] >= 1


def test_requests_run_in_batches_each_as_alone(export_tiny, tmp_path):
    """Three --image/--query pairs in batches of 2 (then --jsonl): result_<n>/ per request, each what the request
    gives alone (mask.png bytes, ids); --batch over the exported maximum is one line naming --max-batch."""
    art = export_tiny("csp", "both")
    cat = _jpeg(tmp_path / "cat")
    gray = _gray_png(tmp_path / "gray")
    pairs = [(cat, QUERY), (gray, "What would you drink from?"), (cat, "The left ear")]
    out = tmp_path / "batched"
    argv = sum((["--image", str(i), "--query", q] for i, q in pairs), [])
    rc, stdout, stderr = call(["run", str(art), *argv, "--batch", "2", "--out", str(out), "--json"])
    assert rc == 0, stderr
    results = json.loads(stdout)
    assert [r["query"] for r in results] == [q for _, q in pairs] and [r["batch"] for r in results] == [2, 2, 1]
    assert [r["image"] for r in results] == [str(i) for i, _ in pairs]
    assert [r["image_cache"] for r in results] == ["miss", "miss", "hit"]  # the cat's encoding is kept
    for n, (image, query) in enumerate(pairs, 1):
        alone = tmp_path / f"alone_{n}"
        rc, stdout, stderr = call(["run", str(art), "--image", str(image), "--query", query, "--out", str(alone),
                                   "--json"])
        assert rc == 0, stderr
        single = json.loads(stdout)
        assert (out / f"result_{n}" / "mask.png").read_bytes() == (alone / "mask.png").read_bytes()
        assert results[n - 1]["mask_areas"] == single["mask_areas"] and results[n - 1]["num_seg"] == 1
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text("".join(json.dumps({"image": i.name, "query": q}) + "\n" for i, q in pairs))  # relative
    rc, stdout, stderr = call(["run", str(art), "--jsonl", str(jsonl), "--out", str(tmp_path / "jsonl"), "--json"])
    assert rc == 0, stderr
    assert [r["mask_areas"] for r in json.loads(stdout)] == [r["mask_areas"] for r in results]
    rc, _, stderr = call(["run", str(art), *argv, "--batch", "9", "--out", str(tmp_path / "nine")])
    line = assert_one_line_error(rc, stderr, ["a batch of 9 requests", "maximum of 8", "--max-batch 9"])
    assert "csprt export" in line
    rc, _, stderr = call(["run", str(art), "--image", str(cat), "--image", str(gray), "--query", QUERY,
                          "--query", QUERY, "--query", QUERY, "--out", str(tmp_path / "odd")])
    assert_one_line_error(rc, stderr, ["--image given 2 times and --query 3 times"])


# --- bad input -------------------------------------------------------------------------------------------------


def _copy_ckpt(tiny_ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def case_no_ckpt(tiny_ckpt, tmp_path):
    return tmp_path / "does-not-exist", {}, ["checkpoint directory not found", "does-not-exist"]


def case_corrupt_weights(tiny_ckpt, tmp_path):
    ckpt = _copy_ckpt(tiny_ckpt, tmp_path)
    shard = sorted(ckpt.glob("pytorch_model-*-of-*.bin"))[0]  # LISA's .bin shards
    shard.write_bytes(os.urandom(64) + b"\x00garbage" * 100)
    return ckpt, {}, [shard.name, "corrupt"]


def case_no_config(tiny_ckpt, tmp_path):
    ckpt = _copy_ckpt(tiny_ckpt, tmp_path)
    (ckpt / "config.json").unlink()
    return ckpt, {}, ["config.json", "not found"]


def case_missing_tensor(tiny_ckpt, tmp_path):
    import json

    import torch

    ckpt = _copy_ckpt(tiny_ckpt, tmp_path)  # LISA's .bin shards: drop the tensor from its shard (the index still names it)
    weight_map = json.loads((ckpt / "pytorch_model.bin.index.json").read_text())["weight_map"]
    key = next(k for k in sorted(weight_map) if "layers.1." in k and k.endswith("down_proj.weight"))
    state = torch.load(ckpt / weight_map[key], weights_only=True)
    del state[key]
    torch.save(state, ckpt / weight_map[key])
    return ckpt, {}, ["missing", key]


def case_unknown_schedule(tiny_ckpt, tmp_path):
    return tiny_ckpt, {"--schedule": "nope"}, ["nope", "full", "csp", "csp-70", "evtp", "fastv"]


def case_schedule_out_of_range(tiny_ckpt, tmp_path):
    from graphs.schedule import resolve

    d = resolve("csp", 4, 64).to_dict()
    d["name"] = "too-deep"
    d["stages"][-1]["end"] = 9  # the tiny model has 4 decoder layers
    path = tmp_path / "too_deep.json"
    path.write_text(json.dumps(d))
    return tiny_ckpt, {"--schedule": str(path)}, ["too-deep", ", 9)", "outside"]


def case_schedule_unparseable(tiny_ckpt, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"name": "x", "stages": [')
    return tiny_ckpt, {"--schedule": str(path)}, ["schedule", "JSON"]


def case_corrupt_image(tiny_ckpt, tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300))  # a JPEG signature, then noise
    return tiny_ckpt, {"--image": str(path)}, ["photo.jpg"]


def case_garbage_image(tiny_ckpt, tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(b"this is not an image\n" * 20)
    return tiny_ckpt, {"--image": str(path)}, ["noise.jpg", "not an image format"]


def case_empty_image(tiny_ckpt, tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    return tiny_ckpt, {"--image": str(path)}, ["empty.jpg", "empty"]


def case_no_image(tiny_ckpt, tmp_path):
    return tiny_ckpt, {"--image": str(tmp_path / "missing.png")}, ["missing.png", "no such file"]


def case_blank_query(tiny_ckpt, tmp_path):
    return tiny_ckpt, {"--query": "  "}, ["query is empty"]


CASES = {
    "no-checkpoint": case_no_ckpt,
    "corrupt-weights": case_corrupt_weights,
    "no-config": case_no_config,
    "missing-tensor": case_missing_tensor,
    "unknown-schedule": case_unknown_schedule,
    "schedule-out-of-range": case_schedule_out_of_range,
    "schedule-unparseable": case_schedule_unparseable,
    "corrupt-jpeg": case_corrupt_image,
    "garbage-image": case_garbage_image,
    "empty-image": case_empty_image,
    "no-image": case_no_image,
    "blank-query": case_blank_query,
}


def build_argv(case, tiny_ckpt, tmp_path) -> tuple[list[str], Path, list[str]]:
    good = _jpeg(tmp_path / "good")
    ckpt, overrides, needles = case(tiny_ckpt, tmp_path)
    opts = {"--image": str(good), "--query": QUERY, "--out": str(tmp_path / "fresh_out"), **overrides}
    argv = [str(ckpt)] + [x for kv in opts.items() for x in kv]
    return argv, Path(opts["--out"]), needles


def assert_one_line_error(rc: int, stderr: str, needles: list[str]) -> str:
    assert rc == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("csprt run: error: ") and len(line) > len("csprt run: error: ") + 10
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def assert_nothing_written(out: Path) -> None:
    if out.exists():
        left = sorted(p.name for p in out.iterdir())
        assert not {"mask.png", "overlay.png", "result.json"} & set(left), left
        assert left == [], left


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line(name, tiny_ckpt, tmp_path):
    argv, out, needles = build_argv(CASES[name], tiny_ckpt, tmp_path)
    rc, stdout, stderr = call(["run", *argv])
    assert_one_line_error(rc, stderr, needles)
    assert stdout == ""
    assert_nothing_written(out)


def test_bad_input_does_not_touch_existing_results(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text('{"old": true}\n')
    rc, _, stderr = call(["run", str(tiny_ckpt), "--image", str(tmp_path / "nope.jpg"), "--query", QUERY,
                          "--out", str(out)])
    assert_one_line_error(rc, stderr, ["nope.jpg"])
    assert sorted(p.name for p in out.iterdir()) == ["result.json"]
    assert json.loads((out / "result.json").read_text()) == {"old": True}


@pytest.mark.parametrize("name", ["missing-tensor", "corrupt-jpeg"])
def test_real_process_exit_code(name, tiny_ckpt, tmp_path):
    argv, out, needles = build_argv(CASES[name], tiny_ckpt, tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tools", "run", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr, needles)
    assert proc.stdout == ""
    assert_nothing_written(out)
