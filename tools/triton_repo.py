"""`csprt triton-repo`: a native Triton model repository for an artifact (one model per stage + a BLS orchestrator).

    csprt triton-repo ART --out REPO [--backend onnxruntime|tensorrt] [--flavor tensorrt|tensorrt-rtx]
                      [--name csprt] [--instances N] [--max-batch-size N] [--max-queue-delay-us US]
                      [--device gpu|cpu] [--link] [--image-cache-mb MB]

Stage models run the artifact's ONNX graphs (onnxruntime_onnx) or its `csprt build` engines
(tensorrt_plan; a block built in pieces is one model per piece, run in order); the BLS model (Python
backend, csprt installed there) takes `image` + `query` and returns `mask_png`, `masks_packed`,
`masks_shape`, `answer`, `generated_ids` and `timings`, the tensors of `csprt serve` (so
tools/triton_client.py works with both). Serve it with `tritonserver --model-repository REPO`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engines.triton_repo import BACKENDS, TRT_FLAVORS, write_triton_repo
from graphs.triton_config import KINDS


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help="write a Triton model repository for an artifact",
                              description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path, help="artifact directory (from csprt export; csprt build for tensorrt)")
    p.add_argument("--out", type=Path, required=True, metavar="REPO",
                   help="repository directory: new, empty, or one csprt triton-repo wrote (it is replaced)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="stage models: onnxruntime (the ONNX graphs) or tensorrt (the engines of csprt build). "
                        "Defaults to onnxruntime")
    p.add_argument("--flavor", choices=TRT_FLAVORS,
                   help="--backend tensorrt: tensorrt engines for stock Triton, or tensorrt-rtx engines for a Triton "
                        "with a TensorRT-RTX backend (backends/tensorrt_rtx). Defaults to tensorrt")
    p.add_argument("--name", help="the BLS model's name; stage models are NAME_<stage> (NAME_<stage>_p<k> for the "
                                  "engine pieces of a block built in pieces). Defaults to csprt")
    p.add_argument("--instances", type=int, metavar="N",
                   help="instances of every model (each stage instance holds its own weights). Defaults to 1")
    p.add_argument("--max-batch-size", type=int, metavar="N",
                   help="the BLS model's max_batch_size: how many one-image requests Triton's dynamic batcher "
                        "groups into one batched pipeline call, at most the artifact's exported maximum (csprt export "
                        "--max-batch); 0 for no batch axis (clients send [1] instead of [1, 1]). Defaults to 8, or "
                        "the exported maximum if lower, as csprt serve")
    p.add_argument("--max-queue-delay-us", type=int, metavar="US",
                   help="the BLS model's dynamic batcher: how long it may hold a request to fill a batch, in "
                        "microseconds. Defaults to 2000, as csprt serve")
    p.add_argument("--device", choices=tuple(KINDS),
                   help="stage model instances on gpu or cpu (cpu: onnxruntime only). Defaults to gpu")
    p.add_argument("--image-cache-mb", type=int, metavar="MB",
                   help="the BLS model's image cache per instance (each Python-backend instance is a process): "
                        "encodings kept for further questions about the same image; 0 turns it off. Defaults to 512")
    p.add_argument("--link", action="store_true", default=None,
                   help="hard-link model files from the artifact instead of copying (same filesystem only)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    given = {k: getattr(args, k) for k in ("backend", "flavor", "name", "instances", "max_batch_size", "device",
                                           "link", "image_cache_mb", "max_queue_delay_us") if getattr(args, k) is not None}
    progress = lambda msg: print(f"[csprt] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    report = write_triton_repo(args.artifact, args.out, progress=progress, **given)
    trt = f" ({report['flavor']} {report['trt_version']})" if report["trt_version"] else ""
    models = report["stage_models"]  # stage -> its model, or its piece models (a block built in pieces)
    pieces = {stage: len(m) for stage, m in models.items() if isinstance(m, list)}
    split = "".join(f"; {stage} as {n} piece models" for stage, n in pieces.items())
    print(f"triton repository: {report['repo']} ({report['backend']}{trt}; BLS model {report['bls_model']!r}, "
          f"{len(models) - len(pieces) + sum(pieces.values())} stage models{split})")
    print(f"  serve: tritonserver --model-repository {report['repo']}  (csprt must be installed for its Python backend)")
    return 0
