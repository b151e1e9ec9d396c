"""`csprt export`: a checkpoint and a schedule -> the artifact of DESIGN.md §5.

Stage by stage: run the stage's wrapper eagerly on a real sample (so every graph is checked
against torch on real data), trace it with `torch.onnx.export(dynamo=True)`, run the ONNX passes
and checks, save it atomically, run it on ONNX Runtime and compare. Only one stage's trace is alive
at a time. Stages whose export key (inputs, settings, code and versions hashed) matches the
existing artifact are reused without loading the checkpoint. The manifest is removed before
anything is rewritten and written last, so an interrupted export never leaves an artifact that loads.
"""

from __future__ import annotations

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
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from exporter.checkpoint import find_weight_files, load_checkpoint, load_tokenizer
from exporter.graph_cache import GraphCache
from exporter.preprocess import clip_pixels, sam_pixels
from exporter.wrappers import make_wrapper
from graphs import manifest as mf
from graphs import onnx_checks, onnx_passes
from graphs.atomic import atomic_path
from graphs.checkpoint_config import read_checkpoint_config, read_clip_processor_config
from graphs.errors import ArtifactError, ParityError, ToolchainError
from graphs.preprocessing import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from graphs.prompt import SEG_TOKEN, token_id, tokenize_prompt
from graphs.schedule import Schedule
from graphs.shapes import ModelShape
from graphs.stages import PRECISIONS, Layout, LayoutOptions, StageSpec, build_layout

SAMPLE_QUERY = "Where is the cat in this picture?"
DEFAULT_OPSET = 18  # what TensorRT 10 / TensorRT-RTX 1.x parse, and what the dynamo exporter emits natively
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Per-stage parity (ORT vs the eager wrapper on the same feed). fp32: measured <= 3e-6 on the tiny model;
# 1e-4 leaves room for deeper models. fp16: measured <= 1.3e-2 (sam_decoder; 2e-3 elsewhere), torch CPU and
# ORT round fp16 at different points.
STAGE_ATOL = {"fp32": 1e-4, "fp16": 2e-2}
STAGE_RTOL = {"fp32": 1e-4, "fp16": 1e-2}
# End to end against the fp32 reference. fp16 measured on the tiny csp artifact: mask logits max abs 2.2e-2,
# mask IoU 0.990 (pixels whose logit is within ~1e-2 of 0 flip), generated ids equal.
E2E_TOLERANCES = {"fp32": {"mask_logits_atol": 1e-3, "mask_iou_min": 1.0},
                  "fp16": {"mask_logits_atol": 0.05, "mask_iou_min": 0.98}}
_CODE = ("exporter/wrappers.py", "exporter/selection.py", "exporter/model.py", "exporter/export.py", "graphs/stages.py",
         "graphs/onnx_passes.py")


@dataclass(frozen=True)
class ExportOptions:
    """What `csprt export` takes besides the checkpoint and schedule. See `LayoutOptions` for the bounds."""

    precision: str = "fp32"
    mode: str = "single-pass"
    opset: int = DEFAULT_OPSET
    max_text_len: int = 256
    max_new_tokens: int = 64
    max_seg: int = 8
    external_data_threshold: int = onnx_passes.EXTERNAL_DATA_THRESHOLD
    cache_dir: str | None = None  # a GraphCache shared between exports; None: no cross-artifact reuse


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


def _code_hash() -> str:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in _CODE:
        h.update((root / rel).read_bytes())
    return h.hexdigest()


def _schedule_context(spec: StageSpec, schedule: Schedule) -> dict:
    """The part of the schedule a stage's graph depends on, so unrelated schedules share graphs."""
    knobs = {k: v for k, v in schedule.to_dict().items() if k not in ("name", "stages", "n_layers", "n_image_tokens")}
    names = [s.name for s in schedule.stages]
    if spec.kind == "vision":
        return {"first": dataclasses.asdict(schedule.stages[0]), "knobs": knobs}
    if spec.kind == "llm":
        i = names.index(spec.name)
        nxt = schedule.stages[i + 1].op if i + 1 < len(names) else None  # the previous budget is in the I/O
        return {"index": i, "stage": dataclasses.asdict(schedule.stages[i]), "next_op": nxt, "knobs": knobs}
    return {}  # decode, seg_head and SAM graphs depend on the I/O alone (decode's past dims encode the stages)


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
def trace_stage(wrapper: torch.nn.Module, spec: StageSpec, args: tuple, opset: int):
    """torch.onnx.export (dynamo) with the spec's names and its named dims dynamic. Returns a ModelProto."""
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
        dynamic = [tuple(dynamic)]  # torch.export matches `*args` as one tuple argument
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
    model = program.model_proto
    del program
    return model


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class _SampleChain:
    """Runs stage wrappers eagerly over a sample request, following the layout's wiring.

    Dynamic dims must be >= 2 in the sample (torch.export specialises sizes 0 and 1), so the sample
    feeds of stages with a [SEG] axis or a decode step axis repeat a row to get two.
    """

    def __init__(self, model, schedule: Schedule, layout: Layout, seg_token_id: int, host: dict[str, torch.Tensor]):
        self.model, self.schedule, self.layout, self.seg = model, schedule, layout, seg_token_id
        self.tensors: dict[str, torch.Tensor] = {f"host.{k}": v for k, v in host.items()}
        self.mode = layout.modes[0]

    def feed(self, spec: StageSpec) -> tuple:
        args = []
        for t in spec.inputs:
            src = t.source_for(self.mode)
            if src.startswith("loop."):  # generate-only artifact: stand-in [SEG] rows from the last hidden state
                src = self.layout.loop.hidden
            x = self.tensors[src]
            if "num_seg" in t.shape or "step_len" in t.shape:
                axis = t.shape.index("num_seg") if "num_seg" in t.shape else t.shape.index("step_len")
                x = torch.cat([x.narrow(axis, 0, 1)] * 2, dim=axis)
            args.append(x)
        return tuple(args)

    def run(self, spec: StageSpec, wrapper, args: tuple) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            outs = wrapper(*args)
        result = {o.name: v for o, v in zip(spec.outputs, outs)}
        for name, v in result.items():
            self.tensors[f"{spec.name}.{name}"] = v
        return result


def _host_sample(loaded, image: np.ndarray, ids, dtype: torch.dtype, layout: Layout) -> dict[str, torch.Tensor]:
    shape = loaded.shape
    host = {
        "clip_pixels": clip_pixels(image, loaded.image_processor_config).to(dtype),
        "sam_pixels": sam_pixels(image, shape.sam.image_size)[0].to(dtype),
        "prefix_ids": torch.tensor(ids.prefix, dtype=torch.long),
        "suffix_ids": torch.tensor(ids.suffix, dtype=torch.long),
    }
    if any(t.name == "seg_rows" for t in layout.host_inputs):
        host["seg_rows"] = torch.tensor([j - 1 for j in ids.seg_suffix_positions()], dtype=torch.long)
    if any(t.name == "instance_masks" for t in layout.host_inputs):
        g = shape.vision.grid
        masks = torch.zeros((2, g, g), dtype=dtype)
        masks[0, : g // 2, : g // 2] = 1
        masks[1, g // 2:, g // 3:] = 1
        host["instance_masks"] = masks
    return host


def _ort_check(path: Path, spec: StageSpec, args: tuple, expected: dict[str, torch.Tensor], precision: str) -> dict:
    """Run the saved graph on ONNX Runtime (CPU) on the sample; compare with the eager wrapper."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {t.name: _as_numpy(a) for t, a in zip(spec.inputs, args)}
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    atol, rtol = STAGE_ATOL[precision], STAGE_RTOL[precision]
    worst, report = 0.0, {}
    for name, ref in expected.items():
        ref = _as_numpy(ref)
        out = got[name]
        if out.shape != ref.shape:
            raise ParityError(f"stage {spec.name!r} output {name!r}: ONNX Runtime gives shape {out.shape}, "
                              f"torch {ref.shape}; the export is wrong (please report)")
        if ref.dtype.kind in "iub":
            bad = int((out != ref).sum())
            if bad:
                raise ParityError(f"stage {spec.name!r} output {name!r}: {bad} integer values differ from torch")
            continue
        diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
        err = float(diff.max()) if diff.size else 0.0
        report[name] = err
        worst = max(worst, err)
        if diff.size and (diff > atol + rtol * np.abs(ref.astype(np.float64))).any():
            raise ParityError(f"stage {spec.name!r} output {name!r}: ONNX Runtime differs from torch by {err:.3g} "
                              f"(tolerance {atol:g} + {rtol:g}*|ref|) on the export sample")
    return {"max_abs": worst, "outputs": report}


def _write_stage(model_proto, spec: StageSpec, art: Path, threshold: int) -> dict[str, str]:
    """Passes, checks, atomic save. Returns {relpath: sha256} of the graph and its data file."""
    model_proto = onnx_passes.rename_dims(model_proto, spec)
    model_proto = onnx_passes.infer_shapes(model_proto)
    if any(t.dtype == "float16" for t in spec.outputs):
        model_proto = onnx_passes.infer_shapes(onnx_passes.upcast_sensitive_ops(model_proto))
    onnx_checks.check_model_proto(model_proto, spec)
    rel = f"graphs/{spec.name}.onnx"
    onnx_passes.save_model(model_proto, art / rel, external_data_threshold_bytes=threshold)
    onnx_checks.check_model(art / rel)
    return mf.graph_files(art, rel)


# -- the export -------------------------------------------------------------------------------
def export_artifact(checkpoint: str | os.PathLike, schedule: Schedule, out: str | os.PathLike,
                    options: ExportOptions = ExportOptions(), vision_tower: str | os.PathLike | None = None,
                    command: str = "", progress: Callable[[str], None] | None = None) -> Path:
    """Export every stage graph of `schedule` and write the manifest. Returns the artifact dir.

    Args:
        checkpoint (path): LISA checkpoint directory.
        schedule (Schedule): resolved against the checkpoint's model.
        out (path): artifact directory (created; an existing artifact is updated incrementally).
        options (ExportOptions): precision, mode, opset and bounds. Defaults to ExportOptions().
        vision_tower (path | None): CLIP directory. Defaults to the checkpoint config's.
        command (str): the command line that regenerates this artifact (recorded in the manifest).
        progress (callable | None): called with one line per stage. Defaults to silent.
    """
    say = progress or (lambda _msg: None)
    art = Path(out)
    if art.exists() and not art.is_dir():
        raise ArtifactError(f"--out {art} exists and is not a directory; choose a directory path")
    if options.precision not in PRECISIONS:
        raise ToolchainError(f"unknown precision {options.precision!r}; choose one of: {', '.join(PRECISIONS)}")
    cfg = read_checkpoint_config(checkpoint, vision_tower)
    shape = cfg.shape
    schedule = schedule.check_against(shape.llm.layers, shape.num_image_tokens)
    tokenizer = load_tokenizer(cfg.ckpt_dir)
    seg_id = token_id(tokenizer, SEG_TOKEN)
    sample_mode = "single-pass" if options.mode in ("single-pass", "both") else "generate"
    ids = tokenize_prompt(tokenizer, SAMPLE_QUERY, sample_mode, shape.num_image_tokens, shape.llm.max_positions)
    layout = build_layout(schedule, shape, LayoutOptions(
        precision=options.precision, mode=options.mode, max_text_len=options.max_text_len,
        max_new_tokens=options.max_new_tokens, max_seg=options.max_seg, opt_prefix=len(ids.prefix),
        opt_suffix=len(ids.suffix)), seg_token_id=seg_id, stop_token_ids=(tokenizer.eos_token_id,))

    weights = _fingerprint(find_weight_files(cfg.ckpt_dir) + [cfg.ckpt_dir / "config.json"]
                           + [p for p in cfg.clip_dir.iterdir() if p.is_file()])
    versions, code = mf.package_versions(), _code_hash()
    keys = {s.name: stage_key(s, schedule, shape, options, weights, versions, code, seg_id) for s in layout.stages}
    reuse = _reusable(art, keys)
    todo = [s for s in layout.stages if s.name not in reuse]
    say(f"export: {len(layout.stages)} stages ({', '.join(s.name for s in layout.stages)}); "
        f"{len(reuse)} unchanged, {len(todo)} to export")

    parity: dict[str, dict] = {name: entry.get("export_parity", {}) for name, entry in reuse.items()}
    files: dict[str, dict[str, str]] = {name: entry["files"] for name, entry in reuse.items()}
    if todo:
        mf.invalidate(art)  # from here until the manifest is rewritten, the directory is not an artifact
        t0 = time.perf_counter()
        loaded = load_checkpoint(cfg.ckpt_dir, vision_tower, attn="eager", dtype=TORCH_DTYPES[options.precision])
        say(f"export: loaded {cfg.ckpt_dir} ({options.precision}) in {time.perf_counter() - t0:.1f}s")
        chain = _SampleChain(loaded.model, schedule, layout, seg_id,
                             _host_sample(loaded, sample_image(), ids, TORCH_DTYPES[options.precision], layout))
        cache = GraphCache(options.cache_dir) if options.cache_dir else None
        todo_names = {s.name for s in todo}
        needed = _needed_stages(layout, todo_names)
        done = 0
        for spec in (s for s in layout.stages if s.name in needed):
            wrapper = make_wrapper(loaded.model, schedule, spec, seg_id)
            args = chain.feed(spec)
            expected = chain.run(spec, wrapper, args)
            if spec.name not in todo_names:
                continue
            t0 = time.perf_counter()
            hit = cache.get(keys[spec.name], art) if cache else None
            if hit:
                files[spec.name] = {rel: mf.file_sha256(art / rel) for rel in hit[0]}
                parity[spec.name] = hit[1]
                how = "from the graph cache"
            else:
                proto = trace_stage(wrapper, spec, args, options.opset)
                files[spec.name] = _write_stage(proto, spec, art, options.external_data_threshold)
                del proto
                gc.collect()
                parity[spec.name] = _ort_check(art / f"graphs/{spec.name}.onnx", spec, args, expected,
                                               options.precision)
                if cache:
                    cache.put(keys[spec.name], art, list(files[spec.name]), parity[spec.name])
                how = f"ONNX Runtime vs torch max abs {parity[spec.name]['max_abs']:.2e}"
            done += 1
            say(f"export: [{done}/{len(todo)}] {spec.name}: {time.perf_counter() - t0:.1f}s, {how}")
        del chain, loaded
        gc.collect()

    _copy_tokenizer(cfg.ckpt_dir, art / "tokenizer")
    manifest = mf.new_manifest(
        layout=layout, shape=shape, schedule=schedule, precision=options.precision, opset=options.opset,
        export={"command": command or f"csprt export {cfg.ckpt_dir} --schedule {schedule.name} --out {art}",
                "checkpoint": str(cfg.ckpt_dir), "vision_tower": str(vision_tower) if vision_tower else None,
                "mode": options.mode, "options": dataclasses.asdict(options), "versions": versions},
        tokenizer={"dir": "tokenizer", "seg_token_id": seg_id, "eos_token_id": tokenizer.eos_token_id,
                   "prompt": {"template": "llava_v1", "sample_query": SAMPLE_QUERY}},
        preprocessing={"clip": read_clip_processor_config(cfg.clip_dir, shape), "sam": {"image_size": shape.sam.image_size, "mean": list(SAM_PIXEL_MEAN),
                                                  "std": list(SAM_PIXEL_STD), "resize": "longest_side",
                                                  "pad": "bottom_right"}},
        postprocessing={"masks": {"crop": "to the resized (unpadded) image", "resize": "bilinear, half-pixel",
                                  "threshold": 0.0}},
        tolerances={"end_to_end": E2E_TOLERANCES[options.precision]},
        stage_files=files, stage_keys=keys,
        stage_tolerances={s.name: {"atol": {"": STAGE_ATOL[options.precision]},
                                   "rtol": {"": STAGE_RTOL[options.precision]}} for s in layout.stages},
    )
    for entry in manifest["stages"]:
        if parity.get(entry["name"]):
            entry["export_parity"] = parity[entry["name"]]
    mf.write_manifest(art, manifest)
    say(f"export: wrote {art / mf.MANIFEST_NAME}")
    return art


def _needed_stages(layout: Layout, todo: set[str]) -> set[str]:
    """Stages whose eager outputs the sample feeds of `todo` depend on (plus `todo` itself)."""
    need, frontier = set(todo), list(todo)
    while frontier:
        spec = layout.stage(frontier.pop())
        for t in spec.inputs:
            sources = t.source.values() if isinstance(t.source, dict) else [t.source]
            for src in sources:
                owner = layout.loop.hidden.split(".")[0] if src.startswith("loop.") else src.split(".")[0]
                if owner != "host" and owner not in need:
                    need.add(owner)
                    frontier.append(owner)
    return need


def _reusable(art: Path, keys: dict[str, str]) -> dict[str, dict]:
    """Manifest entries of stages whose key matches and whose files are intact."""
    previous = mf.read_manifest(art)
    out = {}
    for entry in (previous or {}).get("stages", []):
        if mf.reusable_files(previous, art, entry["name"], keys.get(entry["name"], "")) is not None:
            out[entry["name"]] = entry
    return out


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "added_tokens.json")


def _copy_tokenizer(ckpt_dir: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        src = ckpt_dir / name
        if src.is_file():
            with atomic_path(dest / name) as tmp:
                shutil.copyfile(src, tmp)
