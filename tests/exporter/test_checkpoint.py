"""Saving and loading LISA checkpoints: every HF weight layout, and one clear error per broken input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from exporter import keys
from graphs.preprocessing import default_clip_processor_config
from exporter.checkpoint import (
    FORMATS, all_finite, build_random, find_weight_files, load_checkpoint, save_checkpoint,
)
from exporter.model import LisaModel
from exporter.tiny import CLIP_SUBDIR, tiny_shape
from graphs.errors import CheckpointError

_NON_WEIGHT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def loaded(tiny_ckpt_st):
    return load_checkpoint(tiny_ckpt_st)


def _clone_without_weights(src: Path, dst: Path) -> Path:
    """A checkpoint dir with src's config and tokenizer and no weights; CLIP stays in src."""
    dst.mkdir(parents=True)
    for name in _NON_WEIGHT_FILES:
        shutil.copy(src / name, dst / name)
    return dst


def _with_state(tiny_ckpt_st: Path, dst: Path, edit) -> Path:
    """A copy of the tiny checkpoint whose LISA state dict was changed by `edit(state)`."""
    state = load_file(str(tiny_ckpt_st / "model.safetensors"))
    edit(state)
    _clone_without_weights(tiny_ckpt_st, dst)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def _load(path: Path, tiny_ckpt_st: Path, **kw):
    return load_checkpoint(path, vision_tower=tiny_ckpt_st / CLIP_SUBDIR, **kw)


def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_loaded_weights_equal_the_saved_files(tiny_ckpt_st, loaded):
    on_disk = load_file(str(tiny_ckpt_st / "model.safetensors"))
    _assert_same_tensors(keys.module_state_to_lisa(loaded.model.state_dict()), on_disk)
    clip = load_file(str(tiny_ckpt_st / CLIP_SUBDIR / "model.safetensors"))
    got_clip = {k[len("vision_tower."):]: v for k, v in loaded.model.state_dict().items() if k.startswith("vision_tower.")}
    _assert_same_tensors(got_clip, clip)
    assert loaded.shape == tiny_shape()
    assert loaded.clip_dir == tiny_ckpt_st / CLIP_SUBDIR and loaded.ckpt_dir == tiny_ckpt_st
    assert loaded.model.vision_tower.config._attn_implementation == "eager"
    assert loaded.image_processor_config["crop_size"] == {"height": 64, "width": 64}


def test_constructor_buffers_survive_skipped_init(loaded):
    """Loading builds with init skipped; buffers computed in constructors (rotary, ids) must be intact."""
    reference = LisaModel(tiny_shape())
    want = dict(reference.named_buffers())
    got = dict(loaded.model.named_buffers())
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_weight_format_loads_identical_weights(fmt, tiny_ckpt_st, loaded, tmp_path):
    ckpt = _clone_without_weights(tiny_ckpt_st, tmp_path / fmt)
    written = save_checkpoint(loaded.model, ckpt, fmt=fmt, max_shard_size="64KB")
    if fmt.endswith("-sharded"):
        index_name = "model.safetensors.index.json" if fmt.startswith("safetensors") else "pytorch_model.bin.index.json"
        index = json.loads((ckpt / index_name).read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and written[-1] == ckpt / index_name
        assert shards[0].endswith(f"-00001-of-{len(shards):05d}" + Path(shards[0]).suffix)
        assert sorted(index["weight_map"]) == sorted(keys.module_state_to_lisa(loaded.model.state_dict()))
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in keys.module_state_to_lisa(loaded.model.state_dict()).values())
    else:
        assert [p.name for p in written] == ["model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"]
    assert not list(ckpt.glob(".*.tmp")), "temp files left behind"
    again = _load(ckpt, tiny_ckpt_st)
    _assert_same_tensors(again.model.state_dict(), loaded.model.state_dict())


def test_safetensors_index_is_preferred_over_bin(tiny_ckpt_st, loaded, tmp_path):
    ckpt = _clone_without_weights(tiny_ckpt_st, tmp_path / "both")
    save_checkpoint(loaded.model, ckpt, fmt="bin")
    save_checkpoint(loaded.model, ckpt, fmt="safetensors-sharded", max_shard_size="64KB")
    assert all(p.suffix == ".safetensors" for p in find_weight_files(ckpt))


def test_dtype_and_random_build(loaded):
    half = build_random(tiny_shape(), dtype=torch.float16, seed=3)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    a, b = build_random(tiny_shape(), seed=3), build_random(tiny_shape(), seed=3)
    _assert_same_tensors(a.state_dict(), b.state_dict())
    assert not torch.equal(build_random(tiny_shape(), seed=4).mm_projector.weight, a.mm_projector.weight)
    assert torch.all(a.llm.model.norm.weight == 1) and torch.all(a.mm_projector.bias == 0)
    assert 0.015 < a.llm.model.embed_tokens.weight.std() < 0.025
    for name, buf in loaded.model.named_buffers():  # rotary frequencies etc. are real, not garbage
        assert torch.equal(dict(a.named_buffers())[name], buf), name


def test_half_precision_load(tiny_ckpt_st):
    got = load_checkpoint(tiny_ckpt_st, dtype=torch.float16)
    assert {p.dtype for p in got.model.parameters()} == {torch.float16}


def test_loads_with_hub_offline(tiny_ckpt_st, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    got = load_checkpoint(tiny_ckpt_st)
    assert len(got.tokenizer) == tiny_shape().llm.vocab


def test_missing_key_is_named_with_its_shape(tiny_ckpt_st, tmp_path):
    ckpt = _with_state(tiny_ckpt_st, tmp_path / "c", lambda s: s.pop("model.text_hidden_fcs.0.2.weight"))
    with pytest.raises(CheckpointError, match=r"missing: model\.text_hidden_fcs\.0\.2\.weight \(expected shape \(32, 64\)\)"):
        _load(ckpt, tiny_ckpt_st)


def test_unexpected_key_is_named(tiny_ckpt_st, tmp_path):
    def add(state):
        state["model.visual_model.mask_decoder.extra_head.weight"] = torch.zeros(2)
        state["model.bogus.weight"] = torch.zeros(2)
    ckpt = _with_state(tiny_ckpt_st, tmp_path / "c", add)
    with pytest.raises(CheckpointError) as info:
        _load(ckpt, tiny_ckpt_st)
    assert "unexpected: model.bogus.weight" in str(info.value)
    assert "unexpected: model.visual_model.mask_decoder.extra_head.weight" in str(info.value)


def test_wrong_shape_names_both_shapes(tiny_ckpt_st, tmp_path):
    def reshape(state):
        state["model.mm_projector.weight"] = torch.zeros(64, 33)
    ckpt = _with_state(tiny_ckpt_st, tmp_path / "c", reshape)
    with pytest.raises(CheckpointError, match=r"wrong shape: model\.mm_projector\.weight expected \(64, 32\), found \(64, 33\)"):
        _load(ckpt, tiny_ckpt_st)


def test_all_problems_in_one_capped_error(tiny_ckpt_st, tmp_path):
    def gut(state):
        for name in [k for k in state if k.startswith("model.layers.")]:
            del state[name]
        state["model.bogus.weight"] = torch.zeros(1)
    ckpt = _with_state(tiny_ckpt_st, tmp_path / "c", gut)
    with pytest.raises(CheckpointError) as info:
        _load(ckpt, tiny_ckpt_st)
    message = str(info.value)
    n_missing = 9 * tiny_shape().llm.layers
    assert f"({n_missing + 1} problem(s))" in message
    assert f"... and {n_missing + 1 - 20} more" in message
    assert len(message.splitlines()) == 1 + 20 + 1


def test_ignored_keys_load(tiny_ckpt_st, tmp_path):
    def add(state):
        state["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(32)
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    _load(_with_state(tiny_ckpt_st, tmp_path / "c", add), tiny_ckpt_st)


def test_missing_directory_and_config(tiny_ckpt_st, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"config not found: .*config\.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_checkpoint(tmp_path)


def test_no_weights_lists_what_was_looked_for(tiny_ckpt_st, tmp_path):
    ckpt = _clone_without_weights(tiny_ckpt_st, tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"no weights in .*model\.safetensors\.index\.json, model\.safetensors, "
                                              r"pytorch_model\.bin\.index\.json, pytorch_model\.bin"):
        _load(ckpt, tiny_ckpt_st)


def test_truncated_safetensors(tiny_ckpt_st, tmp_path):
    ckpt = _clone_without_weights(tiny_ckpt_st, tmp_path / "c")
    data = (tiny_ckpt_st / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"weights file .*model\.safetensors is corrupt or truncated"):
        _load(ckpt, tiny_ckpt_st)


@pytest.mark.parametrize("content", [b"garbage bytes, not a pickle", b""])
def test_garbage_bin(tiny_ckpt_st, tmp_path, content):
    ckpt = _clone_without_weights(tiny_ckpt_st, tmp_path / "c")
    (ckpt / "pytorch_model.bin").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"weights file .*pytorch_model\.bin is corrupt or truncated"):
        _load(ckpt, tiny_ckpt_st)


def test_index_naming_a_missing_shard(tiny_ckpt_st, loaded, tmp_path):
    ckpt = _clone_without_weights(tiny_ckpt_st, tmp_path / "c")
    save_checkpoint(loaded.model, ckpt, fmt="safetensors-sharded", max_shard_size="64KB")
    (ckpt / "model-00002-of-{:05d}.safetensors".format(len(list(ckpt.glob("model-*.safetensors"))))).unlink()
    with pytest.raises(CheckpointError, match=r"names missing shard\(s\): model-00002-of-"):
        _load(ckpt, tiny_ckpt_st)


def test_vision_tower_resolution(tiny_ckpt_st, tmp_path):
    ckpt = _clone_without_weights(tiny_ckpt_st, tmp_path / "c")
    shutil.copy(tiny_ckpt_st / "model.safetensors", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14"  # a Hub id, as in LISA's real config
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'openai/clip-vit-large-patch14'.*pass --vision-tower DIR"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="not a CLIP directory"):
        load_checkpoint(ckpt, vision_tower=tmp_path)
    # A CLIP dir without preprocessor_config.json: CLIP defaults at the tower's image size.
    clip = tmp_path / "clip"
    shutil.copytree(tiny_ckpt_st / CLIP_SUBDIR, clip)
    (clip / "preprocessor_config.json").unlink()
    got = load_checkpoint(ckpt, vision_tower=clip)
    assert got.image_processor_config == default_clip_processor_config(64)
    assert got.image_processor_config["image_mean"] == [0.48145466, 0.4578275, 0.40821073]


def test_broken_tokenizer(tiny_ckpt_st, tmp_path):
    ckpt = _clone_without_weights(tiny_ckpt_st, tmp_path / "c")
    shutil.copy(tiny_ckpt_st / "model.safetensors", ckpt)
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer_config.json").unlink()
    (ckpt / "special_tokens_map.json").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="no tokenizer in .*expected LLaMA's tokenizer.model"):
        _load(ckpt, tiny_ckpt_st)


# --- weights trusted only once checked (issue 15) -------------------------------------------------------------

@pytest.mark.parametrize("edit, says", [
    (lambda s: s.__setitem__("model.mm_projector.weight", s["model.mm_projector.weight"].view(torch.int32)),
     "wrong dtype: model.mm_projector.weight is stored as torch.int32, expected a torch.float32 tensor"),
    (lambda s: s["model.norm.weight"].__setitem__(3, float("nan")),
     "non-finite values: model.norm.weight has 1 NaN/Inf of 64"),
    (lambda s: s["model.layers.0.mlp.up_proj.weight"].fill_(float("inf")),
     "non-finite values: model.layers.0.mlp.up_proj.weight has 8192 NaN/Inf of 8192"),
], ids=["int32-same-bytes", "one-nan", "all-inf"])
def test_wrong_dtype_or_non_finite_weights_refused_by_name(tiny_ckpt_st, tmp_path, edit, says):
    ckpt = _with_state(tiny_ckpt_st, tmp_path / "c", edit)
    with pytest.raises(CheckpointError) as info:
        _load(ckpt, tiny_ckpt_st)
    assert says in str(info.value)


def test_streaming_export_refuses_a_nan_weight_as_it_reads_it(tiny_ckpt_st, tmp_path):
    from exporter.streaming import WeightSource
    from graphs.checkpoint_config import read_checkpoint_config

    ckpt = _with_state(tiny_ckpt_st, tmp_path / "c", lambda s: s["model.norm.weight"].__setitem__(0, float("nan")))
    files = WeightSource(ckpt, read_checkpoint_config(ckpt, tiny_ckpt_st / CLIP_SUBDIR).clip_dir)
    files.read("llm.model.layers.0.mlp.up_proj.weight", torch.float32)  # healthy tensors still read
    with pytest.raises(CheckpointError, match="non-finite values: model.norm.weight has 1 NaN/Inf"):
        files.read("llm.model.norm.weight", torch.float32)


class _NewStorages(TorchDispatchMode):
    """Records the byte size of every storage an aten op creates (views of an input's storage are not new)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.sizes.append((str(func), t.untyped_storage().nbytes()))
        return out


def test_the_finiteness_check_copies_no_weight(tiny_ckpt_st):
    """Issue 11: `isfinite(t).all()` made a bool copy of each weight as the streaming export read it; freed at
    once, the blocks stayed with the process (LISA-7B llm_2: +1.7 GiB anonymous memory, 10.0 GiB peak RSS).
    Reading a weight in its stored dtype makes no tensor bigger than a scalar's."""
    from exporter.streaming import WeightSource
    from graphs.checkpoint_config import read_checkpoint_config

    files = WeightSource(tiny_ckpt_st, read_checkpoint_config(tiny_ckpt_st, tiny_ckpt_st / CLIP_SUBDIR).clip_dir)
    big = max(files._where, key=lambda name: torch.Size(files._where[name][2]).numel())
    assert torch.Size(files._where[big][2]).numel() >= 4096  # a copy of it (even as bool) would be seen
    with _NewStorages() as made:
        t = files.read(big, torch.float32)
    assert t.dtype == torch.float32
    assert made.sizes and max(n for _, n in made.sizes) <= 16, made.sizes  # the check ran, on scalars only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_all_finite_finds_any_nan_or_inf(dtype):
    t = torch.randn(3000, 7).to(dtype)
    assert all_finite(t) and all_finite(t.t()) and all_finite(t[:, 2]) and all_finite(t[:0])
    for where in [(0, 0), (1500, 3), (2999, 6)]:
        for bad in (float("nan"), float("inf"), -float("inf")):
            u = t.clone()
            u[where] = bad
            assert not all_finite(u) and not all_finite(u.t()) and not all_finite(u[:, where[1]]), (where, bad)
