"""What a block engine's second (decode) optimization profile costs to build: one graph, built twice.

    python docs/bench/profile_cost.py ART [--cc SM89 ...] [STAGE ...]  (default: every decoded block, every target)

For each block, builds its engine with TensorRT(-RTX) from the same parsed graph and settings as `csprt build`
(`engines.build.prepare_stage`), once with profile 0 alone (what engines had before) and once with both (prefill
+ decode, what `csprt build` makes now), into a temporary directory ($TMPDIR; the artifact is not written). Prints one
JSON line per block: build seconds and plan bytes of each. Run time per step needs a GPU (tools/gpu_decode.py).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from engines.build import PlanFromNetwork, _Job, _resolve, prepare_stage
from engines.profiles import stage_profiles
from engines.trt import CaptureLogger


def build(trt, job, profiles: int, out: Path) -> dict:
    logger = CaptureLogger(trt)
    prep = prepare_stage(trt, job, logger)
    if profiles == 1:  # the same network and settings, profile 0 only
        from engines.build import ConfigFromProfiles

        config, _ = ConfigFromProfiles(trt, prep.profiles[:1], job.settings)(prep.builder, prep.network)
    else:
        config = prep.config
    t0 = time.perf_counter()
    nbytes, _ = PlanFromNetwork((prep.builder, prep.network, prep.parser), config, logger, job.what,
                                weights=prep.weights).to_file(out)
    return {"profiles": config.num_optimization_profiles, "build_s": round(time.perf_counter() - t0, 2),
            "plan_bytes": nbytes}


def main(argv: list[str]) -> None:
    art, rest = argv[0], argv[1:]
    targets = None
    if rest[:1] == ["--cc"]:
        rest = rest[1:]
        targets = [t for t in rest if t.upper().startswith("SM")]
        rest = [t for t in rest if t not in targets]
    stages = rest
    artifact, names, trt, settings, dims = _resolve(art, None, "auto", targets, None, None, None)
    layout = artifact.layout
    stages = stages or [s.name for s in layout.stages if layout.decodes(s.name)]
    with tempfile.TemporaryDirectory() as tmp:
        for name in stages:
            job = _Job(artifact, name, settings, dims)
            assert len(stage_profiles(layout.stage(name), dims, decode=job.decode)) == 2
            one = build(trt, job, 1, Path(tmp) / f"{name}.1.plan")
            two = build(trt, job, 2, Path(tmp) / f"{name}.2.plan")
            print(json.dumps({"stage": name, "targets": list(settings.compute_capabilities), "one": one, "two": two}),
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
