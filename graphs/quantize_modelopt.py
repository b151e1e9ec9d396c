"""`--quantize-format modelopt`: NVIDIA ModelOpt's ONNX quantizer makes the Q/DQ graphs TensorRT takes, run in an
environment of its own.

    csprt (this module)                                 .venv-modelopt (graphs/modelopt_worker.py, one process)
    per llm_<i>: the float graph, prepared (weights
    loaded, Gemm -> MatMul, value_info dropped), one
    .npz per calibration feed; jobs.json   --subprocess-->  modelopt.onnx.quantization.quantize(..., calibration_eps
                                                        ["cpu"]) per graph: int8 / fp8 (Q/DQ on the weight MatMuls,
                                                        weights stored quantized) or int4 (AWQ-clip, blocked
                                                        DequantizeLinear)
    graphs/quantize.py installs each graph   <--  <stage>/<graph> (+ .data), one JSON line per graph done

Why a subprocess: nvidia-modelopt 0.47.0's ONNX extra needs onnx ~1.21 and onnxruntime(-gpu) ~1.24, and csprt pins
onnx 1.23.2 and onnxruntime 1.31.1 (every 0.37-0.47 release asks the same of older ones), so the two cannot share an
environment. `.ci/setup-modelopt` makes it (pinned in requirements-modelopt.txt); CSPRT_MODELOPT_PYTHON names
another interpreter that has it. Memory: ModelOpt holds whole block graphs (like ONNX Runtime's quantize_static)
and, for AWQ, every calibration sample's activations at each weight's input; the streamed methods
(graphs/quantize_stream.py) hold one weight.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from graphs.errors import ToolchainError

ENV_VAR = "CSPRT_MODELOPT_PYTHON"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PYTHON = ROOT / ".venv-modelopt" / "bin" / "python"
WORKER = Path(__file__).with_name("modelopt_worker.py")
MODES = {"int8": "int8", "fp8": "fp8", "int4-wo": "int4"}
# ModelOpt's calibration algorithm per method: its own default for int8 (entropy) and int4 (AWQ-clip: per block,
# the clipping ratio whose quantized output best matches the float one on the calibration activations); max for
# fp8, where e4m3's range makes outlier clipping unnecessary (ModelOpt's FP8 recipe)
ALGORITHMS = {"int8": "entropy", "fp8": "max", "int4-wo": "awq_clip"}
_FIX = (f"make it with `bash .ci/setup-modelopt` (pinned in requirements-modelopt.txt; ~1 minute), or set {ENV_VAR} "
        f"to a Python that has nvidia-modelopt[onnx] 0.47.0 without cupy")


def modelopt_python() -> str:
    """The ModelOpt environment's interpreter: $CSPRT_MODELOPT_PYTHON, else the repository's .venv-modelopt."""
    given = os.environ.get(ENV_VAR)
    path = Path(given) if given else DEFAULT_PYTHON
    if not path.is_file():
        where = f"{ENV_VAR}={given}" if given else str(DEFAULT_PYTHON)
        raise ToolchainError(f"--quantize-format modelopt runs NVIDIA ModelOpt in its own environment (its onnx and "
                             f"onnxruntime pins conflict with csprt's), and {where} does not exist: {_FIX}")
    return str(path)


def _clean_env() -> dict[str, str]:
    """The caller's environment without csprt's own Python paths (the worker must see only its environment)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def modelopt_version() -> str:
    """nvidia-modelopt's version in its environment (read from its metadata: importing ModelOpt takes seconds); a
    ToolchainError naming the fix when the environment or the package is missing. `csprt export` and `csprt bench`
    call this before any work; the manifest records the version the worker reports."""
    python = modelopt_python()
    probe = "import importlib.metadata as m; print(m.version('nvidia-modelopt'))"
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=_clean_env())
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ToolchainError(f"{python} has no NVIDIA ModelOpt ({last}): {_FIX}")
    return proc.stdout.strip().splitlines()[-1]


def row_axes(inputs: list[dict]) -> dict[str, list[int]]:
    """{input: its axes over the block's rows} from a manifest stage's input specs (dims named rows_<stage>)."""
    return {i["name"]: [a for a, d in enumerate(i["shape"]) if isinstance(d, str) and d.startswith("rows_")]
            for i in inputs}


def uniform_rows(feeds: list[dict], axes: dict[str, list[int]]) -> list[dict]:
    """`feeds` padded on the right to one row count, the way a batch pads its requests: float rows 0, integer rows
    repeat the last (positions), `row_lens` keeps each sample's real rows.

    ModelOpt's AWQ concatenates every sample's activations into one array, so their shapes must agree; a padded
    row is masked out of the real rows' attention, and its own activations (small, attention-mixed) are the only
    trace it leaves in the statistics.
    """
    rows = {len(set(f[name].shape[a] for f in feeds)) for name, ax in axes.items() for a in ax}
    if rows <= {1}:
        return feeds
    target = {(name, a): max(f[name].shape[a] for f in feeds) for name, ax in axes.items() for a in ax}
    out = []
    for f in feeds:
        g = dict(f)
        for (name, a), n in target.items():
            pad = [(0, 0)] * f[name].ndim
            pad[a] = (0, n - f[name].shape[a])
            g[name] = (np.pad(g[name], pad) if np.issubdtype(g[name].dtype, np.floating)
                       else np.pad(g[name], pad, mode="edge"))
        out.append(g)
    return out


@dataclass(frozen=True)
class Block:
    """One graph to quantize: its float graph (weights beside it), its calibration feeds and input row axes."""

    graph: Path
    feeds: list
    axes: dict


def quantize_graphs_modelopt(blocks: dict[str, Block], work: Path, opts, precision: str,
                             done: Callable[[str, dict], None] | None = None) -> dict[str, Path]:
    """Quantize each block's float graph with ModelOpt, in one worker process; returns {stage: Q/DQ graph}, each
    `work/<stage>/<graph name>` with its weights in `<graph name>.data` beside it.

    Args:
        blocks (dict[str, Block]): by stage name.
        work (Path): an empty directory on the artifact's filesystem (the results are renamed into place).
        opts (QuantOptions): resolved, format "modelopt".
        precision (str): the artifact's float precision ("fp32" or "fp16"): the Q/DQ graphs keep it.
        done (callable | None): (stage, {"modelopt": version, "quantized_nodes": n}) as each graph finishes.
    """
    import onnx

    from graphs.quantize import prepared_graph

    python = modelopt_python()
    jobs, out = [], {}
    for name, block in blocks.items():
        stage_dir = work / name
        stage_dir.mkdir(parents=True)
        model, nodes = prepared_graph(block.graph)
        prepared = stage_dir / "float" / "float.onnx"
        prepared.parent.mkdir()
        onnx.save_model(model, str(prepared), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="float.onnx.data", size_threshold=1024)
        del model
        feeds = uniform_rows(block.feeds, block.axes) if opts.method == "int4-wo" else block.feeds
        paths = []
        for i, feed in enumerate(feeds):
            paths.append(str(stage_dir / "float" / f"feed_{i:03d}.npz"))
            np.savez(paths[-1], **feed)
        out[name] = stage_dir / block.graph.name
        jobs.append({"stage": name, "model": str(prepared), "output": str(out[name]), "mode": MODES[opts.method],
                     "calibration_method": ALGORITHMS[opts.method], "block_size": opts.block_size,
                     "high_precision_dtype": precision, "nodes": nodes, "feeds": paths})
    (work / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    with open(work / "stderr.txt", "w+", encoding="utf-8") as err:
        proc = subprocess.Popen([python, str(WORKER), str(work / "jobs.json")], stdout=subprocess.PIPE, stderr=err,
                                text=True, cwd=work, env=_clean_env())
        finished = []
        for line in proc.stdout:
            report = _report_line(line)
            if report is not None and report.get("stage") in out:
                finished.append(report["stage"])
                _rename_data(out[report["stage"]])
                shutil.rmtree(out[report["stage"]].parent / "float")  # the prepared copy: its disk back now
                if done:
                    done(report["stage"], report)
        proc.wait()
        err.seek(0)
        tail = "\n".join(err.read().strip().splitlines()[-12:])
    if proc.returncode != 0 or len(finished) != len(jobs):
        failed = next((j["stage"] for j in jobs if j["stage"] not in finished), "?")
        raise ToolchainError(f"NVIDIA ModelOpt ({python}) failed to quantize {failed} ({opts.method}); the export "
                             f"stops here. ModelOpt said:\n{tail}")
    return out


def _report_line(line: str) -> dict | None:
    """The worker's per-graph JSON line, or None for anything else ModelOpt prints to stdout."""
    try:
        report = json.loads(line) if line.startswith("{") else None
    except json.JSONDecodeError:
        return None
    return report if isinstance(report, dict) else None


def _rename_data(graph: Path) -> None:
    """ModelOpt names a graph's data file `<graph>_data`; csprt's artifacts name it `<graph>.data` (the location
    every tensor records, checked by onnx_passes.save_with_external_data): rename the file and the references."""
    import onnx

    from graphs.onnx_passes import external_data_locations, iter_tensors

    want = graph.name + ".data"
    model = onnx.load(str(graph), load_external_data=False)
    locations = sorted(external_data_locations(model))
    if locations in ([], [want]):
        return
    if len(locations) != 1:
        raise ToolchainError(f"NVIDIA ModelOpt wrote {graph.name}'s weights to several files ({', '.join(locations)}); "
                             f"csprt expects one")
    os.replace(graph.with_name(locations[0]), graph.with_name(want))
    for t in iter_tensors(model):
        for e in t.external_data:
            if e.key == "location":
                e.value = want
    onnx.save(model, str(graph))
