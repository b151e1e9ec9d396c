"""`csprt bench`: latency, FLOPs and achieved throughput of schedules and backends, with ratios from one run.

    csprt bench ART [--backends onnxruntime,torch] ...          an exported artifact (its own schedule)
    csprt bench --shape tiny|small|lisa-7b|lisa-13b [--schedules full,csp,...] [--backends torch,onnxruntime]

`--shape` uses random weights of the real shapes (speed does not depend on weight values). Pipeline
backends (onnxruntime, tensorrt) need graphs: the random checkpoint and one artifact per schedule are
exported once into --work (a graph cache shares identical stages) and reused by later runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

from graphs.errors import InputError
from graphs.prompt import MODES

BACKENDS = ("torch", "onnxruntime", "tensorrt")
PIPELINE_BACKENDS = ("onnxruntime", "tensorrt")
DEFAULT_SCHEDULES = "full,csp,csp-70,evtp,fastv"
SHAPE_NAMES = ("tiny", "small", "lisa-7b", "lisa-13b")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SCALING_AXES = ("image-tokens", "text")
SCALING_TEXT = (0, 32, 64, 128)  # query tokens added to the --text-len prompt (the artifact's suffix limit is 256)
SCALING_GRIDS = (8, 16, 24, 32)  # CLIP grids: 64, 256, 576, 1024 image tokens


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="benchmark schedules and backends (latency, FLOPs, ratios)", description=__doc__)
    p.add_argument("artifact", type=Path, nargs="?", help="an exported artifact (instead of --shape)")
    p.add_argument("--shape", choices=SHAPE_NAMES, default=None, help="random weights of a named model shape")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="with ART: the checkpoint for the torch backend (default: the one the manifest names)")
    p.add_argument("--schedules", default=None, help=f"--shape only. Defaults to {DEFAULT_SCHEDULES}.")
    p.add_argument("--backends", default=None,
                   help="comma list of torch, onnxruntime, tensorrt. Defaults to torch,onnxruntime "
                        "(an artifact: onnxruntime, plus torch when its checkpoint is found).")
    p.add_argument("--mode", choices=MODES, default="single-pass", help="Defaults to single-pass.")
    p.add_argument("--batch", default=None,
                   help="requests per run, comma-separated (e.g. 1,4,8): every schedule and backend at each, with "
                        "images/s and csp vs full per batch. Defaults to 1.")
    p.add_argument("--text-len", type=int, default=40, help="text tokens besides the image. Defaults to 40.")
    p.add_argument("--repeat", type=int, default=10, help="timed repeats. Defaults to 10.")
    p.add_argument("--warmup", type=int, default=2, help="untimed repeats first. Defaults to 2.")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generate mode. Defaults to 16.")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda, for torch and onnxruntime; tensorrt always runs on CUDA (cuda when this is "
                        "cpu), as csprt validate pairs them. Defaults to cpu.")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and onnxruntime (same for both, so their ratio is fair). "
                        "Defaults to each library's own choice.")
    p.add_argument("--precision", choices=DTYPES, default=None,
                   help="--shape: weights and graphs (fp16 on cuda, fp32 on cpu by default). ART: its own.")
    p.add_argument("--scaling", default=None,
                   help=f"comma list of {', '.join(SCALING_AXES)}: latency and peak memory vs image tokens "
                        f"(grids {'/'.join(str(g * g) for g in SCALING_GRIDS)}, torch only) and vs text length "
                        f"(--text-len plus {'/'.join(map(str, SCALING_TEXT))} tokens, every backend)")
    p.add_argument("--quantize", default=None,
                   help="--shape, pipeline backends: comma list of none, int8, int4-wo (ONNX Runtime's format; "
                        "TensorRT: the qdq or modelopt format, e.g. int8:qdq, int4-wo:modelopt): one artifact per "
                        "schedule and method, with ratios vs the float one of the same schedule. Defaults to none.")
    p.add_argument("--work", type=Path, default=None,
                   help="--shape: where the random checkpoint and artifacts live. Defaults to ~/.cache/csprt/bench.")
    p.add_argument("--json", type=Path, default=None, help="write the report (schema graphs/bench.schema.json)")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG: latency per stage, speedup vs FLOPs")
    p.set_defaults(func=run)


def _say(msg: str) -> None:
    print(f"[csprt bench] {msg}", file=sys.stderr, flush=True)


def _csv(value: str | None, allowed: tuple[str, ...] | None, flag: str) -> list[str]:
    items = [v.strip() for v in (value or "").split(",") if v.strip()]
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise InputError(f"{flag}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}")
    if len(set(items)) != len(items):
        raise InputError(f"{flag} lists a value twice: {value}")
    return items


class Plan:
    """What to measure, checked before anything slow runs."""

    def __init__(self, args: argparse.Namespace):
        from graphs.schedule import PRESETS

        if (args.artifact is None) == (args.shape is None):
            raise InputError("give an artifact directory or --shape NAME (not both); e.g. csprt bench --shape small")
        for flag, value, least in (("--repeat", args.repeat, 1), ("--warmup", args.warmup, 0),
                                   ("--text-len", args.text_len, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                                   ("--threads", 1 if args.threads is None else args.threads, 1)):
            if value < least:
                raise InputError(f"{flag} must be >= {least}, got {value}")
        if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
            raise InputError(f"--device {args.device!r}: choose cpu or cuda")
        self.scaling = _csv(args.scaling, SCALING_AXES, "--scaling")
        self.batches = _batches(args.batch)
        self.args, self.sessions = args, {}
        if args.artifact is not None:
            from graphs.manifest import load_artifact

            if args.schedules is not None:
                raise InputError("--schedules goes with --shape; an artifact has its own schedule (export another "
                                 "artifact, or bench --shape)")
            self.artifact = load_artifact(args.artifact)
            self.shape, self.shape_name = self.artifact.shape, None
            self.precision = self.artifact.precision
            if args.precision not in (None, self.precision):
                raise InputError(f"artifact {args.artifact} is {self.precision}, not {args.precision}; re-export it "
                                 f"with --precision {args.precision}")
            self.schedules = [self.artifact.schedule.name]
            if args.quantize is not None:
                raise InputError("--quantize goes with --shape; an artifact has its own quantization (export "
                                 "another with csprt export --quantize, or bench --shape)")
            self.quantize = [None]
            self.checkpoint = args.checkpoint or _manifest_checkpoint(self.artifact)
            default = "onnxruntime,torch" if self.checkpoint else "onnxruntime"
            self.backends = _csv(args.backends or default, BACKENDS, "--backends")
            if "torch" in self.backends and self.checkpoint is None:
                raise InputError("--backends torch needs the checkpoint this artifact was exported from; "
                                 "pass --checkpoint DIR")
            if args.mode not in self.artifact.modes:
                raise InputError(f"artifact {args.artifact} serves {', '.join(self.artifact.modes)}, not {args.mode}; "
                                 f"re-export with --mode both: {self.artifact.rebuild_command}")
        else:
            from exporter.tiny import tiny_shape
            from graphs.shapes import SHAPES

            self.artifact = None
            self.shape_name = args.shape
            self.shape = tiny_shape() if args.shape == "tiny" else SHAPES[args.shape]
            self.precision = args.precision or ("fp16" if args.device.startswith("cuda") else "fp32")
            from graphs.schedule import ACCM_PRESETS

            self.schedules = _csv(args.schedules or DEFAULT_SCHEDULES, (*PRESETS, *ACCM_PRESETS), "--schedules")
            self.backends = _csv(args.backends or "torch,onnxruntime", BACKENDS, "--backends")
            accm = [s for s in self.schedules if s in ACCM_PRESETS]
            if accm and "torch" in self.backends:
                raise InputError(f"--schedules {','.join(accm)}: ACCM schedules are benched on their exported "
                                 "artifacts (the torch backend times the plain reference); pass --backends onnxruntime")
            self.checkpoint = None
            self.quantize = _quantize_list(args.quantize, self.precision)
            self.work = (args.work or Path.home() / ".cache" / "csprt" / "bench") / f"{args.shape}-{self.precision}"
        if not self.schedules or not self.backends:
            raise InputError("nothing to measure: --schedules and --backends need at least one value each")
        if self.precision == "fp16" and "torch" in self.backends and not args.device.startswith("cuda"):
            _say("note: fp16 matmuls on this CPU run at a tiny fraction of fp32 speed; torch fp16 figures on CPU "
                 "say little about a GPU")


def _quantize_list(value: str | None, precision: str) -> list:
    """--quantize "none,int8,int4-wo:qdq" -> [None, QuantOptions(int8), QuantOptions(int4-wo, qdq)], checked
    (a :modelopt method also needs ModelOpt's environment)."""
    from graphs.quantize import QuantOptions, check_precision

    out = []
    for item in _csv(value or "none", None, "--quantize"):
        method, _, fmt = item.partition(":")
        opts = QuantOptions(method=method, format=fmt or None).resolved()
        if opts.method != "none":
            check_precision(opts, precision)
        if opts.format == "modelopt":
            from graphs.quantize_modelopt import modelopt_version

            modelopt_version()  # its environment is there, before any work
        out.append(None if opts.method == "none" else opts)
    return out


def _batches(value: str | None) -> list[int]:
    """--batch "1,4,8" -> [1, 4, 8]; one line on anything else."""
    if value is None:
        return [1]
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--batch {value!r}: expected batch sizes separated by commas, e.g. 1,4,8") from None
    if not out or min(out) < 1 or len(set(out)) != len(out):
        raise InputError(f"--batch {value!r}: expected distinct batch sizes >= 1, e.g. 1,4,8")
    return out


def _manifest_checkpoint(artifact) -> Path | None:
    path = artifact.manifest.get("export", {}).get("checkpoint")
    return Path(path) if path and Path(path, "config.json").is_file() else None


def run(args: argparse.Namespace) -> int:
    plan = Plan(args)
    try:
        records, scaling = _measure_all(plan)
    finally:
        for session in plan.sessions.values():
            session.close()
    report = _report(plan, records, scaling)
    if args.json:
        from graphs.atomic import write_json

        write_json(report, args.json)
        _say(f"wrote {args.json}")
    if args.plot:
        from tools.bench_plot import plot_report

        plot_report(report, args.plot)
        _say(f"wrote {args.plot}")
    print(format_table(report))
    return 0


def _measure_all(plan: Plan) -> tuple[list[dict], list[dict]]:
    args, records, scaling = plan.args, [], []
    if args.threads is not None and "torch" in plan.backends:
        import torch

        torch.set_num_threads(args.threads)
    torch_model = None
    if any(b in PIPELINE_BACKENDS for b in plan.backends) and plan.artifact is None:
        plan.checkpoint = _random_checkpoint(plan)
    if "torch" in plan.backends:
        torch_model = _torch_model(plan)
    # Batch-major: the schedules, backends and quantizations compared at one batch size run back to back (a shared
    # machine's load drifts; ratios between neighbours are the fair ones).
    for sched_name, backend, quant, batch in ((s, b, q, n) for n in plan.batches for s in plan.schedules
                                              for b in plan.backends
                                              for q in (plan.quantize if b != "torch" else [None])):
        what = f"{backend}" + (f" {quant.method}/{quant.format}" if quant else "")
        _say(f"{sched_name} on {what}/{args.device}, batch {batch}: warm-up x{args.warmup}, timed x{args.repeat}")
        record, raw = _measure(plan, sched_name, backend, torch_model, args.text_len, batch, quant)
        records.append(record)
        llm = record["llm_ms"]["median"] if record["llm_ms"] else float("nan")
        _say(f"{sched_name} on {what}, batch {batch}: llm {llm:.2f} ms, end to end "
             f"{record['end_to_end_ms']['median']:.2f} ms, {record['images_per_s']:.2f} images/s")
        if "text" in plan.scaling and batch == plan.batches[0] and quant is None:
            for extra in SCALING_TEXT:  # from the prompt as measured: --text-len may be under the template's length
                n = record["text_tokens"] + extra
                _say(f"scaling: {sched_name} on {backend}, {n} text tokens")
                point, _ = _measure(plan, sched_name, backend, torch_model, n)
                scaling.append(_scaling_point("text_tokens", point["text_tokens"], point, plan.shape.num_image_tokens))
    if "image-tokens" in plan.scaling:
        scaling += _image_token_scaling(plan)
    return records, scaling


def _random_checkpoint(plan: Plan) -> Path:
    ckpt = plan.work / "checkpoint"
    if (ckpt / "config.json").is_file():
        return ckpt
    _say(f"writing a random {plan.shape_name} checkpoint to {ckpt}")
    if plan.shape_name == "tiny":
        from exporter.tiny import make_tiny

        make_tiny(ckpt)
    else:
        from exporter.random_ckpt import write_random_checkpoint

        write_random_checkpoint(plan.shape, ckpt, dtype=plan.precision)
    return ckpt


def _torch_model(plan: Plan):
    import torch

    dtype = getattr(torch, DTYPES[plan.precision])
    if plan.checkpoint is not None:
        from exporter.checkpoint import load_checkpoint

        _say(f"loading {plan.checkpoint} ({plan.precision}) for the torch backend")
        loaded = load_checkpoint(plan.checkpoint, dtype=dtype, device=plan.args.device)
        return loaded.model, loaded.tokenizer
    from exporter.bench import random_model

    _say(f"building random {plan.shape_name} weights ({plan.precision}) on {plan.args.device}")
    return random_model(plan.shape, dtype=dtype, device=plan.args.device)


def _artifact_for(plan: Plan, sched_name: str, quant=None) -> Path:
    if plan.artifact is not None:
        return plan.artifact.dir
    from exporter.export import ExportOptions, export_artifact
    from graphs.manifest import read_manifest
    from graphs.quantize import quantization_of
    from graphs.schedule import resolve

    tag = f"-{quant.method}-{quant.format}" if quant else ""
    out = plan.work / f"art-{sched_name}-{plan.args.mode}{tag}"
    previous = read_manifest(out)
    if quant is not None and previous and quantization_of(previous):  # quantized earlier: its float keys are gone
        return out
    sched = resolve(sched_name, plan.shape.llm.layers, plan.shape.num_image_tokens)
    finish = None
    if quant is not None:
        from tools.quantize_args import quantize_after_export

        finish = lambda gen: quantize_after_export(gen, quant, _say)  # noqa: E731  inside the new generation
    export_artifact(plan.checkpoint, sched, out,
                    ExportOptions(precision=plan.precision, mode=plan.args.mode, cache_dir=str(plan.work / "graph-cache")),
                    progress=_say, finish=finish, accm_dir=_accm_models(plan) if sched.accm is not None else None)
    return out


def _accm_models(plan: Plan) -> Path:
    """ACCM's models for an accm-* schedule at --shape: `csprt make-tiny --accm`'s tiny ones (GPT-2, LongCLIP and
    the selector at tiny sizes) around the random checkpoint's CLIP tower, written once."""
    from exporter.accm.tiny import ACCM_SUBDIR, make_tiny_accm_for

    accm = plan.checkpoint / ACCM_SUBDIR
    if not (accm / "accm_config.json").is_file():
        _say(f"writing tiny ACCM models for the {plan.shape_name} checkpoint to {accm}")
        make_tiny_accm_for(plan.checkpoint)
    return accm


def _measure(plan: Plan, sched_name: str, backend: str, torch_model, text_len: int,
             batch: int = 1, quant=None) -> tuple[dict, dict]:
    from graphs.bench_report import make_record
    from graphs.schedule import resolve

    args = plan.args
    sched = resolve(sched_name, plan.shape.llm.layers, plan.shape.num_image_tokens) if plan.artifact is None \
        else plan.artifact.schedule
    if backend == "torch":
        from exporter.bench import bench_torch

        model, tokenizer = torch_model
        raw = bench_torch(model, tokenizer, sched, text_len, mode=args.mode, repeat=args.repeat, warmup=args.warmup,
                          max_new_tokens=args.max_new_tokens, batch=batch)
    else:
        from engines.bench import bench_session
        from engines.session import ArtifactSession

        from graphs.quantize import artifact_weights, quantization_tag

        key = (sched_name, backend, quant)
        if key not in plan.sessions:
            plan.sessions[key] = ArtifactSession(_artifact_for(plan, sched_name, quant), backend=backend,
                                                 device=backend_device(backend, args.device), threads=args.threads)
        art = plan.sessions[key].artifact
        extra = {"quantization": quantization_tag(art.manifest), "weights": artifact_weights(art.manifest, art.dir)}
        raw = bench_session(plan.sessions[key], text_len, mode=args.mode, repeat=args.repeat, warmup=args.warmup,
                            max_new_tokens=args.max_new_tokens, batch=batch)
        raw["device_name"] = _gpu_name() if backend_device(backend, args.device).startswith("cuda") else None
    record = make_record(schedule=sched, shape=plan.shape, backend=backend,
                         device=backend_device(backend, args.device),
                         text_tokens=raw["text_tokens"], image_tokens_per_layer=raw["image_tokens_per_layer"],
                         runs=raw["runs"], e2e_ms=raw["e2e_ms"], pipeline_ms=raw["pipeline_ms"],
                         peak_memory_mib=raw["peak_memory_mib"], device_name=raw.get("device_name"),
                         decode_steps=raw["decode_steps"], batch=batch, **(extra if backend != "torch" else {}))
    return record, raw


def backend_device(backend: str, device: str) -> str:
    """Where `backend` runs under `--device`: the device itself, except tensorrt on "cpu", which runs on "cuda"."""
    return "cuda" if backend == "tensorrt" and not device.startswith("cuda") else device


def _scaling_point(axis: str, value: int, record: dict, image_tokens: int) -> dict:
    return {"axis": axis, "value": value, "schedule": record["schedule"], "backend": record["backend"],
            "image_tokens": image_tokens,
            "text_tokens": record["text_tokens"], "avg_image_tokens_per_layer": record["avg_image_tokens_per_layer"],
            "llm_ms": record["llm_ms"], "end_to_end_ms": record["end_to_end_ms"],
            "peak_memory_mib": record["peak_memory_mib"]}


def _image_token_scaling(plan: Plan) -> list[dict]:
    """Latency and peak memory vs image tokens: larger CLIP grids, torch backend (graphs have static image budgets)."""
    import dataclasses

    import torch

    from exporter.bench import bench_torch, random_model
    from graphs.bench_report import make_record
    from graphs.schedule import resolve

    args, points = plan.args, []
    for grid in SCALING_GRIDS:
        vision = dataclasses.replace(plan.shape.vision, image_size=grid * plan.shape.vision.patch_size)
        shape = dataclasses.replace(plan.shape, vision=vision)
        model, tokenizer = random_model(shape, dtype=getattr(torch, DTYPES[plan.precision]), device=args.device)
        for sched_name in plan.schedules:
            _say(f"scaling: {sched_name} on torch, {shape.num_image_tokens} image tokens")
            sched = resolve(sched_name, shape.llm.layers, shape.num_image_tokens)
            raw = bench_torch(model, tokenizer, sched, args.text_len, mode=args.mode, repeat=args.repeat,
                              warmup=args.warmup, max_new_tokens=args.max_new_tokens)
            record = make_record(schedule=sched, shape=shape, backend="torch", device=args.device,
                                 text_tokens=raw["text_tokens"], image_tokens_per_layer=raw["image_tokens_per_layer"],
                                 runs=raw["runs"], e2e_ms=raw["e2e_ms"], peak_memory_mib=raw["peak_memory_mib"])
            points.append(_scaling_point("image_tokens", shape.num_image_tokens, record, shape.num_image_tokens))
        del model
    return points


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        return None


def _machine(plan: Plan) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("torch", "onnxruntime", "transformers", "tensorrt", "tensorrt-rtx-cu13-bindings"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = _gpu_name() if any(backend_device(b, plan.args.device).startswith("cuda") for b in plan.backends) else None
    return {"cpu": cpu, "cpu_cores": os.cpu_count() or 1, "gpu": gpu, "versions": versions,
            "python": platform.python_version()}


def _report(plan: Plan, records: list[dict], scaling: list[dict]) -> dict:
    from graphs.bench_report import make_report

    args = plan.args
    config = {"source": str(args.artifact) if plan.artifact is not None else f"shape:{plan.shape_name}",
              "shape": plan.shape.to_dict(), "precision": plan.precision, "mode": args.mode,
              "text_len": args.text_len, "repeat": args.repeat, "warmup": args.warmup, "device": args.device,
              "threads": args.threads,
              "schedules": plan.schedules, "backends": plan.backends, "scaling": plan.scaling, "batch": plan.batches,
              "quantize": [f"{q.method}/{q.format}" if q else "none" for q in plan.quantize],
              "command": "csprt bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None}
    return make_report(config=config, machine=_machine(plan), records=records, scaling=scaling)


def format_table(report: dict) -> str:
    """Medians per (schedule, backend, batch) with images/s, and the pairwise ratios of the same run: each schedule
    vs full at the same batch, each backend vs torch and each quantized artifact vs its float one at the smallest
    batch."""
    from graphs.bench_report import label

    vs_torch = report["ratios"]["backend_vs_torch"]
    vs_float = report["ratios"].get("quantized_vs_float", {})
    by_batch = report["ratios"].get("schedule_vs_full_by_batch", {})
    least = min((r.get("batch", 1) for r in report["records"]), default=1)

    def fmt(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    head = (f"{'schedule':<9} {'backend':<24} {'batch':>5} {'img tok/L':>9} {'llm ms':>9} {'e2e ms':>9} {'img/s':>8} "
            f"{'betw %':>7} {'LLM FLOPs -%':>12} {'llm x full':>10} {'e2e x full':>10} {'e2e x torch':>11} "
            f"{'llm TFLOP/s':>11} {'LLM MB':>9} {'all MB':>9} {'llm x float':>11} {'e2e x float':>11} "
            f"{'LLM B/float':>11}")
    lines = [head]
    for r in report["records"]:
        batch, name = r.get("batch", 1), label(r)
        f = by_batch.get(name, {}).get(str(batch), {}).get(r["schedule"], {})
        t = vs_torch.get(r["schedule"], {}).get(name, {}) if batch == least else {}
        q = vs_float.get(name, {}).get(r["schedule"], {}) if batch == least else {}
        w = r.get("weights") or {}
        mb = {k: w[k] / 1e6 if k in w else None for k in ("llm", "total")}
        llm = r["llm_ms"]["median"] if r["llm_ms"] else None
        betw = r["overhead"]["between_stages_pct"] if r["overhead"] else None
        lines.append(f"{r['schedule']:<9} {name:<24} {batch:>5} {r['avg_image_tokens_per_layer']:>9.1f} "
                     f"{fmt(llm):>9} {r['end_to_end_ms']['median']:>9.2f} {fmt(r.get('images_per_s')):>8} "
                     f"{fmt(betw, '.1f'):>7} {r['flops_reduction_pct']['llm']:>12.1f} "
                     f"{fmt(f.get('llm_speedup')):>10} "
                     f"{fmt(f.get('end_to_end_speedup')):>10} {fmt(t.get('end_to_end_speedup')):>11} "
                     f"{fmt(r['achieved_tflops']['llm'], '.3f'):>11} {fmt(mb['llm'], '.1f'):>9} "
                     f"{fmt(mb['total'], '.1f'):>9} {fmt(q.get('llm_speedup')):>11} "
                     f"{fmt(q.get('end_to_end_speedup')):>11} {fmt(q.get('llm_weight_ratio'), '.3f'):>11}")
    return "\n".join(lines)
