"""What the GPU Pipeline does where, decided from the Layout alone: pure functions, no torch, no TensorRT.

    plan_streams(layout, mode)   stage -> "main" | "side" stream, which events to record and wait on
    host_reads(layout, mode)     the only tensors that come to the host: final outputs and the decode loop's token
    graph_mode(stage, flavor)    how a stage's engine uses CUDA graphs: "off" | "builtin" | "manual"
    GraphCache                   manual capture bookkeeping: plain -> capture -> replay per (profile, shapes) key

The stream plan for every csprt layout (the SAM encoder reads only host.sam_pixels, so it overlaps the LLM):

    side:  sam_encoder ---------------------------------------(event)--+
    main:  vision -> llm_0 -> ... -> llm_{n-1} [-> decode loop] [-> seg_gather] -> seg_head -> wait -> sam_decoder
    host:  reads `host_reads` only: the outputs once at the end, plus the token of each decode step (the stop check)

`engines.cuda_chain.CudaChain` carries the plan out on torch CUDA streams; these functions are what
CPU tests check.
"""

from __future__ import annotations

import logging

from collections import OrderedDict
from dataclasses import dataclass

from graphs.stages import Layout, StageSpec

MAIN, SIDE = "main", "side"
SIDE_KINDS = ("sam_encoder",)  # stage kinds that run on the side stream when they read only host inputs
PLAIN, CAPTURE, REPLAY = "plain", "capture", "replay"


@dataclass(frozen=True)
class StreamPlan:
    stream: dict[str, str]              # stage -> MAIN | SIDE, for every stage of the mode's sequence
    waits: dict[str, tuple[str, ...]]   # stage -> producers on the other stream whose completion it waits on
    record: tuple[str, ...]             # stages whose completion event is recorded (waited on, or joined)
    join: tuple[str, ...]               # side stages the main stream waits on before the host reads results


def _producer(source: str) -> str:
    """"llm_0.present_key_0" -> "llm_0"; "host.x" -> "host"; "loop.seg_hidden" -> "loop"."""
    return source.split(".", 1)[0]


def plan_streams(layout: Layout, mode: str, side_kinds: tuple[str, ...] = SIDE_KINDS) -> StreamPlan:
    """Which stream runs each stage of `mode`, and the events that order them.

    A stage runs on the side stream when its kind is in `side_kinds`, it is not the loop stage, and every
    input comes from the host (so it depends on nothing the main stream computes). A stage reading a
    stage of the other stream waits on that stage's completion event; the main stream joins every side
    stage before the host reads results.

    Args:
        layout (Layout): the artifact's stages and wiring.
        mode (str): "single-pass" or "generate".
        side_kinds (tuple[str, ...]): stage kinds that may run on the side stream. Defaults to ("sam_encoder",).

    Returns:
        StreamPlan: streams, waits, recorded events and joins.
    """
    sequence = layout.sequence(mode)
    stream = {}
    for s in sequence:
        host_only = all(_producer(t.source_for(mode)) == "host" for t in s.inputs)
        stream[s.name] = SIDE if s.kind in side_kinds and host_only and not s.loop else MAIN
    waits: dict[str, tuple[str, ...]] = {}
    for s in sequence:
        others = [p for p in dict.fromkeys(_producer(t.source_for(mode)) for t in s.inputs)
                  if p in stream and stream[p] != stream[s.name]]
        if others:
            waits[s.name] = tuple(others)
    join = tuple(name for name, st in stream.items() if st == SIDE)
    record = tuple(dict.fromkeys([p for ps in waits.values() for p in ps] + list(join)))
    return StreamPlan(stream=stream, waits=waits, record=record, join=join)


def host_reads(layout: Layout, mode: str) -> tuple[str, ...]:
    """The sources the GPU Pipeline copies to the host in `mode`; every other tensor stays on the device.

    The layout's outputs are read once, at the end ("loop.generated_ids" is assembled on the host from the
    tokens, so it is no device read). In generate mode the decode loop reads one token per step, its
    stop check: the prefill's token first, then each decode step's.
    """
    reads = []
    for src in layout.outputs.values():
        src = src.get(mode) if isinstance(src, dict) else src
        # host.* (seg_batch in single-pass) is on the host already; loop.generated_ids is assembled there
        if src is not None and _producer(src) != "host" and src != "loop.generated_ids":
            reads.append(src)
    loop = layout.loop
    if loop is not None and mode == "generate":  # plus the first position, once
        reads += [loop.token, loop.position, loop.token_output]
    return tuple(reads)


def graph_mode(stage: StageSpec, flavor: str, enabled: bool = True) -> str:
    """How `stage`'s engine uses CUDA graphs.

    Only decode steps do: the engine of a block (`stage.cache`), whose one-row calls repeat one shape
    for a whole request (its static cache has the request's capacity) and for later requests with the
    same bounds; its prefill calls run plainly (`TrtRunner` graphs only calls of one row). TensorRT-RTX
    captures them itself ("builtin": its runtime config's WHOLE_GRAPH_CAPTURE,
    taken once its shape-specialised kernels are compiled; manual capture would need engines built with
    REQUIRE_USER_ALLOCATION). TensorRT is captured by csprt ("manual", see `GraphCache`).

    Args:
        stage (StageSpec): the stage.
        flavor (str): "tensorrt" or "tensorrt-rtx".
        enabled (bool): False turns graphs off. Defaults to True.

    Returns:
        str: "off", "builtin" or "manual".
    """
    if not enabled or not (stage.loop or stage.cache):
        return "off"
    return "builtin" if flavor == "tensorrt-rtx" else "manual"


def graph_key(profile: int, shapes: dict[str, tuple[int, ...]]) -> tuple:
    """The key of a captured graph: the optimization profile and every input shape, in input order."""
    return (profile, tuple((name, tuple(shape)) for name, shape in shapes.items()))


def unknown_dims(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Outputs whose shape TensorRT cannot tell before running (a -1 dim: data-dependent). csprt graphs have
    none (TopK with static k, [SEG] rows from the host), which is what lets outputs be preallocated views."""
    return [name for name, shape in shapes.items() if any(int(d) < 0 for d in shape)]


class GraphCache:
    """Which way to run each call under manual capture, and the graphs captured so far. No CUDA here.

    A key's first call runs plainly (TensorRT finishes deferred work for new shapes on it, and capturing
    a first run would record that), its second is captured and replayed, later ones replay. A failed
    capture turns capture off for good (`disabled` says why): plain execution is always correct.
    At most `max_graphs` graphs are kept; the least recently used one is dropped.

    Args:
        max_graphs (int): graphs kept. Defaults to 64.
    """

    def __init__(self, max_graphs: int = 64):
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, object] = OrderedDict()
        self.seen: dict[tuple, int] = {}
        self.disabled = ""
        self.replays = 0

    def decide(self, key: tuple) -> str:
        """PLAIN, CAPTURE or REPLAY for a call with `key`; counts the call."""
        if key in self.graphs:
            self.graphs.move_to_end(key)
            self.replays += 1
            return REPLAY
        runs = self.seen.get(key, 0)
        self.seen[key] = runs + 1
        return PLAIN if self.disabled or runs == 0 else CAPTURE

    def store(self, key: tuple, graph) -> object | None:
        """Keep `graph` for `key`; returns the graph evicted to make room, if any (the caller frees it)."""
        self.graphs[key] = graph
        if len(self.graphs) > self.max_graphs:
            return self.graphs.popitem(last=False)[1]
        return None

    def disable(self, why: str) -> None:
        """Stop capturing (a capture failed or the context is not capturable); kept graphs still replay.

        Logged once, as a warning: decode then runs without CUDA graphs, correct but slower."""
        if not self.disabled:
            logging.getLogger("csprt").warning("CUDA graph capture failed (%s); decode steps run without CUDA graphs "
                                               "from now on", why or "capture failed")
        self.disabled = why or "capture failed"
