"""`csprt export`: a checkpoint and a schedule -> segmented ONNX graphs + manifest.json (an artifact)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from graphs.checkpoint_config import read_checkpoint_config
from graphs.errors import InputError
from graphs.shapes import ModelShape
from graphs.stages import EXPORT_MODES, PRECISIONS, LayoutOptions
from graphs.trt_ops import DEFAULT_OPSET, EXPORT_OPSET_RANGE
from tools.quantize_args import QUANT_FLAGS, add_quantize_args, quantize_after_export, quantize_options
from tools.schedule_args import KNOB_FLAGS, add_schedule_args, schedule_from_args


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="export a checkpoint to per-stage ONNX graphs", description=__doc__)
    p.add_argument("checkpoint", type=Path, help="LISA checkpoint directory")
    p.add_argument("--out", type=Path, required=True, help="artifact directory (updated incrementally if it exists)")
    p.add_argument("--mode", choices=EXPORT_MODES, default="single-pass",
                   help="which inference modes the graphs serve. Defaults to single-pass.")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="weights and float I/O of every graph (TensorRT engines inherit it). Defaults to fp32.")
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset. Defaults to {DEFAULT_OPSET}.")
    p.add_argument("--vision-tower", type=Path, default=None, help="CLIP directory, if config.json does not name a local one")
    p.add_argument("--max-text-len", type=int, default=None, help=f"most text tokens either side of the image. Defaults to {LayoutOptions.max_text_len}.")
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"generate-mode decode limit. Defaults to {LayoutOptions.max_new_tokens}.")
    p.add_argument("--max-seg", type=int, default=None, help=f"most [SEG] tokens per request. Defaults to {LayoutOptions.max_seg}.")
    p.add_argument("--max-batch", type=int, default=None,
                   help=f"most requests per batch: the `batch` dim of every graph. Defaults to {LayoutOptions.max_batch}.")
    p.add_argument("--opt-batch", type=int, default=None,
                   help="the batch size TensorRT profiles are tuned for (1 to --max-batch). Defaults to "
                        "min(4, --max-batch).")
    p.add_argument("--accm", type=Path, default=None, metavar="DIR",
                   help="ACCM's models (caption_model.pt, selector.pt, gpt2/, longclip/, clip/; docs/accm.md), for an "
                        "accm-* schedule: its graphs and tokenizer files go into the artifact (batch 1, fp32)")
    p.add_argument("--cache", type=Path, default=None,
                   help="graph cache directory shared between exports (same graphs are copied, not re-traced)")
    p.add_argument("--trace-only", action="store_true", default=None,
                   help="do not run the model: trace each stage on inputs built from the layout and skip the "
                        "ONNX Runtime parity check, for models too big to run on this host (e.g. LISA-7B on a "
                        "CPU). The manifest records the stages as unchecked; check them later with csprt validate.")
    add_schedule_args(p)
    add_quantize_args(p)
    p.set_defaults(func=run)


def _command(args: argparse.Namespace) -> str:
    """The command line that regenerates this artifact, recorded in its manifest."""
    words = ["csprt", "export", str(args.checkpoint), "--schedule", args.schedule, "--out", str(args.out),
             "--mode", args.mode, "--precision", args.precision]
    for flag in ("opset", "vision_tower", "accm", "max_text_len", "max_new_tokens", "max_seg", "max_batch", "opt_batch",
                 *KNOB_FLAGS, *QUANT_FLAGS):
        value = getattr(args, flag, None)
        if value is not None:
            words += [f"--{flag.replace('_', '-')}", str(value)]
    if getattr(args, "trace_only", None):
        words.append("--trace-only")
    return shlex.join(words)


MAX_SEG = 256  # far above any answer's [SEG] count; keeps the seg_head/sam_decoder profiles sane
MAX_BATCH = 256  # far above what one GPU batches for a 7B LVLM; keeps profiles and KV caches sane


def check_bounds(args: argparse.Namespace, shape: ModelShape) -> None:
    """Refuse out-of-range export bounds before any work (they used to fail after a whole export)."""
    room = shape.llm.max_positions - shape.num_image_tokens  # text and generated tokens share the rest
    limits = {
        "opset": EXPORT_OPSET_RANGE,
        "max_text_len": (1, room),
        "max_new_tokens": (1, room),
        "max_seg": (1, MAX_SEG),
        "max_batch": (1, MAX_BATCH),
        "opt_batch": (1, args.max_batch or LayoutOptions.max_batch),
    }
    for flag, (lo, hi) in limits.items():
        value = getattr(args, flag, None)
        if value is not None and not lo <= value <= hi:
            why = (f"the model has {shape.llm.max_positions} positions, {shape.num_image_tokens} of them image tokens"
                   if flag in ("max_text_len", "max_new_tokens") else "")
            raise InputError(f"--{flag.replace('_', '-')} {value} is out of range: choose {lo} to {hi}"
                             + (f" ({why})" if why else ""))


def run(args: argparse.Namespace) -> int:
    from exporter.export import ExportOptions, export_artifact

    shape = read_checkpoint_config(args.checkpoint, args.vision_tower).shape
    check_bounds(args, shape)
    schedule = schedule_from_args(args, shape.llm.layers, shape.num_image_tokens)
    given = {k: getattr(args, k) for k in ("opset", "max_text_len", "max_new_tokens", "max_seg", "max_batch",
                                           "opt_batch")
             if getattr(args, k) is not None}
    options = ExportOptions(precision=args.precision, mode=args.mode, trace_only=bool(args.trace_only),
                            cache_dir=str(args.cache) if args.cache else None, **given)
    quant = quantize_options(args)  # checked before any work
    say = lambda msg: print(f"[csprt] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    # Quantized inside the new generation, before it is swapped in: a reader never sees a half-quantized artifact.
    art = export_artifact(args.checkpoint, schedule, args.out, options, vision_tower=args.vision_tower,
                          command=_command(args), progress=say, finish=lambda gen: quantize_after_export(gen, quant, say),
                          accm_dir=args.accm)
    print(f"artifact: {art} (schedule {schedule.name}, {args.precision}, mode {args.mode}"
          + (f", quantized {quant.method} ({quant.format})" if quant.method != "none" else "")
          + (", trace only: parity not checked; run csprt validate" if args.trace_only else "") + ")")
    return 0
