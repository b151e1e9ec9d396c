"""`csprt run`: segment images for queries and write mask.png, overlay.png, result.json per request.

TARGET is an exported artifact (runs on ONNX Runtime by default; --backend tensorrt runs its
`csprt build` engines on an NVIDIA GPU) or a checkpoint directory (runs the PyTorch reference).

Requests: one --image with one or more --query (questions about one image), as many --image as --query
(request n is the n-th of each), or --jsonl FILE with one {"image": PATH, "query": TEXT} object per line
(relative paths are relative to the file). An artifact runs them in batches of --batch (at most its
exported --max-batch), each batch one run of every stage graph. One request writes
OUT/{mask.png,overlay.png,result.json}; several write OUT/result_<n>/ for the n-th (1-based), each with the
same three files. An image asked about more than once is encoded once (its image-only stages run for its
first request only) and its other requests are answered from that encoding; result.json's "image_cache"
says "miss" or "hit".
"""

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

BACKENDS = ("torch", "onnxruntime", "tensorrt")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="segment an image for a query", description=__doc__)
    p.add_argument("target", type=Path, help="artifact directory (from csprt export) or LISA checkpoint directory")
    p.add_argument("--image", type=Path, action="append", default=None,
                   help="JPEG/PNG/WebP image, any size; repeat with as many --query to run several requests")
    p.add_argument("--query", action="append", default=None,
                   help="what to segment, e.g. 'Where is the cat?'; repeat for several questions about one --image "
                        "(encoded once), or pair with repeated --image; results in OUT/result_<n>/")
    p.add_argument("--jsonl", type=Path, default=None,
                   help='requests, one JSON object per line: {"image": PATH, "query": TEXT} (instead of --image/--query)')
    p.add_argument("--batch", type=int, default=None,
                   help="requests per batch (an artifact; at most its exported --max-batch). Defaults to that maximum.")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="tensorrt needs an NVIDIA GPU and engines from csprt build. Defaults to onnxruntime for an "
                        "artifact, torch for a checkpoint.")
    p.add_argument("--mode", choices=MODES, default="single-pass", help="Defaults to single-pass.")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generate mode only. Defaults to 32 (an artifact: its exported limit, at most 32).")
    p.add_argument("--vision-tower", type=Path, default=None, help="CLIP directory, if config.json does not name a local one")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (torch device, ONNX Runtime provider, TensorRT GPU). Defaults to cpu "
                        "(cuda for --backend tensorrt).")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="torch backend only. Defaults to fp32.")
    p.add_argument("--instance-masks", type=Path, default=None,
                   help=".npy [M, grid, grid] instance masks for --cluster-method seg_first")
    p.add_argument("--accm", type=Path, default=None, metavar="DIR",
                   help="ACCM directory (caption model, selector, GPT-2, LongCLIP; docs/accm.md) for an accm-* schedule "
                        "on a checkpoint; its full CLIP directory is --vision-tower, else DIR/clip")
    p.add_argument("--out", type=Path, default=Path("out"), help="output directory. Defaults to ./out.")
    p.add_argument("--json", action="store_true", help="print result.json to stdout (several queries: a list)")
    add_schedule_args(p, default=None)
    p.set_defaults(func=run)


def _progress(msg: str) -> None:
    print(f"[csprt run] {msg}", file=sys.stderr, flush=True)


def _instance_masks(path: Path | None):
    import numpy as np

    if path is None:
        return None
    try:
        return np.load(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read instance masks {path}: {exc}; pass a .npy array [M, grid, grid]") from None


def requests_from_args(args: argparse.Namespace) -> list[tuple[Path, str]]:
    """(image path, query) per request, from --image/--query or --jsonl; one line on any mismatch."""
    if args.jsonl is not None:
        if args.image or args.query:
            raise InputError("--jsonl gives the requests: drop --image and --query, or drop --jsonl")
        return _jsonl_requests(args.jsonl)
    images, queries = args.image or [], args.query or []
    if not images or not queries:
        raise InputError("pass --image IMG --query TEXT (repeat both for several requests), or --jsonl FILE")
    if len(images) == 1:
        return [(images[0], q) for q in queries]
    if len(images) != len(queries):
        raise InputError(f"--image given {len(images)} times and --query {len(queries)} times: pass one --query per "
                         "--image (request n is the n-th of each), or one --image with several --query")
    return list(zip(images, queries))


def _jsonl_requests(path: Path) -> list[tuple[Path, str]]:
    import json

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read --jsonl {path}: {exc}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"--jsonl {path} line {n} is not JSON ({exc.msg}); expected "
                             '{"image": PATH, "query": TEXT}') from None
        if not (isinstance(item, dict) and isinstance(item.get("image"), str) and isinstance(item.get("query"), str)):
            raise InputError(f'--jsonl {path} line {n}: expected an object {{"image": PATH, "query": TEXT}}, got {line[:80]!r}')
        image = Path(item["image"])
        out.append((image if image.is_absolute() else path.parent / image, item["query"]))
    if not out:
        raise InputError(f"--jsonl {path} holds no requests; write one {{\"image\": PATH, \"query\": TEXT}} per line")
    return out


def run(args: argparse.Namespace) -> int:
    from graphs.manifest import is_artifact_dir

    requests = requests_from_args(args)
    images = {path: load_image(path) for path in dict.fromkeys(p for p, _ in requests)}  # bad input fails first
    for _, query in requests:
        prompt_text(query, args.mode)
    if args.batch is not None and args.batch < 1:
        raise InputError(f"--batch {args.batch}: pass 1 or more requests per batch")
    if is_artifact_dir(args.target):
        if args.backend == "torch":
            raise InputError(f"{args.target} is an exported artifact; --backend torch runs a checkpoint directory "
                             "(pass the checkpoint instead, or choose --backend onnxruntime or tensorrt)")
        if args.accm is not None:
            raise InputError("--accm runs ACCM on a checkpoint's PyTorch reference; an ACCM artifact (csprt export "
                             "--schedule accm-36 --accm DIR) carries its graphs and tokenizers: drop --accm")
        answers = _run_artifact(args, requests, images)
    else:
        if args.backend not in (None, "torch"):
            raise InputError(f"--backend {args.backend} runs an exported artifact, and {args.target} is not one "
                             f"(no manifest.json); export it first: csprt export {args.target} --out ART")
        answers = _run_checkpoint(args, requests, images)
    several = len(answers) > 1
    written = [_write_outputs(args, images[path], masks, result, args.out / f"result_{n}" if several else args.out)
               for n, ((path, _), (result, masks)) in enumerate(zip(requests, answers), 1)]
    if args.json:
        import json

        print(json.dumps(written if several else written[0], indent=2))
    return 0


def _run_artifact(args: argparse.Namespace, requests: list, images: dict) -> list:
    from engines.session import ArtifactSession

    session = ArtifactSession(args.target, backend=args.backend or "onnxruntime", device=args.device)
    sched = session.artifact.schedule
    if args.schedule is not None and args.schedule != sched.name:
        raise InputError(f"artifact {args.target} was exported with schedule {sched.name!r}, not {args.schedule!r}; "
                         f"re-export with --schedule {args.schedule}, or drop --schedule")
    batch = args.batch or session.max_batch
    session.check_batch(batch)  # over the exported maximum: one line naming --max-batch
    limit = session.artifact.layout.loop.max_new_tokens if session.artifact.layout.loop else 0
    max_new = args.max_new_tokens if args.max_new_tokens is not None else min(32, limit)
    masks_in = _instance_masks(args.instance_masks)
    repeated = {p for p in images if sum(1 for q, _ in requests if q == p) > 1}
    _progress(f"artifact {args.target}: schedule {sched.name}, {session.artifact.precision}, "
              f"{args.mode} on {session.backend}/{session.device}, {len(requests)} request(s) in batches of "
              f"{min(batch, len(requests))}" + (f"; {len(repeated)} image(s) encoded once" if repeated else ""))
    answers, encodings = [], {}
    with session:
        for start in range(0, len(requests), batch):
            chunk = requests[start:start + batch]
            paths = [p for p, _ in chunk]
            fresh = {p for p in paths if paths.count(p) > 1} - set(encodings)  # asked twice in this batch
            for path in sorted(fresh):
                encodings[path] = session.encode_image(images[path], instance_masks=masks_in)
            hits = [p in encodings for p in paths]
            sources = [encodings[p] if hit else images[p] for p, hit in zip(paths, hits)]
            outs = session.segment_batch(sources, [q for _, q in chunk], mode=args.mode,
                                         max_new_tokens=max_new if args.mode == "generate" else None,
                                         instance_masks=None if masks_in is None else
                                         [None if hit else masks_in for hit in hits],
                                         keep_encoding=any(p in repeated and not hit for p, hit in zip(paths, hits)))
            for (path, query), out, hit in zip(chunk, outs, hits):
                timings = dict(out.timings_ms)
                if path in fresh:  # its first request here paid for the encoding: a miss, with the image stages
                    fresh.discard(path)
                    timings, hit = {**encodings[path].timings_ms, **timings}, False
                elif path in repeated and path not in encodings and out.encoding is not None:
                    encodings[path] = out.encoding
                result = {"query": query, "image": str(path), "answer": out.answer,
                          "generated_ids": out.generated_ids, "image_tokens_per_layer": out.image_tokens_per_layer,
                          "timings_ms": timings, "schedule": sched.to_dict(), "backend": session.backend,
                          "batch": len(chunk), "image_cache": "hit" if hit else "miss", **out.host_steps}
                answers.append((result, out.masks))
    return answers


def _run_checkpoint(args: argparse.Namespace, requests: list, images: dict):
    import torch

    from exporter.checkpoint import load_checkpoint
    from exporter.reference import Reference

    shape = read_checkpoint_config(args.target, args.vision_tower).shape
    device = args.device or "cpu"
    if args.schedule is None:
        args.schedule = "csp"
    schedule = schedule_from_args(args, shape.llm.layers, shape.num_image_tokens)
    _check_accm_args(args, schedule)
    masks_in = _instance_masks(args.instance_masks)
    _progress(f"loading {args.target}")
    loaded = load_checkpoint(args.target, vision_tower=args.vision_tower, dtype=getattr(torch, DTYPES[args.dtype]),
                             device=device)
    _progress(f"schedule {schedule.name}: {schedule.avg_image_tokens():.1f} image tokens/layer "
              f"({schedule.reduction_pct():.1f}% saved)")
    ref = _accm_reference(args, loaded, schedule, device) if schedule.accm is not None else \
        Reference(loaded.model, loaded.tokenizer, loaded.image_processor_config, schedule)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else 32
    answers = []
    for path, query in requests:  # the reference runs every stage per request (no image encoding is kept)
        _progress(f"running {args.mode} on torch/{device}")
        out = ref(images[path], query, mode=args.mode, max_new_tokens=max_new, instance_masks=masks_in)
        result = {"query": query, "image": str(path), "answer": out.answer, "generated_ids": out.generated_ids,
                  "image_tokens_per_layer": out.image_tokens_per_layer, "timings_ms": out.timings_ms,
                  "schedule": schedule.to_dict(), "backend": "torch"}
        if getattr(out, "accm", None) is not None:
            c = out.accm
            result["accm"] = {"candidates": c.candidates, "candidate_ids": c.candidate_ids, "beam_scores": c.beam_scores,
                              "selector_probs": c.selector_probs, "chosen": c.chosen, "caption": c.caption,
                              "picks": c.picks.sorted_indices}
        answers.append((result, out.masks))
    return answers


def _check_accm_args(args: argparse.Namespace, schedule) -> None:
    """--accm and an ACCM schedule go together, checked before anything loads."""
    if schedule.accm is None and args.accm is not None:
        raise InputError(f"--accm goes with an ACCM schedule (accm-36, accm-18), not {schedule.name!r}; drop --accm")
    if schedule.accm is not None and args.accm is None:
        raise InputError(f"schedule {schedule.name!r} needs ACCM's models: pass --accm DIR (make a tiny one with "
                         "`csprt make-tiny OUT --accm`, then --accm OUT/accm)")


def _accm_reference(args: argparse.Namespace, loaded, schedule, device: str):
    """The ACCM reference for an accm-* schedule (docs/accm.md)."""
    from exporter.accm.checkpoint import load_accm
    from exporter.accm.reference import AccmReference

    _progress(f"loading ACCM models from {args.accm}")
    accm = load_accm(args.accm, args.vision_tower, loaded.shape.vision.hidden,
                     dtype=next(loaded.model.parameters()).dtype, device=device)
    return AccmReference(loaded.model, loaded.tokenizer, loaded.image_processor_config, schedule, accm)


def _write_outputs(args: argparse.Namespace, image, masks, partial: dict, out_dir: Path) -> dict:
    import numpy as np

    union = masks.any(axis=0) if len(masks) else np.zeros(image.shape[:2], dtype=bool)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_mask_png(union, out_dir / "mask.png")
    write_overlay_png(image, union, out_dir / "overlay.png")
    result = {
        "query": partial["query"],
        "answer": partial["answer"],
        "num_seg": int(len(masks)),
        "mask_area": int(union.sum()),
        "mask_areas": [int(m.sum()) for m in masks],
        "image_size": [int(image.shape[1]), int(image.shape[0])],
        "mode": args.mode,
        "backend": partial["backend"],
        "generated_ids": partial["generated_ids"],
        "image_tokens_per_layer": partial["image_tokens_per_layer"],
        "timings_ms": {k: round(float(v), 3) for k, v in partial["timings_ms"].items()},
        "schedule": partial["schedule"],
    }
    for key in ("image", "batch", "image_cache", "accm"):  # accm: ACCM's candidate captions and the chosen one
        if key in partial:
            result[key] = partial[key]
    write_json(result, out_dir / "result.json")
    _progress(f"wrote {out_dir / 'mask.png'}, {out_dir / 'overlay.png'}, {out_dir / 'result.json'}")
    if not args.json:
        print(f"answer: {result['answer']!r}  [SEG] masks: {result['num_seg']}  mask area: {result['mask_area']} px  "
              f"-> {out_dir}")
    return result
