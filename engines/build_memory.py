"""How much host memory a stage's engine build takes, and keeping it bounded (`csprt build --max-build-memory`).

    estimate_stage_memory(artifact, stage) -> StageMemory      from the manifest's file sizes; no graph is loaded
    check_build_memory(...)                                    one-line refusal before any build, naming the fix
    MappedWeights                                              external data mapped read-only for the parser,
                                                               its pages dropped while the builder runs
    trim_host_memory                                           returning memory between stages (PeakRss and
                                                               rss_bytes come from graphs.host_memory)
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import threading
from dataclasses import dataclass
from pathlib import Path

from graphs.errors import ArtifactError, ToolchainError
from graphs.host_memory import available_bytes
from graphs.manifest import Artifact


# What a stage build holds at its peak, measured with TensorRT-RTX 1.7.1 on a GPU-less host (docs/benchmarks.md,
# "Engine build memory"; every sidecar records its stage's sampled peak): the builder's own copies of the
# weights it packs into the plan (anonymous memory, 1.75x the weights of a LISA-7B LLM stage), plus, for a graph
# parsed from file (weights inline in the .onnx), the parser's copy of the file. External data is mapped and
# dropped (`MappedWeights`) and the plan streamed to disk, so neither counts. BUILD_BASE covers the process, the
# TensorRT libraries and the builder's working memory.
GIB = 1 << 30
BUILD_BASE = int(0.5 * GIB)
RATIO_MAPPED = 1.75  # peak bytes per byte of external-data weights (7B llm_0: 7.1 GiB for 4.0; llm_2: 12.0 for 6.8)
RATIO_INLINE = 2.75  # peak bytes per byte of weights inline in the .onnx: the same plus the parser's copy
RATIO_INPUT = 0.02   # per byte of external weights an engine takes as inputs (7B llm_2: 0.6 GiB for 7.0 GiB)
_DROP_EVERY_S = 0.02 # how often mapped weight pages are let go while the builder runs


@dataclass(frozen=True)
class StageMemory:
    """A stage's weight bytes and the estimated peak RSS of building it (`estimate_stage_memory`). `layer` set: a
    block that is over the budget even one decoder layer per engine; the estimate is that layer's engine's."""

    stage: str
    inline_bytes: int
    external_bytes: int
    peak_bytes: int
    layer: int | None = None
    input_bytes: int = 0     # external-data weights the engine takes as inputs (`--weights-as-inputs`): not built in

    def to_json(self) -> dict:
        out = {"weight_bytes": self.inline_bytes + self.external_bytes, "inline_weight_bytes": self.inline_bytes,
               "external_weight_bytes": self.external_bytes, "estimated_peak_bytes": self.peak_bytes,
               "ratios": {"base": BUILD_BASE, "mapped": RATIO_MAPPED, "inline": RATIO_INLINE}}
        if self.input_bytes:
            out["ratios"]["input"] = RATIO_INPUT
            out["weight_input_bytes"] = self.input_bytes
        return out


def external_initializers(path: Path) -> list[tuple[str, str, int, int]]:
    """(name, location, offset, length) of every main-graph initializer of `path` stored as external data."""
    import onnx

    return external_initializers_of(onnx.load(str(path), load_external_data=False))


def external_initializers_of(model) -> list[tuple[str, str, int, int]]:
    """(name, location, offset, length) of every main-graph initializer of a ModelProto stored as external data."""
    from graphs.onnx_passes import external_placement

    return [(t.name, *placed) for t in model.graph.initializer if (placed := external_placement(t))]


def estimate_stage_memory(artifact: Artifact, stage: str, input_bytes: int = 0) -> StageMemory:
    """The estimated peak RSS of building `stage`: BUILD_BASE + RATIO_INLINE x the graph file's bytes +
    RATIO_MAPPED x its external-data files' bytes (the manifest's "files"; tensors are nearly all of them).

    `input_bytes`: external-data weights the engine takes as inputs (`--weights-as-inputs`); the builder never
    reads them, so they count only at RATIO_INPUT (the builder's memory for a large graph without its weights).
    Inline weights count in full: the graph is loaded to be rewritten.
    """
    entry = artifact.stage_entry(stage)
    sizes = {rel: (artifact.dir / rel).stat().st_size for rel in entry["files"]}
    inline = sizes.pop(entry["graph"])
    external = sum(sizes.values())
    built_in = max(0, external - input_bytes)
    peak = BUILD_BASE + RATIO_INLINE * inline + RATIO_MAPPED * built_in + RATIO_INPUT * (external - built_in)
    return StageMemory(stage, inline, external, int(peak), input_bytes=input_bytes)


def host_memory_budget() -> int:
    """What this host can give a build now (MemAvailable)."""
    return available_bytes()


def gib(n: int) -> str:
    """Bytes as "9.7 GiB", or "12.3 MiB" under 0.1 GiB."""
    return f"{n / GIB:.1f} GiB" if n >= GIB // 10 else f"{n / (1 << 20):.1f} MiB"


class MappedWeights:
    """A graph's external-data files mapped read-only; `address()` points the ONNX parser at a tensor's bytes.

    The builder reads the weights through the mapping while it copies them into the plan. `dropping()` lets the
    mapped pages go every `_DROP_EVERY_S` (madvise MADV_DONTNEED: they stay in the page cache, and a page the
    builder reads again faults back in from it), so the weights count once, in the builder, not twice.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._maps: dict[str, mmap.mmap] = {}
        self._addr: dict[str, int] = {}

    def address(self, location: str, offset: int, length: int) -> int:
        if location not in self._maps:
            path = self.root / location
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[location] = mm
            self._addr[location] = _buffer_address(mm)
        if offset + length > len(self._maps[location]):
            raise ArtifactError(f"{self.root / location}: tensor data at [{offset}, {offset + length}) is past the end "
                                f"of the file ({len(self._maps[location])} bytes); re-export the artifact")
        return self._addr[location] + offset

    def drop(self) -> None:
        for mm in self._maps.values():
            with contextlib.suppress(ValueError, OSError):  # closed, or madvise unsupported here
                mm.madvise(mmap.MADV_DONTNEED)

    @contextlib.contextmanager
    def dropping(self, every: float = _DROP_EVERY_S):
        stop = threading.Event()

        def loop():
            while not stop.wait(every):
                self.drop()

        thread = threading.Thread(target=loop, name="csprt-drop-weights", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.drop()

    def close(self) -> None:
        for mm in self._maps.values():
            with contextlib.suppress(BufferError):
                mm.close()
        self._maps.clear()


def _buffer_address(mm: mmap.mmap) -> int:
    """The address of a read-only mapping's first byte (numpy reads it without copying)."""
    import numpy as np
    return np.frombuffer(mm, dtype=np.uint8).ctypes.data


def trim_host_memory() -> None:
    """Hand the memory a finished build freed back to the system (glibc keeps it otherwise)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --- build ----------------------------------------------------------------------------------------


def check_build_memory(artifact: Artifact, names: list[str], memory: dict[str, StageMemory], budget: int,
                       from_host: bool) -> None:
    """Refuse, in one line, a build whose largest stage's estimated peak is over `budget`.

    Args:
        artifact (Artifact): the artifact.
        names (list[str]): every stage of this build, in order.
        memory (dict[str, StageMemory]): the estimates of the stages to build (cached ones are not built); a
            block built in pieces: its largest piece's; a block over the budget even one layer per engine: that
            layer's (`layer` set).
        budget (int): bytes.
        from_host (bool): the budget is the host's available memory (not `--max-build-memory`).

    Raises:
        ToolchainError: names the stage, its estimate, the budget, the `--max-build-memory` that would fit and
            the `--stages` that fit this one.
    """
    over = [m for m in memory.values() if m.peak_bytes > budget]
    if not over:
        return
    worst = max(over, key=lambda m: m.peak_bytes)
    need = math.ceil(worst.peak_bytes / GIB * 10) / 10
    fit = [n for n in names if n not in memory or memory[n].peak_bytes <= budget]
    where = (f"the {gib(budget)} this host has available now (--max-build-memory defaults to it)" if from_host
             else f"the --max-build-memory budget of {gib(budget)}")
    others = f"; or build the stages that fit with --stages {','.join(fit)}" if fit else ""
    weights = gib(worst.inline_bytes + worst.external_bytes)
    what = (f"to build even one decoder layer per engine (layer {worst.layer} alone: {weights} of weights"
            if worst.layer is not None else f"to build ({weights} of weights")
    blocks = "".join(f"; {m.stage!r} needs about {gib(m.peak_bytes)} even one decoder layer per engine (layer "
                     f"{m.layer} alone)" for m in over if m.layer is not None and m is not worst)
    raise ToolchainError(f"stage {worst.stage!r} needs about {gib(worst.peak_bytes)} {what}; {len(over)} of "
                         f"{len(memory)} stages to build are over{blocks}), more than {where}; build it on a host "
                         f"with {need} GiB free, or with --max-build-memory {need} once that much is free{others}")


