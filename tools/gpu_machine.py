"""`tools.gpu_check`'s machine record: GPU, compute capability, driver, torch, CUDA, TensorRT, package versions,
whether every csprt module imports, and which `csprt bench` options exist.

The package list is derived from pyproject.toml's pins (every group), so it cannot drift from what csprt
declares; each entry says the pinned and the installed version.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("exporter", "engines", "graphs", "tools")
EXTRA_PACKAGES = ("tensorrt", "pip")  # used when present, pinned nowhere
_PIN = re.compile(r'"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^";\s]+)"')

# Run in a subprocess: a module that fails to import (a missing wheel, an API gone from transformers) must
# not take the check down with it.
IMPORT_CHECK = """
import importlib, json, sys
failed = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException as exc:  # noqa: BLE001  SystemExit from a module counts as a failure too
        failed[name] = f"{type(exc).__name__}: {exc}"[:500]
print(json.dumps(failed))
"""


def pinned_packages(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """{distribution name: pinned version} of every `name==version` in pyproject.toml."""
    return {name.lower(): ver for name, ver in _PIN.findall(pyproject.read_text(encoding="utf-8"))}


def package_versions(pins: dict[str, str]) -> dict[str, dict]:
    """{name: {"pinned", "installed"}} for the pins and `EXTRA_PACKAGES` (installed None: not installed)."""
    out = {}
    for name in [*pins, *EXTRA_PACKAGES]:
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        out[name] = {"pinned": pins.get(name), "installed": installed}
    return out


def csprt_modules(root: Path = ROOT) -> list[str]:
    """Every module of csprt's packages, e.g. "engines.trt_runner" (derived from the files)."""
    mods = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            package = all((root / Path(*rel.parts[:i]) / "__init__.py").is_file() for i in range(1, len(rel.parts)))
            if package and rel.name != "__main__":  # not a package: e.g. engines/triton_bls, a model Triton loads
                mods.append(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
    return mods


def import_check(timeout: float = 120.0) -> dict:
    """{"modules": n, "failed": {module: error}} from importing every csprt module in a fresh interpreter."""
    mods = csprt_modules()
    try:
        proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK, *mods], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
        failed = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
            "*": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]}
    except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        failed = {"*": f"{type(exc).__name__}: {exc}"}
    return {"modules": len(mods), "failed": failed}


def bench_options() -> dict:
    """Which optional `csprt bench` flags exist here: {"batch": bool, "cuda_graphs": bool} (read from its parser)."""
    import argparse

    from tools import bench

    sub = argparse.ArgumentParser().add_subparsers()
    bench.add_parser(sub, "bench")
    flags = {s for a in sub.choices["bench"]._actions for s in a.option_strings}
    return {"batch": "--batch" in flags, "cuda_graphs": "--cuda-graphs" in flags}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def torch_record() -> tuple[dict, dict | None]:
    """({"version", "cuda", "cudnn", "cuda_available", "problem"}, gpu record or None)."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return {"version": None, "cuda": None, "cudnn": None, "cuda_available": False,
                "problem": f"torch does not import: {exc}"}, None
    avail = torch.cuda.is_available()
    rec = {"version": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if avail else None, "cuda_available": avail,
           "problem": None if avail else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"}
    if not avail:
        return rec, None
    major, minor = torch.cuda.get_device_capability()
    props = torch.cuda.get_device_properties(0)
    gpu = {"name": torch.cuda.get_device_name(0), "compute_capability": f"SM{major}{minor}",
           "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
           "driver": _driver()}
    return rec, gpu


def tensorrt_record(gpu: dict | None) -> dict:
    """{"flavor", "version", "targets", "gpu_listed", "problem"}: the TensorRT here and whether it lists this GPU."""
    from engines.trt import load_trt
    from graphs.errors import ToolchainError

    try:
        trt, flavor, ver = load_trt()
    except ToolchainError as exc:
        return {"flavor": None, "version": None, "targets": [], "gpu_listed": None, "problem": str(exc)}
    targets = []
    if flavor == "tensorrt-rtx":
        from engines.build import targetable

        targets = list(targetable(trt))
    listed = None if gpu is None or flavor != "tensorrt-rtx" else gpu["compute_capability"] in targets
    return {"flavor": flavor, "version": ver, "targets": targets, "gpu_listed": listed, "problem": None}


def machine_record() -> dict:
    """Everything `gpu_check` records about the machine (see graphs/gpu_check.schema.json, "machine")."""
    torch_rec, gpu = torch_record()
    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu(),
        "cpu_cores": os.cpu_count() or 1, "gpu": gpu, "torch": torch_rec, "tensorrt": tensorrt_record(gpu),
        "packages": package_versions(pinned_packages()), "csprt_imports": import_check(),
        "bench_options": bench_options(),
    }
