"""`csprt run`: segment one image for one query and write mask.png, overlay.png, result.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from graphs.checkpoint_config import read_checkpoint_config
from graphs.errors import InputError
from graphs.atomic import write_json
from graphs.imageio import load_image, write_mask_png, write_overlay_png
from graphs.prompt import MODES, prompt_text
from tools.schedule_args import add_schedule_args, schedule_from_args

BACKENDS = ("torch",)
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="segment an image for a query", description=__doc__)
    p.add_argument("checkpoint", type=Path, help="LISA checkpoint directory (for --backend torch)")
    p.add_argument("--image", type=Path, required=True, help="JPEG/PNG/WebP image, any size")
    p.add_argument("--query", required=True, help="what to segment, e.g. 'Where is the cat?'")
    p.add_argument("--backend", choices=BACKENDS, default="torch", help="Defaults to torch.")
    p.add_argument("--mode", choices=MODES, default="single-pass", help="Defaults to single-pass.")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generate mode only. Defaults to 32.")
    p.add_argument("--vision-tower", type=Path, default=None, help="CLIP directory, if config.json does not name a local one")
    p.add_argument("--device", default="cpu", help="torch device. Defaults to cpu.")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="Defaults to fp32.")
    p.add_argument("--instance-masks", type=Path, default=None,
                   help=".npy [M, grid, grid] instance masks for --cluster-method seg_first")
    p.add_argument("--out", type=Path, default=Path("out"), help="output directory. Defaults to ./out.")
    p.add_argument("--json", action="store_true", help="print result.json to stdout")
    add_schedule_args(p)
    p.set_defaults(func=run)


def _progress(msg: str) -> None:
    print(f"[csprt run] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from exporter.checkpoint import load_checkpoint
    from exporter.reference import Reference

    # Fail on bad input before the slow load: the image, the query, and the schedule (from config.json alone;
    # the loader derives the same shape from the same files, and Reference re-checks it against the model).
    image = load_image(args.image)
    prompt_text(args.query, args.mode)
    shape = read_checkpoint_config(args.checkpoint, args.vision_tower).shape
    schedule = schedule_from_args(args, shape.llm.layers, shape.num_image_tokens)
    masks_in = None
    if args.instance_masks is not None:
        try:
            masks_in = np.load(args.instance_masks)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read instance masks {args.instance_masks}: {exc}; pass a .npy array [M, grid, grid]") from None
    _progress(f"loading {args.checkpoint}")
    loaded = load_checkpoint(args.checkpoint, vision_tower=args.vision_tower, dtype=getattr(torch, DTYPES[args.dtype]),
                             device=args.device)
    _progress(f"schedule {schedule.name}: {schedule.avg_image_tokens():.1f} image tokens/layer "
              f"({schedule.reduction_pct():.1f}% saved)")
    ref = Reference(loaded.model, loaded.tokenizer, loaded.image_processor_config, schedule)
    _progress(f"running {args.mode} on {args.backend}/{args.device}")
    out = ref(image, args.query, mode=args.mode, max_new_tokens=args.max_new_tokens, instance_masks=masks_in)
    union = out.masks.any(axis=0) if len(out.masks) else np.zeros(image.shape[:2], dtype=bool)
    args.out.mkdir(parents=True, exist_ok=True)
    write_mask_png(union, args.out / "mask.png")
    write_overlay_png(image, union, args.out / "overlay.png")
    result = {
        "answer": out.answer,
        "num_seg": int(len(out.masks)),
        "mask_area": int(union.sum()),
        "mask_areas": [int(m.sum()) for m in out.masks],
        "image_size": [int(image.shape[1]), int(image.shape[0])],
        "mode": args.mode,
        "backend": args.backend,
        "generated_ids": out.generated_ids,
        "image_tokens_per_layer": out.image_tokens_per_layer,
        "timings_ms": {k: round(v, 3) for k, v in out.timings_ms.items()},
        "schedule": schedule.to_dict(),
    }
    write_json(result, args.out / "result.json")
    _progress(f"wrote {args.out / 'mask.png'}, {args.out / 'overlay.png'}, {args.out / 'result.json'}")
    if args.json:
        import json

        print(json.dumps(result, indent=2))
    else:
        print(f"answer: {out.answer!r}  [SEG] masks: {result['num_seg']}  mask area: {result['mask_area']} px  "
              f"-> {args.out}")
    return 0
