"""csprt build's memory budget: the per-stage estimate, the one-line refusal, and the mapped external data the
parser reads without a copy (its pages let go while building). The TensorRT-RTX builds are in test_build.py."""

from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from engines import build_memory as build_mod
from engines.build import (GIB, MappedWeights, StageMemory, build_engines, check_build_memory,
                           estimate_stage_memory)
from graphs.errors import ArtifactError, ToolchainError
from graphs.manifest import MANIFEST_NAME, graph_files, load_artifact, sealed


def externalize(art: Path, stages=None) -> None:
    """What the exporter writes for a graph over 2 GB: its tensors in graphs/<stage>.onnx.data, and the manifest's
    file hashes updated to match."""
    manifest = json.loads((art / MANIFEST_NAME).read_text(encoding="utf-8"))
    for entry in manifest["stages"]:
        if stages is not None and entry["name"] not in stages:
            continue
        graph = art / entry["graph"]
        onnx.save(onnx.load(str(graph)), str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=graph.name + ".data", size_threshold=1024)
        entry["files"] = graph_files(art, entry["graph"])
    (art / MANIFEST_NAME).write_text(json.dumps(sealed(manifest), indent=2), encoding="utf-8")


def test_estimate_counts_inline_and_external_bytes_at_their_ratios(export_tiny, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    inline = estimate_stage_memory(load_artifact(art), "llm_0")
    externalize(art, ["llm_0"])
    mapped = estimate_stage_memory(load_artifact(art), "llm_0")
    data = (art / "graphs/llm_0.onnx.data").stat().st_size
    assert inline.external_bytes == 0 and inline.inline_bytes > data  # before: every byte in the .onnx
    assert mapped.external_bytes == data and mapped.inline_bytes < inline.inline_bytes - data // 2
    assert inline.peak_bytes == int(build_mod.BUILD_BASE + build_mod.RATIO_INLINE * inline.inline_bytes)
    assert mapped.peak_bytes == int(build_mod.BUILD_BASE + build_mod.RATIO_INLINE * mapped.inline_bytes
                                    + build_mod.RATIO_MAPPED * data)
    assert mapped.peak_bytes < inline.peak_bytes  # the same weights need less mapped than inline


def _mem(stage, peak_gib, weights_gib=1.0):
    return StageMemory(stage, 0, int(weights_gib * GIB), int(peak_gib * GIB))


def test_refusal_is_one_line_naming_stage_budget_and_what_fits(export_tiny):
    artifact = load_artifact(export_tiny("csp", "both"))
    names = [s.name for s in artifact.layout.stages]
    memory = {n: _mem(n, 1.0) for n in names} | {"llm_2": _mem("llm_2", 9.73, 7.0), "llm_1": _mem("llm_1", 8.5)}
    with pytest.raises(ToolchainError) as info:
        check_build_memory(artifact, names, memory, 8 * GIB, from_host=True)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"stage 'llm_2' needs about 9.7 GiB to build (7.0 GiB of weights; 2 of {len(names)} stages "
                          "to build are over), more than the 8.0 GiB this host has available now (--max-build-memory "
                          "defaults to it); build it on a host with 9.8 GiB free, or with --max-build-memory 9.8 "
                          "once that much is free; or build the stages that fit with --stages ")
    fit = msg.rsplit("--stages ", 1)[1].split(",")
    assert fit == [n for n in names if n not in ("llm_1", "llm_2")]
    with pytest.raises(ToolchainError, match=r"more than the --max-build-memory budget of 8\.0 GiB;"):
        check_build_memory(artifact, names, memory, 8 * GIB, from_host=False)
    check_build_memory(artifact, names, memory, 10 * GIB, from_host=False)  # fits: no error


def test_cached_stages_are_not_held_to_the_budget(export_tiny):
    artifact = load_artifact(export_tiny("csp", "both"))
    names = [s.name for s in artifact.layout.stages]
    check_build_memory(artifact, names, {"seg_head": _mem("seg_head", 0.5)}, GIB, from_host=True)  # others cached


@pytest.mark.trt
@pytest.mark.parametrize("budget", [0, -1])
def test_non_positive_budget_is_refused(export_tiny, budget):
    with pytest.raises(ToolchainError, match=rf"^--max-build-memory {budget}: expected a positive size in GiB$"):
        build_engines(export_tiny("csp", "both"), max_build_memory_gb=budget)


@pytest.mark.trt
def test_cli_over_budget_exits_2_before_building(export_tiny, tmp_path, capsys):
    from tools.cli import main

    art = tmp_path / "art"
    shutil.copytree(export_tiny("csp", "both"), art)
    assert main(["build", str(art), "--max-build-memory", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "more than the --max-build-memory budget of 0.5 GiB" in err
    assert "Traceback" not in err and not (art / "engines").exists()  # nothing was built


def test_mapped_weights_point_at_the_file_bytes_and_survive_dropping(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 3 * 4096 + 7, dtype=np.uint8).tobytes()
    (tmp_path / "w.data").write_bytes(data)
    weights = MappedWeights(tmp_path)
    addr = weights.address("w.data", 4096, 5000)
    assert ctypes.string_at(addr, 5000) == data[4096:9096]
    assert weights.address("w.data", 0, 10) == addr - 4096  # one mapping per file
    drops = []
    real_drop = weights.drop
    weights.drop = lambda: (drops.append(1), real_drop())
    with weights.dropping(every=0.01):
        deadline = __import__("time").monotonic() + 5
        while len(drops) < 3 and __import__("time").monotonic() < deadline:
            assert ctypes.string_at(addr, 5000) == data[4096:9096]  # a dropped page faults back in from the file
    assert len(drops) >= 4  # while building, and once after
    assert ctypes.string_at(addr, 5000) == data[4096:9096]
    weights.close()


def test_mapped_weights_refuse_a_tensor_past_the_file_end(tmp_path):
    (tmp_path / "w.data").write_bytes(b"x" * 100)
    with pytest.raises(ArtifactError, match=r"w\.data: tensor data at \[90, 110\) is past the end of the file \(100 "
                                            r"bytes\); re-export the artifact$"):
        MappedWeights(tmp_path).address("w.data", 90, 20)


def test_peak_rss_is_sampled_without_resetting_the_process_peak():
    import resource
    import time

    from engines.build import PeakRss

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with PeakRss(every=0.01) as rss:
        start = rss.peak
        block = bytearray(200 << 20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page
        time.sleep(0.1)
        del block
    assert rss.peak - start >= 150 << 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >= before  # /usr/bin/time -v still sees the real peak
