"""Streaming export: each stage holds only the parameters its wrapper touches, the graphs equal what the
whole model gives, trace-only export needs no eager run, and graphs over the protobuf limit go through
external data.

Costs are kept to a few traces of small stages: most tests reuse the session artifact of `export_tiny`
(csp, both modes, fp32) and its graph cache, and re-export only the stages they delete from a copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporter import export as ex
from exporter.checkpoint import load_checkpoint, load_tokenizer
from exporter.streaming import StagedWeights, _RecordState
from exporter.wrappers import make_wrapper
from graphs import onnx_passes
from graphs.checkpoint_config import read_checkpoint_config, read_clip_processor_config
from graphs.manifest import MANIFEST_NAME, load_artifact
from graphs.prompt import SEG_TOKEN, token_id, tokenize_prompt
from graphs.schedule import PRESETS, resolve
from graphs.stages import LayoutOptions, build_layout
from tools import cli

# torch.export records the stride/offset symbols of view inputs here: a real feed (a slice of the previous
# stage's output) has them, a synthetic one does not. Nothing else in the graph depends on it.
_RANGE_KEY = "pkg.torch.export.ExportedProgram.range_constraints"


def _setup(ckpt: Path, preset: str, mode: str = "both", **knobs):
    """(schedule, layout, seg id, host sample) as `export_artifact` builds them (fp32)."""
    shape = read_checkpoint_config(ckpt).shape
    tok = load_tokenizer(ckpt)
    seg = token_id(tok, SEG_TOKEN)
    ids = tokenize_prompt(tok, ex.SAMPLE_QUERY, "single-pass" if mode != "generate" else "generate",
                          shape.num_image_tokens, shape.llm.max_positions)
    schedule = resolve(preset, shape.llm.layers, shape.num_image_tokens, **knobs)
    layout = build_layout(schedule, shape, LayoutOptions(mode=mode, opt_prefix=len(ids.prefix),
                                                         opt_suffix=len(ids.suffix)),
                          seg_token_id=seg, stop_token_ids=(tok.eos_token_id,))
    host = ex._host_sample(shape, read_clip_processor_config(ckpt / "vision_tower", shape), ex.sample_image(), ids,
                           torch.float32, layout)
    return schedule, layout, seg, host


def _graph_bytes(path: Path) -> bytes:
    """A graph with its weights loaded, without torch.export's range_constraints metadata, as bytes."""
    model = onnx.load(str(path))
    for holder in (model, model.graph):
        keep = [p for p in holder.metadata_props if p.key != _RANGE_KEY]
        del holder.metadata_props[:]
        holder.metadata_props.extend(keep)
    for t in onnx_passes.iter_tensors(model):
        t.ClearField("data_location")  # set explicitly by loading external data; unset means the same
    return model.SerializeToString()


@pytest.fixture(scope="module")
def whole(tiny_ckpt):
    return load_checkpoint(tiny_ckpt, attn="eager")


@pytest.fixture(scope="module")
def staged(tiny_ckpt):
    cfg = read_checkpoint_config(tiny_ckpt)
    return StagedWeights(cfg.shape, cfg.ckpt_dir, cfg.clip_dir, torch.float32)


@pytest.fixture
def art_copy(export_tiny, tmp_path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), dst)
    return dst


# --- which parameters a stage holds ------------------------------------------------------------------

# Every preset (evtp's k-center indexes with a 0-d tensor, which meta cannot read), and the other cluster
# methods on the vision stage, where they differ.
CASES = [(p, {}, None) for p in PRESETS if p != "csp-70"] + [
    ("csp", {"cluster_method": m}, "vision") for m in ("cls_attention", "kmeans", "seg_first")]


@pytest.mark.parametrize("preset, knobs, last", CASES, ids=[p + "".join(f"-{v}" for v in k.values()) for p, k, _ in CASES])
def test_meta_run_finds_exactly_what_the_eager_run_touches(tiny_ckpt, whole, staged, preset, knobs, last):
    """Per stage: the parameters `used_by` finds on meta are those the real forward reads, and the streamed
    model (only those held) gives bit-identical outputs to the whole model."""
    schedule, layout, seg, host = _setup(tiny_ckpt, preset, **knobs)
    ref_chain = ex._SampleChain(whole.model, schedule, layout, seg, host)
    chain = ex._SampleChain(staged.model, schedule, layout, seg, host)
    names = {id(p): n for n, p in whole.model.named_parameters()}
    stages = layout.stages if last is None else layout.stages[:[s.name for s in layout.stages].index(last) + 1]
    for spec in stages:
        args = ref_chain.feed(spec)
        touched = _RecordState(names)
        with touched:
            want = ref_chain.run(spec, make_wrapper(whole.model, schedule, spec, seg), args)
        used = staged.used_by(lambda m: make_wrapper(m, schedule, spec, seg), args)
        assert used == touched.used, spec.name
        staged.hold(used, spec.name)
        got = chain.run(spec, make_wrapper(staged.model, schedule, spec, seg), chain.feed(spec))
        assert all(torch.equal(got[k], want[k]) for k in want), spec.name
    staged.hold(())


def test_export_holds_one_stage_at_a_time(tiny_ckpt, export_tiny, tmp_path, tmp_path_factory, monkeypatch):
    """A whole export (graphs from the session cache, so no tracing) never holds more than the largest
    stage's parameters, each stage holds what its wrapper uses, and nothing stays held at the end."""
    export_tiny("csp", "both")  # fills the session graph cache
    cache = sorted(tmp_path_factory.getbasetemp().glob("graph_cache*"))[0]
    made: list[StagedWeights] = []

    class Recorded(StagedWeights):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(ex, "StagedWeights", Recorded)
    schedule = resolve("csp", 4, 64)
    ex.export_artifact(tiny_ckpt, schedule, tmp_path / "art", ex.ExportOptions(mode="both", cache_dir=str(cache)))
    (weights,) = made
    stats = weights.stats
    total = weights.total_tensors
    held = {label: n for label, n, _ in stats.history}
    assert list(held) == ["vision", "sam_encoder", "embed", "entry_0", "llm_0", "entry_1", "llm_1", "entry_2", "llm_2",
                          "seg_gather", "seg_head", "sam_decoder", "done"]
    assert held["done"] == 0 and weights.held == set()
    assert stats.peak_tensors == max(held.values()) < total
    # csp on 4 layers: llm_1 is one decoder layer (9 tensors) of the 259; llm_2 two layers, norm and lm_head.
    assert held["llm_1"] == 9 and held["llm_2"] == 2 * 9 + 2 and held["embed"] == 1
    assert held["seg_gather"] == held["entry_0"] == held["entry_2"] == 0  # weightless
    assert all(p.is_meta for p in weights.model.parameters())


# --- graphs ------------------------------------------------------------------------------------------

def test_streamed_graph_equals_whole_model_graph(tiny_ckpt, whole, export_tiny, tmp_path):
    """The artifact's seg_head graph (traced from the streamed model, everything but the head on meta) is
    byte for byte what tracing the whole loaded model gives."""
    art = export_tiny("csp", "both")
    schedule, layout, seg, host = _setup(tiny_ckpt, "csp")
    spec = layout.stage("seg_head")
    args = ex.spec_feed(spec, layout, host, seg)
    program = ex.trace_program(make_wrapper(whole.model, schedule, spec, seg), spec, args, ex.DEFAULT_OPSET)
    (tmp_path / "graphs").mkdir()
    ex._write_stage(program, spec, tmp_path, ex.onnx_passes.EXTERNAL_DATA_THRESHOLD)
    assert _graph_bytes(tmp_path / "graphs/seg_head.onnx") == _graph_bytes(art / "graphs/seg_head.onnx")


def test_trace_only_export_then_validate(tiny_ckpt, art_copy, export_tiny):
    """Stages re-exported trace-only (no eager run, no ONNX Runtime) give the same graphs as the checked
    export, the manifest marks them unchecked, and `csprt validate` on the artifact passes."""
    redo = ("llm_1", "seg_head")
    before = {s: _graph_bytes(art_copy / f"graphs/{s}.onnx") for s in redo}
    for s in redo:
        (art_copy / f"graphs/{s}.onnx").unlink()
    lines = []
    ex.export_artifact(tiny_ckpt, resolve("csp", 4, 64), art_copy, ex.ExportOptions(mode="both", trace_only=True),
                       progress=lines.append)
    assert any("2 to export (trace only: no parity check)" in line for line in lines), lines
    assert {s: _graph_bytes(art_copy / f"graphs/{s}.onnx") for s in redo} == before
    manifest = json.loads((art_copy / MANIFEST_NAME).read_text())
    parity = {e["name"]: e["export_parity"] for e in manifest["stages"]}
    assert {n for n, p in parity.items() if not ex.parity_checked(p)} == set(redo)
    assert parity["llm_1"]["check_with"] == f"csprt validate {art_copy}"
    assert manifest["export"]["options"]["trace_only"] is True
    load_artifact(art_copy)
    # A checked export does not keep what a trace-only one left unchecked.
    keys = {e["name"]: e["export_key"] for e in manifest["stages"]}
    assert set(ex._reusable(art_copy, keys, need_parity=True)) == set(keys) - set(redo)
    assert set(ex._reusable(art_copy, keys, need_parity=False)) == set(keys)

    from tools.validate import validate_artifact

    report = validate_artifact(art_copy, tiny_ckpt, image=ex.sample_image(), query="Where is the cat?",
                               modes=["single-pass"], progress=lambda _m: None)
    assert report["passed"], report


def test_trace_only_cli_flag(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"export": "tools.export"})
    args = cli.build_parser().parse_args(["export", "ckpt", "--out", "o", "--trace-only"])
    from tools.export import _command

    assert args.trace_only is True and _command(args).endswith("--trace-only")
    assert cli.build_parser().parse_args(["export", "ckpt", "--out", "o"]).trace_only is None


def test_spec_feed_is_valid_for_every_stage(tiny_ckpt):
    """Synthetic feeds: the spec's dtypes, named dims >= 2, and integer inputs inside what they index."""
    schedule, layout, seg, host = _setup(tiny_ckpt, "csp")
    n = 64
    for spec in layout.stages:
        for t, x in zip(spec.inputs, ex.spec_feed(spec, layout, host, seg)):
            assert str(x.dtype).removeprefix("torch.") == t.dtype, (spec.name, t.name)
            assert all(s >= 2 for s, d in zip(x.shape, t.shape) if isinstance(d, str)), (spec.name, t.name)
            if t.name.startswith("image_indices"):  # per request: distinct, ascending
                for row in x:
                    assert row.unique().numel() == row.numel() and int(row.max()) < n
                    assert torch.equal(row, row.sort().values)
            if t.name == "seg_rows":
                assert int(x.max()) < host["suffix_ids"].shape[1]
            if t.name == "seg_batch":
                assert int(x.max()) < layout.dims["batch"].max and torch.equal(x, x.sort().values)


# --- graphs over the protobuf limit -----------------------------------------------------------------

def test_external_data_path_for_large_graphs(tiny_ckpt, art_copy, monkeypatch):
    """With the threshold and the protobuf limit lowered to a few bytes, a re-exported stage takes the
    >2 GB route (weights streamed to .onnx.data, passes on the graph alone, path-based checker) and runs
    on ONNX Runtime (the checked export compares it with torch) to the same outputs as the inline graph."""
    inline = art_copy / "graphs/seg_head.onnx"
    want = _graph_bytes(inline)
    inline.unlink()
    monkeypatch.setattr(onnx_passes, "PROTOBUF_LIMIT", 1)  # any in-memory ModelProto counts as "over 2 GB"
    ex.export_artifact(tiny_ckpt, resolve("csp", 4, 64), art_copy,
                       ex.ExportOptions(mode="both", external_data_threshold=1))
    art = load_artifact(art_copy)
    files = art.stage_entry("seg_head")["files"]
    assert set(files) == {"graphs/seg_head.onnx", "graphs/seg_head.onnx.data"}
    assert onnx_passes.external_data_locations(onnx_passes.load_graph(inline)) == ["seg_head.onnx.data"]
    assert art.stage_entry("seg_head")["export_parity"]["checked"] is True
    assert _graph_bytes(inline) == want
    assert not list((art_copy / "graphs").glob(".*"))  # no temp dirs left


def test_infer_shapes_over_the_limit_matches_in_memory(monkeypatch, export_tiny):
    model = onnx.load(str(export_tiny("csp", "both") / "graphs/seg_head.onnx"))
    want = onnx_passes.infer_shapes(model)
    monkeypatch.setattr(onnx_passes, "PROTOBUF_LIMIT", 1)
    got = onnx_passes.infer_shapes(model)
    assert {v.name: v for v in got.graph.value_info} == {v.name: v for v in want.graph.value_info}


def test_save_with_external_data_checks_locations(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])
    w = onnx.numpy_helper.from_array(np.ones(512, np.float32)[:4].copy(), "w")
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "w"], ["y"])], "g", [x],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])], [w]))
    onnx.external_data_helper.set_external_data(model.graph.initializer[0], "other.data")
    data = tmp_path / "tmp.data"
    data.write_bytes(np.ones(4, np.float32).tobytes())
    with pytest.raises(Exception, match="other.data"):
        onnx_passes.save_with_external_data(model, tmp_path / "g.onnx", data)
    assert not (tmp_path / "g.onnx").exists() and data.exists()


# --- checkpoint formats and errors --------------------------------------------------------------------

def _ckpt_copy(tiny_ckpt: Path, dst: Path) -> Path:
    """The checkpoint without its LISA weights (CLIP's stay)."""
    shutil.copytree(tiny_ckpt, dst, ignore=lambda d, names: [n for n in names if Path(d) == tiny_ckpt
                                                             and n.startswith(("model", "pytorch_model"))])
    return dst


def test_bin_checkpoint_is_read_whole_and_streams_the_same(tiny_ckpt, whole, staged, tmp_path):
    """A sharded .bin checkpoint (pickles: loaded whole, once) gives every parameter bit-identical to the
    safetensors one, held per stage the same way."""
    from exporter.checkpoint import save_checkpoint

    ckpt = _ckpt_copy(tiny_ckpt, tmp_path / "bin")
    save_checkpoint(whole.model, ckpt, fmt="bin-sharded", max_shard_size="100KB", include_clip=True)  # fp32 now
    cfg = read_checkpoint_config(ckpt)
    from_bin = StagedWeights(cfg.shape, cfg.ckpt_dir, cfg.clip_dir, torch.float32)
    assert len(from_bin.source._whole) > 1  # every .bin shard read whole
    names = set(from_bin._slots)
    from_bin.hold(names)
    staged.hold(names)
    for name in names:
        assert torch.equal(from_bin._param(name), staged._param(name)), name
    staged.hold(())


def test_missing_tensor_fails_before_any_stage(tiny_ckpt_st, tmp_path):
    """Keys and shapes are checked from the file headers up front, with load_checkpoint's message."""
    from safetensors.torch import load_file, save_file

    from graphs.errors import CheckpointError

    ckpt = _ckpt_copy(tiny_ckpt_st, tmp_path / "ckpt")
    state = load_file(str(tiny_ckpt_st / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    cfg = read_checkpoint_config(ckpt)
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        StagedWeights(cfg.shape, cfg.ckpt_dir, cfg.clip_dir, torch.float32)
