"""`csprt make-tiny OUT_DIR`: write a tiny, seeded LISA-layout checkpoint (weights, config, tokenizer, CLIP dir).

With `--shape NAME` (lisa-7b, lisa-13b, small) it writes a random-weight checkpoint of that named shape in the
same layout instead, one tensor at a time (sharded safetensors; LISA-7B fits in a few hundred MB of memory).
"""

from __future__ import annotations

import argparse
import dataclasses

FORMATS = ("safetensors", "safetensors-sharded", "bin", "bin-sharded")
DTYPES = ("fp16", "fp32")


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    from exporter.tiny import TinyOptions
    from graphs.shapes import SHAPES

    defaults = TinyOptions()
    p = subparsers.add_parser(name, help=__doc__.splitlines()[0].split(": ", 1)[-1],
                              description=__doc__.splitlines()[0])
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created)")
    for field in dataclasses.fields(TinyOptions):
        if field.name == "format":
            continue
        flag = "--" + field.name.replace("_", "-")
        p.add_argument(flag, type=int, default=None, help=f"default {getattr(defaults, field.name)}")
    p.add_argument("--format", choices=FORMATS, default=None, help=f"weight layout, default {defaults.format}")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="write a random-weight checkpoint of this named model shape instead of the tiny one "
                        "(sharded safetensors, written tensor by tensor; LISA-7B fp16 is about 15 GB)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype of a --shape checkpoint, default fp16")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from exporter.tiny import TinyOptions, make_tiny
    from graphs.errors import ToolchainError

    # Flags default to None so only what the user set overrides TinyOptions.
    chosen = {f.name: getattr(args, f.name) for f in dataclasses.fields(TinyOptions)
              if getattr(args, f.name, None) is not None}
    if getattr(args, "shape", None):
        return _run_shape(args, chosen)
    if getattr(args, "dtype", None):
        raise ToolchainError("--dtype applies to --shape checkpoints; the tiny checkpoint is always fp32")
    try:
        out = make_tiny(args.out_dir, TinyOptions(**chosen))
    except ValueError as exc:  # e.g. a vocab too small for the tokenizer
        raise ToolchainError(str(exc)) from None
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    print(f"wrote tiny LISA checkpoint to {out}:")
    for f in files:
        print(f"  {f}")
    return 0


def _run_shape(args, chosen: dict) -> int:
    from exporter.random_ckpt import write_random_checkpoint
    from graphs.errors import ToolchainError
    from graphs.shapes import shape_named

    sizes = sorted(k for k in chosen if k != "seed")
    if sizes:
        flags = ", ".join("--" + k.replace("_", "-") for k in sizes)
        raise ToolchainError(f"{flags}: sizes and formats apply to the tiny checkpoint; --shape {args.shape} "
                             "fixes every size and writes sharded safetensors (drop them, or drop --shape)")
    dtype = args.dtype or "fp16"
    out = write_random_checkpoint(shape_named(args.shape), args.out_dir, dtype=dtype, seed=chosen.get("seed", 0))
    files = sorted(p for p in out.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"wrote random-weight {args.shape} LISA checkpoint ({dtype}, {total / 1e9:.2f} GB) to {out}:")
    for f in files:
        print(f"  {f.relative_to(out)}")
    return 0
