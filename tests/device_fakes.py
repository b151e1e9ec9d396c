"""CPU stand-ins for the GPU Pipeline's CUDA side, so its chaining runs in CI: a recording `torch.cuda`
(streams, events) and an ONNX Runtime runner that behaves like `TrtRunner.enqueue` (torch tensors in and
out, outputs in buffers that every call overwrites).

    cuda = FakeCuda()
    chain = CudaChain(layout, "cuda", cuda=cuda, alloc_device="cpu")
    Pipeline(layout, device_ort_runner_for(artifact_or_layout, graphs, cuda.log), chain=chain)
    cuda.log  # [("run", "side", "sam_encoder"), ("record", "side", "sam_encoder"), ("wait", "main", "sam_encoder"), ...]
"""

from __future__ import annotations

import contextlib

import math

import numpy as np
import torch

from engines.ort_runner import OrtRunner
from engines.trt_runner import buffer_plan


class FakeEvent:
    def __init__(self, log: list):
        self.log, self.tag = log, None

    def record(self, stream) -> None:
        ran = [e[2] for e in self.log if e[0] == "run" and e[1] == stream.name]
        self.tag = ran[-1] if ran else None  # the stage this event marks the end of
        self.log.append(("record", stream.name, self.tag))

    def elapsed_time(self, end) -> float:
        return 1.0


class FakeStream:
    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_event(self, event: FakeEvent) -> None:
        self.log.append(("wait", self.name, event.tag))

    def synchronize(self) -> None:
        self.log.append(("sync", self.name, None))


class FakeCuda:
    """What CudaChain uses of torch.cuda: Stream(device), Event(), stream(s). The first stream is "main"."""

    def __init__(self):
        self.log: list[tuple] = []
        self.made = 0

    def Stream(self, device):  # noqa: N802  torch.cuda's name
        self.made += 1
        return FakeStream("main" if self.made == 1 else "side", self.log)

    def Event(self):  # noqa: N802
        return FakeEvent(self.log)

    def stream(self, stream):
        return contextlib.nullcontext()


class DeviceOrt(OrtRunner):
    """OrtRunner with `enqueue(feed, stream)` as TrtRunner has it: numpy or torch inputs, and outputs that are views
    of preallocated buffers (`buffer_plan`) the next call overwrites, so a row the Pipeline keeps must be cloned.
    Logs ("run", stream, stage, {input: "tensor" | "numpy"})."""

    def __init__(self, *args, log: list, **kwargs):
        super().__init__(*args, **kwargs)
        self.log, self.last_events = log, ()
        self.bufs = {b.name: torch.zeros(max(1, math.prod(b.max_shape)), dtype=getattr(torch, b.dtype))
                     for b in buffer_plan(self.stage, self.dims).values() if b.io == "output"}

    def enqueue(self, feed: dict, stream) -> dict:
        kinds = {n: "tensor" if isinstance(v, torch.Tensor) else "numpy" for n, v in feed.items()}
        self.log.append(("run", stream.name, self.name, kinds))
        out = self.infer({n: v.numpy() if isinstance(v, torch.Tensor) else v for n, v in feed.items()})
        views = {}
        for name, value in out.items():
            views[name] = self.bufs[name][:value.size].view(value.shape)
            views[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
        self.last_events = (FakeEvent(self.log), FakeEvent(self.log))
        return views


def device_ort_runner_for(layout, graph_path, log: list):
    """`runner_for(stage)` making DeviceOrt runners; `graph_path(name)` gives a stage's .onnx."""
    def runner_for(stage):
        return DeviceOrt(stage, layout.dims, graph_path(stage.name), log=log)

    return runner_for
