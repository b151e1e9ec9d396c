"""csprt build on CPU with TensorRT-RTX: every stage engine of the tiny `full` and `csp` artifacts (both modes),
sidecars, profiles read back from the TensorRT objects, the build cache, and refusing stale engines."""

from __future__ import annotations

import json
import shutil
import time

import onnx
import pytest
from onnx import TensorProto, helper

from engines.build import (EngineBuildError, build_engines, check_engine, engine_paths, inspect_stage, read_profile,
                           targetable)
from engines.profiles import InputShapes
from engines.trt import load_trt
from exporter.tiny import tiny_shape
from graphs.errors import ArtifactError
from graphs.manifest import MANIFEST_NAME, file_sha256, load_artifact, sealed
from graphs.schedule import resolve
from graphs.stages import LayoutOptions, build_layout

pytestmark = pytest.mark.trt

SCHEDULES = ("full", "csp")


def _stage_names(schedule: str) -> tuple[str, ...]:
    """The stages `export_tiny(schedule, "both")` writes, from the stage contract (no export needed to collect)."""
    shape = tiny_shape()
    layout = build_layout(resolve(schedule, shape.llm.layers, shape.num_image_tokens), shape,
                          LayoutOptions(mode="both"), seg_token_id=0, stop_token_ids=(1,))
    return tuple(s.name for s in layout.stages)


SCHEDULE_STAGES = {sched: _stage_names(sched) for sched in SCHEDULES}
CASES = [(sched, stage) for sched, stages in SCHEDULE_STAGES.items() for stage in stages]
IDS = [f"{sched}-{stage}" for sched, stage in CASES]


def _manifest(art) -> dict:
    return json.loads((art / MANIFEST_NAME).read_text(encoding="utf-8"))


def _entry(art, stage: str) -> dict:
    return next(e for e in _manifest(art)["stages"] if e["name"] == stage)


@pytest.fixture(scope="module")
def installed():
    _, flavor, version = load_trt()
    return flavor, version


@pytest.fixture(scope="module")
def built(export_tiny, tmp_path_factory):
    """`built(schedule) -> (artifact copy, report, seconds, progress lines)`: every stage built once per module.

    A failed stage does not stop the others; its test reports the failure."""
    made = {}

    def get(schedule: str):
        if schedule not in made:
            art = tmp_path_factory.mktemp(f"built_{schedule}") / "art"
            shutil.copytree(export_tiny(schedule, "both"), art)
            lines = []
            t0 = time.perf_counter()
            try:
                report = build_engines(art, progress=lines.append)
            except EngineBuildError as exc:
                report = exc.report
            made[schedule] = (art, report, time.perf_counter() - t0, lines)
        return made[schedule]

    return get


@pytest.fixture
def built_copy(built, tmp_path):
    """`built_copy(schedule) -> Path`: a private copy of a built artifact (mtimes kept) to modify."""
    def copy(schedule: str):
        dst = tmp_path / f"{schedule}_copy"
        shutil.copytree(built(schedule)[0], dst)
        return dst

    return copy


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_stage_list_is_what_the_export_has(export_tiny, schedule):
    names = tuple(e["name"] for e in _manifest(export_tiny(schedule, "both"))["stages"])
    assert names == SCHEDULE_STAGES[schedule], "the export and the stage contract disagree: not every stage is tested"


@pytest.mark.parametrize("schedule, stage", CASES, ids=IDS)
def test_stage_engine_is_built_with_a_matching_sidecar(built, installed, schedule, stage):
    art, report, _, _ = built(schedule)
    assert stage not in report.get("failures", {}), report["failures"][stage]
    flavor, version = installed
    plan_rel, sidecar_rel = engine_paths(flavor, stage)
    plan = art / plan_rel
    assert plan.stat().st_size > 0 and report["stages"][stage]["plan"] == str(plan)
    sidecar = json.loads((art / sidecar_rel).read_text(encoding="utf-8"))
    entry = _entry(art, stage)
    assert sidecar["stage"] == stage and sidecar["flavor"] == flavor and sidecar["trt_version"] == version
    assert sidecar["graph"] == entry["graph"] and sidecar["graph_sha256"] == entry["files"][entry["graph"]]
    assert sidecar["graph_files"] == entry["files"]
    assert sidecar["plan_sha256"] == file_sha256(plan) and sidecar["plan_bytes"] == plan.stat().st_size
    assert sidecar["precision"] == _manifest(art)["precision"] == "fp32"
    assert sidecar["compute_capabilities"] == report["compute_capabilities"]
    decoded = load_artifact(art).layout.decodes(stage)  # a block of a `both` artifact: prefill + decode profiles
    assert decoded == stage.startswith("llm_")
    assert len(sidecar["profiles"]) == (2 if decoded else 1)
    assert sidecar["profile_names"] == (["prefill", "decode"] if decoded else ["all"])
    assert report["stages"][stage]["profiles"] == sidecar["profile_names"]
    assert sidecar["profiles_note"].startswith("two profiles" if decoded else "one profile")
    assert entry["engines"][flavor] == {
        "sidecar": sidecar_rel, "plan": plan_rel, "build_key": sidecar["build_key"], "trt_version": version,
        "compute_capabilities": sidecar["compute_capabilities"], "precision": "fp32", "dims": sidecar["dims"],
        "profiles_note": sidecar["profiles_note"]}
    assert check_engine(art, stage) == (plan, sidecar)
    if stage != "seg_head":  # every other engine takes a batch: 1 to --max-batch, tuned for --opt-batch
        assert sidecar["dims"]["batch"] == {"min": 1, "opt": 4, "max": 8}


@pytest.mark.parametrize("schedule, stage", CASES, ids=IDS)
def test_profile_in_the_config_is_exactly_the_manifest_dims(export_tiny, schedule, stage):
    art = export_tiny(schedule, "both")
    manifest = _manifest(art)
    dims, spec = manifest["dims"], _entry(art, stage)
    prepared = inspect_stage(art, stage)
    decoded = stage.startswith("llm_")  # every block of a `both` artifact: profile 1 is its decode profile
    assert prepared.config.num_optimization_profiles == len(prepared.trt_profiles) == (2 if decoded else 1)
    for i, profile in enumerate(prepared.trt_profiles):
        got = read_profile(profile, prepared.network)
        at = {**dims, f"rows_{stage}": {"min": 1, "opt": 1, "max": 1}} if i == 1 else dims
        want = {}
        for t in spec["inputs"]:
            if t["name"] in got:
                want[t["name"]] = InputShapes(*(tuple(d if isinstance(d, int) else at[d][k] for d in t["shape"])
                                                for k in ("min", "opt", "max")))
        assert got == want, f"profile {i}"
    assert set(got) <= {t["name"] for t in spec["inputs"]} and got  # graph inputs are spec inputs


def test_default_targets_are_ampere_and_newer(export_tiny):
    prepared = inspect_stage(export_tiny("csp", "both"), "seg_head")
    cfg = prepared.config
    got = [cfg.get_compute_capability(i).name for i in range(cfg.num_compute_capabilities)]
    assert got == [c for c in targetable(load_trt()[0]) if int(c[2:]) >= 80]
    assert "SM86" in got and "SM89" in got and "SM120" in got and "SM75" not in got


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_unchanged_rebuild_is_a_cache_hit(built, built_copy, schedule):
    art = built_copy(schedule)
    plans = {p: p.stat().st_mtime_ns for p in (art / "engines").rglob("*.plan")}
    manifest_mtime = (art / MANIFEST_NAME).stat().st_mtime_ns
    assert plans
    lines = []
    t0 = time.perf_counter()
    report = build_engines(art, progress=lines.append)
    seconds = time.perf_counter() - t0
    assert {s["status"] for s in report["stages"].values()} == {"cached"}
    assert set(report["stages"]) == set(built(schedule)[1]["stages"])
    assert {p: p.stat().st_mtime_ns for p in plans} == plans
    assert (art / MANIFEST_NAME).stat().st_mtime_ns == manifest_mtime  # nothing changed: not rewritten
    assert seconds < max(5.0, built(schedule)[2] / 2), f"cache hit took {seconds:.1f} s"
    assert any(": cached (engines/" in line for line in lines)


def test_progress_names_every_stage(built):
    _, _, _, lines = built("csp")
    n = len(SCHEDULE_STAGES["csp"])
    for i, stage in enumerate(SCHEDULE_STAGES["csp"], 1):
        assert any(line.startswith(f"[{i}/{n}] {stage}: building with TensorRT-RTX ") for line in lines), stage


def _reexport_graph(art, stage: str) -> None:
    """What a re-export with a changed graph leaves: a new graph file and its new hash in the manifest."""
    rel = f"graphs/{stage}.onnx"
    model = onnx.load(str(art / rel))
    model.doc_string = "changed"
    onnx.save(model, str(art / rel))
    manifest = _manifest(art)
    entry = next(e for e in manifest["stages"] if e["name"] == stage)
    entry["files"][rel] = file_sha256(art / rel)
    (art / MANIFEST_NAME).write_text(json.dumps(sealed(manifest), indent=2), encoding="utf-8")


def test_engine_of_a_changed_graph_is_refused_then_rebuilt(built_copy):
    art = built_copy("csp")
    _reexport_graph(art, "seg_head")
    with pytest.raises(ArtifactError, match=r"^engine engines/tensorrt-rtx/seg_head\.plan was built from another "
                                            r"graphs/seg_head\.onnx \(the graph changed since the build.*"
                                            r"rebuild with: csprt build .*csp_copy$"):
        check_engine(art, "seg_head")
    check_engine(art, "sam_decoder")  # other stages are untouched
    report = build_engines(art, stages="seg_head,sam_decoder")
    assert report["stages"]["seg_head"]["status"] == "built" and report["stages"]["sam_decoder"]["status"] == "cached"
    check_engine(art, "seg_head")


def test_engine_from_another_version_or_flavor_is_refused(built_copy, installed):
    art = built_copy("csp")
    flavor, version = installed
    with pytest.raises(ArtifactError, match=rf"^engine engines/tensorrt-rtx/seg_head\.plan was built with TensorRT-RTX "
                                            rf"{version}, but this host runs TensorRT-RTX 1\.6\.0\.0; an engine is never "
                                            r"loaded into another TensorRT version or flavor; rebuild with: csprt build "):
        check_engine(art, "seg_head", flavor, "1.6.0.0")
    with pytest.raises(ArtifactError, match=rf"^stage 'seg_head' has no TensorRT engine in .* \(it has TensorRT-RTX "
                                            rf"{version} engines, which never load into another flavor\); build it "
                                            r"with: csprt build "):
        check_engine(art, "seg_head", "tensorrt", "10.13.0")
    sidecar_path = art / engine_paths(flavor, "seg_head")[1]
    sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    sidecar["trt_version"] = "1.5.0.0"  # a plan left over from an older TensorRT-RTX
    sidecar_path.write_text(json.dumps(sidecar), encoding="utf-8")
    with pytest.raises(ArtifactError, match=rf"built with TensorRT-RTX 1\.5\.0\.0, but this host runs TensorRT-RTX "
                                            rf"{version}"):
        check_engine(art, "seg_head")
    assert build_engines(art, stages="seg_head")["stages"]["seg_head"]["status"] == "built"  # key covers the version
    check_engine(art, "seg_head")


def _same_build(a: bytes, b: bytes) -> bool:
    """Two plans of one graph and settings: same size and layout. Not byte-identical: Myelin numbers the
    tensors it generates per build ("__mye134604" vs "__mye134652"), a few hundred bytes in a 6.7 MB plan."""
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b)) < len(a) // 1000


def test_changed_plan_is_refused_and_rebuilt(built_copy, installed):
    art = built_copy("csp")
    plan = art / engine_paths(installed[0], "sam_decoder")[0]
    original = plan.read_bytes()
    plan.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ArtifactError, match=r"sam_decoder\.plan changed since it was built \(hash mismatch\); rebuild "
                                            r"with: csprt build "):
        check_engine(art, "sam_decoder")
    assert build_engines(art, stages="sam_decoder")["stages"]["sam_decoder"]["status"] == "built"
    check_engine(art, "sam_decoder")
    assert _same_build(plan.read_bytes(), original)


def test_settings_change_the_build_key(built_copy, installed, tmp_path):
    art = built_copy("csp")
    flavor, _ = installed
    before = json.loads((art / engine_paths(flavor, "seg_head")[1]).read_text(encoding="utf-8"))
    cache, lines = tmp_path / "timing.cache", []
    report = build_engines(art, stages=["seg_head"], shapes=["num_seg=1:2:4"], compute_capabilities=["sm_89", "8.6"],
                           workspace_gb=0.25, timing_cache=cache, progress=lines.append)
    assert report["stages"]["seg_head"]["status"] == "built"
    assert lines[0].startswith("--timing-cache ignored: TensorRT-RTX ") and not cache.exists()
    sidecar = json.loads((art / engine_paths(flavor, "seg_head")[1]).read_text(encoding="utf-8"))
    assert sidecar["build_key"] != before["build_key"]
    assert sidecar["compute_capabilities"] == ["SM86", "SM89"]
    assert sidecar["profiles"] == [{"seg_hidden": {"min": [1, 64], "opt": [2, 64], "max": [4, 64]}}]
    assert sidecar["dims"] == {"num_seg": {"min": 1, "opt": 2, "max": 4}}
    assert sidecar["settings"]["workspace_gb"] == 0.25
    assert _entry(art, "seg_head")["engines"][flavor]["dims"] == sidecar["dims"]
    again = build_engines(art, stages=["seg_head"], shapes=["num_seg=1:2:4"], compute_capabilities=["SM86", "SM89"],
                          workspace_gb=0.25, timing_cache=cache)
    assert again["stages"]["seg_head"]["status"] == "cached"  # same settings, spelled differently
    prepared = inspect_stage(art, "seg_head", shapes=["num_seg=1:2:4"], compute_capabilities=["SM86", "SM89"],
                             workspace_gb=0.25)
    trt = load_trt()[0]
    assert prepared.config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE) == 1 << 28
    assert read_profile(prepared.trt_profiles[0], prepared.network) == {
        "seg_hidden": InputShapes((1, 64), (2, 64), (4, 64))}


def test_fp16_artifact_builds_fp16_engines(export_tiny, tmp_path, installed):
    art = tmp_path / "csp16"
    shutil.copytree(export_tiny("csp", "both", "fp16"), art)
    report = build_engines(art, precision="fp16", stages="embed,entry_2,llm_2,seg_head,sam_decoder")
    assert report["precision"] == "fp16" and set(report["stages"]) == {"embed", "entry_2", "llm_2", "seg_head",
                                                                       "sam_decoder"}
    for stage in report["stages"]:
        plan, sidecar = check_engine(art, stage)
        assert sidecar["precision"] == "fp16" and plan.stat().st_size > 0


@pytest.mark.parametrize("stage", ["seg_head", "sam_decoder"])
def test_rebuilds_agree(built_copy, installed, stage):
    art = built_copy("full")
    plan_rel, sidecar_rel = engine_paths(installed[0], stage)
    before = (art / plan_rel).read_bytes()
    (art / sidecar_rel).unlink()  # forget the build: the next one really builds
    assert build_engines(art, stages=stage)["stages"][stage]["status"] == "built"
    after = (art / plan_rel).read_bytes()
    assert _same_build(after, before)
    if stage == "seg_head":  # no Myelin-generated names: byte-identical
        assert after == before


def test_cli_build_prints_where_engines_went(built_copy, capsys):
    from tools.cli import main

    art = built_copy("csp")
    assert main(["build", str(art), "--stages", "seg_head,sam_decoder", "--shapes", "num_seg=1:1:2"]) == 0
    out, err = capsys.readouterr()
    assert f"engines: {art}/engines/tensorrt-rtx (tensorrt-rtx " in out
    assert f"  seg_head: {art}/engines/tensorrt-rtx/seg_head.plan (built, " in out
    assert "[csprt] [1/2] seg_head: building with TensorRT-RTX" in err
    assert main(["build", str(art), "--stages", "seg_head,sam_decoder", "--shapes", "num_seg=1:1:2"]) == 0
    assert "; 0 built, 2 cached)" in capsys.readouterr().out


def test_cli_build_shapes_narrow_both_profiles_of_a_decoded_block(built_copy, installed, capsys):
    """`csprt build --shapes` on a block of a `both` artifact: prefill and decode profiles, both narrowed, printed."""
    from tools.cli import main

    art = built_copy("csp")
    assert main(["build", str(art), "--stages", "llm_0", "--shapes", "cache_llm_0=1:8:48", "rows_llm_0=1:8:40"]) == 0
    out = capsys.readouterr().out
    assert f"  llm_0: {art}/engines/tensorrt-rtx/llm_0.plan (built, " in out and "; profiles prefill, decode)" in out
    sidecar = json.loads((art / engine_paths(installed[0], "llm_0")[1]).read_text(encoding="utf-8"))
    prefill, decode = sidecar["profiles"]
    assert prefill["past_key_0"]["max"][2] == decode["past_key_0"]["max"][2] == 48
    assert (prefill["hidden"]["min"][1], prefill["hidden"]["max"][1]) == (1, 40)
    assert decode["hidden"]["min"][1] == decode["hidden"]["opt"][1] == decode["hidden"]["max"][1] == 1
    assert sidecar["dims"]["cache_llm_0"] == {"min": 1, "opt": 8, "max": 48}
    assert main(["build", str(art), "--stages", "llm_0", "--shapes", "rows_llm_0=2:8:40"]) == 2
    err = capsys.readouterr().err
    assert "rows_llm_0=2:8:40: min 2 leaves out the one-row decode steps of block 'llm_0'" in err


def test_cli_build_with_an_unimportable_graph_exits_2_naming_the_node(built_copy, capsys):
    from tools.cli import main

    art = built_copy("csp")
    # seg_head replaced by a graph TensorRT cannot import (an ArgMax over a 1-D tensor), as a re-export would;
    # its declared I/O is the stage's, which the artifact check at load compares
    out_dim = load_artifact(art, verify=False).layout.stage("seg_head").output("seg_embeddings").shape[1]
    model = helper.make_model(helper.make_graph(
        [helper.make_node("ReduceSum", ["seg_hidden", "axis1"], ["rows"], keepdims=0),
         helper.make_node("ArgMax", ["rows"], ["picked"], axis=0, keepdims=1, name="pick_row"),
         helper.make_node("Cast", ["picked"], ["seg_embeddings"], to=TensorProto.FLOAT)], "seg_head",
        [helper.make_tensor_value_info("seg_hidden", TensorProto.FLOAT, ["num_seg", 64])],
        [helper.make_tensor_value_info("seg_embeddings", TensorProto.FLOAT, ["num_seg", out_dim])],
        initializer=[helper.make_tensor("axis1", TensorProto.INT64, [1], [1])]),
        opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(art / "graphs/seg_head.onnx"))
    manifest = _manifest(art)
    next(e for e in manifest["stages"] if e["name"] == "seg_head")["files"]["graphs/seg_head.onnx"] = file_sha256(
        art / "graphs/seg_head.onnx")
    (art / MANIFEST_NAME).write_text(json.dumps(sealed(manifest), indent=2), encoding="utf-8")
    capsys.readouterr()
    assert main(["build", str(art), "--stages", "seg_head,sam_decoder"]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines()[-1].startswith(
        "csprt build: error: 1 of 2 stage engines failed to build (seg_head); first: stage 'seg_head' "
        "(graphs/seg_head.onnx): TensorRT-RTX 1.7.1.116 cannot import the graph: node 'pick_row' (ArgMax): ")
    assert "[csprt] [1/2] seg_head: FAILED: " in err
    assert f"  sam_decoder: {art}/engines/tensorrt-rtx/sam_decoder.plan (cached, " in out
    assert "tensorrt-rtx" not in _entry(art, "seg_head")["engines"]  # the stale engine is no longer listed
    with pytest.raises(ArtifactError, match=r"^stage 'seg_head' has no TensorRT-RTX engine in .*; build it with: "):
        check_engine(art, "seg_head")


def test_budget_below_the_inline_need_builds_from_mapped_external_data(built, export_tiny, tmp_path, monkeypatch,
                                                                       installed):
    """The chosen mechanism at tiny scale (BUILD_BASE 0, so the budget is about the weights alone): the largest
    stage, over the budget with its weights inline, builds within it from mapped external data, into the plan
    the inline graph gives."""
    from engines import build_memory as build_mod
    from engines.build import GIB, MappedWeights, estimate_stage_memory
    from graphs.errors import ToolchainError
    from graphs.manifest import load_artifact
    from tests.engines.test_build_memory import externalize

    monkeypatch.setattr(build_mod, "BUILD_BASE", 0)
    inline_art, mapped_art = tmp_path / "inline", tmp_path / "mapped"
    for art in (inline_art, mapped_art):
        shutil.copytree(export_tiny("csp", "both"), art)
    stage = max(SCHEDULE_STAGES["csp"], key=lambda n: estimate_stage_memory(load_artifact(inline_art), n).peak_bytes)
    externalize(mapped_art, [stage])
    need_inline = estimate_stage_memory(load_artifact(inline_art), stage).peak_bytes
    need_mapped = estimate_stage_memory(load_artifact(mapped_art), stage).peak_bytes
    assert need_mapped < need_inline
    budget = (need_mapped + need_inline) / 2 / GIB
    with pytest.raises(ToolchainError, match=rf"^stage '{stage}' needs about .* more than the --max-build-memory "
                                             r"budget of .*; or build the stages that fit with --stages "):
        build_engines(inline_art, max_build_memory_gb=budget)
    drops = []
    real_drop = MappedWeights.drop
    monkeypatch.setattr(MappedWeights, "drop", lambda self: (drops.append(1), real_drop(self)))
    report = build_engines(mapped_art, stages=stage, max_build_memory_gb=budget)
    assert report["stages"][stage]["status"] == "built" and report["budget_bytes"] == int(budget * GIB)
    assert drops  # the parser read the mapped file, and its pages were let go while building
    plan_rel, sidecar_rel = engine_paths(installed[0], stage)
    mapped, inline = (mapped_art / plan_rel).read_bytes(), (built("csp")[0] / plan_rel).read_bytes()
    # The plan the inline graph gives, up to Myelin's per-build names: two inline builds of `decode` differ in
    # 5603 of 5055108 bytes (0.11%), mapped vs inline in 5258; other weights would change far more.
    assert len(mapped) == len(inline) and sum(x != y for x, y in zip(mapped, inline)) < len(inline) // 400
    sidecar = json.loads((mapped_art / sidecar_rel).read_text(encoding="utf-8"))
    assert sidecar["build_memory"]["external_weight_bytes"] == (mapped_art / f"graphs/{stage}.onnx.data").stat().st_size
    assert sidecar["build_memory"]["estimated_peak_bytes"] == need_mapped
    assert 0 < sidecar["build_memory"]["measured_peak_bytes"] < 4 * GIB  # this stage's own peak, sampled
    assert check_engine(mapped_art, stage)[1] == sidecar


def test_cached_stages_build_under_any_budget(built_copy):
    art = built_copy("csp")
    report = build_engines(art, max_build_memory_gb=0.001)  # nothing to build: nothing to refuse
    assert {s["status"] for s in report["stages"].values()} == {"cached"}
