"""The artifact manifest: exact layout round trip, schema validation, and every load_artifact failure
with its one-sentence message and rebuild command."""

import dataclasses
import json

import onnx
import pytest
from onnx import TensorProto, helper

from graphs.errors import ArtifactError
from graphs.manifest import (MANIFEST_NAME, SCHEMA_VERSION, check_stage_names, graph_files, invalidate,
                             layout_from_dict, layout_problems, layout_to_dict, load_artifact, manifest_schema,
                             manifest_seal, new_manifest, read_manifest, reusable_files, schema_errors, sealed,
                             write_manifest)
from graphs.onnx_checks import ONNX_DTYPES, GraphCheckError, graph_io
from graphs.onnx_passes import save_model
from graphs.schedule import resolve
from graphs.shapes import LlmShape, ModelShape, SamShape, VisionShape
from graphs.stages import LayoutOptions, build_layout

SHAPE = ModelShape(  # N = (32/8)^2 = 16 image tokens, L = 4 layers
    vision=VisionShape(layers=2, hidden=16, heads=2, intermediate=32, image_size=32, patch_size=8),
    llm=LlmShape(layers=4, hidden=16, heads=2, kv_heads=1, intermediate=32, vocab=64),
    sam=SamShape(image_size=64, patch_size=16, hidden=16, layers=2, heads=2, mlp_dim=32, window=2,
                 global_attn=(1,), out_chans=8, decoder_heads=2, decoder_mlp=16),
)
SEG, EOS = 60, 2
COMMAND = "csprt export ckpt --schedule {preset} --out {out}"


def _layout(preset="csp", mode="single-pass", precision="fp32", **knobs):
    sched = resolve(preset, SHAPE.llm.layers, SHAPE.num_image_tokens, **knobs)
    opts = LayoutOptions(precision=precision, mode=mode, max_text_len=32, max_new_tokens=8)
    return sched, build_layout(sched, SHAPE, opts, seg_token_id=SEG, stop_token_ids=(EOS,))


def _stand_in_graph(stage) -> onnx.ModelProto:
    """A graph declaring `stage`'s inputs and outputs (what the load check reads) around one weight; no real ops."""
    def info(t):
        return helper.make_tensor_value_info(t.name, ONNX_DTYPES[t.dtype], [d for d in t.shape])
    w = helper.make_tensor("w", TensorProto.FLOAT, [300], [0.5] * 300)  # 1.2 KB: goes external when forced
    g = helper.make_graph([], stage.name, [info(t) for t in stage.inputs], [info(t) for t in stage.outputs], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def make_artifact(out, preset="csp", mode="single-pass", external=False):
    """A complete artifact directory with a stand-in graph per stage (the manifest does not read them)."""
    sched, layout = _layout(preset, mode)
    files, keys, tols = {}, {}, {}
    for s in layout.stages:
        rel = f"graphs/{s.name}.onnx"
        save_model(_stand_in_graph(s), out / rel, external_data_threshold_bytes=0 if external else 2**31)
        files[s.name], keys[s.name] = graph_files(out, rel), f"key-{s.name}"
        tols[s.name] = {"atol": {"": 1e-4}, "rtol": {"": 1e-3}}
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    manifest = new_manifest(
        layout=layout, shape=SHAPE, schedule=sched, precision="fp32", opset=18,
        export={"command": COMMAND.format(preset=preset, out=out), "checkpoint": "ckpt", "vision_tower": None,
                "mode": mode, "options": dataclasses.asdict(LayoutOptions(mode=mode)), "versions": {"onnx": "1"}},
        tokenizer={"dir": "tokenizer", "seg_token_id": SEG, "eos_token_id": EOS, "prompt": {"template": "llava_v1"}},
        preprocessing={"clip": {"size": 32}, "sam": {"size": 64}}, postprocessing={"threshold": 0.0},
        tolerances={"end_to_end": {"mask_logits_atol": 1e-3, "mask_iou_min": 1.0}},
        stage_files=files, stage_keys=keys, stage_tolerances=tols)
    write_manifest(out, manifest)
    return manifest


@pytest.fixture
def art(tmp_path):
    out = tmp_path / "art"
    make_artifact(out)
    return out


def _rewrite(art, edit):
    m = json.loads((art / MANIFEST_NAME).read_text())
    edit(m)
    (art / MANIFEST_NAME).write_text(json.dumps(sealed(m)))


def _load_error(path, **kw) -> str:
    with pytest.raises(ArtifactError) as exc:
        load_artifact(path, **kw)
    return str(exc.value)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["single-pass", "generate", "both"])
@pytest.mark.parametrize("preset,knobs", [("full", {}), ("csp", {}), ("fastv", {}), ("evtp", {}),
                                          ("csp", {"cluster_method": "seg_first"})],
                         ids=["full", "csp", "fastv", "evtp", "csp-seg_first"])
def test_layout_round_trip(preset, knobs, mode, precision):
    _, layout = _layout(preset, mode, precision, **knobs)
    d = layout_to_dict(layout)
    back = layout_from_dict(json.loads(json.dumps(d)))  # through real JSON: tuples become lists and back
    assert back == layout
    assert all(isinstance(t.shape, tuple) for s in back.stages for t in (*s.inputs, *s.outputs))
    assert layout_problems(back) == []
    assert (back.loop is not None) == (mode != "single-pass")


def test_written_manifest_validates_and_reloads_the_layout(art):
    m = json.loads((art / MANIFEST_NAME).read_text())
    assert schema_errors(m) == [] and m["schema_version"] == SCHEMA_VERSION
    assert layout_from_dict(m) == _layout("csp")[1]
    llm0 = next(s for s in m["stages"] if s["name"] == "llm_0")
    assert llm0["graph"] == "graphs/llm_0.onnx" and list(llm0["files"]) == ["graphs/llm_0.onnx"]
    assert llm0["inputs"][0] == {"name": "hidden", "dtype": "float32", "shape": ["batch", "rows_llm_0", 16],
                                 "from": "entry_0.hidden"}
    past_len = next(t for t in llm0["inputs"] if t["name"] == "past_len")
    assert llm0["cache"][0] == ["past_key_0", "key_0"] and past_len == {"name": "past_len", "dtype": "int64",
                                                                     "shape": ["batch"], "from": "cache"}
    assert manifest_schema()["$schema"].endswith("2020-12/schema")
    llm0["export_parity"] = {"max_abs": 1e-6}  # optional per-stage record the exporter adds
    llm0["engines"] = {"fp32": {"plan": "engines/llm_0.plan"}}  # free-form until csprt build defines it
    assert schema_errors(m) == []
    llm0["surprise"] = 1
    assert schema_errors(m) == ["$.stages[4]: Additional properties are not allowed ('surprise' was unexpected)"]


@pytest.mark.parametrize("edit,path", [
    (lambda m: m["stages"][0]["inputs"][0].update(dtype="float64"), "$.stages[0].inputs[0].dtype"),
    (lambda m: m.pop("precision"), "$: 'precision' is a required property"),
    (lambda m: m.update(precision="int8"), "$.precision"),
    (lambda m: m["stages"][4]["inputs"][0].pop("from"), "$.stages[4].inputs[0]"),
    (lambda m: m["stages"][0].update(kind="encoder"), "$.stages[0].kind"),
    (lambda m: m.update(modes=["chat"]), "$.modes[0]"),
    (lambda m: m["dims"]["prefix_len"].pop("opt"), "$.dims.prefix_len"),
], ids=["dtype", "missing-key", "precision", "missing-from", "kind", "mode", "dim-range"])
def test_schema_rejects(art, edit, path):
    m = json.loads((art / MANIFEST_NAME).read_text())
    edit(m)
    errors = schema_errors(m)
    assert errors and errors[0].startswith(path)
    with pytest.raises(AssertionError, match="internal error"):
        write_manifest(art, m)


def test_load_artifact(art):
    a = load_artifact(art)
    assert a.precision == "fp32" and a.modes == ("single-pass",)
    assert [s.name for s in a.layout.stages][:5] == ["vision", "sam_encoder", "embed", "entry_0", "llm_0"]
    assert a.schedule.name == "csp" and a.shape == SHAPE
    assert a.graph_path("llm_1") == art / "graphs/llm_1.onnx" and a.graph_path("llm_1").is_file()
    assert a.rebuild_command == f"csprt export ckpt --schedule csp --out {art}"
    assert a.stage_entry("seg_head")["tolerance"] == {"atol": {"": 1e-4}, "rtol": {"": 1e-3}}


def test_unknown_stage_lists_valid_ones(art):
    a = load_artifact(art)
    with pytest.raises(ArtifactError, match=r"unknown stage 'llm_9'; this artifact has: vision, sam_encoder, embed, entry_0, llm_0, "):
        a.stage_entry("llm_9")
    with pytest.raises(ArtifactError, match="unknown stage 'x'"):
        check_stage_names(a, ["llm_0", "x"])
    check_stage_names(a, ["llm_0", "sam_decoder"])


def test_missing_or_not_a_directory(tmp_path):
    msg = _load_error(tmp_path / "nope")
    assert "does not exist" in msg and f"csprt export CHECKPOINT --schedule NAME --out {tmp_path / 'nope'}" in msg
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in _load_error(tmp_path / "file")


def test_no_manifest_means_not_an_artifact_or_interrupted(tmp_path):
    msg = _load_error(tmp_path)
    assert "no manifest.json" in msg and "interrupted" in msg and "csprt export CHECKPOINT" in msg


def test_invalidate(art):
    invalidate(art)
    assert "interrupted" in _load_error(art)
    invalidate(art)  # idempotent


def test_bad_json_and_wrong_format(art):
    (art / MANIFEST_NAME).write_text("{not json")
    assert "is not valid JSON" in _load_error(art)
    (art / MANIFEST_NAME).write_text(json.dumps({"format": "something-else"}))
    assert "format 'something-else', expected 'csprt.artifact'" in _load_error(art)


def test_old_schema_names_the_rebuild_command(art):
    _rewrite(art, lambda m: m.update(schema_version=SCHEMA_VERSION - 1))
    msg = _load_error(art)
    assert f"written by an older csprt (schema {SCHEMA_VERSION - 1}, this csprt reads {SCHEMA_VERSION})" in msg
    assert msg.endswith(f"re-export with: csprt export ckpt --schedule csp --out {art}")


def test_newer_schema_says_upgrade(art):
    _rewrite(art, lambda m: m.update(schema_version=SCHEMA_VERSION + 1))
    assert "upgrade csprt" in _load_error(art)


def test_schema_failure_names_the_json_path(art):
    _rewrite(art, lambda m: m["stages"][3]["outputs"][0].update(dtype="bfloat16"))
    msg = _load_error(art)
    assert "$.stages[3].outputs[0].dtype" in msg and "re-export with: csprt export ckpt" in msg


def test_broken_wiring(art):
    _rewrite(art, lambda m: m["stages"][3]["inputs"][0].update({"from": "llm_7.prefix_hidden"}))
    assert "comes from 'llm_7.prefix_hidden', which no stage" in _load_error(art)


def test_hash_mismatch_and_missing_files(art):
    load_artifact(art)
    with open(art / "graphs/llm_1.onnx", "ab") as f:
        f.write(b"\0")
    msg = _load_error(art)
    assert msg == ("graphs/llm_1.onnx changed since export (hash mismatch); "
                   f"re-export with: csprt export ckpt --schedule csp --out {art}")
    assert load_artifact(art, verify=False).schedule.name == "csp"  # verify=False skips hashing
    (art / "graphs/llm_1.onnx").unlink()
    assert "graphs/llm_1.onnx (stage 'llm_1') is missing" in _load_error(art)
    (art / "tokenizer").rmdir()
    assert "tokenizer directory" in _load_error(art)


def test_external_data_files_are_listed_and_verified(tmp_path):
    out = tmp_path / "art"
    m = make_artifact(out, preset="full", mode="generate", external=True)
    entry = next(s for s in m["stages"] if s["name"] == "llm_0")
    assert sorted(entry["files"]) == ["graphs/llm_0.onnx", "graphs/llm_0.onnx.data"]
    a = load_artifact(out)
    assert a.modes == ("generate",) and a.layout.loop.after == "llm_0"
    assert [s.graph for s in a.layout.loop.steps] == ["embed", "llm_0"]  # decode runs the prefill graphs
    (out / "graphs/llm_0.onnx.data").write_bytes(b"corrupt")
    assert "graphs/llm_0.onnx.data changed since export" in _load_error(out)


def test_incremental_reuse(art):
    prev = read_manifest(art)
    assert prev is not None
    assert reusable_files(prev, art, "llm_0", "key-llm_0") == {"graphs/llm_0.onnx": prev["stages"][4]["files"]["graphs/llm_0.onnx"]}
    assert reusable_files(prev, art, "llm_0", "other-key") is None
    assert reusable_files(None, art, "llm_0", "key-llm_0") is None
    (art / "graphs/llm_0.onnx").write_bytes(b"changed")
    assert reusable_files(prev, art, "llm_0", "key-llm_0") is None
    invalidate(art)
    assert read_manifest(art) is None


# --- the sealed manifest (issue 15) ----------------------------------------------------------------------------

def _hand_edit(art, edit):
    """Edit manifest.json as a person would: no reseal."""
    m = json.loads((art / MANIFEST_NAME).read_text())
    edit(m)
    (art / MANIFEST_NAME).write_text(json.dumps(m, indent=2))


def test_written_manifest_carries_its_seal(art):
    m = json.loads((art / MANIFEST_NAME).read_text())
    assert m["seal"] == manifest_seal(m) and len(m["seal"]) == 64
    assert manifest_seal({**m, "seal": "x"}) == m["seal"]  # the seal covers everything but itself
    reordered = json.loads(json.dumps(dict(reversed(list(m.items())))))
    assert manifest_seal(reordered) == m["seal"]  # key order and whitespace are not content
    (art / MANIFEST_NAME).write_text(json.dumps(m, indent=4, sort_keys=True))
    assert load_artifact(art).precision == "fp32"


@pytest.mark.parametrize("edit", [
    lambda m: m["preprocessing"]["sam"].update(size=65),
    lambda m: m["dims"]["prefix_len"].update(max=16),
    lambda m: m["tokenizer"].update(seg_token_id=SEG + 1),
    lambda m: m["tolerances"]["end_to_end"].update(mask_iou_min=0.0),
    lambda m: m["postprocessing"].update(threshold=0.5),
], ids=["preprocessing", "dim-bound", "seg-token", "tolerance", "postprocessing"])
def test_a_hand_edit_is_refused_naming_what_to_do(art, edit):
    _hand_edit(art, edit)
    for verify in (True, False):
        msg = _load_error(art, verify=verify)
        assert "was edited after csprt wrote it" in msg and "restore the original file" in msg
        assert msg.endswith(f"re-export with: csprt export ckpt --schedule csp --out {art}")


def test_a_manifest_without_its_seal_is_refused(art):
    _hand_edit(art, lambda m: m.pop("seal"))
    assert "has no seal" in _load_error(art)
    _hand_edit(art, lambda m: m.update(seal=["not", "a", "hash"]))
    assert "has no seal" in _load_error(art)


def test_declared_precision_checked_against_the_layout(art):
    _rewrite(art, lambda m: m.update(precision="fp16"))  # resealed: as if csprt itself had written it wrong
    msg = _load_error(art, verify=False)
    assert "is float32, but the manifest declares precision 'fp16' (float16)" in msg


def test_graph_io_checked_against_the_manifest_at_load(art):
    def edit(m):  # the layout says float16 where the graph has float32, in a resealed manifest
        m["precision"] = "fp16"
        for s in m["stages"]:
            for t in (*s["inputs"], *s["outputs"]):
                if t["dtype"] == "float32" and t["name"] != "row_scores":
                    t["dtype"] = "float16"
        for t in m["host_inputs"]:
            if t["dtype"] == "float32":
                t["dtype"] = "float16"
    _rewrite(art, edit)
    assert load_artifact(art, verify=False).precision == "fp16"  # consistent in itself
    msg = _load_error(art)
    assert "stage 'vision' graph I/O does not match its spec" in msg and "expected dtype float16, got float32" in msg
    assert "the manifest does not describe its graphs" in msg


def test_graph_io_named_dims_checked(art):
    _rewrite(art, lambda m: m["stages"][2]["inputs"][0].update(shape=["batch", "suffix_len"]))  # [batch, prefix_len]
    msg = _load_error(art)
    assert "expected named dim 'suffix_len'" in msg


def test_a_malformed_dim_expression_is_refused(art):
    _rewrite(art, lambda m: m["stages"][2]["inputs"][0].update(shape=[1, "__import__('os')", 16]))
    msg = _load_error(art, verify=False)
    assert "only non-negative ints, named dims, + and * are allowed" in msg


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_graph_io_reads_inputs_outputs_and_initializer_names_only(tmp_path, external):
    model = _identity_like(400)
    path = tmp_path / "g.onnx"
    save_model(model, path, external_data_threshold_bytes=0 if external else 2**31)
    got = graph_io(path)
    assert list(got.graph.input) == list(model.graph.input)
    assert list(got.graph.output) == list(model.graph.output)
    assert [t.name for t in got.graph.initializer] == ["w"] and not got.graph.initializer[0].raw_data
    assert not got.graph.node


def test_graph_io_of_a_file_that_is_not_onnx(tmp_path):
    for i, data in enumerate([b"\x3a\xff\xff\xff\xff\x0f", b"not onnx at all \xff", b"\x3a\x10abc"]):
        path = tmp_path / f"bad{i}.onnx"
        path.write_bytes(data)
        with pytest.raises(GraphCheckError, match=f"graph bad{i}.onnx is not a readable ONNX model"):
            graph_io(path)


def _identity_like(n: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n + 1", 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, [n], [0.5] * n)
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
