"""`csprt build`: one TensorRT engine per stage graph of an exported artifact.

    csprt build ART [--precision fp16|bf16|fp32] [--flavor auto|tensorrt|tensorrt-rtx]
                    [--compute-capability SM86 ...] [--shapes NAME=min:opt:max ...]
                    [--timing-cache PATH] [--workspace GB] [--stages a,b] [--max-build-memory GB]
                    [--max-layers-per-engine N] [--weights-as-inputs]

Engines go to ART/engines/<flavor>/<stage>.plan, each with a <stage>.json sidecar (flavour, version,
targets, graph hash, profiles, settings, build memory), and the manifest lists them. A block that generate
mode decodes gets two optimization profiles, prefill and decode (rows 1); `--shapes` narrows both. TensorRT-RTX builds on a
machine without a GPU; an unchanged rebuild is a cache hit. Stages build one at a time; before the first, every
stage's estimated peak memory is checked against the budget (--max-build-memory, default: what the host has
available). An LLM block over it is built as several engines of consecutive decoder layers (the fewest that
each fit; --max-layers-per-engine N caps them too); the runtime chains them as one stage. Any other stage over
it, or a block whose single layer is, is refused in one line naming the budget that would fit.
--weights-as-inputs builds weight-free engines: the GEMM and embedding weights become engine inputs that the
runtime reads from the artifact's graphs and binds at load (graphs.weight_inputs), so the artifact holds every
weight once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engines.build import PRECISIONS, EngineBuildError, build_engines
from engines.trt import CHOICES


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help="build TensorRT engines for an artifact's stages",
                              description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path, help="artifact directory (from csprt export)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="must equal the artifact's precision: strongly typed engines compute in the graph's "
                        "dtypes. Defaults to the artifact's")
    p.add_argument("--flavor", choices=CHOICES,
                   help="tensorrt (data-center GPUs) or tensorrt-rtx (RTX GPUs; builds without a GPU). "
                        "Defaults to auto: tensorrt if installed, else tensorrt-rtx")
    p.add_argument("--compute-capability", nargs="+", metavar="SM",
                   help="TensorRT-RTX targets, e.g. SM86 SM89 SM120 (or 'current'). Defaults to every one from "
                        "SM80 on that the installed TensorRT-RTX supports")
    p.add_argument("--shapes", nargs="+", metavar="NAME=MIN:OPT:MAX",
                   help="narrow a named dim's profile within its exported range, e.g. suffix_len=1:32:128. "
                        "Defaults to the manifest's dims")
    p.add_argument("--timing-cache", type=Path, metavar="PATH", help="timing cache file to read and update (TensorRT only: "
                                                                         "TensorRT-RTX has none)")
    p.add_argument("--workspace", type=float, metavar="GB", help="builder workspace limit in GiB. Defaults to "
                                                                 "TensorRT's")
    p.add_argument("--stages", metavar="A,B", help="only these stages (comma-separated). Defaults to all")
    p.add_argument("--max-build-memory", type=float, metavar="GB",
                   help="build memory budget in GiB: an LLM block over it is built as several engines of consecutive "
                        "layers; other stages over it are refused before building. Defaults to the memory this host "
                        "has available now")
    p.add_argument("--max-layers-per-engine", type=int, metavar="N",
                   help="build each LLM block as engines of at most N decoder layers. Defaults to as many as the "
                        "build memory budget allows")
    p.add_argument("--weights-as-inputs", action="store_true",
                   help="weight-free engines: each stage's GEMM and embedding weights become engine inputs that the "
                        "runtime reads from the artifact's ONNX external data and binds at load, so the artifact "
                        "holds every weight once and the build never packs them (not for Triton's TensorRT backend)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    given = {k: getattr(args, k) for k in ("precision", "flavor", "shapes", "timing_cache", "stages")
             if getattr(args, k) is not None}
    if args.compute_capability is not None:
        given["compute_capabilities"] = args.compute_capability
    if args.workspace is not None:
        given["workspace_gb"] = args.workspace
    if args.max_build_memory is not None:
        given["max_build_memory_gb"] = args.max_build_memory
    if args.max_layers_per_engine is not None:
        given["max_layers_per_engine"] = args.max_layers_per_engine
    if args.weights_as_inputs:
        given["weights_as_inputs"] = True
    progress = lambda msg: print(f"[csprt] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        report = build_engines(args.artifact, progress=progress, **given)
    except EngineBuildError as exc:
        _print_report(exc.report)
        raise
    _print_report(report)
    return 0


def _print_report(report: dict) -> None:
    stages = report["stages"]
    built = sum(1 for s in stages.values() if s["status"] == "built")
    print(f"engines: {report['engines_dir']} ({report['flavor']} {report['trt_version']}, "
          f"{', '.join(report['compute_capabilities'])}, {report['precision']}; {built} built, "
          f"{len(stages) - built} cached)")
    for name, s in stages.items():
        profiles = s.get("profiles") or ["all"]
        more = f"; profiles {', '.join(profiles)}" if len(profiles) > 1 else ""
        engines = f", {s['engines']} engines" if s.get("engines", 1) > 1 else ""
        given = f", weights as inputs: {_size(s['weight_input_bytes'])}" if s.get("weight_input_bytes") else ""
        print(f"  {name}: {s['plan']} ({s['status']}, {_size(s['plan_bytes'])}{engines}{given}{more})")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"
