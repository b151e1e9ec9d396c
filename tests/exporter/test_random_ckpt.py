"""Random-weight checkpoints of any shape: LISA's layout, loadable by `load_checkpoint`, written a tensor at a time."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from safetensors import safe_open

from exporter import random_ckpt
from exporter.checkpoint import build_meta, load_checkpoint
from exporter.random_ckpt import write_random_checkpoint, write_safetensors
from exporter.tiny import CLIP_SUBDIR, tiny_shape
from graphs.checkpoint_config import read_checkpoint_config
from tests.cli_io import call, error_lines
from tools import cli


@pytest.fixture(autouse=True)
def only_make_tiny(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"make-tiny": "tools.make_tiny"})


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny-shape fp32 random checkpoint, sharded at 200 kB (8 LISA shards)."""
    return write_random_checkpoint(tiny_shape(), tmp_path_factory.mktemp("rand") / "ckpt", dtype="fp32",
                                   shard_bytes=200_000)


def test_loads_with_the_shapes_of_its_config(sharded):
    assert read_checkpoint_config(sharded).shape == tiny_shape()
    loaded = load_checkpoint(sharded)
    want = {k: v.shape for k, v in build_meta(tiny_shape()).state_dict().items()}
    assert {k: v.shape for k, v in loaded.model.state_dict().items()} == want
    m = loaded.model
    assert torch.all(m.llm.model.norm.weight == 1) and torch.all(m.sam.vision_encoder.neck.layer_norm1.weight == 1)
    assert torch.all(m.mm_projector.bias == 0)
    assert 0.015 < float(m.llm.model.layers[0].mlp.up_proj.weight.detach().std()) < 0.025


def test_hf_layout(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert len(shards) > 1
    for s in shards:  # full up to 200 kB; a bigger tensor gets a shard of its own
        with safe_open(str(sharded / s), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        nbytes = sum(4 * torch.Size(size).numel() for size in sizes)
        assert nbytes <= 200_000 or len(sizes) == 1, (s, nbytes, len(sizes))
    assert index["metadata"]["total_size"] == sum(
        t.numel() * 4 for k, t in build_meta(tiny_shape()).state_dict().items()
        if not k.startswith("vision_tower.") and "shared_image_embedding" not in k)
    clip = sharded / CLIP_SUBDIR
    assert {p.name for p in clip.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json"}
    assert json.loads((clip / "config.json").read_text())["architectures"] == ["CLIPVisionModel"]
    assert json.loads((sharded / "config.json").read_text())["torch_dtype"] == "float32"


def test_fp16_is_stored_in_fp16_and_deterministic(tmp_path):
    a = write_random_checkpoint(tiny_shape(), tmp_path / "a", seed=3)
    b = write_random_checkpoint(tiny_shape(), tmp_path / "b", seed=3)
    with safe_open(str(a / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / "config.json").read_text())["torch_dtype"] == "float16"


def test_one_tensor_alive_at_a_time(tmp_path, monkeypatch):
    made = []
    original = random_ckpt._random_tensor

    def tracked(*args, **kw):
        assert sum(r() is not None for r in made) == 0, "a tensor outlived its write"
        t = original(*args, **kw)
        made.append(weakref.ref(t))
        return t

    monkeypatch.setattr(random_ckpt, "_random_tensor", tracked)
    write_random_checkpoint(tiny_shape(), tmp_path / "c", dtype="fp32")
    assert len(made) == len(build_meta(tiny_shape()).state_dict()) - 1  # the shared SAM tensor is stored once


def test_safetensors_writer_round_trips(tmp_path):
    tensors = {"b": torch.randn(3, 5), "a": torch.arange(7, dtype=torch.float32), "s": torch.tensor(2.5)}
    path = write_safetensors(tmp_path / "x.safetensors",
                             {k: (tuple(v.shape), lambda size, v=v: v) for k, v in tensors.items()}, torch.float32)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)


def test_cli_shape_flag(tmp_path):
    rc, out, err = call(["make-tiny", str(tmp_path / "small"), "--shape", "small"])
    assert rc == 0, err
    assert "random-weight small LISA checkpoint (fp16" in out
    assert read_checkpoint_config(tmp_path / "small").shape.llm.hidden == 512


@pytest.mark.parametrize("argv, needle", [
    (["--shape", "small", "--layers", "2"], "--layers: sizes and formats apply to the tiny checkpoint"),
    (["--shape", "small", "--format", "bin"], "--format: sizes and formats apply to the tiny checkpoint"),
    (["--dtype", "fp16"], "--dtype applies to --shape checkpoints"),
])
def test_cli_rejects_mixed_flags(tmp_path, argv, needle):
    rc, _, err = call(["make-tiny", str(tmp_path / "x"), *argv])
    assert rc == 2
    assert any(needle in line for line in error_lines(err)), err
    assert not (tmp_path / "x").exists()
