"""`csprt make-tiny OUT_DIR`: write a tiny, seeded LISA-layout checkpoint (weights, config, tokenizer, CLIP dir)."""

from __future__ import annotations

import argparse
import dataclasses

FORMATS = ("safetensors", "safetensors-sharded", "bin", "bin-sharded")


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    from exporter.tiny import TinyOptions

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
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from exporter.tiny import TinyOptions, make_tiny
    from graphs.errors import ToolchainError

    # Flags default to None so only what the user set overrides TinyOptions.
    chosen = {f.name: getattr(args, f.name) for f in dataclasses.fields(TinyOptions)
              if getattr(args, f.name, None) is not None}
    try:
        out = make_tiny(args.out_dir, TinyOptions(**chosen))
    except ValueError as exc:  # e.g. a vocab too small for the tokenizer
        raise ToolchainError(str(exc)) from None
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    print(f"wrote tiny LISA checkpoint to {out}:")
    for f in files:
        print(f"  {f}")
    return 0
