"""`csprt export --quantize ...`: the flags, their checks before any work, and the pass after the float export."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from graphs.errors import InputError
from graphs.quantize import ACCURACY_LEVELS, BLOCK_SIZES, FORMATS, METHODS, QuantOptions

QUANT_FLAGS = ("quantize", "quantize_format", "quantize_block_size", "quantize_accuracy_level", "calibration")


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization (the LLM blocks llm_<i>; see docs/artifact.md)")
    g.add_argument("--quantize", choices=METHODS, default=None,
                   help="int8, int4-wo (weight-only) or fp8 (TensorRT, SM89+) weights in the decoder blocks. "
                        "Defaults to none (float).")
    g.add_argument("--quantize-format", choices=FORMATS, default=None,
                   help="ort: ONNX Runtime's CPU ops (int8: MatMulInteger, int4-wo: MatMulNBits); qdq: "
                        "QuantizeLinear/DequantizeLinear graphs that TensorRT builds (and ONNX Runtime runs), made "
                        "by ONNX Runtime's quantizer (int4-wo round to nearest); modelopt: the same kind of graphs "
                        "made by NVIDIA ModelOpt (int4-wo: AWQ-clip; int8/fp8 calibrated; runs in .venv-modelopt, "
                        "see .ci/setup-modelopt). Defaults to ort for int8 and int4-wo, qdq for fp8.")
    g.add_argument("--quantize-block-size", type=int, choices=BLOCK_SIZES, default=None,
                   help="int4-wo: weights per scale along K. Defaults to 32.")
    g.add_argument("--quantize-accuracy-level", type=int, choices=ACCURACY_LEVELS, default=None,
                   help="int4-wo ort: MatMulNBits compute type (1 fp32, 2 fp16, 3 bf16, 4 int8). Defaults to 4.")
    g.add_argument("--calibration", type=Path, default=None,
                   help='qdq int8 and fp8, every modelopt method: a calibration set, JSON {"format": '
                        '"csprt.calibration", "samples": '
                        '[{"image": PATH, "query": TEXT}, ...]}. Defaults to the built-in set (6 prompts, 4 images).')


def quantize_options(args: argparse.Namespace) -> QuantOptions:
    """The checked options (before any export work): one line naming the fix for a combination that cannot work."""
    given = {k: v for k, v in (("format", args.quantize_format), ("block_size", args.quantize_block_size),
                               ("accuracy_level", args.quantize_accuracy_level)) if v is not None}
    opts = QuantOptions(method=args.quantize or "none",
                        calibration=str(args.calibration) if args.calibration else None, **given).resolved()
    if opts.method == "none":
        extra = [f"--{k.replace('_', '-')}" for k in QUANT_FLAGS[1:] if getattr(args, k, None) is not None]
        if extra:
            raise InputError(f"{', '.join(extra)} given without --quantize: add --quantize int8|int4-wo|fp8")
        return opts
    from graphs.quantize import check_precision

    check_precision(opts, args.precision)
    if opts.needs_calibration and args.trace_only:
        raise InputError(f"--quantize {opts.method} --quantize-format {opts.format} calibrates by running the model, "
                         f"which --trace-only does not: drop --trace-only, or use round-to-nearest weight-only int4 "
                         f"(--quantize int4-wo --quantize-format qdq)")
    if opts.calibration is not None and not opts.needs_calibration:
        raise InputError(f"--calibration: --quantize {opts.method} --quantize-format {opts.format} takes no "
                         f"calibration (qdq int8 and fp8 and every modelopt method calibrate); drop --calibration")
    if opts.format == "modelopt":
        from graphs.quantize_modelopt import modelopt_version

        modelopt_version()  # its environment is there and imports, before the export's minutes of work
    if opts.needs_calibration:
        from graphs.quantize import load_calibration

        load_calibration(opts.calibration)  # a corrupt or empty set fails now, not after the export
    return opts


def quantize_after_export(art: Path, opts: QuantOptions, say: Callable[[str], None]) -> None:
    """The post-export pass: calibrate on the float artifact (qdq int8 / fp8), then quantize its LLM blocks."""
    if opts.method == "none":
        return
    from engines.calibration import calibration_feeds
    from graphs.quantize import quantize_artifact

    quantize_artifact(art, opts, calibrate=lambda cal, stages: calibration_feeds(art, cal, stages, say), progress=say)
