"""`csprt make-tiny OUT_DIR`: write a tiny, seeded checkpoint in LISA's published format (weights, config, tokenizer).

By default a LISA v1 release in miniature: LLaMA's SentencePiece tokenizer set (tokenizer.model, tokenizer_config.json,
special_tokens_map.json, added_tokens.json), `.bin` shards with pytorch_model.bin.index.json, LISA's
config.json fields, and the CLIP tower embedded in the weights (fp32 unless --weights bf16, LISA's own dtype). `--layout v0` writes LISA v0's split layout,
`--clip separate` leaves CLIP out (written to OUT_DIR-clip, for --vision-tower), `--tokenizer bpe` the byte-level BPE.

With `--shape NAME` (lisa-7b, lisa-13b, small) it writes a random-weight checkpoint of that named shape in the
same layout instead, one tensor at a time (sharded safetensors; LISA-7B fits in a few hundred MB of memory).
"""

from __future__ import annotations

import argparse
import dataclasses

FORMATS = ("safetensors", "safetensors-sharded", "bin", "bin-sharded")
_CHOICES = {"format": FORMATS, "tokenizer": ("sentencepiece", "bpe"), "layout": ("v1", "v0"), "clip": ("embedded", "separate", "local"),
            "weights": ("bf16", "fp32"), "llm_weights": ("random", "trained-like")}
_HELP = {"format": "weight layout", "tokenizer": "tokenizer format (sentencepiece: LISA's files; bpe: a tokenizer.json)",
         "layout": "LISA release layout (v1: one merged checkpoint; v0: LLaVA base + visual_model/text_hidden_fcs .bin)",
         "clip": "where the CLIP tower goes (embedded in the weights; separate: OUT_DIR-clip, for --vision-tower; "
                 "local: OUT_DIR/vision_tower, named by mm_vision_tower)",
         "weights": "weight dtype (LISA ships bf16)",
         "llm_weights": "LLM weight distribution (trained-like: heavy tails and outlier channels, for quantization "
                        "checks; see exporter.tiny.trained_like_llm)"}
DTYPES = ("fp16", "fp32")


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    from exporter.tiny import TinyOptions
    from graphs.shapes import SHAPES

    defaults = TinyOptions()
    p = subparsers.add_parser(name, help=__doc__.splitlines()[0].split(": ", 1)[-1],
                              description=__doc__.splitlines()[0])
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created)")
    for field in dataclasses.fields(TinyOptions):
        flag = "--" + field.name.replace("_", "-")
        if field.name in _CHOICES:
            p.add_argument(flag, choices=_CHOICES[field.name], default=None,
                           help=f"{_HELP[field.name]}, default {getattr(defaults, field.name)}")
        else:
            p.add_argument(flag, type=int, default=None, help=f"default {getattr(defaults, field.name)}")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="write a random-weight checkpoint of this named model shape instead of the tiny one "
                        "(sharded safetensors, written tensor by tensor; LISA-7B fp16 is about 15 GB)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype of a --shape checkpoint, default fp16")
    p.add_argument("--accm", action="store_true", default=None,
                   help="also write tiny ACCM models in ACCM's released layouts to OUT_DIR/accm (docs/accm.md)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from exporter.tiny import TinyOptions, make_tiny
    from graphs.errors import ToolchainError

    # Flags default to None so only what the user set overrides TinyOptions.
    chosen = {f.name: getattr(args, f.name) for f in dataclasses.fields(TinyOptions)
              if getattr(args, f.name, None) is not None}
    if getattr(args, "shape", None):
        if getattr(args, "accm", None):
            raise ToolchainError("--accm writes tiny ACCM models for the tiny checkpoint; drop --shape (or --accm)")
        return _run_shape(args, chosen)
    if getattr(args, "dtype", None):
        raise ToolchainError("--dtype applies to --shape checkpoints; the tiny checkpoint takes --weights bf16|fp32")
    try:
        out = make_tiny(args.out_dir, TinyOptions(**chosen))
    except ValueError as exc:  # e.g. a vocab too small for the tokenizer
        raise ToolchainError(str(exc)) from None
    from exporter.tiny import separate_clip_dir

    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    opts = TinyOptions(**chosen)
    print(f"wrote tiny LISA {opts.layout} checkpoint ({opts.tokenizer} tokenizer, CLIP {opts.clip}) to {out}:")
    for f in files:
        print(f"  {f}")
    if opts.clip == "separate":
        print(f"CLIP vision tower: {separate_clip_dir(out)} (pass --vision-tower {separate_clip_dir(out)})")
    if getattr(args, "accm", None):
        from exporter.accm.tiny import make_tiny_accm_for

        accm = make_tiny_accm_for(out, separate_clip_dir(out) if opts.clip == "separate" else None, seed=opts.seed)
        print(f"ACCM models (caption model, selector, GPT-2, LongCLIP, full CLIP): {accm}")
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
