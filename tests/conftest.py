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
    """Path of a `csprt make-tiny` checkpoint (default options: LISA v1's published format, SentencePiece tokenizer,
    `.bin` shards, CLIP embedded), written once per session. Treat as read-only."""
    from exporter.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_ckpt_st(tmp_path_factory):
    """csprt's earlier tiny layout, for tests that edit weight files: fp32 `model.safetensors`, a byte-level BPE
    tokenizer.json and CLIP in `vision_tower/` (named by a relative mm_vision_tower). Treat as read-only."""
    from exporter.tiny import TinyOptions, make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_ckpt_st") / "tiny",
                     TinyOptions(format="safetensors", tokenizer="bpe", clip="local", weights="fp32"))


@pytest.fixture(scope="session")
def export_tiny(tiny_ckpt, tmp_path_factory):
    """`export_tiny(schedule="csp", mode="both", precision="fp32") -> Path`: an artifact of `tiny_ckpt`,
    exported once per session (stages shared through one graph cache). Treat as read-only; copy to modify."""
    from exporter.export import ExportOptions, export_artifact
    from graphs.checkpoint_config import read_checkpoint_config
    from graphs.schedule import resolve

    cache_dir = tmp_path_factory.mktemp("graph_cache")
    shape = read_checkpoint_config(tiny_ckpt).shape
    made = {}

    def export(schedule: str = "csp", mode: str = "both", precision: str = "fp32"):
        key = (schedule, mode, precision)
        if key not in made:
            out = tmp_path_factory.mktemp(f"art_{schedule}_{mode}_{precision}") / "art"
            export_artifact(tiny_ckpt, resolve(schedule, shape.llm.layers, shape.num_image_tokens), out,
                            ExportOptions(mode=mode, precision=precision, cache_dir=str(cache_dir)))
            made[key] = out
        return made[key]

    return export
