"""Chains stage runners by the Layout's wiring: no model-specific code between stages.

    host {"clip_pixels", "prefix_ids", ...}
      -> for stage in layout.sequence(mode):
             its host steps first (layout.host_steps_before: the `host_steps` hook on host arrays; ACCM's
                 tokenizers and caption beam loop, which runs the stages in `HostStep.runs` itself)
             feed = {input: tensors[input.source_for(mode)]}      # "host.x" | "<stage>.<out>" | "loop.<x>" | "cache"
             skip_if_empty input has a zero-size dim -> empty outputs, else outputs = runner.infer(feed)
             a block (stage.cache): its cache inputs are the run's static KV cache (`KvCache`); its new K/V rows
                 are written into it in place at past_len
             generate, after loop.after -> the greedy decode loop (graphs.stages.Loop): each step runs loop.steps
                 on the same runners (one per graph), collecting "loop.generated_ids", "loop.seg_hidden"
      -> PipelineResult(outputs = layout.outputs resolved, tensors, feeds, timings)

Where tensors live between stages is the chain's business (`HostChain` here: numpy arrays, ONNX Runtime;
`engines.cuda_chain.CudaChain`: torch CUDA tensors that stay on the GPU, TensorRT). The Pipeline only
asks the chain to run a stage, to allocate and write cache rows, to keep a decode row, to stack rows, to read
a token for the stop check and to bring the outputs to the host; both chains follow `exporter.reference`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Collection

import numpy as np

from graphs.dims import dim_names, eval_dim
from graphs.errors import InputError, internal_error
from graphs.runner import BaseRunner, is_plain_dim
from graphs.stages import CACHE_LENGTH, CACHE_SOURCE, ROW_LENS, HostStep, Layout, StageSpec, TensorSpec


@dataclass
class PipelineResult:
    outputs: dict[str, np.ndarray]                        # layout.outputs present in this mode
    tensors: dict[str, np.ndarray]                        # every "host.x", "<stage>.<out>", "loop.x" (CudaChain:
                                                          # device views, valid until the next run)
    feeds: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # record=True: stage -> its feed
    timings_ms: dict[str, float] = field(default_factory=dict)  # stage -> ms; "decode" (all steps), "decode_steps"
    generated_ids: list[list[int]] = field(default_factory=list)  # generate mode: per request; empty in single-pass


@dataclass(frozen=True)
class DecodeIds:
    """The token ids greedy decoding reacts to in one run: a token in `stop_token_ids` ends its request, one equal
    to `seg_token_id` is a [SEG] (its hidden state is collected). `Pipeline.run` defaults to the layout's loop's
    (`of`); a run given others (serving's warm-up) leaves the shared layout alone."""

    stop_token_ids: tuple[int, ...]
    seg_token_id: int

    @classmethod
    def of(cls, loop) -> "DecodeIds":
        """The ids of a `graphs.stages.Loop` (the artifact's own)."""
        return cls(tuple(loop.stop_token_ids), loop.seg_token_id)


class HostChain:
    """Stages exchange numpy arrays through the host (ONNX Runtime, validation). The default chain."""

    def begin(self, mode: str):
        return contextlib.nullcontext()

    def infer(self, stage: StageSpec, runner: BaseRunner, feed: dict, timings: dict[str, float]) -> dict:
        out = runner.infer(feed)
        timings[stage.name] = timings.get(stage.name, 0.0) + runner.last_ms
        return out

    def recorded(self, feed: dict) -> dict:
        return feed

    def keep(self, row):
        return row  # runners return fresh arrays: nothing overwrites it

    def stack(self, rows: list, like):
        return np.stack(rows) if rows else np.zeros((0, like.shape[-1]), like.dtype)

    def tokens(self, source: str, value) -> list[int]:
        return [int(v) for v in np.asarray(value).reshape(-1)]

    def vector(self, values) -> np.ndarray:
        return np.asarray(values, dtype=np.int64)  # [B] int64 feed (past_len, positions, row_lens, seg_batch)

    def cat(self, values: list):
        return np.concatenate(values)  # along the batch axis

    def alloc(self, shape: tuple[int, ...], dtype: str):
        return np.zeros(shape, dtype=dtype)  # a cache buffer; zeros: masked rows stay finite

    def write(self, buffer, start, rows) -> int:
        """Write `rows` [B, kv, T, hd] into `buffer` [B, kv, C, hd] at rows start[b].. of each request, in place.
        Returns bytes written."""
        start, t = np.asarray(start).reshape(-1), rows.shape[2]
        if (start == start[0]).all():  # a prefill (every request at 0), or decode steps in lockstep: one slice copy
            buffer[:, :, start[0]:start[0] + t] = rows
        else:
            for b, s in enumerate(start.tolist()):
                buffer[b, :, s:s + t] = rows[b]
        return rows.nbytes

    def to_host(self, source: str, value):
        return value

    def finish(self, timings: dict[str, float]) -> None:
        pass


class KvCache:
    """The static KV cache of every block graph: buffers preallocated per request shape, written in place.

    A block's first call in a run (its prefill) sizes its buffers: the batch, its (padded) rows + `extra` (the
    decode steps a generate run may take), checked against the cache dim's exported max. The same buffers serve
    the next batch whose shape is equal (one set per block: bounded), so decode shapes repeat across batches.
    Each request has its own valid length (`past_len` [B], on the chain): a call's rows are written at it, and it
    advances by the call's `row_lens` (a prefill's real rows, so right padding is overwritten by the first decode
    step; 1 per decode step, 0 for a finished request). Nothing here copies a cache: a call's feed holds the
    buffers themselves, and only the call's new rows are written (`bytes_written`, per call in `last_bytes`).

    Args:
        layout (Layout): block stages (`StageSpec.cache`) and their cache dims.
        chain: allocates buffers and writes rows (`HostChain.alloc`, `.write`, `.scalar`).
    """

    def __init__(self, layout: Layout, chain):
        self.layout, self.chain = layout, chain
        self.buffers: dict[str, dict[str, object]] = {}  # graph -> cache input -> buffer
        self.length: dict[str, object] = {}              # graph -> valid rows per request [B] (chain vector)
        self.extra = 0
        self.bytes_written = 0
        self.last_bytes = 0
        self.allocations = 0

    def begin(self, extra: int) -> None:
        self.length, self.extra = {}, extra

    def feed(self, stage: StageSpec, feed: dict) -> dict:
        """The stage's cache inputs (the buffers, and past_len), allocating them at its first call of a run."""
        g = stage.graph_name
        if g not in self.length:
            self._allocate(stage, feed)
        out = dict(self.buffers[g])
        out[CACHE_LENGTH] = self.length[g]
        return out

    def _allocate(self, stage: StageSpec, feed: dict) -> None:
        g, (inp, outp) = stage.graph_name, stage.cache[0]
        rows_dim = stage.output(outp).shape[2]
        rows = next(v.shape[axis] for t in stage.inputs if t.source != CACHE_SOURCE and t.name in feed
                    for axis, d in enumerate(t.shape) if d == rows_dim for v in (feed[t.name],))
        batch = feed[stage.inputs[0].name].shape[0]
        cap_dim = stage.input(inp).shape[2]
        capacity = rows + self.extra
        rng = self.layout.dims.get(cap_dim)
        if rng is not None and capacity > rng.max:
            raise InputError(f"stage {stage.name!r}: its KV cache needs {rows} prompt rows + {self.extra} generated = "
                             f"{capacity} rows, more than the exported {rng.max} ({cap_dim}); shorten the text or "
                             "generate fewer tokens, or re-export with a larger --max-text-len / --max-new-tokens")
        old = self.buffers.get(g)
        if old is None or tuple(next(iter(old.values())).shape[:3:2]) != (batch, capacity):
            specs = [stage.input(i) for i, _ in stage.cache]
            self.buffers[g] = {t.name: self.chain.alloc((batch, t.shape[1], capacity, t.shape[3]), t.dtype)
                               for t in specs}
            self.allocations += 1
        self.length[g] = self.chain.vector([0] * batch)

    def write(self, stage: StageSpec, outs: dict, row_lens) -> None:
        """Write the call's new K/V rows into the buffers at each request's past_len; advance it by `row_lens` [B]."""
        g, buffers, start = stage.graph_name, self.buffers[stage.graph_name], self.length[stage.graph_name]
        n = 0
        for inp, outp in stage.cache:
            n += self.chain.write(buffers[inp], start, outs[outp])
        self.length[g] = start + row_lens
        self.last_bytes = n
        self.bytes_written += n


class Pipeline:
    """Runs a Layout's stages in order, wiring each input from its source.

    Args:
        layout (Layout): the artifact's stages, wiring and named dims.
        runner_for (Callable[[StageSpec], BaseRunner]): makes the runner of a stage; called once per stage,
            the first time the stage runs. Runners are activated then and deactivated by `close()`.
        chain (HostChain | CudaChain | None): where tensors live between stages. Defaults to None
            (`HostChain`: numpy arrays through the host).
        host_steps (Callable | None): runs the layout's host steps: (step, feed, context, run_stage) -> outputs
            (`engines.host_steps.HostSteps`). Defaults to None (a layout with host steps then cannot run).
    """

    def __init__(self, layout: Layout, runner_for: Callable[[StageSpec], BaseRunner], chain=None, host_steps=None):
        self.layout = layout
        self.host_steps = host_steps
        self.runner_for = runner_for
        self.chain = chain if chain is not None else HostChain()
        self.runners: dict[str, BaseRunner] = {}  # graph name -> runner: a decode step reuses its block's
        self.kv = KvCache(layout, self.chain)

    def runner(self, stage: StageSpec) -> BaseRunner:
        g = stage.graph_name
        if g not in self.runners:
            r = self.runner_for(self.layout.stage(g) if stage.loop else stage)
            r.activate()
            self.runners[g] = r
        return self.runners[g]

    def close(self) -> None:
        runners, self.runners = self.runners, {}
        for r in runners.values():
            r.deactivate()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- run ------------------------------------------------------------------------------------
    def run(self, host: dict[str, np.ndarray], mode: str, record: bool = False,
            max_new_tokens: int | None = None, given: dict | None = None,
            stages: Collection[str] | None = None, context: dict | None = None,
            decode_ids: DecodeIds | None = None) -> PipelineResult:
        """Run every stage of `mode` on the host inputs.

        Args:
            host (dict[str, np.ndarray]): host input name -> array (see `layout.host_inputs`).
            mode (str): "single-pass" or "generate" (one of `layout.modes`).
            record (bool): keep each stage's feed in `PipelineResult.feeds` (decode: its first step's).
                Defaults to False.
            max_new_tokens (int | list[int] | None): generate-mode limit, at most the exported one; a list gives
                each request of the batch its own. Defaults to None (the exported `loop.max_new_tokens`).
            given (dict | None): tensors by source ("<stage>.<output>", "host.<input>") known before the first
                stage, e.g. an image encoding (engines.session.ImageEncoding). Defaults to None.
            stages (Collection[str] | None): run only these stages of the mode's sequence; the others' outputs
                must be in `given`. Defaults to None (every stage).
            context (dict | None): what host steps read besides tensors, e.g. {"queries": [...]}. Defaults to None.
            decode_ids (DecodeIds | None): generate mode's stop and [SEG] ids for this run. Defaults to None (the
                layout's loop's).

        Returns:
            PipelineResult: the outputs, every intermediate tensor, feeds and timings.
        """
        if mode not in self.layout.modes:
            raise InputError(f"mode {mode!r} is not in this artifact; it has: {', '.join(self.layout.modes)}")
        sequence = self.layout.sequence(mode)
        if stages is not None:
            sequence = [s for s in sequence if s.name in stages]
        self._check_host(host, sequence, mode, given or {})
        loop = self.layout.loop if mode == "generate" else None
        limits = self._limits(max_new_tokens) if loop is not None else [0]
        limit = max(limits)
        res = PipelineResult(outputs={}, tensors={**(given or {}), **{f"host.{k}": v for k, v in host.items()}})
        chain = self.chain
        self.kv.begin(max(limit - 1, 0))  # a generate run feeds at most limit - 1 tokens back
        with chain.begin(mode):
            for stage in sequence:
                for step in self.layout.host_steps_before(stage.name):
                    self._host_step(step, mode, res, record, context or {})
                outs = self._step(stage, mode, res.tensors, res, record)
                res.tensors.update({f"{stage.name}.{k}": v for k, v in outs.items()})
                if loop is not None and stage.name == loop.after:
                    self._run_loop(res, record, limits, decode_ids or DecodeIds.of(loop))
            for name, src in self.layout.outputs.items():
                src = src.get(mode) if isinstance(src, dict) else src
                if src is not None and src in res.tensors:
                    res.outputs[name] = chain.to_host(src, res.tensors[src])
            chain.finish(res.timings_ms)
        if loop is not None:
            steps = [res.timings_ms.pop(s.name) for s in loop.steps if s.name in res.timings_ms]
            if steps:
                res.timings_ms[loop.stage] = sum(steps)
        return res

    def _step(self, stage: StageSpec, mode: str, tensors: dict, res: PipelineResult, record: bool,
              record_as: str = "") -> dict:
        """Feed one stage from `tensors` (and the KV cache), run it, write its new cache rows."""
        feed = {t.name: self._source(tensors, stage, t, mode) for t in stage.inputs if t.source != CACHE_SOURCE}
        if stage.cache:
            feed.update(self.kv.feed(stage, feed))
        if record and (record_as or stage.name) not in res.feeds:
            kept = {k: (v.copy() if isinstance(v, np.ndarray) and k not in self._plain(stage) else v)
                    for k, v in feed.items()}  # cache buffers change after this call: keep what it saw
            res.feeds[record_as or stage.name] = self.chain.recorded(kept)
        if stage.skip_if_empty and 0 in feed[stage.skip_if_empty].shape:
            return _empty_outputs(stage, feed)
        outs = self.chain.infer(stage, self.runner(stage), feed, res.timings_ms)
        if stage.cache:
            self.kv.write(stage, outs, feed[ROW_LENS])
        return outs

    def _host_step(self, step: HostStep, mode: str, res: PipelineResult, record: bool, context: dict) -> None:
        """Run a declared host step (graphs.stages.HostStep) on host arrays; the stages it runs itself go through
        their runners here (timed; with `record`, their first call's feed is kept, as a decode step's)."""
        if self.host_steps is None:
            raise internal_error(f"the layout has host step {step.name!r} but the Pipeline was given no host_steps")
        feed = {}
        for t in step.inputs:
            src = t.source.get(mode) if isinstance(t.source, dict) else t.source
            if src is not None:
                feed[t.name] = self.chain.to_host(src, self._source(res.tensors, step, t, mode))

        def run_stage(name: str, stage_feed: dict) -> dict:
            stage = self.layout.stage(name)
            if record and name not in res.feeds:
                res.feeds[name] = {k: np.array(v, copy=True) for k, v in stage_feed.items()}
            out = self.chain.infer(stage, self.runner(stage), stage_feed, res.timings_ms)
            return {k: self.chain.to_host(f"{name}.{k}", v) for k, v in out.items()}

        t0 = time.perf_counter()
        outs = self.host_steps(step, feed, context, run_stage)
        res.timings_ms[step.name] = res.timings_ms.get(step.name, 0.0) + 1e3 * (time.perf_counter() - t0)
        res.tensors.update({f"{step.name}.{k}": v for k, v in outs.items()})

    @staticmethod
    def _plain(stage: StageSpec) -> set[str]:
        return {t.name for t in stage.inputs if t.source != CACHE_SOURCE}

    def _limits(self, max_new_tokens) -> list[int]:
        """The decode limit as a list: one value for every request, or each request's own."""
        loop = self.layout.loop
        given = [loop.max_new_tokens] if max_new_tokens is None else (
            [int(v) for v in max_new_tokens] if isinstance(max_new_tokens, (list, tuple)) else [int(max_new_tokens)])
        for limit in given:
            if not 1 <= limit <= loop.max_new_tokens:
                raise InputError(f"max_new_tokens is {limit}; this artifact was exported for 1 to "
                                 f"{loop.max_new_tokens} (re-export with a larger --max-new-tokens)")
        return given

    def _check_host(self, host: dict, sequence: list[StageSpec], mode: str, given: dict) -> None:
        known = {t.name: t for t in self.layout.host_inputs}
        needed = {t.source_for(mode)[5:] for s in sequence for t in s.inputs
                  if t.source_for(mode).startswith("host.") and t.source_for(mode) not in given}
        missing = sorted(needed - set(host))
        extra = sorted(set(host) - set(known))
        if missing or extra:
            spec = ", ".join(f"{t.name} {t.dtype} [{', '.join(map(str, t.shape))}]" for t in self.layout.host_inputs)
            what = "; ".join(p for p in (f"missing {', '.join(missing)}" if missing else "",
                                         f"unexpected {', '.join(extra)}" if extra else "") if p)
            raise InputError(f"host inputs: {what}; this artifact takes: {spec}")

    @staticmethod
    def _source(tensors: dict, stage: StageSpec | HostStep, spec: TensorSpec, mode: str) -> np.ndarray:
        src = spec.source_for(mode)
        if src not in tensors:
            raise internal_error(f"stage {stage.name!r} input {spec.name!r}: source {src!r} was not produced "
                                 f"before it in mode {mode!r}; the layout's stage order or wiring is wrong")
        return tensors[src]

    # -- decode loop ----------------------------------------------------------------------------
    def _run_loop(self, res: PipelineResult, record: bool, limits: list[int], ids: DecodeIds) -> None:
        """Greedy decoding of a batch as `exporter.reference.Reference._generate` does it per request
        (see graphs.stages.Loop).

        Every request decodes in the same steps; one that stopped (a stop token, or its limit) stays in the
        batch with `row_lens` 0, so its cache stops growing and its tokens are ignored; the loop ends when every
        request has stopped. Limits are checked before the first step (positions past the model's maximum) or at
        the step they are crossed (more [SEG] tokens than the exported per-request maximum).
        """
        loop, t, chain = self.layout.loop, res.tensors, self.chain
        tok, hid = t[loop.token], t[loop.hidden]  # [B] int64, [B, H]
        tok_src = loop.token
        pos = t[loop.position]  # [B]: each request's next position
        starts = chain.tokens(loop.position, pos)
        batch, first, limit = len(starts), max(starts), max(limits)
        if len(limits) not in (1, batch):
            raise InputError(f"max_new_tokens gives {len(limits)} limits for a batch of {batch}; give one, or one "
                             "per request")
        limits = limits * batch if len(limits) == 1 else limits
        if loop.max_positions and first + limit - 1 > loop.max_positions:
            raise InputError(f"generate: the prompt ends at position {first} and max_new_tokens {limit} would feed "
                             f"positions up to {first + limit - 2}, past the model's maximum {loop.max_positions - 1}; "
                             f"shorten the text or pass max_new_tokens <= {max(loop.max_positions - first + 1, 1)}")
        max_seg = loop.max_seg
        first_row = chain.alloc((batch, 1), "int64")
        generated: list[list[int]] = [[] for _ in range(batch)]
        seg_rows: list[list] = [[] for _ in range(batch)]
        active = [True] * batch
        steps = 0
        step_out: dict = {}
        while True:
            for b, token in enumerate(chain.tokens(tok_src, tok)):  # the one host read per step: the stop check
                if not active[b]:
                    continue
                generated[b].append(token)
                if token == ids.seg_token_id:
                    if max_seg is not None and len(seg_rows[b]) == max_seg:
                        raise InputError(f"generate: request {b + 1} emitted [SEG] number {max_seg + 1} at step "
                                         f"{len(generated[b])}; this artifact was exported for at most {max_seg} masks "
                                         "per request; re-export with a larger --max-seg, or pass a smaller "
                                         "max_new_tokens")
                    seg_rows[b].append(chain.keep(hid[b]))  # a device row lives in a buffer the next step overwrites
                if token in ids.stop_token_ids or len(generated[b]) == limits[b]:
                    active[b] = False
            if not any(active):
                break
            step_out = {"loop.token": tok[:, None], "loop.position": pos[:, None], "loop.first_row": first_row,
                        "loop.row_lens": chain.vector([int(a) for a in active])}
            for step in loop.steps:
                outs = self._step(step, "generate", {**t, **step_out}, res, record)
                step_out.update({f"{step.name}.{k}": v for k, v in outs.items()})
            steps += 1
            pos = pos + 1
            tok, hid = step_out[loop.token_output], step_out[loop.hidden_output]
            tok_src = loop.token_output
        if steps:
            t.update({k: v for k, v in step_out.items() if not k.startswith("loop.")})  # the last step's outputs
        res.timings_ms["decode_steps"] = steps
        width = max(len(g) for g in generated)
        t["loop.generated_ids"] = np.asarray([g + [-1] * (width - len(g)) for g in generated], dtype=np.int64)
        t["loop.seg_hidden"] = chain.stack([r for rows in seg_rows for r in rows], hid)  # [K, H], request order
        t["loop.seg_batch"] = chain.vector([b for b, rows in enumerate(seg_rows) for _ in rows])  # [K], sam_decoder's
        res.generated_ids = generated


def _empty_outputs(stage: StageSpec, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zero-size outputs of a skipped stage: dims (and expressions of them) take their size from the feed; a dim
    the feed does not size is 0."""
    sizes: dict[str, int] = {}
    for spec in stage.inputs:
        for dim, size in zip(spec.shape, feed[spec.name].shape):
            if is_plain_dim(dim):
                sizes.setdefault(dim, size)

    def size(dim) -> int:
        return eval_dim(dim, sizes) if all(n in sizes for n in dim_names(dim)) else 0

    return {o.name: np.zeros(tuple(size(d) for d in o.shape), dtype=o.dtype) for o in stage.outputs}
