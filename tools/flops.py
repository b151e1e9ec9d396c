"""`csprt flops`: image tokens per layer and FLOPs per component for a schedule.

    csprt flops (--checkpoint DIR [--vision-tower DIR] | --shape NAME) --schedule NAME_OR_JSON
                [--text-tokens N] [--json]

The shape comes from a checkpoint's `config.json` plus the CLIP tower's `config.json` (read as
JSON only, so no torch import and no weights), or from a named preset shape.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from graphs.checkpoint_config import read_checkpoint_config
from graphs.errors import ToolchainError
from graphs.flops import CONVENTIONS, DEFAULT_TEXT_TOKENS, flops_report
from graphs.schedule import load_schedule, preset_names
from graphs.shapes import SHAPES, ModelShape, shape_named


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help="image tokens per layer and FLOPs of a schedule",
                              description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", metavar="DIR", help="LISA checkpoint directory (its config.json is read)")
    p.add_argument("--vision-tower", metavar="DIR",
                   help="CLIP vision tower directory. Defaults to the config's mm_vision_tower when that is a directory "
                        "(relative to the checkpoint)")
    p.add_argument("--shape", metavar="NAME", help=f"a named model shape instead of a checkpoint: {', '.join(SHAPES)}")
    p.add_argument("--schedule", required=True, metavar="NAME_OR_JSON",
                   help=f"a preset ({', '.join(preset_names())}) or a schedule .json file")
    p.add_argument("--text-tokens", type=int, metavar="N",
                   help=f"text tokens besides the image. Defaults to {DEFAULT_TEXT_TOKENS}")
    p.add_argument("--json", action="store_true", help="print only the JSON report")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if (args.checkpoint is None) == (args.shape is None):
        raise ToolchainError("give exactly one of --checkpoint DIR or --shape NAME "
                             f"(shapes: {', '.join(SHAPES)})")
    if args.vision_tower is not None and args.checkpoint is None:
        raise ToolchainError("--vision-tower goes with --checkpoint; a --shape already includes the vision tower")
    if args.shape is not None:
        shape, source = shape_named(args.shape), args.shape
    else:
        shape, source = shape_from_checkpoint(Path(args.checkpoint), args.vision_tower), args.checkpoint
    schedule = load_schedule(args.schedule, shape.llm.layers, shape.num_image_tokens)
    text_tokens = DEFAULT_TEXT_TOKENS if args.text_tokens is None else args.text_tokens
    report = flops_report(shape, schedule, text_tokens=text_tokens)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report, source))
    return 0


def shape_from_checkpoint(checkpoint: Path, vision_tower: str | None = None) -> ModelShape:
    """A checkpoint's shape from its config files alone (no weights, no torch)."""
    return read_checkpoint_config(checkpoint, vision_tower).shape


def format_report(report: dict, source: str) -> str:
    """A short human-readable table of `flops_report`'s output (GFLOPs, FastV convention)."""
    width = max(18, *(len(name) + 2 for name in report["flops"]))
    lines = [
        f"schedule {report['schedule']} on {source}: L={report['n_layers']} layers, "
        f"N={report['n_image_tokens']} image tokens, {report['text_tokens']} text tokens",
        f"image tokens / layer  {report['avg_image_tokens_per_layer']:.2f} of {report['n_image_tokens']} "
        f"({report['image_token_reduction_pct']:.1f}% fewer)",
        *([f"caption tokens       {report['caption_tokens']} (ACCM's splice budget, text at every layer)"]
          if "caption_tokens" in report else []),
        "",
        f"{'GFLOPs (MACs)':<{width}}" + "".join(f"{c:>12}" for c in CONVENTIONS),
    ]
    for name, per in report["flops"].items():
        lines.append(f"{name:<{width}}" + "".join(f"{per[c] / 1e9:>12.2f}" for c in CONVENTIONS))
    lines += [
        "",
        f"saved vs full       image-token FLOPs {report['image_token_flops_reduction_pct']:.1f}%, "
        f"LLM {report['llm_flops_reduction_pct']:.1f}%, total {report['total_flops_reduction_pct']:.1f}%",
    ]
    cached = report["cached_question"]
    lines.append(f"cached question     skips {', '.join(cached['image_only_stages'])}: "
                 f"{cached['skipped_flops']['fastv'] / 1e9:.2f} GFLOPs ({cached['skipped_pct']:.1f}% of total; "
                 "a further question about an already encoded image)")
    return "\n".join(lines)
