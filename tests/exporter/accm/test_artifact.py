"""An ACCM artifact end to end: `csprt export --schedule accm-36 --accm`, its manifest (graphs as stages, host steps,
sealed tokenizer files), `csprt run`, `csprt validate` against AccmReference, and its bad-input lines.

One single-pass export of the tiny ACCM checkpoint per module (the costly part: ~1 min on 2 loaded cores).
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.cli_io import call, error_lines

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def accm_art(tiny_accm, tmp_path_factory):
    ckpt, accm_dir = tiny_accm
    out = tmp_path_factory.mktemp("accm_art") / "art"
    rc, stdout, stderr = call(["export", str(ckpt), "--schedule", "accm-36", "--accm", str(accm_dir), "--out",
                               str(out)])
    assert rc == 0, stderr[-3000:]
    return out


def _manifest(art):
    return json.loads((art / "manifest.json").read_text())


def test_manifest_declares_accm_graphs_and_host_steps(accm_art):
    from graphs.flops import flops_report
    from graphs.image_encoding import image_plan
    from graphs.manifest import load_artifact

    m = _manifest(accm_art)
    names = [s["name"] for s in m["stages"]]
    assert names[:2] == ["accm_vision", "sam_encoder"] and "vision" not in names
    assert names.index("accm_selector") < names.index("embed")
    steps = {h["name"]: h for h in m["host_steps"]}
    assert [h["kind"] for h in m["host_steps"]] == ["accm_question", "accm_beam_search", "accm_selector_text",
                                                    "accm_splice"]
    splice = steps["accm_splice"]
    assert splice["before"] == "embed" and splice["params"]["template"] == "additional information: {caption}"
    assert splice["params"]["bos"] is False
    assert steps["accm_captions"]["runs"] == ["accm_gpt2", "accm_beam_step"]
    assert all(t["from"] == "accm_captions.feed" for s in m["stages"] if s["name"] == "accm_gpt2" for t in s["inputs"])
    # the LLM side reads the picks and the spliced suffix, not vision and the raw host ids
    entry = next(s for s in m["stages"] if s["name"] == "entry_0")
    froms = {t["name"]: t["from"] for t in entry["inputs"]}
    assert froms["image_hidden"] == "accm_picks.image_hidden" and froms["suffix_lens"] == "accm_splice.suffix_lens"
    assert m["dims"]["batch"]["max"] == 1 and m["export"]["accm"]
    assert "--accm" in m["export"]["command"]
    tok_files = steps["accm_selector_text"]["files"]
    assert {"accm/gpt2/vocab.json", "accm/longclip/vocab.json"} <= set(tok_files)
    art = load_artifact(accm_art)  # sealed, schema-valid, every file's hash checked
    assert [h.name for h in art.layout.host_steps] == list(steps)
    # csprt flops names the stages a cached question skips as this manifest does
    assert flops_report(art.shape, art.schedule)["cached_question"]["image_only_stages"] == list(
        image_plan(art.layout).stages)
    assert "accm_gpt2" not in [s.name for s in art.layout.sequence("single-pass")]


def test_validate_matches_accm_reference(accm_art):
    """Per-stage parity (the ACCM graphs too), identical caption ids and chosen candidate, mask IoU 1.0 in fp32."""
    from tools.validate import validate_artifact

    report = validate_artifact(accm_art, progress=lambda _m: None)
    assert report["passed"], report
    staged = {s["name"] for s in report["stages"]}
    assert {"accm_vision", "accm_picks", "accm_gpt2", "accm_beam_step", "accm_selector", "llm_0"} <= staged
    (e2e,) = report["end_to_end"]
    assert e2e["mask_iou"] == 1.0 and e2e["accm"]["caption_ids_equal"] and e2e["accm"]["chosen_equal"]


def test_run_writes_candidates_and_choice(accm_art, tiny_accm, tmp_path):
    """csprt run ART: result.json carries the candidates and the chosen caption, equal to the torch path's."""
    from PIL import Image

    from exporter.export import sample_image

    image = tmp_path / "img.png"
    Image.fromarray(sample_image()).save(image)
    q = "Where is the red disc?"
    rc, _, stderr = call(["run", str(accm_art), "--image", str(image), "--query", q, "--out", str(tmp_path / "a")])
    assert rc == 0, stderr[-2000:]
    got = json.loads((tmp_path / "a" / "result.json").read_text())["accm"]
    ckpt, accm_dir = tiny_accm
    rc, _, stderr = call(["run", str(ckpt), "--schedule", "accm-36", "--accm", str(accm_dir), "--image", str(image),
                          "--query", q, "--out", str(tmp_path / "b")])
    assert rc == 0, stderr[-2000:]
    want = json.loads((tmp_path / "b" / "result.json").read_text())["accm"]
    assert len(got["candidates"]) == 3 and got["caption"] == got["candidates"][got["chosen"]]
    for key in ("candidates", "candidate_ids", "chosen", "caption", "picks"):
        assert got[key] == want[key], key
    assert got["selector_probs"] == pytest.approx(want["selector_probs"], abs=1e-5)


def test_artifact_without_its_caption_files_is_one_line(accm_art, tmp_path):
    art = tmp_path / "copy"
    shutil.copytree(accm_art, art)
    (art / "accm/gpt2/merges.txt").unlink()
    from PIL import Image

    from exporter.export import sample_image

    Image.fromarray(sample_image()).save(tmp_path / "img.png")
    rc, _, stderr = call(["run", str(art), "--image", str(tmp_path / "img.png"), "--query", "q"])
    assert rc == 2
    (line,) = error_lines(stderr)
    assert "accm/gpt2/merges.txt" in line and "accm_question" in line
    assert "re-export with: csprt export" in line and "--accm" in line


def test_export_of_an_accm_schedule_without_accm_is_one_line(tiny_accm, tmp_path):
    ckpt, accm_dir = tiny_accm
    rc, _, stderr = call(["export", str(ckpt), "--schedule", "accm-36", "--out", str(tmp_path / "x")])
    assert rc == 2
    (line,) = error_lines(stderr)
    assert "needs ACCM's models" in line and "--accm ACCM_DIR" in line and "csprt make-tiny OUT --accm" in line
    rc, _, stderr = call(["export", str(ckpt), "--schedule", "csp", "--accm", str(accm_dir), "--out",
                          str(tmp_path / "y")])
    assert rc == 2 and "drop --accm" in error_lines(stderr)[0]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.trt
def test_build_accm_artifact_with_tensorrt_rtx(accm_art, tmp_path):
    """`csprt build` of the exported ACCM artifact: every stage (the seven ACCM graphs included) builds for SM86."""
    art = tmp_path / "art"
    shutil.copytree(accm_art, art)
    rc, _, stderr = call(["build", str(art), "--flavor", "tensorrt-rtx", "--compute-capability", "SM86"])
    assert rc == 0, stderr[-3000:]
    engines = _manifest(art)
    built = {s["name"] for s in engines["stages"] if s["engines"].get("tensorrt-rtx")}
    assert built == {s["name"] for s in engines["stages"]}
    assert {"accm_gpt2", "accm_beam_step", "accm_selector"} <= built


def test_encoded_image_and_server_response_carry_the_caption(accm_art):
    """A question about an encoded image (SAM's set_image: accm_vision and sam_encoder once) gives the same ACCM
    result as a full run, and csprt serve's response carries it as the host_steps JSON."""
    from engines.serving import encode_response
    from engines.session import ArtifactSession
    from exporter.export import sample_image

    image = sample_image()
    with ArtifactSession(accm_art) as s:
        assert set(s.image_plan.stages) == {"accm_vision", "sam_encoder"}
        full = s.segment(image, "Which object is red?")
        enc = s.encode_image(image)
        again = s.segment(enc, "Which object is red?")
        assert again.host_steps == full.host_steps and (again.masks == full.masks).all()
        with pytest.raises(Exception, match="one request at a time"):
            s.segment_batch([image, image], ["a", "b"])
    out = encode_response(full, image.shape[:2], False, full.timings_ms)
    assert json.loads(out["host_steps"][0, 0]) == full.host_steps
    assert full.host_steps["accm"]["caption"] == full.host_steps["accm"]["candidates"][full.host_steps["accm"]["chosen"]]


def test_triton_repo_carries_the_host_step_files(accm_art, tmp_path):
    """The Triton BLS model loads its artifact copy (manifest, tokenizer, ACCM's tokenizer files) as ArtifactSession
    does, and declares the host_steps output."""
    from graphs.manifest import load_artifact

    rc, _, stderr = call(["triton-repo", str(accm_art), "--out", str(tmp_path / "repo")])
    assert rc == 0, stderr[-2000:]
    copy = tmp_path / "repo/csprt/1/artifact"
    art = load_artifact(copy, verify=False)  # would name a missing accm/... file
    assert (copy / "accm/longclip/vocab.json").is_file() and art.layout.host_steps
    assert 'name: "host_steps"' in (tmp_path / "repo/csprt/config.pbtxt").read_text()
