"""Calibration feeds for `csprt export --quantize`: the float artifact's own stage inputs on real requests.

    calibration set (graphs.quantize: image + query samples, hashed)
        --ArtifactSession(float artifact, ONNX Runtime, record=True)--> {llm_<i>: [feed, ...]}
        --> graphs.quantize.quantize_artifact (onnxruntime.quantization.quantize_static reads them)

Each sample runs the whole pipeline once (single-pass when the artifact has it: the prefill every request pays
for), so a block is calibrated on the hidden rows it really gets after the schedule's selections.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from graphs.quantize import CalibrationSet


def calibration_feeds(art_dir, calibration: CalibrationSet, stages: list[str],
                      progress: Callable[[str], None] | None = None) -> dict[str, list[dict[str, np.ndarray]]]:
    """{stage: [its recorded feed per sample]} from running `calibration` through the artifact on ONNX Runtime.

    Args:
        art_dir (path): a float artifact.
        calibration (CalibrationSet): the samples.
        stages (list[str]): the stages whose feeds to keep (e.g. the llm_<i> blocks).
        progress (callable | None): one line per sample. Defaults to silent.
    """
    from engines.session import ArtifactSession

    say = progress or (lambda _m: None)
    out: dict[str, list[dict[str, np.ndarray]]] = {s: [] for s in stages}
    with ArtifactSession(art_dir, backend="onnxruntime", verify=False) as session:
        mode = "single-pass" if "single-pass" in session.artifact.modes else "generate"
        for i, (image, query) in enumerate(calibration.samples, 1):
            seg = session.segment(image, query, mode=mode, max_new_tokens=1, record=True)
            for name in stages:
                feed = seg.pipeline.feeds.get(name)
                if feed is not None:
                    out[name].append({k: np.array(v, copy=True) for k, v in feed.items()})
            say(f"quantize: calibration sample {i}/{len(calibration.samples)} ({mode})")
    return out
