"""TrtRunner.infer orders its own stream after the caller's: torch CUDA inputs are copied only once the work that
produced them is done. The GPU is faked with recording streams (tests/device_fakes.py shows the pattern)."""

from __future__ import annotations

import numpy as np
import pytest


class RecordingStream:
    def __init__(self, name: str, log: list):
        self.name, self.log, self.cuda_stream = name, log, 0

    def wait_stream(self, other) -> None:
        self.log.append(("wait", self.name, other.name))

    def synchronize(self) -> None:
        self.log.append(("sync", self.name))


@pytest.mark.trt
def test_infer_waits_for_the_stream_that_produced_its_inputs(export_tiny, monkeypatch):
    torch = pytest.importorskip("torch")
    import engines.trt_runner as trt_runner
    from engines.profiles import profiles_to_json, stage_profiles
    from graphs.manifest import load_artifact

    art = export_tiny("csp", "both")
    layout = load_artifact(art).layout
    stage = layout.stage("seg_head")
    sidecar = {"profiles": profiles_to_json(stage_profiles(stage, layout.dims)), "dims": {}}
    # no engine is built or loaded: the sidecar is what `check_engine` would return for one
    monkeypatch.setattr(trt_runner, "check_engine", lambda *a: (art / "engines" / "seg_head.plan", sidecar))
    runner = trt_runner.TrtRunner(stage, art)
    log = []
    caller = RecordingStream("caller", log)

    def activate():  # no GPU here: only the stream the runner owns
        runner.stream = RecordingStream("runner", log)

    def run(feed, stream):
        log.append(("enqueue", stream.name))
        return {"seg_embeddings": torch.zeros((1, 32))}

    monkeypatch.setattr(runner, "_activate", activate)
    monkeypatch.setattr(runner, "_run", run)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    with runner:
        out = runner.infer({"seg_hidden": torch.ones((1, 64))})
    assert log == [("wait", "runner", "caller"), ("enqueue", "runner"), ("sync", "runner")]
    assert isinstance(out["seg_embeddings"], np.ndarray)
