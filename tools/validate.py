"""`csprt validate`: parity of an artifact's backends against the PyTorch reference and each other.

Per backend: every stage gets the exact feed it received in that backend's pipeline run, on the backend
and on the stage's torch wrapper, and outputs are compared with Polygraphy's comparator; end to end,
the pipeline's masks and generated ids against `exporter.reference`. With several backends
(--backends onnxruntime,tensorrt), each later one is also compared with the first: per stage on the
first's recorded feeds, and end to end (mask IoU, mask logits, ids). Tolerances follow the precision
the backend computes in (`tolerances`). A backend that cannot run here fails before anything loads
(exit 2); a failed comparison exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from graphs.errors import InputError, ToolchainError
from graphs.quantize import quantization_basis, report_only
from graphs.tolerance import E2E_TOLERANCES, stage_tolerance

DEFAULT_QUERY = "Where is the red disc in this picture?"
# TensorRT builds fp32 engines with TF32 on (the builder default, which csprt build keeps), so their matmuls and
# convolutions round to fp16's 10-bit mantissa: an fp32 artifact on TensorRT is held to the fp16 tolerances that
# exporter.export measured for fp16 graphs. Assumed, not yet measured on a GPU. Every other pair: the manifest's.
_MATH_PRECISION = {("tensorrt", "fp32"): "fp16"}


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="check an artifact against the PyTorch reference", description=__doc__)
    p.add_argument("artifact", type=Path, help="artifact directory (from csprt export)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="the checkpoint it was exported from. Defaults to the one the manifest records.")
    p.add_argument("--vision-tower", type=Path, default=None, help="CLIP directory, if the checkpoint config does not name one")
    p.add_argument("--accm", type=Path, default=None, metavar="DIR",
                   help="ACCM's models, for an ACCM artifact. Defaults to the directory the manifest records.")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends to check, the first is the baseline the others are compared with "
                        "(onnxruntime, tensorrt; tensorrt needs an NVIDIA GPU and csprt build). Defaults to onnxruntime.")
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


def parse_backends(text: str | None) -> list[str]:
    """"onnxruntime,tensorrt" -> ["onnxruntime", "tensorrt"]; each known, none twice. None: ["onnxruntime"]."""
    from engines.session import BACKENDS

    names = [b.strip() for b in (text or "onnxruntime").split(",") if b.strip()]
    if not names:
        raise ToolchainError(f"--backends {text!r}: name at least one of: {', '.join(BACKENDS)}")
    for b in names:
        if b not in BACKENDS:
            raise ToolchainError(f"--backends: unknown backend {b!r}; choose from: {', '.join(BACKENDS)}")
    twice = sorted({b for b in names if names.count(b) > 1})
    if twice:
        raise ToolchainError(f"--backends: {', '.join(twice)} given twice")
    return names


def tolerances(art, backend: str) -> dict:
    """The tolerances `backend` is held to on `art`: {"basis", "end_to_end", "stage": {name: {"atol", "rtol"}}}."""
    math = _MATH_PRECISION.get((backend, art.precision))
    quantized = quantization_basis(art.manifest)
    if quantized:  # the manifest's quantization-aware end-to-end tolerances (graphs.quantize)
        return {"basis": quantized, "end_to_end": dict(art.manifest["tolerances"]["end_to_end"]),
                "stage": {s.name: art.stage_entry(s.name)["tolerance"] for s in art.layout.stages}}
    if math is None:
        return {"basis": f"manifest, {art.precision}", "end_to_end": dict(art.manifest["tolerances"]["end_to_end"]),
                "stage": {s.name: art.stage_entry(s.name)["tolerance"] for s in art.layout.stages}}
    return {"basis": f"{math}: {backend} computes a {art.precision} artifact in TF32",
            "end_to_end": dict(E2E_TOLERANCES[math]),
            "stage": {s.name: stage_tolerance(math, s.name) for s in art.layout.stages}}


def _looser(art, a: str, b: str) -> dict:
    ta, tb = tolerances(art, a), tolerances(art, b)
    return tb if tb["end_to_end"]["mask_logits_atol"] > ta["end_to_end"]["mask_logits_atol"] else ta


@dataclass
class _Reference:
    """The torch side, loaded once for every backend; its end-to-end outputs cached per mode."""

    checkpoint: Path
    reference: object          # exporter.reference.Reference (fp32); AccmReference for an ACCM artifact
    stage_model: object        # the model at the artifact's precision, for per-stage wrappers
    seg_id: int
    outputs: dict = field(default_factory=dict)
    accm: object = None        # ACCM's models (exporter.accm.checkpoint.AccmModels) of an ACCM artifact

    @classmethod
    def load(cls, art, checkpoint, vision_tower, progress, accm_dir=None) -> "_Reference":
        from exporter.checkpoint import load_checkpoint
        from exporter.export import TORCH_DTYPES
        from exporter.reference import Reference

        ckpt = checkpoint or Path(art.manifest["export"]["checkpoint"])
        tower = vision_tower or art.manifest["export"].get("vision_tower")
        progress(f"loading reference {ckpt}")
        ref_ckpt = load_checkpoint(ckpt, tower, attn="eager")
        if ref_ckpt.shape != art.shape:
            raise InputError(f"checkpoint {ckpt} does not match artifact {art.path} (other model dimensions); "
                             f"pass the checkpoint it was exported from with --checkpoint")
        stage_model = ref_ckpt.model if art.precision == "fp32" else load_checkpoint(
            ckpt, tower, attn="eager", dtype=TORCH_DTYPES[art.precision]).model
        accm = None
        if art.schedule.accm is not None:  # the reference that exists for ACCM schedules (exporter/accm/reference.py)
            from exporter.accm.checkpoint import load_accm
            from exporter.accm.reference import AccmReference

            accm_dir = accm_dir or art.manifest["export"].get("accm")
            if accm_dir is None:
                raise InputError(f"artifact {art.path} is an ACCM artifact: pass its ACCM models with --accm DIR")
            progress(f"loading ACCM models {accm_dir}")
            accm = load_accm(accm_dir, vision_hidden=art.shape.vision.hidden)
            reference = AccmReference(ref_ckpt.model, ref_ckpt.tokenizer, ref_ckpt.image_processor_config,
                                      art.schedule, accm)
        else:
            reference = Reference(ref_ckpt.model, ref_ckpt.tokenizer, ref_ckpt.image_processor_config, art.schedule)
        return cls(ckpt, reference, stage_model, art.manifest["tokenizer"]["seg_token_id"], accm=accm)

    def run(self, image, query: str, mode: str, max_new_tokens: int, progress):
        if mode not in self.outputs:
            import torch

            progress(f"{mode}: running the torch reference")
            with torch.no_grad():
                self.outputs[mode] = self.reference(image, query, mode=mode, max_new_tokens=max_new_tokens)
        return self.outputs[mode]


def validate_backends(art_dir: Path, backends=("onnxruntime",), checkpoint: Path | None = None,
                      vision_tower: Path | None = None, image=None, query: str = DEFAULT_QUERY, modes=None,
                      max_new_tokens: int = 8, stages=None, progress=_progress, accm_dir: Path | None = None) -> dict:
    """The parity report of `backends` on one artifact (see `format_report` for its fields).

    Every backend is checked (`engines.session.check_backend`) before the reference loads. The report keeps
    the single-backend keys (artifact, checkpoint, backend = the first, precision, schedule, stages,
    end_to_end, mask_iou, passed; stage and end-to-end entries gain "backend"), and adds "backends"
    (name -> that backend's report) and "cross" (each later backend against the first).
    """
    from engines.session import ArtifactSession
    from exporter.export import sample_image
    from graphs.manifest import check_stage_names

    backends = list(backends)
    with contextlib.ExitStack() as stack:
        sessions = {b: stack.enter_context(ArtifactSession(art_dir, backend=b, verify=i == 0))
                    for i, b in enumerate(backends)}
        base = sessions[backends[0]]
        art = base.artifact
        if stages is not None:
            check_stage_names(art, stages)
        modes = list(modes or art.modes)
        for mode in modes:
            base.check_mode(mode)
        image = sample_image() if image is None else image
        ref = _Reference.load(art, checkpoint, vision_tower, progress, accm_dir)
        tokenizer = check_tokenizer(art, ref.reference.tokenizer, progress)
        reports, runs = {}, {}
        for b in backends:
            reports[b], runs[b] = _check_backend(sessions[b], ref, image, query, modes, max_new_tokens, stages,
                                                 progress)
        cross = [_cross(sessions[b], base, runs[b], runs[backends[0]], stages, progress) for b in backends[1:]]
    first = reports[backends[0]]
    report = {"artifact": str(art_dir), "checkpoint": str(ref.checkpoint), "backend": backends[0],
              "precision": art.precision, "schedule": art.schedule.name,
              "stages": [s for b in backends for s in reports[b]["stages"]],
              "end_to_end": [e for b in backends for e in reports[b]["end_to_end"]],
              "tolerance_basis": first["tolerance_basis"], "backends": reports, "cross": cross}
    report["mask_iou"] = min([e["mask_iou"] for e in report["end_to_end"]]
                             + [e["mask_iou"] for c in cross for e in c["end_to_end"]], default=1.0)
    report["tokenizer"] = tokenizer
    report["passed"] = (all(r["passed"] for r in reports.values()) and all(c["passed"] for c in cross)
                        and tokenizer["passed"])
    return report


def check_tokenizer(art, reference, progress=_progress) -> dict:
    """The artifact's tokenizer.json against the checkpoint's tokenizer (LISA's slow one) over the prompt corpus."""
    from graphs.tokenizer import JsonTokenizer, compare_corpus

    result = compare_corpus(reference, JsonTokenizer.from_dir(art.dir / art.manifest["tokenizer"]["dir"]))
    result["passed"] = result["mismatches"] == 0
    progress(f"tokenizer: {result['prompts']} corpus texts, {result['tokens']} tokens, "
             f"{result['mismatches']} mismatches {'ok' if result['passed'] else 'FAILED'}")
    return result


def validate_artifact(art_dir: Path, checkpoint: Path | None = None, vision_tower: Path | None = None,
                      backend: str = "onnxruntime", image=None, query: str = DEFAULT_QUERY, modes=None,
                      max_new_tokens: int = 8, stages=None, progress=_progress) -> dict:
    """The parity report of one backend (`validate_backends` with one backend)."""
    return validate_backends(art_dir, [backend], checkpoint, vision_tower, image, query, modes, max_new_tokens,
                             stages, progress)


def _compared_feeds(art, seg, stages):
    """(stage, feed) of every stage that ran in `seg`'s pipeline run, limited to `stages` when given."""
    for name, feed in seg.pipeline.feeds.items():
        if stages is not None and name not in stages:
            continue
        stage = art.layout.stage(name)
        if stage.skip_if_empty and feed[stage.skip_if_empty].size == 0:
            continue  # skipped in the run (no [SEG]): nothing ran, nothing to compare
        yield stage, feed


def _stage_entry(name: str, mode: str, backend: str, cmp, atol: dict) -> dict:
    stats = list(cmp.outputs.values())
    return {"name": name, "mode": mode, "backend": backend, "passed": bool(cmp), "max_abs": cmp.max_abs,
            "mean_abs": max((s.mean_abs for s in stats), default=0.0),
            "p99_abs": max((s.p99_abs for s in stats), default=0.0),
            "passing_atol": max((s.passing_atol for s in stats), default=0.0),
            "atol": atol.get("", 0.0), "outputs": cmp.to_dict()["outputs"]}


def _check_backend(session, ref: _Reference, image, query, modes, max_new_tokens, stages, progress):
    """One backend against the reference: (report, {mode: Segmentation})."""
    from engines.compare import compare
    from exporter.torch_runner import TorchStageRunner

    art, backend = session.artifact, session.backend
    tol = tolerances(art, backend)
    report = {"backend": backend, "tolerance_basis": tol["basis"], "stages": [], "end_to_end": []}
    segs = {}
    for mode in modes:
        progress(f"{mode}: running the {backend} pipeline")
        seg = segs[mode] = session.segment(image, query, mode=mode, max_new_tokens=max_new_tokens, record=True)
        for stage, feed in _compared_feeds(art, seg, stages):
            got = session.pipeline.runner(stage).infer(feed)
            with TorchStageRunner(stage, art.layout.dims, ref.stage_model, art.schedule, ref.seg_id,
                                  accm=ref.accm) as torch_runner:
                want = torch_runner.infer(feed)
            cmp = compare(got, want, **tol["stage"][stage.graph_name])
            report["stages"].append(report_only(art.manifest, stage.graph_name, _stage_entry(
                stage.name, mode, backend, cmp, tol["stage"][stage.graph_name]["atol"])))
            progress(f"{mode}: {backend} {stage.name}: max abs {cmp.max_abs:.2e} {_verdict(report['stages'][-1])}")
        out = ref.run(image, query, mode, max_new_tokens, progress)
        report["end_to_end"].append({"backend": backend, **_end_to_end(
            mode, seg, out.mask_logits.float().cpu().numpy(), out.masks, out.generated_ids, tol["end_to_end"],
            _accm_of(out))})
    report["mask_iou"] = min((e["mask_iou"] for e in report["end_to_end"]), default=1.0)
    report["passed"] = all(s["passed"] for s in report["stages"]) and all(e["passed"] for e in report["end_to_end"])
    return report, segs


def _cross(other, base, other_segs: dict, base_segs: dict, stages, progress) -> dict:
    """Backend `other` against backend `base`: per stage on `base`'s recorded feeds, and end to end."""
    from engines.compare import compare

    art = base.artifact
    tol = _looser(art, base.backend, other.backend)
    entry = {"backend": other.backend, "against": base.backend, "tolerance_basis": tol["basis"], "stages": [],
             "end_to_end": []}
    for mode, base_seg in base_segs.items():
        for stage, feed in _compared_feeds(art, base_seg, stages):
            want = base.pipeline.runner(stage).infer(feed)
            got = other.pipeline.runner(stage).infer(feed)
            cmp = compare(got, want, **tol["stage"][stage.graph_name])
            entry["stages"].append(report_only(art.manifest, stage.graph_name, _stage_entry(
                stage.name, mode, other.backend, cmp, tol["stage"][stage.graph_name]["atol"])))
            progress(f"{mode}: {other.backend} vs {base.backend} {stage.name}: max abs {cmp.max_abs:.2e} "
                     f"{_verdict(entry['stages'][-1])}")
        entry["end_to_end"].append(_end_to_end(mode, other_segs[mode], base_seg.mask_logits, base_seg.masks,
                                               base_seg.generated_ids, tol["end_to_end"]))
    entry["mask_iou"] = min((e["mask_iou"] for e in entry["end_to_end"]), default=1.0)
    entry["passed"] = all(s["passed"] for s in entry["stages"]) and all(e["passed"] for e in entry["end_to_end"])
    return entry


def _accm_of(out) -> dict | None:
    """The reference's ACCM caption as a Segmentation's host steps report it (candidate ids, chosen), or None."""
    c = getattr(out, "accm", None)
    return None if c is None else {"candidate_ids": [list(i) for i in c.candidate_ids], "chosen": c.chosen,
                                   "caption": c.caption}


def _end_to_end(mode: str, seg, ref_logits, ref_masks, ref_ids: list[int], tol: dict, ref_accm: dict | None = None
                ) -> dict:
    """`seg` (a backend's Segmentation) against reference logits [K, H, W], masks [K, H, W] and ids (and, for
    ACCM, the candidates' GPT-2 ids and the chosen one)."""
    import numpy as np

    from engines.compare import mask_iou

    same_k = seg.mask_logits.shape == ref_logits.shape
    max_abs = float(np.abs(seg.mask_logits - ref_logits).max()) if same_k and ref_logits.size else 0.0
    iou = mask_iou(seg.masks.any(axis=0), ref_masks.any(axis=0)) if same_k else 0.0
    ids_equal = list(seg.generated_ids) == list(ref_ids)
    logits_ok = tol["mask_logits_atol"] is None or max_abs <= tol["mask_logits_atol"]  # None: reported only
    passed = same_k and logits_ok and iou >= tol["mask_iou_min"] and ids_equal
    entry = {"mode": mode, "num_seg": int(seg.masks.shape[0]), "ref_num_seg": int(ref_masks.shape[0]),
             "mask_logits_max_abs": max_abs, "mask_logits_atol": tol["mask_logits_atol"], "mask_iou": float(iou),
             "mask_iou_min": tol["mask_iou_min"], "ids_equal": ids_equal, "generated_ids": list(seg.generated_ids)}
    if ref_accm is not None:
        got = seg.host_steps.get("accm") or {}
        entry["accm"] = {"caption_ids_equal": got.get("candidate_ids") == ref_accm["candidate_ids"],
                         "chosen_equal": got.get("chosen") == ref_accm["chosen"], "chosen": got.get("chosen"),
                         "caption": got.get("caption"), "ref_caption": ref_accm["caption"]}
        passed = passed and entry["accm"]["caption_ids_equal"] and entry["accm"]["chosen_equal"]
    entry["passed"] = bool(passed)
    return entry


def _verdict(entry: dict) -> str:
    return "reported (quantized)" if entry.get("report_only") else "ok" if entry["passed"] else "FAILED"


def _stage_lines(entries: list[dict]) -> list[str]:
    lines = [f"  {'stage':<12} {'mode':<12} {'max abs':>10} {'p99 abs':>10} {'passing atol':>13} {'atol':>8}  result"]
    for s in entries:
        lines.append(f"  {s['name']:<12} {s['mode']:<12} {s['max_abs']:>10.2e} {s['p99_abs']:>10.2e} "
                     f"{s['passing_atol']:>13.2e} {s['atol']:>8.0e}  {_verdict(s)}")
    return lines


def _atol_text(atol) -> str:
    return "reported, not judged" if atol is None else f"atol {atol:g}"


def _e2e_line(e: dict, against: str) -> str:
    a = e.get("accm")
    caption = "" if a is None else (f", ACCM caption ids {'equal' if a['caption_ids_equal'] else 'DIFFER'}, chosen "
                                    f"candidate {a['chosen']} {'equal' if a['chosen_equal'] else 'DIFFERS'}")
    return (f"  end to end {e['mode']}: [SEG] masks {e['num_seg']} ({against} {e['ref_num_seg']}), mask logits "
            f"max abs {e['mask_logits_max_abs']:.2e} ({_atol_text(e['mask_logits_atol'])}), mask IoU "
            f"{e['mask_iou']:.4f} (min {e['mask_iou_min']:g}), ids {'equal' if e['ids_equal'] else 'DIFFER'}"
            f"{caption}: {'ok' if e['passed'] else 'FAILED'}")


def format_report(report: dict) -> str:
    lines = []
    for name, r in report["backends"].items():
        lines.append(f"artifact {report['artifact']} ({report['schedule']}, {report['precision']}) on {name} "
                     f"vs torch reference {report['checkpoint']} (tolerances: {r['tolerance_basis']})")
        lines += _stage_lines(r["stages"])
        lines += [_e2e_line(e, "reference") for e in r["end_to_end"]]
    for c in report["cross"]:
        lines.append(f"{c['backend']} vs {c['against']} on the same feeds (tolerances: {c['tolerance_basis']})")
        lines += _stage_lines(c["stages"])
        lines += [_e2e_line(e, c["against"]) for e in c["end_to_end"]]
    tok = report.get("tokenizer")
    if tok:
        lines.append(f"tokenizer ids, artifact vs checkpoint: {tok['prompts']} corpus texts, {tok['tokens']} tokens, "
                     f"{tok['mismatches']} mismatches" + ("" if tok["passed"] else
                                                          f" (first: {tok['first_mismatch']['text']!r})"))
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from graphs.imageio import load_image

    backends = parse_backends(args.backends)
    image = load_image(args.image) if args.image is not None else None
    modes = [args.mode] if args.mode else None
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    report = validate_backends(args.artifact, backends, args.checkpoint, args.vision_tower, image, args.query, modes,
                               args.max_new_tokens, stages, accm_dir=args.accm)
    if args.json:
        print(json.dumps(report, indent=2, default=float))
    else:
        print(format_report(report))
    return 0 if report["passed"] else 1
