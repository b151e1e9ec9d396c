"""Every exported graph runs under `polygraphy run --onnxrt` (a tool outside csprt), and every manifest
validates against graphs/manifest.schema.json with jsonschema directly.

Index inputs (image_indices, assign, token ids) need valid values, so each graph is fed through
`--load-inputs` with two iterations: the exact feed the stage got in a real pipeline run (recorded by
`ArtifactSession.segment(record=True)`), and a feed at the manifest's `opt` shape of every named dim.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphs.manifest import MANIFEST_NAME

REPO = Path(__file__).resolve().parents[2]
POLYGRAPHY = Path(sys.executable).parent / "polygraphy"  # the venv's console script (no `python -m polygraphy`)
STAGES = ("vision", "sam_encoder", "embed", "entry_0", "llm_0", "entry_1", "llm_1", "entry_2", "llm_2", "seg_gather",
          "seg_head", "sam_decoder")


def recorded_feeds(art: Path) -> dict[str, dict[str, np.ndarray]]:
    """stage -> the feed it received running the export sample in every mode of the artifact."""
    from engines.session import ArtifactSession
    from exporter.export import SAMPLE_QUERY, sample_image

    feeds: dict[str, dict[str, np.ndarray]] = {}
    with ArtifactSession(art) as session:
        for mode in session.artifact.modes:
            seg = session.segment(sample_image(), SAMPLE_QUERY, mode=mode, max_new_tokens=4, record=True)
            for name, feed in seg.pipeline.feeds.items():
                feeds.setdefault(name, feed)
    return feeds


def opt_feed(manifest: dict, stage: dict, recorded: dict[str, np.ndarray], rng) -> dict[str, np.ndarray]:
    """A feed with every named dim at its `opt`: static-shaped inputs keep the recorded values (indices stay
    valid), variable-length token ids are drawn below the vocabulary size, floats are random."""
    vocab = manifest["model"]["llm"]["vocab"]
    dims = manifest["dims"]
    opt = {d: r["opt"] for d, r in dims.items()}
    rows = next((t["shape"][1] for t in stage["inputs"] if t["name"] in ("hidden", "block_hidden")), None)
    limits = {"suffix_lens": opt["suffix_len"], "row_lens": opt.get(rows), "query_rows": opt.get(rows, 1) - 1}
    feed = {}
    for t in stage["inputs"]:
        shape = tuple(d if isinstance(d, int) else opt[d] for d in t["shape"])
        if all(isinstance(d, int) for d in t["shape"]):
            assert recorded[t["name"]].shape == shape, (stage["name"], t["name"])
            feed[t["name"]] = recorded[t["name"]]
        elif t["dtype"] == "int64" and all(isinstance(d, int) or d == "batch" for d in t["shape"][1:]):
            # per-request indices and lengths (image indices, assignments, lengths): request 0's, repeated over the
            # batch at opt (clipped to the opt lengths), so every index stays valid
            value = np.repeat(recorded[t["name"]][:1], shape[0], axis=0)
            feed[t["name"]] = np.minimum(value, limits[t["name"]]) if limits.get(t["name"]) is not None else value
        elif t["name"] == "seg_rows":  # row indices into the suffix, not token ids
            feed[t["name"]] = rng.integers(0, opt["suffix_len"], size=shape, dtype=np.int64)
        elif t["name"] == "seg_batch":  # the request of each [SEG] row, ascending
            feed[t["name"]] = np.sort(rng.integers(0, opt["batch"], size=shape, dtype=np.int64))
        elif t["dtype"] == "int64":
            feed[t["name"]] = rng.integers(3, vocab, size=shape, dtype=np.int64)
        else:
            feed[t["name"]] = rng.standard_normal(shape).astype(t["dtype"])
    return feed


@pytest.fixture(scope="module")
def polygraphy_inputs(export_tiny, tmp_path_factory):
    """(artifact dir, manifest, {stage: path of a --load-inputs JSON with [recorded feed, opt feed]})."""
    from polygraphy.json import save_json

    art = export_tiny("csp", "both")
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    recorded = recorded_feeds(art)
    root = tmp_path_factory.mktemp("polygraphy_inputs")
    rng = np.random.default_rng(0)
    paths = {}
    for stage in manifest["stages"]:
        name = stage["name"]
        assert name in recorded, f"stage {name} never ran in the sample request; ran: {sorted(recorded)}"
        feeds = [recorded[name], opt_feed(manifest, stage, recorded[name], rng)]
        paths[name] = root / f"{name}.json"
        save_json(feeds, str(paths[name]), description=f"{name} feeds")
    return art, manifest, paths


def test_stage_names(polygraphy_inputs):
    _, manifest, _ = polygraphy_inputs
    assert tuple(s["name"] for s in manifest["stages"]) == STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_polygraphy_run_onnxrt(polygraphy_inputs, stage):
    art, manifest, inputs = polygraphy_inputs
    entry = next(s for s in manifest["stages"] if s["name"] == stage)
    graph = art / entry["graph"]
    proc = subprocess.run([str(POLYGRAPHY), "run", str(graph), "--onnxrt",
                           "--load-inputs", str(inputs[stage])],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "PASSED" in log, log
    assert "Iteration: 1" in log, log  # both feeds ran: the recorded one and the one at opt shapes
    for out in entry["outputs"]:
        assert out["name"] in log, (out["name"], log)


@pytest.mark.parametrize("key", [("csp", "both"), ("full", "single-pass")], ids=["csp-both", "full-single-pass"])
def test_manifest_matches_schema(export_tiny, key):
    import jsonschema

    schema = json.loads((REPO / "graphs" / "manifest.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    manifest = json.loads((export_tiny(*key) / MANIFEST_NAME).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(manifest)
    assert manifest["schedule"]["name"] == key[0] and manifest["export"]["mode"] == key[1]


def test_schema_rejects_a_broken_manifest(export_tiny):
    """The schema is not vacuous: a manifest missing a stage's graph or with a bad dim range fails it."""
    import jsonschema

    schema = json.loads((REPO / "graphs" / "manifest.schema.json").read_text(encoding="utf-8"))
    manifest = json.loads((export_tiny("csp", "both") / MANIFEST_NAME).read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    no_graph = json.loads(json.dumps(manifest))
    del no_graph["stages"][0]["graph"]
    assert not validator.is_valid(no_graph)
    bad_format = {**manifest, "format": "something.else"}
    assert not validator.is_valid(bad_format)
