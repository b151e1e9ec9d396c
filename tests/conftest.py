"""Markers: `gpu` skips without CUDA, `trt` skips without TensorRT or TensorRT-RTX."""

from __future__ import annotations

import functools
import importlib.util

import pytest


@functools.lru_cache(maxsize=None)
def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def has_tensorrt() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_rtx_bindings", "tensorrt_rtx"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not has_cuda():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "trt" in item.keywords and not has_tensorrt():
            item.add_marker(pytest.mark.skip(reason="needs TensorRT or TensorRT-RTX"))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Path of a `csprt make-tiny` checkpoint (default options), written once per session. Treat as read-only."""
    from exporter.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_ckpt") / "tiny")
