"""`csprt export`: a checkpoint and a schedule -> the artifact of DESIGN.md §5.

Stage by stage: read just the weights the stage's wrapper touches (`exporter.streaming`: the model
lives on `meta` otherwise), run the wrapper eagerly on a real sample (so every graph is checked
against torch on real data), trace it with `torch.onnx.export(dynamo=True)`, run the ONNX passes
and checks, save it atomically (weights streamed to external data over 2 GB), run it on ONNX Runtime
and compare, then put the weights back on `meta`. Only one stage's weights and trace are alive at a
time. With `trace_only` (models too big to run on the export host) the feed is built from the
layout instead, nothing runs eagerly or on ONNX Runtime, and the manifest marks the stages
unchecked for `csprt validate` to check later. Stages whose export key (inputs, settings, code and
versions hashed) matches the existing artifact are reused without reading the checkpoint. The
manifest is removed before anything is rewritten and written last, so an interrupted export never
leaves an artifact that loads.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import gc
import hashlib
import inspect
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from exporter.checkpoint import find_weight_files
from exporter.tokenizer import TokenizerExport
from exporter.graph_cache import GraphCache
from exporter.preprocess import clip_pixels, sam_pixels
from exporter.streaming import StagedWeights
from exporter.wrappers import make_wrapper
from graphs import artifact_dir
from graphs import manifest as mf
from graphs import onnx_checks, onnx_passes
from graphs.atomic import exclusive_lock
from graphs.checkpoint_config import read_checkpoint_config, read_clip_processor_config
from graphs.dims import eval_dim
from graphs.errors import ArtifactError, ParityError, ScheduleError, ToolchainError, internal_error
from graphs.preprocessing import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from graphs.prompt import SEG_TOKEN, token_id, tokenize_prompt
from graphs.schedule import Schedule
from graphs.shapes import ModelShape
from graphs.stages import CACHE_LENGTH, CACHE_SOURCE, PRECISIONS, Layout, LayoutOptions, StageSpec, build_layout
from graphs.trt_ops import DEFAULT_OPSET
from graphs.tolerance import E2E_TOLERANCES, STAGE_RTOL, mismatches, stage_atol, stage_tolerance

SAMPLE_QUERY = "Where is the cat in this picture?"
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# The graph cache's code key: every module of ours that exporter.export and the wrappers it traces import,
# transitively (code_files), so an edit anywhere the traced code reaches re-traces; no hand list to drift.
_CODE_ROOTS = ("exporter/export.py", "exporter/wrappers.py")
_OWN_PACKAGES = ("exporter", "graphs")


@dataclass(frozen=True)
class ExportOptions:
    """What `csprt export` takes besides the checkpoint and schedule. See `LayoutOptions` for the bounds."""

    precision: str = "fp32"
    mode: str = "single-pass"
    opset: int = DEFAULT_OPSET
    # The layout's own defaults: one place for each bound.
    max_text_len: int = LayoutOptions.max_text_len
    max_new_tokens: int = LayoutOptions.max_new_tokens
    max_seg: int = LayoutOptions.max_seg
    max_batch: int = LayoutOptions.max_batch
    opt_batch: int = LayoutOptions.opt_batch
    external_data_threshold: int = onnx_passes.EXTERNAL_DATA_THRESHOLD
    cache_dir: str | None = None  # a GraphCache shared between exports; None: no cross-artifact reuse
    # Trace each stage on inputs built from the layout instead of running the model, and skip the ONNX
    # Runtime parity check (for models too big to run on the export host; `csprt validate` checks later).
    trace_only: bool = False


def sample_image(h: int = 96, w: int = 128) -> np.ndarray:
    """A deterministic, structured RGB test image: gradients plus a disc (no file, no download)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 7.0) * np.cos(yy / 5.0)], axis=-1)
    disc = (yy - h * 0.55) ** 2 + (xx - w * 0.4) ** 2 < (min(h, w) * 0.25) ** 2
    img[disc] = (0.9, 0.2, 0.1)
    return (img * 255).round().astype(np.uint8)


# -- keys -------------------------------------------------------------------------------------
def _fingerprint(paths: list[Path]) -> list:
    """Name, size and mtime of each file: cheap, and changes whenever weights are rewritten."""
    out = []
    for p in sorted(paths):
        st = p.stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def code_files(roots=_CODE_ROOTS, packages=_OWN_PACKAGES, base: Path | None = None) -> list[str]:
    """Repo-relative paths of the modules `roots` import from `packages`, transitively (their own imports at any
    depth, function-local ones included), found by reading their source: the same on every run."""
    base = base or Path(__file__).resolve().parent.parent
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        rel = todo.pop()
        if rel in seen or not (base / rel).is_file():
            continue
        seen.add(rel)
        for node in ast.walk(ast.parse((base / rel).read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for name in names:
                if name.split(".")[0] in packages:
                    path = name.replace(".", "/")
                    todo += [f"{path}.py", f"{path}/__init__.py"]
    return sorted(seen)


def _code_hash() -> str:
    base = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in code_files():
        h.update(rel.encode() + b"\0" + (base / rel).read_bytes())
    return h.hexdigest()


def _schedule_context(spec: StageSpec, schedule: Schedule) -> dict:
    """The part of the schedule a stage's graph depends on, so unrelated schedules share graphs."""
    knobs = {k: v for k, v in schedule.to_dict().items() if k not in ("name", "stages", "n_layers", "n_image_tokens")}
    names = [s.name for s in schedule.stages]
    if spec.kind == "vision":
        return {"first": dataclasses.asdict(schedule.stages[0]), "knobs": knobs}
    if spec.kind in ("accm_picks", "accm_beam_step"):  # the picks' budget and text picks; the beam width
        return {"first": dataclasses.asdict(schedule.stages[0]), "accm": dataclasses.asdict(schedule.accm)}
    if spec.kind == "entry":
        i = int(spec.name.split("_")[-1])
        nxt = schedule.stages[i + 1].op if i + 1 < len(names) else None  # the previous budget is in the I/O
        return {"index": i, "stage": dataclasses.asdict(schedule.stages[i]), "next_op": nxt, "knobs": knobs}
    # Blocks depend on their layers and I/O alone (scores and the head show in their outputs), so schedules
    # with one layer partition share them; embed, seg_gather, seg_head and SAM graphs on the I/O alone.
    return {}


def stage_key(spec: StageSpec, schedule: Schedule, shape: ModelShape, opts: ExportOptions, weights: list,
              versions: dict, code: str, seg_token_id: int) -> str:
    """Content key of one stage graph: everything that can change its bytes, nothing that cannot."""
    io_spec = {"kind": spec.kind, "layers": list(spec.layers),
               "inputs": [[t.name, t.dtype, list(t.shape)] for t in spec.inputs],
               "outputs": [[t.name, t.dtype, list(t.shape)] for t in spec.outputs]}
    blob = {"name": spec.name, "io": io_spec, "schedule": _schedule_context(spec, schedule), "shape": shape.to_dict(),
            "precision": opts.precision, "opset": opts.opset, "weights": weights, "versions": versions,
            "code": code, "seg": seg_token_id}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


# -- tracing ----------------------------------------------------------------------------------
def trace_program(wrapper: torch.nn.Module, spec: StageSpec, args: tuple, opset: int):
    """torch.onnx.export (dynamo) with the spec's names and its named dims dynamic; optimised (constants
    folded). Returns the `torch.onnx.ONNXProgram`: its initializers still share the wrapper's weights, so
    nothing is copied until it is saved (`_write_stage`)."""
    dims: dict[str, torch.export.Dim] = {}
    dynamic = []
    for t in spec.inputs:
        axes = {}
        for axis, d in enumerate(t.shape):
            if isinstance(d, str):
                axes[axis] = dims.setdefault(d, torch.export.Dim(d, min=1))
        dynamic.append(axes or None)
    params = inspect.signature(wrapper.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        fixed = sum(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
        dynamic = [*dynamic[:fixed], tuple(dynamic[fixed:])]  # torch.export matches `*args` as one tuple argument
    sink = io.StringIO()
    # The exporter narrates to stdout, warns about unused dim names and logs missing torchvision ops:
    # none of it is actionable here, and progress is reported per stage instead.
    for name in ("torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(sink), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, args, dynamo=True, input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs], dynamic_shapes=tuple(dynamic), opset_version=opset,
            optimize=True, verbose=False)
    return program



def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class _SampleChain:
    """Runs stage wrappers eagerly over a sample request, following the layout's wiring.

    Dynamic dims must be >= 2 in the sample (torch.export specialises sizes 0 and 1): the sample is a
    batch of two requests (the second with the image mirrored and its query one token shorter, right-padded),
    each with one [SEG] row. A block gets an empty static cache
    (past_len 0) a few rows longer than its prompt rows: its prefill, as the Pipeline runs it.
    """

    def __init__(self, model, schedule: Schedule, layout: Layout, seg_token_id: int, host: dict[str, torch.Tensor],
                 given: dict[str, torch.Tensor] | None = None, owned_feed: Callable[[StageSpec], dict] | None = None):
        self.model, self.schedule, self.layout, self.seg = model, schedule, layout, seg_token_id
        self.tensors: dict[str, torch.Tensor] = {f"host.{k}": v for k, v in host.items()}
        self.tensors.update(given or {})  # host steps' outputs on the sample (ACCM: exporter.accm.sample)
        self.owned_feed = owned_feed      # the feed of a stage a host step runs (HostStep.runs)
        self.mode = layout.modes[0]
        self.batch = host["suffix_lens"].shape[0]

    def feed(self, spec: StageSpec) -> tuple:
        if spec.name in self.layout.run_by_host_steps():
            feed = self.owned_feed(spec)
            return tuple(feed[t.name] for t in spec.inputs)
        args = {}
        for t in spec.inputs:
            src = t.source_for(self.mode)
            if src == CACHE_SOURCE:
                continue
            if src == "loop.seg_batch":  # generate-only artifact: one stand-in [SEG] row per request
                x = torch.arange(self.tensors["host.suffix_lens"].shape[0])
            elif src.startswith("loop."):  # ... taken from the last hidden state
                x = self.tensors[self.layout.loop.hidden]
            else:
                x = self.tensors[src]
            args[t.name] = self._fit_batch(x, t)
        if spec.cache:
            rows = args["hidden"].shape[1]
            args.update(empty_cache(spec, rows + 3, args["hidden"].dtype, args["hidden"].shape[0]))
        return tuple(args[t.name] for t in spec.inputs)

    def _fit_batch(self, x: torch.Tensor, t) -> torch.Tensor:
        """A stage of one request (leading dim 1: ACCM's) takes the sample's first request; a batched input fed
        by such a stage gets its rows repeated for the sample's other request."""
        if t.shape and t.shape[0] == 1 and x.shape[0] != 1:
            return x[:1]
        if t.shape and t.shape[0] == "batch" and x.shape[0] == 1 and self.batch > 1:
            return x.expand(self.batch, *x.shape[1:]).contiguous()
        return x

    def run(self, spec: StageSpec, wrapper, args: tuple) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            outs = wrapper(*args)
        result = {o.name: v for o, v in zip(spec.outputs, outs)}
        for name, v in result.items():
            self.tensors[f"{spec.name}.{name}"] = v
        return result


def empty_cache(spec: StageSpec, capacity: int, dtype: torch.dtype, batch: int) -> dict[str, torch.Tensor]:
    """A block's cache inputs for a prefill: zero buffers of `capacity` rows and past_len 0."""
    out = {CACHE_LENGTH: torch.zeros(batch, dtype=torch.long)}
    for inp, _ in spec.cache:
        t = spec.input(inp)
        out[inp] = torch.zeros((batch, t.shape[1], capacity, t.shape[3]), dtype=dtype)
    return out


def _host_sample(shape: ModelShape, clip_processor: dict, image: np.ndarray, ids, dtype: torch.dtype,
                 layout: Layout) -> dict[str, torch.Tensor]:
    """A batch of two requests: the sample image and query, and the image mirrored with the query one token
    shorter (its suffix right-padded with another id: padding may hold anything)."""
    images = [image, np.ascontiguousarray(image[:, ::-1])]
    s = len(ids.suffix)
    host = {
        "clip_pixels": torch.cat([clip_pixels(im, clip_processor) for im in images]).to(dtype),
        "sam_pixels": torch.cat([sam_pixels(im, shape.sam.image_size)[0] for im in images]).to(dtype),
        "prefix_ids": torch.tensor([ids.prefix] * 2, dtype=torch.long),
        "suffix_ids": torch.tensor([ids.suffix, ids.suffix[:-1] + ids.suffix[:1]], dtype=torch.long),
        "suffix_lens": torch.tensor([s, s - 1], dtype=torch.long),
    }
    if any(t.name == "seg_rows" for t in layout.host_inputs):
        seg = ids.seg_rows()[0]  # the single-pass answer "[SEG]." keeps its [SEG] in the shorter suffix
        host["seg_rows"] = torch.tensor([seg, seg], dtype=torch.long)
        host["seg_batch"] = torch.tensor([0, 1], dtype=torch.long)
    if any(t.name == "instance_masks" for t in layout.host_inputs):
        g = shape.vision.grid
        masks = torch.zeros((2, 2, g, g), dtype=dtype)
        masks[:, 0, : g // 2, : g // 2] = 1
        masks[:, 1, g // 2:, g // 3:] = 1
        masks[1, 1] = 0  # the second request has one instance (an empty mask pads it)
        host["instance_masks"] = masks
    return host


def spec_feed(spec: StageSpec, layout: Layout, host: dict[str, torch.Tensor], seg_token_id: int,
              seed: int = 0) -> tuple:
    """A stage's feed built from the layout alone, for tracing without running the model (trace_only).

    Named dims take their profile `opt`, at least 2 (torch.export specialises sizes 0 and 1); host
    inputs are the real sample's (rows repeated to the dim's size); other floats are seeded normal
    values, and integer inputs get valid indices for what they index (rows, tokens, positions).

    Args:
        spec (StageSpec): the stage.
        layout (Layout): its layout (dim profiles, host inputs).
        host (dict[str, Tensor]): the host sample (`_host_sample`), e.g. prefix_ids, clip_pixels.
        seg_token_id (int): token id fed to a decode step.
        seed (int): generator seed for the float inputs. Defaults to 0.
    """
    gen = torch.Generator().manual_seed(seed)
    dims = {name: max(2, r.opt) for name, r in layout.dims.items()}  # prefix/suffix_len opt: the sample's
    for s in layout.stages:  # a block's rows are P + its budget + S; its cache a few more (an empty prefill cache)
        if s.cache:
            budget = layout.stage(f"entry_{s.name.split('_')[-1]}").output("image_indices_out").shape[1]
            dims[f"rows_{s.name}"] = dims["prefix_len"] + budget + dims["suffix_len"]
            dims[f"cache_{s.name}"] = dims[f"rows_{s.name}"] + 3
    sizes = {t.name: tuple(eval_dim(d, dims) for d in t.shape) for t in spec.inputs}
    n_image = layout.stage("vision").outputs[0].shape[1]  # image_embeds [B, N, H]
    args = []
    for t in spec.inputs:
        size = sizes[t.name]
        src = t.source_for(layout.modes[0])
        if src.startswith("host.") and src[5:] in host:
            x = host[src[5:]]
            for axis, n in enumerate(size):  # repeat rows to the dim's size, as _SampleChain does for num_seg
                x = x.index_select(axis, torch.arange(n) % x.shape[axis]) if x.shape[axis] != n else x
        elif t.dtype != "int64":
            x = torch.randn(size, generator=gen).to(getattr(torch, t.dtype))
        else:
            x = _index_input(t.name, size, sizes, n_image, dims, seg_token_id)
        args.append(x)
    return tuple(args)


def _index_input(name: str, size: tuple[int, ...], sizes: dict[str, tuple], n_image: int, dims: dict[str, int],
                 seg_token_id: int) -> torch.Tensor:
    """Valid values for an integer stage input that no host sample provides (every one has a leading batch dim)."""
    b, n = size[0], size[-1]

    def per_request(row: torch.Tensor) -> torch.Tensor:
        return row[None].expand(b, -1).contiguous()

    if name in ("image_indices", "image_indices_out"):  # distinct image-token indices, ascending
        return per_request(torch.arange(n) * (n_image // n))
    if name == "assign":  # each image token's representative: a position in this stage's image_indices
        return per_request(torch.arange(n) % sizes["image_indices"][1])
    if name == CACHE_LENGTH:  # a prefill: the cache is empty
        return torch.zeros(b, dtype=torch.long)
    if name == "positions":  # the block's rows in position order
        return per_request(torch.arange(n))
    rows = next((v[1] for k, v in sizes.items() if k == "hidden"), 1)
    if name == "row_lens":  # every row real
        return torch.full((b,), rows, dtype=torch.long)
    if name == "query_rows":  # the last prompt row
        return torch.full((b, n), rows - 1, dtype=torch.long)
    if name == "seg_batch":  # [SEG] rows spread over the batch, ascending
        return torch.arange(n) * dims["batch"] // max(n, 1)
    raise internal_error(f"spec_feed: no rule for integer input {name!r}; add one to exporter.export._index_input")


# fp16 graphs: a selection index (argmax / top-k over scores computed from fp16 activations) may flip where two
# scores are within fp16 rounding of each other, since torch and ONNX Runtime round fp16 at different points.
# Exact ties break by index on every backend (exporter.selection); near-ties cannot. Up to this share of a
# selection output's values (and always one) may differ; the stages after it are checked on torch's own values, and csprt
# validate judges the effect end to end (mask IoU).
FP16_INTEGER_FLIP_SHARE = 0.01


def _integer_flips(spec: StageSpec, name: str, out: np.ndarray, ref: np.ndarray, precision: str) -> int:
    """How many integer values of an output differ from torch; ParityError past what `precision` allows."""
    bad = int((out != ref).sum())
    allowed = max(1, int(FP16_INTEGER_FLIP_SHARE * ref.size)) if precision == "fp16" else 0  # one near-tie always
    if bad > allowed:
        why = ("selection near-ties: scores within fp16 rounding of each other pick differently in torch and "
               "ONNX Runtime; export with --precision fp32, where selection agrees exactly"
               if precision == "fp16" else "the graph computes something else than torch (please report)")
        raise ParityError(f"stage {spec.name!r} output {name!r}: {bad} of {ref.size} integer values differ from "
                          f"torch (at most {allowed} allowed in {precision}): {why}")
    return bad


def _ort_check(path: Path, spec: StageSpec, args: tuple, expected: dict[str, torch.Tensor], precision: str) -> dict:
    """Run the saved graph on ONNX Runtime (CPU) on the sample; compare with the eager wrapper."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {t.name: _as_numpy(a) for t, a in zip(spec.inputs, args)}
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    atol, rtol = stage_atol(precision, spec.name), STAGE_RTOL[precision]
    worst, report, flipped = 0.0, {}, {}
    for name, ref in expected.items():
        ref = _as_numpy(ref)
        out = got[name]
        if out.shape != ref.shape:
            raise ParityError(f"stage {spec.name!r} output {name!r}: ONNX Runtime gives shape {out.shape}, "
                              f"torch {ref.shape}; the export is wrong (please report)")
        if ref.dtype.kind in "iub":
            flips = _integer_flips(spec, name, out, ref, precision)
            if flips:
                flipped[name] = flips
            continue
        diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
        err = float(diff.max()) if diff.size else 0.0
        report[name] = err
        worst = max(worst, err)
        if diff.size and mismatches(out, ref, atol, rtol).any():
            raise ParityError(f"stage {spec.name!r} output {name!r}: ONNX Runtime differs from torch by {err:.3g} "
                              f"(atol {atol:g}, rtol {rtol:g}: an element fails past both) on the export sample")
    return {"max_abs": worst, "outputs": report, **({"integer_flips": flipped} if flipped else {})}


def _write_stage(program, spec: StageSpec, art: Path, threshold: int, release: Callable[[], None] = lambda: None,
                 ) -> dict[str, str]:
    """Passes, checks, atomic save of a traced stage. Returns {relpath: sha256} of the graph and its data file.

    The graph never exists as one protobuf with its weights until the end (the in-memory ONNX APIs copy
    a model several times, and cannot take one over 2 GB): the weights stream to a data file one tensor
    at a time, the passes and checks run on the graph alone, and a graph under `threshold` is then
    inlined into one .onnx; over it, it keeps `<stage>.onnx.data` beside it.

        ONNXProgram --save(external data)--> tmp/<stage>.onnx + tmp/<stage>.onnx.data   (then `release()`)
            --load graph only--> passes + checks --> graphs/<stage>.onnx(.data), data renamed first, graph last

    Args:
        program (torch.onnx.ONNXProgram): from `trace_program`.
        spec (StageSpec): the stage.
        art (Path): artifact directory.
        threshold (int): serialized size above which weights stay external.
        release (callable): called once the weights are written (the caller may drop them). Defaults to a no-op.
    """
    (art / "graphs").mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(dir=art / "graphs", prefix=f".{spec.name}."))  # same filesystem: renames
    graph = tmpdir / f"{spec.name}.onnx"
    try:
        _contiguous_on_save(program.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program.save(graph, external_data=True)
        del program
        _forget_rewriter_matches()
        release()
        model_proto = _graph_passes(onnx_passes.load_graph(graph), spec)
        graph.write_bytes(model_proto.SerializeToString())
        onnx_checks.check_model(graph)  # path based, beside its data: what is installed next, byte for byte
        written = onnx_passes.save_with_external_data(model_proto, art / f"graphs/{spec.name}.onnx",
                                                      graph.with_name(graph.name + ".data"),
                                                      inline_threshold_bytes=threshold)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    written.sort(key=lambda p: p.suffix != ".onnx")  # the graph first, as mf.graph_files lists it
    return {p.relative_to(art).as_posix(): mf.file_sha256(p) for p in written}


def _forget_rewriter_matches() -> None:
    """Drop what onnxscript's rewrite rules remember of the last graph they matched.

    The rules are module-level objects whose matchers keep their last graph, node and bindings; through
    them a traced graph, and every weight it ever referenced, outlives its export: each stage's weights
    would stay in memory until the next stage's optimiser overwrote them. Skipped if onnxscript moves them.
    """
    try:
        from onnxscript.rewriter._basics import MatchResult
        from onnxscript.rewriter._matcher import PatternMatcher
    except ImportError:
        return
    for obj in gc.get_objects():
        if issubclass(type(obj), PatternMatcher):  # type(), not isinstance: no __class__ lookups (some warn)
            for attr in ("_graph", "_current_node", "_tracer"):
                if hasattr(obj, attr):
                    setattr(obj, attr, None)
            if hasattr(obj, "_match"):
                obj._match = MatchResult()


def _contiguous_on_save(model) -> None:
    """Make folded weights contiguous as they are written, one at a time.

    The optimizer folds `Transpose(W)` into a strided numpy view of W, which numpy's `tofile` (what the
    external-data writer calls) writes one element at a time: about 20 MB/s here, most of an LLM
    stage's export. A lazy tensor copies each to C order only when it is written.
    """
    import onnx_ir as ir

    for value in model.graph.initializers.values():
        t = value.const_value
        if isinstance(t, ir.Tensor) and isinstance(t.raw, np.ndarray) and not t.raw.flags.c_contiguous:
            value.const_value = ir.LazyTensor(
                lambda a=t.raw, dtype=t.dtype, name=t.name: ir.Tensor(np.ascontiguousarray(a), dtype=dtype, name=name),
                dtype=t.dtype, shape=t.shape, name=t.name)


def _graph_passes(model_proto, spec: StageSpec):
    """Dim names, shape inference, fp16 upcasts and the in-memory checks (weights need not be loaded)."""
    model_proto = onnx_passes.rename_dims(model_proto, spec)
    model_proto = onnx_passes.infer_shapes(model_proto)
    if any(t.dtype == "float16" for t in spec.outputs):
        model_proto = onnx_passes.infer_shapes(onnx_passes.upcast_sensitive_ops(model_proto))
    onnx_checks.check_model_proto(model_proto, spec)
    return model_proto


# -- the export -------------------------------------------------------------------------------
def export_artifact(checkpoint: str | os.PathLike, schedule: Schedule, out: str | os.PathLike,
                    options: ExportOptions = ExportOptions(), vision_tower: str | os.PathLike | None = None,
                    command: str = "", progress: Callable[[str], None] | None = None,
                    finish: Callable[[Path], None] | None = None, accm_dir: str | os.PathLike | None = None) -> Path:
    """Export every stage graph of `schedule` and write the manifest. Returns the artifact dir.

    Weights stream: the model is built on `meta` and each stage reads only the checkpoint tensors its
    wrapper touches (`exporter.streaming`), so memory holds one stage's weights, not the model's.

    Args:
        checkpoint (path): LISA checkpoint directory.
        schedule (Schedule): resolved against the checkpoint's model.
        out (path): artifact directory (created; an existing artifact is updated incrementally).
        options (ExportOptions): precision, mode, opset, bounds, trace_only. Defaults to ExportOptions().
        vision_tower (path | None): CLIP directory. Defaults to the checkpoint config's.
        command (str): the command line that regenerates this artifact (recorded in the manifest).
        progress (callable | None): called with one line per stage. Defaults to silent.
        finish (callable | None): a last pass over the complete new generation's directory before it is swapped
            in (`csprt export --quantize`), so a reader never sees it half-done. Defaults to None.
        accm_dir (path | None): ACCM's models (exporter/accm/checkpoint.py), for a schedule whose first op is
            "accm"; only then. Defaults to None.
    """
    say = progress or (lambda _msg: None)
    art = Path(out)
    if schedule.accm is not None:
        options = _accm_options(schedule, options, accm_dir, checkpoint, art)
    elif accm_dir is not None:
        raise ScheduleError(f"--accm is for ACCM schedules (accm-36, accm-18); schedule {schedule.name!r} has no "
                            "ACCM entry: drop --accm, or export an ACCM schedule")
    if art.exists() and not art.is_dir():
        raise ArtifactError(f"--out {art} exists and is not a directory; choose a directory path")
    if options.precision not in PRECISIONS:
        raise ToolchainError(f"unknown precision {options.precision!r}; choose one of: {', '.join(PRECISIONS)}")
    # One export at a time per artifact: a second one is refused at once, naming the first, instead of two
    # writers interleaving their graphs and one of them failing later with a misleading error.
    with exclusive_lock(artifact_dir.export_lock(art), f"csprt export to {art}"):
        # Into a new generation beside the artifact, which keeps running and serving until this one is complete
        # and swapped in (graphs/artifact_dir.py); a killed export leaves the artifact as it was.
        gen = artifact_dir.begin_generation(art, mf.is_artifact_dir(art))
        _export(gen, checkpoint, schedule, options, vision_tower, command, say, shown=art, accm_dir=accm_dir)
        if finish is not None:
            finish(gen)
        artifact_dir.publish(art, gen)
        say(f"export: wrote {art / mf.MANIFEST_NAME}")
        return art


def _accm_options(schedule: Schedule, options: ExportOptions, accm_dir, checkpoint, art: Path) -> ExportOptions:
    """The options an ACCM export runs with: its graphs run one request (batch 1), in fp32, traced on real data."""
    fix = f"csprt export {checkpoint} --schedule {schedule.name} --accm ACCM_DIR --out {art}"
    if accm_dir is None:
        raise ScheduleError(f"schedule {schedule.name!r} is an ACCM schedule: it needs ACCM's models "
                            "(caption_model.pt, selector.pt, gpt2/, longclip/, clip/; `csprt make-tiny OUT --accm` "
                            f"writes tiny ones): {fix}")
    if options.precision != "fp32":
        raise ToolchainError(f"ACCM artifacts export in fp32 only (its picks and beam ranking are not checked in "
                             f"fp16 yet); drop --precision {options.precision}")
    if options.trace_only:
        raise ToolchainError("ACCM artifacts are exported with parity checks (--trace-only is not supported for "
                             "ACCM schedules yet); drop --trace-only")
    return dataclasses.replace(options, max_batch=1, opt_batch=1)  # ACCM's graphs run one request at a time


def _export(art: Path, checkpoint, schedule: Schedule, options: ExportOptions, vision_tower, command: str,
            say: Callable[[str], None], shown: Path, accm_dir=None) -> Path:
    """`export_artifact` under its lock, into the generation directory `art` (`shown`: the path the user named)."""
    cfg = read_checkpoint_config(checkpoint, vision_tower)
    shape = cfg.shape
    schedule = schedule.check_against(shape.llm.layers, shape.num_image_tokens)
    tok_export = TokenizerExport(cfg.ckpt_dir, shape.llm.vocab)  # converted to tokenizer.json and checked, up front
    tokenizer = tok_export.reference
    seg_id = token_id(tokenizer, SEG_TOKEN)
    sample_mode = "single-pass" if options.mode in ("single-pass", "both") else "generate"
    ids = tokenize_prompt(tokenizer, SAMPLE_QUERY, sample_mode, shape.num_image_tokens, shape.llm.max_positions)
    accm = accm_info = None
    if schedule.accm is not None:
        from exporter.accm.sample import load_for_export

        accm, accm_info = load_for_export(accm_dir, shape, say)
    layout = build_layout(schedule, shape, LayoutOptions(
        precision=options.precision, mode=options.mode, max_text_len=options.max_text_len,
        max_new_tokens=options.max_new_tokens, max_seg=options.max_seg, opt_prefix=len(ids.prefix),
        opt_suffix=len(ids.suffix), max_batch=options.max_batch, opt_batch=options.opt_batch), seg_token_id=seg_id,
        stop_token_ids=(tokenizer.eos_token_id,), accm=accm_info)

    weights = _fingerprint(find_weight_files(cfg.ckpt_dir) + [cfg.ckpt_dir / "config.json"]
                           + [p for p in cfg.clip_dir.iterdir() if p.is_file()]
                           + ([p for p in Path(accm_dir).rglob("*") if p.is_file()] if accm is not None else []))
    versions, code = mf.package_versions(), _code_hash()
    keys = {s.name: stage_key(s, schedule, shape, options, weights, versions, code, seg_id) for s in layout.stages}
    reuse = _reusable(art, keys, need_parity=not options.trace_only)
    todo = [s for s in layout.stages if s.name not in reuse]
    say(f"export: {len(layout.stages)} stages ({', '.join(s.name for s in layout.stages)}); "
        f"{len(reuse)} unchanged, {len(todo)} to export" + (" (trace only: no parity check)" if options.trace_only else ""))

    parity: dict[str, dict] = {name: entry.get("export_parity", {}) for name, entry in reuse.items()}
    files: dict[str, dict[str, str]] = {name: entry["files"] for name, entry in reuse.items()}
    if todo:
        mf.invalidate(art)  # from here until the manifest is rewritten, the directory is not an artifact
        processor = read_clip_processor_config(cfg.clip_dir, shape)
        host = _host_sample(shape, processor, sample_image(), ids, TORCH_DTYPES[options.precision], layout)
        run = _StageRun(art=art, shown=shown, schedule=schedule, layout=layout, options=options, seg_id=seg_id,
                        keys=keys, host=host, files=files, parity=parity, say=say,
                        cache=GraphCache(options.cache_dir) if options.cache_dir else None, accm=accm)
        run.export(cfg, [s.name for s in todo])

    tok_files = tok_export.write(art / "tokenizer")
    host_step_files = None
    if accm is not None:
        from exporter.accm.sample import write_tokenizers

        host_step_files = write_tokenizers(Path(accm_dir), art, layout)
    manifest = mf.new_manifest(
        layout=layout, shape=shape, schedule=schedule, precision=options.precision, opset=options.opset,
        export={"command": command or (f"csprt export {cfg.ckpt_dir} --schedule {schedule.name} --out {shown}"
                                       + (f" --accm {accm_dir}" if accm is not None else "")),
                "checkpoint": str(cfg.ckpt_dir), "vision_tower": str(vision_tower) if vision_tower else None,
                "mode": options.mode, "options": dataclasses.asdict(options), "versions": versions,
                **({"accm": str(Path(accm_dir).resolve())} if accm is not None else {})},
        tokenizer={"dir": "tokenizer", "seg_token_id": seg_id, "eos_token_id": tokenizer.eos_token_id,
                   "prompt": {"template": "llava_v1", "sample_query": SAMPLE_QUERY}, **tok_files},
        preprocessing={"clip": read_clip_processor_config(cfg.clip_dir, shape), "sam": {"image_size": shape.sam.image_size, "mean": list(SAM_PIXEL_MEAN),
                                                  "std": list(SAM_PIXEL_STD), "resize": "longest_side",
                                                  "pad": "bottom_right"}},
        postprocessing={"masks": {"crop": "to the resized (unpadded) image", "resize": "bilinear, half-pixel",
                                  "threshold": 0.0}},
        tolerances={"end_to_end": E2E_TOLERANCES[options.precision]},
        stage_files=files, stage_keys=keys,
        stage_tolerances={s.name: stage_tolerance(options.precision, s.name) for s in layout.stages},
        host_step_files=host_step_files,
    )
    for entry in manifest["stages"]:
        if parity.get(entry["name"]):
            entry["export_parity"] = parity[entry["name"]]
    mf.write_manifest(art, manifest)
    unchecked = [name for name, p in parity.items() if not parity_checked(p)]
    if unchecked:
        say(f"export: parity NOT checked for {', '.join(unchecked)} (trace only); "
            f"check it with: csprt validate {shown}")
    return art


def parity_checked(record: dict) -> bool:
    """False for the `export_parity` record of a stage exported with `trace_only` (not compared with torch)."""
    return record.get("checked") is not False


def _unchecked_parity(art: Path) -> dict:
    return {"checked": False,
            "reason": "trace-only export: traced on inputs synthesised from the layout; ONNX Runtime was not "
                      "compared with torch",
            "check_with": f"csprt validate {art}"}


@dataclass
class _StageRun:
    """The per-stage loop of `export_artifact`: hold the stage's weights, feed, trace, save, check."""

    art: Path
    shown: Path  # the artifact path the user named (art is the generation being written)
    schedule: Schedule
    layout: Layout
    options: ExportOptions
    seg_id: int
    keys: dict[str, str]
    host: dict[str, torch.Tensor]
    files: dict[str, dict[str, str]]
    parity: dict[str, dict]
    say: Callable[[str], None]
    cache: GraphCache | None = None
    accm: object = None  # exporter.accm.checkpoint.AccmModels of an ACCM schedule

    def export(self, cfg, todo: list[str]) -> None:
        """Export the stages named in `todo` (in layout order) from the checkpoint of `cfg`."""
        t0 = time.perf_counter()
        staged = StagedWeights(cfg.shape, cfg.ckpt_dir, cfg.clip_dir, TORCH_DTYPES[self.options.precision])
        self.say(f"export: opened {cfg.ckpt_dir} ({self.options.precision}; {staged.total_tensors} tensors, read "
                 f"per stage) in {time.perf_counter() - t0:.1f}s")
        given = owned = None
        if self.accm is not None:
            from exporter.accm.sample import sample_sources

            given, owned = sample_sources(self.accm, self.layout, self.host)
        chain = None if self.options.trace_only else _SampleChain(
            staged.model, self.schedule, self.layout, self.seg_id, self.host, given, owned)
        # Trace-only stages are independent; checked ones need the eager outputs of the stages feeding them.
        needed = set(todo) if chain is None else _needed_stages(self.layout, set(todo))
        done = 0
        for spec in (s for s in self.layout.stages if s.name in needed):
            t0 = time.perf_counter()
            how = self._stage(spec, staged, chain, spec.name in todo)
            if how:
                done += 1
                self.say(f"export: [{done}/{len(todo)}] {spec.name}: {time.perf_counter() - t0:.1f}s, {how}")
        staged.hold((), "done")
        del chain, staged
        gc.collect()

    def _stage(self, spec: StageSpec, staged: StagedWeights, chain: _SampleChain | None, todo: bool) -> str:
        """One stage; returns the progress note, or "" when it only ran to feed later stages."""
        name = spec.name
        hit = self.cache.get(self.keys[name], self.art) if self.cache and todo else None
        if hit and chain is None:
            self.files[name] = {rel: mf.file_sha256(self.art / rel) for rel in hit[0]}
            self.parity[name] = hit[1] if parity_checked(hit[1]) else _unchecked_parity(self.shown)
            return "from the graph cache"
        make = lambda model: make_wrapper(model, self.schedule, spec, self.seg_id, accm=self.accm)  # noqa: E731
        args = chain.feed(spec) if chain else spec_feed(spec, self.layout, self.host, self.seg_id)
        # ACCM's own models are loaded whole (small); of LISA's weights only accm_vision reads any (CLIP, projector)
        lisa_weights = not spec.kind.startswith("accm_") or spec.kind == "accm_vision"
        staged.hold(staged.used_by(make, args) if lisa_weights else (), name)
        wrapper = make(staged.model)
        expected = chain.run(spec, wrapper, args) if chain else None
        if not todo:
            return ""
        if hit:
            self.files[name] = {rel: mf.file_sha256(self.art / rel) for rel in hit[0]}
            # A cache entry from a trace-only export is checked now: the feed and torch outputs are at hand.
            self.parity[name] = hit[1] if parity_checked(hit[1]) else self._check(spec, args, expected)
            return "from the graph cache"
        program = trace_program(wrapper, spec, args, self.options.opset)
        del wrapper
        self.files[name] = _write_stage(program, spec, self.art, self.options.external_data_threshold,
                                        release=lambda: staged.hold((), f"{name} written"))
        del program
        gc.collect()
        self.parity[name] = self._check(spec, args, expected) if chain else _unchecked_parity(self.shown)
        if self.cache:
            self.cache.put(self.keys[name], self.art, list(self.files[name]), self.parity[name])
        if chain is None:
            return "traced only (parity not checked)"
        return f"ONNX Runtime vs torch max abs {self.parity[name]['max_abs']:.2e}"

    def _check(self, spec: StageSpec, args: tuple, expected: dict) -> dict:
        return {"checked": True, **_ort_check(self.art / f"graphs/{spec.name}.onnx", spec, args, expected,
                                              self.options.precision)}


def _needed_stages(layout: Layout, todo: set[str]) -> set[str]:
    """Stages whose eager outputs the sample feeds of `todo` depend on (plus `todo` itself)."""
    need, frontier = set(todo), list(todo)
    stages = {s.name for s in layout.stages}
    while frontier:
        spec = layout.stage(frontier.pop())
        for t in spec.inputs:
            sources = t.source.values() if isinstance(t.source, dict) else [t.source]
            for src in sources:
                if src == CACHE_SOURCE:
                    continue
                owner = layout.loop.hidden.split(".")[0] if src.startswith("loop.") else src.split(".")[0]
                if owner not in stages:  # the host, or a host step (the sample chain is given its outputs)
                    continue
                if owner not in need:
                    need.add(owner)
                    frontier.append(owner)
    return need


def _reusable(art: Path, keys: dict[str, str], need_parity: bool) -> dict[str, dict]:
    """Manifest entries of stages whose key matches and whose files are intact (and, with `need_parity`,
    whose parity was checked: a checked export re-exports what a trace-only one left unchecked)."""
    previous = mf.read_manifest(art)
    out = {}
    for entry in (previous or {}).get("stages", []):
        if need_parity and not parity_checked(entry.get("export_parity", {})):
            continue
        if mf.reusable_files(previous, art, entry["name"], keys.get(entry["name"], "")) is not None:
            out[entry["name"]] = entry
    return out
