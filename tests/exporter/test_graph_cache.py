"""The cross-artifact graph cache: all-or-nothing entries, copies identical bytes, keyed by content."""

from __future__ import annotations

from exporter.graph_cache import GraphCache


def _art(tmp_path, name, payload: bytes):
    art = tmp_path / name
    (art / "graphs").mkdir(parents=True)
    (art / "graphs/vision.onnx").write_bytes(payload)
    (art / "graphs/vision.onnx.data").write_bytes(payload * 3)
    return art


def test_put_then_get_copies_the_same_bytes(tmp_path):
    cache = GraphCache(tmp_path / "cache")
    src = _art(tmp_path, "a", b"graph-bytes")
    files = ["graphs/vision.onnx", "graphs/vision.onnx.data"]
    cache.put("k1", src, files, {"max_abs": 1e-7})
    dst = tmp_path / "b"
    got = cache.get("k1", dst)
    assert got == (files, {"max_abs": 1e-7})
    for rel in files:
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()


def test_unknown_key_and_incomplete_entry_miss(tmp_path):
    cache = GraphCache(tmp_path / "cache")
    assert cache.get("nope", tmp_path / "x") is None
    src = _art(tmp_path, "a", b"g")
    cache.put("k2", src, ["graphs/vision.onnx"], {})
    (tmp_path / "cache/k2/graphs/vision.onnx").unlink()  # a damaged entry is a miss, not a broken artifact
    assert cache.get("k2", tmp_path / "y") is None
    assert not (tmp_path / "y/graphs/vision.onnx").exists()


def test_cache_is_not_changed_by_editing_an_artifact_and_rejects_edited_entries(tmp_path):
    cache = GraphCache(tmp_path / "cache")
    src = _art(tmp_path, "a", b"graph")
    cache.put("k4", src, ["graphs/vision.onnx"], {})
    with open(src / "graphs/vision.onnx", "ab") as f:  # edit the artifact in place
        f.write(b"x")
    assert cache.get("k4", tmp_path / "b") is not None
    assert (tmp_path / "b/graphs/vision.onnx").read_bytes() == b"graph"
    with open(tmp_path / "cache/k4/graphs/vision.onnx", "ab") as f:  # edit the cache itself
        f.write(b"x")
    assert cache.get("k4", tmp_path / "c") is None
    assert not (tmp_path / "cache/k4").exists()  # dropped, so the next put stores good bytes again


def test_existing_entry_is_kept(tmp_path):
    cache = GraphCache(tmp_path / "cache")
    cache.put("k3", _art(tmp_path, "a", b"first"), ["graphs/vision.onnx"], {})
    cache.put("k3", _art(tmp_path, "b", b"second"), ["graphs/vision.onnx"], {})
    cache.get("k3", tmp_path / "c")
    assert (tmp_path / "c/graphs/vision.onnx").read_bytes() == b"first"


def test_stage_keys_are_shared_exactly_where_graphs_are_identical():
    from exporter.export import ExportOptions, stage_key
    from exporter.tiny import tiny_shape
    from graphs.schedule import resolve
    from graphs.stages import LayoutOptions, build_layout

    shape = tiny_shape()

    def keys(preset, **opts):
        sched = resolve(preset, shape.llm.layers, shape.num_image_tokens)
        layout = build_layout(sched, shape, LayoutOptions(mode="both"), 508, (2,))
        return {s.name: stage_key(s, sched, shape, ExportOptions(mode="both", **opts), [["w", 1, 2]], {}, "c", 508)
                for s in layout.stages}

    csp, csp70, evtp, full = keys("csp"), keys("csp-70"), keys("evtp"), keys("full")
    for name in ("sam_encoder", "seg_head", "sam_decoder"):
        assert csp[name] == evtp[name] == full[name]
    assert csp["embed"] == evtp["embed"] == full["embed"]
    assert csp["vision"] == csp70["vision"] != evtp["vision"]
    # blocks depend on their layers and I/O only: csp and csp-70 share all three (budgets differ in the entries)
    assert [csp[b] for b in ("llm_0", "llm_1", "llm_2")] == [csp70[b] for b in ("llm_0", "llm_1", "llm_2")]
    assert csp["entry_0"] == csp70["entry_0"] and csp["entry_2"] != csp70["entry_2"]  # the prune budget is entry_2's
    assert csp["llm_0"] != evtp["llm_0"] and csp["entry_0"] != evtp["entry_0"]
    assert keys("csp", precision="fp16")["seg_head"] != csp["seg_head"]
