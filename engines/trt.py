"""One import shim for TensorRT and TensorRT-RTX, as Polygraphy's `POLYGRAPHY_USE_TENSORRT_RTX` does, per call.

    trt, flavor, version = load_trt("auto")   # "auto": tensorrt if it imports, else tensorrt-rtx

    flavor         module                  where it comes from
    tensorrt       tensorrt                data-center TensorRT (NVIDIA's wheels; needs a GPU host to install here)
    tensorrt-rtx   tensorrt_rtx            TensorRT-RTX SDK wheels
                   tensorrt_rtx_bindings   PyPI tensorrt-rtx-cu13-bindings (it loads tensorrt-rtx-cu13-libs itself)

Both expose the same `Builder` / `OnnxParser` / `Runtime` API. TensorRT-RTX builds engines without a
GPU, ahead of time for chosen compute capabilities; running any engine needs a GPU. The probe is
cached; `clear_cache()` forgets it (tests). Polygraphy (POLYGRAPHY_USE_TENSORRT_RTX=1) imports only the
name `tensorrt_rtx`, so it does not find the PyPI wheel's `tensorrt_rtx_bindings`.
"""

from __future__ import annotations

import functools
import importlib

from graphs.errors import ToolchainError

FLAVORS = ("tensorrt", "tensorrt-rtx")
CHOICES = ("auto", *FLAVORS)
MODULES = {"tensorrt": ("tensorrt",), "tensorrt-rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}
PRETTY = {"tensorrt": "TensorRT", "tensorrt-rtx": "TensorRT-RTX"}
INSTALL_HINT = ("pip install tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116 "
                "(or 'csprt[trt]'), or tensorrt on a data-center GPU host")

_import_module = importlib.import_module  # tests replace this to simulate a host without TensorRT


@functools.lru_cache(maxsize=None)
def _probe(flavor: str) -> tuple:
    """(module, version, "") for the first module of `flavor` that imports, else (None, "", why not)."""
    reasons = []
    for name in MODULES[flavor]:
        try:
            module = _import_module(name)
        except ImportError as exc:
            if getattr(exc, "name", None) != name:  # the module exists but a library it needs does not load
                reasons.append(f"{name}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001  e.g. the PyPI `tensorrt` stub failing to fetch its wheel
            reasons.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        return module, str(getattr(module, "__version__", "unknown")), ""
    return None, "", "; ".join(reasons)


def load_trt(flavor: str = "auto"):
    """Import TensorRT or TensorRT-RTX.

    Args:
        flavor (str): "auto" (tensorrt, then tensorrt-rtx), "tensorrt" or "tensorrt-rtx". Defaults to "auto".

    Returns:
        tuple: (module, flavor, version), e.g. (tensorrt_rtx_bindings, "tensorrt-rtx", "1.7.1.116").

    Raises:
        ToolchainError: an unknown flavor, or the flavor is not installed (the message names the packages).
    """
    if flavor not in CHOICES:
        raise ToolchainError(f"unknown TensorRT flavor {flavor!r}; choose one of: {', '.join(CHOICES)}")
    tried = FLAVORS if flavor == "auto" else (flavor,)
    reasons = []
    for name in tried:
        module, version, why = _probe(name)
        if module is not None:
            return module, name, version
        if why:
            reasons.append(why)
    what = "TensorRT is not installed" if flavor == "auto" else f"{PRETTY[flavor]} is not installed"
    detail = f" (found but failed to load: {'; '.join(reasons)})" if reasons else ""
    raise ToolchainError(f"{what}{detail}; {INSTALL_HINT}")


def available_flavors() -> tuple[str, ...]:
    """The flavors that import here, in "auto" order."""
    return tuple(f for f in FLAVORS if _probe(f)[0] is not None)


def clear_cache() -> None:
    """Forget the cached probe (after installing TensorRT in-process, or in tests)."""
    _probe.cache_clear()


# CUDA probes a GPU-less TensorRT-RTX build makes and logs as errors; they do not affect the plan.
NO_GPU_NOISE = ("cudaError 35", "CUDA driver version is insufficient", "cudaError 100", "no CUDA-capable device")


class CaptureLogger:
    """`logger(trt)`: a TensorRT ILogger that keeps warnings and errors instead of printing them."""

    def __new__(cls, trt):
        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages: list[tuple[int, str]] = []  # (severity: 0 internal error .. 2 warning, text)

            def log(self, severity, msg):
                if int(severity) <= int(trt.ILogger.Severity.WARNING):
                    self.messages.append((int(severity), str(msg)))

            def errors(self) -> list[str]:
                errs = [m for s, m in self.messages if s <= int(trt.ILogger.Severity.ERROR)]
                real = [m for m in errs if not any(n in m for n in NO_GPU_NOISE)]
                return real or errs

        return _Logger()
