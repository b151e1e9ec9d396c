"""Runs inside the ModelOpt environment only (`.venv-modelopt`, made by `.ci/setup-modelopt`), never in csprt's own.

    <modelopt python> graphs/modelopt_worker.py JOBS.json

nvidia-modelopt's ONNX quantizer needs onnx ~1.21 and onnxruntime(-gpu) ~1.24, which conflict with csprt's pins
(onnx 1.23.2, onnxruntime 1.31.1), so csprt runs it as a subprocess in an environment of its own
(graphs/quantize_modelopt.py writes the job and reads the result). This file imports only that environment's
packages and the standard library: csprt is not importable here.

JOBS.json: a list, one job per graph (one process for all of them: importing ModelOpt takes seconds), each
{"stage": name, "model": prepared float graph (weights beside it), "output": where the Q/DQ graph goes,
"mode": "int8"|"fp8"|"int4", "calibration_method": str, "block_size": int, "high_precision_dtype": "fp32"|"fp16",
"nodes": [names of the MatMuls to quantize], "feeds": [npz files, one calibration sample each]}.
It prints one JSON line per graph done: {"stage": name, "modelopt": version, "quantized_nodes": n}.
"""

from __future__ import annotations

import json
import re
import sys


class _Feeds:
    """ONNX Runtime's CalibrationDataReader protocol, plus what ModelOpt also calls: get_first/rewind (int8,
    fp8) and iteration (AWQ)."""

    def __init__(self, feeds: list[dict]):
        self._feeds = feeds
        self._i = 0

    def get_next(self):
        if self._i >= len(self._feeds):
            return None
        self._i += 1
        return self._feeds[self._i - 1]

    def get_first(self):
        return self._feeds[0]

    def rewind(self):
        self._i = 0

    def __len__(self):
        return len(self._feeds)

    def __iter__(self):  # ModelOpt's AWQ iterates the reader
        return iter(self._feeds)

    def set_range(self, start: int, end: int):
        self._feeds = self._feeds[start:end]
        self._i = 0


def _quantize(job: dict, quantize, np, onnx) -> int:
    """One graph: returns how many DequantizeLinear nodes its Q/DQ graph has."""
    feeds = []
    for path in job["feeds"]:
        with np.load(path) as z:
            feeds.append({k: z[k] for k in z.files})
    kwargs = {}
    if job["mode"] == "int4":
        kwargs["block_size"] = job["block_size"]
    else:
        # the MatMuls whose B is a weight, by exact name (ModelOpt reads these as regular expressions); weights are
        # stored quantized (DequantizeLinear only on them), activations get a calibrated Q/DQ pair
        kwargs.update(op_types_to_quantize=["MatMul"], nodes_to_quantize=[f"^{re.escape(n)}$" for n in job["nodes"]],
                      high_precision_dtype=job["high_precision_dtype"], dq_only=True)
    quantize(job["model"], quantize_mode=job["mode"], calibration_method=job["calibration_method"],
             calibration_data_reader=_Feeds(feeds), calibration_eps=["cpu"], use_external_data_format=True,
             output_path=job["output"], log_level="ERROR", **kwargs)
    model = onnx.load(job["output"], load_external_data=False)
    return sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear")


def main(jobs_path: str) -> int:
    import importlib.metadata
    import logging

    import numpy as np
    import onnx
    from modelopt.onnx.quantization import quantize

    # ModelOpt's quantizers log each phase at INFO through their own and the root logger; csprt reports per stage
    logging.getLogger().setLevel(logging.ERROR)
    version = importlib.metadata.version("nvidia-modelopt")
    for job in json.loads(open(jobs_path, encoding="utf-8").read()):
        quantized = _quantize(job, quantize, np, onnx)
        print(json.dumps({"stage": job["stage"], "modelopt": version, "quantized_nodes": quantized}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
