"""The Pipeline's GPU chain: TensorRT stages exchange torch CUDA tensors, two streams, timed by CUDA events.

    Pipeline(layout, runner_for, chain=CudaChain(layout, "cuda"))   # runners: TrtRunner (`enqueue`)

    run   with torch.cuda.stream(main):            # host reads (token, outputs) are ordered after main's work
    stage     wait the events `plan.waits` names, runner.enqueue(feed, stream) -> device views, record its event
    loop      token(): the one host read per step; keep(): clone a [SEG] row before the next step overwrites it
    end       main joins the side stream; outputs .cpu(); timings from each enqueue's event pair

What runs where comes from `engines.gpu_plan.plan_streams` (pure, tested on CPU). torch is imported
on first use, so `engines` imports without it. `cuda` may be any object with torch.cuda's `Stream`,
`Event` and `stream` (CPU tests pass a recording fake and runners that return CPU tensors).
"""

from __future__ import annotations

import numpy as np

from engines.gpu_plan import MAIN, SIDE, SIDE_KINDS, StreamPlan, plan_streams
from graphs.stages import Layout, StageSpec


def _torch():
    import torch  # lazily: engines/ imports without torch

    return torch


def is_tensor(value) -> bool:
    """True for a torch tensor, without importing torch when it is not loaded."""
    return type(value).__module__.startswith("torch")


class CudaChain:
    """Keeps stage outputs on the device; only `host_reads` (see engines.gpu_plan) reach the host.

    Args:
        layout (Layout): the artifact's stages and wiring.
        device (str): "cuda" or "cuda:N". Defaults to "cuda".
        side_kinds (tuple[str, ...]): stage kinds for the side stream. Defaults to ("sam_encoder",).
        cuda (module | None): torch.cuda or a stand-in. Defaults to None (torch.cuda, imported on first use).
        alloc_device (str | None): where KV caches and step scalars are allocated. Defaults to None (`device`).
    """

    def __init__(self, layout: Layout, device: str = "cuda", side_kinds: tuple[str, ...] = SIDE_KINDS, cuda=None,
                 alloc_device: str | None = None):
        self.layout, self.device, self.side_kinds = layout, device, side_kinds
        self.alloc_device = alloc_device or device  # where caches and scalars live (CPU under the test fakes)
        self._cuda = cuda
        self.streams: dict = {}
        self.plan: StreamPlan | None = None
        self._events: dict = {}
        self._timers: list[tuple[str, tuple]] = []

    @property
    def cuda(self):
        if self._cuda is None:
            self._cuda = _torch().cuda
        return self._cuda

    def begin(self, mode: str):
        """Plan `mode`; returns the context that makes the main stream current for the run."""
        self.plan = plan_streams(self.layout, mode, self.side_kinds)
        if not self.streams:
            self.streams = {MAIN: self.cuda.Stream(self.device), SIDE: self.cuda.Stream(self.device)}
        self._events, self._timers = {}, []
        return self.cuda.stream(self.streams[MAIN])

    def infer(self, stage: StageSpec, runner, feed: dict, timings: dict[str, float]) -> dict:
        """Enqueue `stage` on its stream after the events it waits on; no host synchronisation."""
        stream = self.streams[self.plan.stream.get(stage.name, MAIN)]  # decode steps: main
        for producer in self.plan.waits.get(stage.name, ()):
            if producer in self._events:  # absent: the producer was skipped (its outputs are host empties)
                stream.wait_event(self._events[producer])
        out = runner.enqueue(feed, stream)
        timings.setdefault(stage.name, 0.0)  # keeps stage order; `finish` fills in the times
        self._timers.append((stage.name, runner.last_events))
        if stage.name in self.plan.record:
            event = self.cuda.Event()
            event.record(stream)
            self._events[stage.name] = event
        return out

    def recorded(self, feed: dict) -> dict:
        """A host copy of a feed (`record=True`, validation): every stream is synchronised first."""
        self._sync()
        return {name: self._numpy(v) for name, v in feed.items()}

    def keep(self, row):
        return row.clone() if is_tensor(row) else row

    def stack(self, rows: list, like):
        if not is_tensor(like):
            return np.stack(rows) if rows else np.zeros((0, like.shape[-1]), like.dtype)
        torch = _torch()
        return torch.stack(rows) if rows else like.new_zeros((0, like.shape[-1]))

    def tokens(self, source: str, value) -> list[int]:
        """The stop check's host read: a D2H copy of the batch's int64 tokens on the current (main) stream."""
        return [int(v) for v in (value.reshape(-1).tolist() if is_tensor(value) else np.asarray(value).reshape(-1))]

    def vector(self, values):
        """[B] int64 on the device (past_len, positions, row_lens, seg_batch): a few bytes' upload, not a cache copy."""
        return _torch().tensor(list(values), dtype=_torch().int64, device=self.alloc_device)

    def cat(self, values: list):
        """Tensors joined along the batch axis (encodings batched together)."""
        if not is_tensor(values[0]):
            return np.concatenate(values)
        return _torch().cat(values)

    def alloc(self, shape: tuple[int, ...], dtype: str):
        """A static KV cache buffer on the device (zeros: masked rows stay finite)."""
        return _torch().zeros(shape, dtype=getattr(_torch(), dtype), device=self.alloc_device)

    def write(self, buffer, start, rows) -> int:
        """Write a call's new rows [B, kv, T, hd] into the cache at each request's start[b] on the current stream,
        in place (one scatter: no host read of the starts); returns bytes."""
        torch = _torch()
        t = rows.shape[2]
        idx = start.reshape(-1, 1, 1, 1) + torch.arange(t, device=start.device).reshape(1, 1, t, 1)
        buffer.scatter_(2, idx.expand(rows.shape), rows)
        return rows.numel() * rows.element_size()

    def to_host(self, source: str, value):
        """A final output, on the host: the main stream joins the side stream first."""
        self._join()
        return self._numpy(value)

    def finish(self, timings: dict[str, float]) -> None:
        """Wait for both streams, then turn each enqueue's event pair into milliseconds."""
        self._sync()
        for name, (start, end) in self._timers:
            timings[name] = timings.get(name, 0.0) + float(start.elapsed_time(end))
        self._timers = []

    # -- helpers --------------------------------------------------------------------------------
    def _join(self) -> None:
        main = self.streams[MAIN]
        for name in self.plan.join:
            if name in self._events:
                main.wait_event(self._events[name])

    def _sync(self) -> None:
        self._join()
        for stream in self.streams.values():
            stream.synchronize()

    @staticmethod
    def _numpy(value):
        return value.detach().cpu().numpy() if is_tensor(value) else value

