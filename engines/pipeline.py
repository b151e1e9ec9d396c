"""Chains stage runners by the Layout's wiring: no model-specific code between stages.

    host {"clip_pixels", "prefix_ids", ...}
      -> for stage in layout.sequence(mode):
             feed = {input: tensors[input.source_for(mode)]}      # "host.x" | "<stage>.<out>" | "loop.<x>"
             skip_if_empty input has a zero-size dim -> empty outputs, else outputs = runner.infer(feed)
             loop stage -> the greedy decode loop (graphs.stages.Loop), collecting "loop.generated_ids", "loop.seg_hidden"
      -> PipelineResult(outputs = layout.outputs resolved, tensors, feeds, timings)

Where tensors live between stages is the chain's business (`HostChain` here: numpy arrays, ONNX Runtime;
`engines.cuda_chain.CudaChain`: torch CUDA tensors that stay on the GPU, TensorRT). The Pipeline only
asks the chain to run a stage, to keep a decode row, to stack rows, to read a token for the stop check
and to bring the outputs to the host; both chains follow `exporter.reference`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Collection

import numpy as np

from graphs.errors import InputError, internal_error
from graphs.runner import BaseRunner, is_plain_dim
from graphs.stages import Layout, StageSpec, TensorSpec


@dataclass
class PipelineResult:
    outputs: dict[str, np.ndarray]                        # layout.outputs present in this mode
    tensors: dict[str, np.ndarray]                        # every "host.x", "<stage>.<out>", "loop.x" (CudaChain:
                                                          # device views, valid until the next run)
    feeds: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # record=True: stage -> its feed
    timings_ms: dict[str, float] = field(default_factory=dict)  # stage -> ms; "decode" summed, plus "decode_steps"
    generated_ids: list[int] = field(default_factory=list)     # generate mode; empty in single-pass


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

    def token(self, source: str, value) -> int:
        return int(value.reshape(-1)[0])

    def to_host(self, source: str, value):
        return value

    def finish(self, timings: dict[str, float]) -> None:
        pass


class Pipeline:
    """Runs a Layout's stages in order, wiring each input from its source.

    Args:
        layout (Layout): the artifact's stages, wiring and named dims.
        runner_for (Callable[[StageSpec], BaseRunner]): makes the runner of a stage; called once per stage,
            the first time the stage runs. Runners are activated then and deactivated by `close()`.
        chain (HostChain | CudaChain | None): where tensors live between stages. Defaults to None
            (`HostChain`: numpy arrays through the host).
    """

    def __init__(self, layout: Layout, runner_for: Callable[[StageSpec], BaseRunner], chain=None):
        self.layout = layout
        self.runner_for = runner_for
        self.chain = chain if chain is not None else HostChain()
        self.runners: dict[str, BaseRunner] = {}

    def runner(self, stage: StageSpec) -> BaseRunner:
        if stage.name not in self.runners:
            r = self.runner_for(stage)
            r.activate()
            self.runners[stage.name] = r
        return self.runners[stage.name]

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
            stages: Collection[str] | None = None) -> PipelineResult:
        """Run every stage of `mode` on the host inputs.

        Args:
            host (dict[str, np.ndarray]): host input name -> array (see `layout.host_inputs`).
            mode (str): "single-pass" or "generate" (one of `layout.modes`).
            record (bool): keep each stage's feed in `PipelineResult.feeds` (decode: its first step's).
                Defaults to False.
            max_new_tokens (int | None): generate-mode limit, at most the exported one. Defaults to None
                (the exported `loop.max_new_tokens`).
            given (dict | None): tensors by source ("<stage>.<output>", "host.<input>") known before the first
                stage, e.g. an image encoding (engines.session.ImageEncoding). Defaults to None.
            stages (Collection[str] | None): run only these stages of the mode's sequence; the others' outputs
                must be in `given`. Defaults to None (every stage).

        Returns:
            PipelineResult: the outputs, every intermediate tensor, feeds and timings.
        """
        if mode not in self.layout.modes:
            raise InputError(f"mode {mode!r} is not in this artifact; it has: {', '.join(self.layout.modes)}")
        sequence = self.layout.sequence(mode)
        if stages is not None:
            sequence = [s for s in sequence if s.name in stages]
        self._check_host(host, sequence, mode, given or {})
        res = PipelineResult(outputs={}, tensors={**(given or {}), **{f"host.{k}": v for k, v in host.items()}})
        chain = self.chain
        with chain.begin(mode):
            for stage in sequence:
                if stage.loop:
                    self._run_loop(stage, mode, res, record, max_new_tokens)
                    continue
                feed = {t.name: self._source(res.tensors, stage, t, mode) for t in stage.inputs}
                if record:
                    res.feeds[stage.name] = chain.recorded(feed)
                if stage.skip_if_empty and 0 in feed[stage.skip_if_empty].shape:
                    outs = _empty_outputs(stage, feed)
                else:
                    outs = chain.infer(stage, self.runner(stage), feed, res.timings_ms)
                res.tensors.update({f"{stage.name}.{k}": v for k, v in outs.items()})
            for name, src in self.layout.outputs.items():
                src = src.get(mode) if isinstance(src, dict) else src
                if src is not None and src in res.tensors:
                    res.outputs[name] = chain.to_host(src, res.tensors[src])
            chain.finish(res.timings_ms)
        return res

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
    def _source(tensors: dict, stage: StageSpec, spec: TensorSpec, mode: str) -> np.ndarray:
        src = spec.source_for(mode)
        if src not in tensors:
            raise internal_error(f"stage {stage.name!r} input {spec.name!r}: source {src!r} was not produced "
                                 f"before it in mode {mode!r}; the layout's stage order or wiring is wrong")
        return tensors[src]

    # -- decode loop ----------------------------------------------------------------------------
    def _run_loop(self, stage: StageSpec, mode: str, res: PipelineResult, record: bool,
                  max_new_tokens: int | None) -> None:
        """Greedy decoding as `exporter.reference.Reference._generate` does it (see graphs.stages.Loop)."""
        loop = self.layout.loop
        if loop is None or loop.stage != stage.name:
            raise internal_error(f"stage {stage.name!r} is a loop stage but the layout's loop is {loop}")
        uncarried = [t.name for t in stage.inputs if t.name not in loop.carry]
        if uncarried:
            raise internal_error(f"loop stage {stage.name!r}: inputs {uncarried} have no carry")
        limit = loop.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= limit <= loop.max_new_tokens:
            raise InputError(f"max_new_tokens is {limit}; this artifact was exported for 1 to {loop.max_new_tokens} "
                             "(re-export with a larger --max-new-tokens)")
        t, chain = res.tensors, self.chain
        tok, hid = t[loop.token], t[loop.hidden]  # [1] int64, [1, H]
        tok_src = loop.token
        feed = {s.name: self._source(t, stage, s, mode) for s in stage.inputs}
        generated: list[int] = []
        seg_rows: list = []
        steps = 0
        while True:
            generated.append(chain.token(tok_src, tok))  # the one host read per step: the stop check
            if generated[-1] == loop.seg_token_id:
                seg_rows.append(chain.keep(hid[0]))  # a device row lives in a buffer the next step overwrites
            if generated[-1] in loop.stop_token_ids or len(generated) == limit:
                break
            if record and steps == 0:
                res.feeds[stage.name] = chain.recorded(feed)
            out = chain.infer(stage, self.runner(stage), feed, res.timings_ms)
            steps += 1
            tok, hid = out[loop.token_output], out[loop.hidden_output]
            tok_src = f"{stage.name}.{loop.token_output}"
            feed = {name: out[src] for name, src in loop.carry.items()}
        if steps:
            t.update({f"{stage.name}.{k}": v for k, v in out.items()})  # the last step's outputs
        res.timings_ms["decode_steps"] = steps
        t["loop.generated_ids"] = np.asarray(generated, dtype=np.int64)
        t["loop.seg_hidden"] = chain.stack(seg_rows, hid)  # [K, H]
        res.generated_ids = generated


def _empty_outputs(stage: StageSpec, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zero-size outputs of a skipped stage: named dims take their size from the feed, unknown ones 0."""
    sizes: dict[str, int] = {}
    for spec in stage.inputs:
        for dim, size in zip(spec.shape, feed[spec.name].shape):
            if is_plain_dim(dim):
                sizes.setdefault(dim, size)
    return {o.name: np.zeros(tuple(d if isinstance(d, int) else sizes.get(d, 0) for d in o.shape), dtype=o.dtype)
            for o in stage.outputs}
