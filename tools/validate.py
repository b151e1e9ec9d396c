"""`csprt validate`: parity of an artifact's backend against the PyTorch reference, per stage and end to end.

Per stage: every stage gets the exact feed it received in a pipeline run, on the backend and on the
stage's torch wrapper, and outputs are compared with Polygraphy's comparator at the manifest's
tolerances. End to end: the pipeline's masks and generated ids against `exporter.reference`.
Exits 1 when anything fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from graphs.errors import InputError

DEFAULT_QUERY = "Where is the red disc in this picture?"


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="check an artifact against the PyTorch reference", description=__doc__)
    p.add_argument("artifact", type=Path, help="artifact directory (from csprt export)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="the checkpoint it was exported from. Defaults to the one the manifest records.")
    p.add_argument("--vision-tower", type=Path, default=None, help="CLIP directory, if the checkpoint config does not name one")
    p.add_argument("--backends", default="onnxruntime", help="comma-separated backends to check. Defaults to onnxruntime.")
    p.add_argument("--image", type=Path, default=None, help="image to run. Defaults to a built-in synthetic picture.")
    p.add_argument("--query", default=DEFAULT_QUERY, help=f"Defaults to {DEFAULT_QUERY!r}.")
    p.add_argument("--mode", default=None, help="single-pass or generate. Defaults to every mode the artifact has.")
    p.add_argument("--max-new-tokens", type=int, default=8, help="generate-mode decode steps. Defaults to 8.")
    p.add_argument("--stages", default=None,
                   help="comma-separated stage names to compare per stage. Defaults to every stage that runs.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _progress(msg: str) -> None:
    print(f"[csprt validate] {msg}", file=sys.stderr, flush=True)


def validate_artifact(art_dir: Path, checkpoint: Path | None = None, vision_tower: Path | None = None,
                      backend: str = "onnxruntime", image=None, query: str = DEFAULT_QUERY, modes=None,
                      max_new_tokens: int = 8, stages=None, progress=_progress) -> dict:
    """The parity report of one backend (see `format_report` for its fields)."""
    import numpy as np
    import torch

    from engines.compare import compare, mask_iou
    from engines.session import ArtifactSession
    from exporter.checkpoint import load_checkpoint
    from exporter.export import TORCH_DTYPES, sample_image
    from exporter.reference import Reference
    from exporter.torch_runner import TorchStageRunner

    from graphs.manifest import check_stage_names

    session = ArtifactSession(art_dir, backend=backend)
    art = session.artifact
    if stages is not None:
        check_stage_names(art, stages)
    ckpt = checkpoint or Path(art.manifest["export"]["checkpoint"])
    tower = vision_tower or art.manifest["export"].get("vision_tower")
    modes = list(modes or art.modes)
    for mode in modes:
        session.check_mode(mode)
    image = sample_image() if image is None else image
    progress(f"loading reference {ckpt}")
    ref_ckpt = load_checkpoint(ckpt, tower, attn="eager")
    if ref_ckpt.shape != art.shape:
        raise InputError(f"checkpoint {ckpt} does not match artifact {art_dir} (other model dimensions); "
                         f"pass the checkpoint it was exported from with --checkpoint")
    stage_model = ref_ckpt.model if art.precision == "fp32" else load_checkpoint(
        ckpt, tower, attn="eager", dtype=TORCH_DTYPES[art.precision]).model
    seg_id = art.manifest["tokenizer"]["seg_token_id"]
    reference = Reference(ref_ckpt.model, ref_ckpt.tokenizer, ref_ckpt.image_processor_config, art.schedule)
    e2e_tol = art.manifest["tolerances"]["end_to_end"]
    report = {"artifact": str(art_dir), "checkpoint": str(ckpt), "backend": backend, "precision": art.precision,
              "schedule": art.schedule.name, "stages": [], "end_to_end": []}
    with session:
        for mode in modes:
            progress(f"{mode}: running the {backend} pipeline")
            seg = session.segment(image, query, mode=mode, max_new_tokens=max_new_tokens, record=True)
            for name, feed in seg.pipeline.feeds.items():
                if stages is not None and name not in stages:
                    continue
                stage = art.layout.stage(name)
                if stage.skip_if_empty and feed[stage.skip_if_empty].size == 0:
                    continue  # skipped in the run (no [SEG]): nothing ran, nothing to compare
                entry = art.stage_entry(name)
                got = session.pipeline.runner(stage).infer(feed)
                with TorchStageRunner(stage, art.layout.dims, stage_model, art.schedule, seg_id) as torch_runner:
                    want = torch_runner.infer(feed)
                cmp = compare(got, want, atol=entry["tolerance"]["atol"], rtol=entry["tolerance"]["rtol"])
                stats = [s for s in cmp.outputs.values()]
                report["stages"].append({
                    "name": name, "mode": mode, "passed": bool(cmp), "max_abs": cmp.max_abs,
                    "mean_abs": max((s.mean_abs for s in stats), default=0.0),
                    "p99_abs": max((s.p99_abs for s in stats), default=0.0),
                    "passing_atol": max((s.passing_atol for s in stats), default=0.0),
                    "atol": entry["tolerance"]["atol"].get("", 0.0), "outputs": cmp.to_dict()["outputs"]})
                progress(f"{mode}: {name}: max abs {cmp.max_abs:.2e} {'ok' if cmp else 'FAILED'}")
            progress(f"{mode}: running the torch reference")
            with torch.no_grad():
                ref = reference(image, query, mode=mode, max_new_tokens=max_new_tokens)
            report["end_to_end"].append(_end_to_end(mode, seg, ref, e2e_tol, mask_iou, np))
    report["mask_iou"] = min((e["mask_iou"] for e in report["end_to_end"]), default=1.0)
    report["passed"] = all(s["passed"] for s in report["stages"]) and all(e["passed"] for e in report["end_to_end"])
    return report


def _end_to_end(mode: str, seg, ref, tol: dict, mask_iou, np) -> dict:
    ref_logits = ref.mask_logits.float().cpu().numpy()
    same_k = seg.mask_logits.shape == ref_logits.shape
    max_abs = float(np.abs(seg.mask_logits - ref_logits).max()) if same_k and ref_logits.size else 0.0
    iou = mask_iou(seg.masks.any(axis=0), ref.masks.any(axis=0)) if same_k else 0.0
    ids_equal = seg.generated_ids == ref.generated_ids
    passed = same_k and max_abs <= tol["mask_logits_atol"] and iou >= tol["mask_iou_min"] and ids_equal
    return {"mode": mode, "num_seg": int(seg.masks.shape[0]), "ref_num_seg": int(ref.masks.shape[0]),
            "mask_logits_max_abs": max_abs, "mask_logits_atol": tol["mask_logits_atol"], "mask_iou": float(iou),
            "mask_iou_min": tol["mask_iou_min"], "ids_equal": ids_equal, "generated_ids": seg.generated_ids,
            "passed": bool(passed)}


def format_report(report: dict) -> str:
    lines = [f"artifact {report['artifact']} ({report['schedule']}, {report['precision']}) on {report['backend']} "
             f"vs torch reference {report['checkpoint']}"]
    lines.append(f"  {'stage':<12} {'mode':<12} {'max abs':>10} {'p99 abs':>10} {'passing atol':>13} {'atol':>8}  result")
    for s in report["stages"]:
        lines.append(f"  {s['name']:<12} {s['mode']:<12} {s['max_abs']:>10.2e} {s['p99_abs']:>10.2e} "
                     f"{s['passing_atol']:>13.2e} {s['atol']:>8.0e}  {'ok' if s['passed'] else 'FAILED'}")
    for e in report["end_to_end"]:
        lines.append(f"  end to end {e['mode']}: [SEG] masks {e['num_seg']} (reference {e['ref_num_seg']}), mask logits "
                     f"max abs {e['mask_logits_max_abs']:.2e} (atol {e['mask_logits_atol']:g}), mask IoU "
                     f"{e['mask_iou']:.4f} (min {e['mask_iou_min']:g}), ids {'equal' if e['ids_equal'] else 'DIFFER'}: "
                     f"{'ok' if e['passed'] else 'FAILED'}")
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from graphs.imageio import load_image

    image = load_image(args.image) if args.image is not None else None
    modes = [args.mode] if args.mode else None
    reports = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
        reports.append(validate_artifact(args.artifact, args.checkpoint, args.vision_tower, backend, image, args.query,
                                         modes, args.max_new_tokens, stages))
    report = reports[0] if len(reports) == 1 else {
        "passed": all(r["passed"] for r in reports), "mask_iou": min(r["mask_iou"] for r in reports),
        "stages": [s for r in reports for s in r["stages"]], "backends": reports}
    if args.json:
        print(json.dumps(report, indent=2, default=float))
    else:
        for r in reports:
            print(format_report(r))
    return 0 if report["passed"] else 1
