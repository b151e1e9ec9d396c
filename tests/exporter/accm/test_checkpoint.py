"""ACCM's files load in ACCM's own layouts, and every bad file is one clear CheckpointError."""

import json
import shutil

import pytest
import torch

from exporter.accm.checkpoint import (CAPTION_FILE, LONGCLIP_DIR, SELECTOR_FILE, load_accm, load_caption_model,
                                      load_selector)
from exporter.accm.model import CaptionModel, Selector
from graphs.accm import AccmShape
from graphs.errors import CheckpointError


def _accm_mapper_keys(layers: int) -> set[str]:
    """clip_project.* as ClipCap's TransformerMapper names them (clipcap_model.py at ASGO-MM/ACCM 50f1bd8):
    attention q and k/v without bias (TransformerLayer's bias=False), project with bias, ReLU MLP fc1/fc2."""
    keys = {"clip_project.linear.weight", "clip_project.linear.bias", "clip_project.prefix_const"}
    for i in range(layers):
        p = f"clip_project.transformer.layers.{i}."
        keys |= {p + k for k in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                 "attn.to_queries.weight", "attn.to_keys_values.weight", "attn.project.weight",
                                 "attn.project.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")}
    return keys


def _accm_selector_keys(layers: int) -> set[str]:
    """TransformerSelector: nn.TransformerEncoder(norm_first) layers and a Linear head (selector_transformer.py)."""
    keys = {"head.weight", "head.bias"}
    for i in range(layers):
        p = f"transformer_encoder.layers.{i}."
        keys |= {p + k for k in ("self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
                                 "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight",
                                 "linear2.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")}
    return keys


def test_released_sizes_have_accms_key_names_and_shapes():
    shape = AccmShape()
    with torch.device("meta"):
        caption, selector = CaptionModel(shape), Selector(shape)
    state = caption.state_dict()
    assert {k for k in state if k.startswith("clip_project.")} == _accm_mapper_keys(4)
    assert state["clip_project.prefix_const"].shape == (20, 768)
    assert state["clip_project.transformer.layers.0.attn.to_keys_values.weight"].shape == (1536, 768)
    assert state["clip_project.transformer.layers.0.mlp.fc1.weight"].shape == (1536, 768)  # mlp_ratio 2
    assert "gpt.transformer.h.11.attn.c_attn.weight" in state and "gpt.lm_head.weight" in state
    sel = selector.state_dict()
    assert set(sel) == _accm_selector_keys(4)
    assert sel["transformer_encoder.layers.0.linear1.weight"].shape == (1536, 768)
    assert sel["head.weight"].shape == (1, 768)


def test_tiny_files_load(tiny_accm, accm_models):
    a = accm_models
    assert a.shape.longclip_text.positions == 248
    assert len(a.caption.clip_project.transformer.layers) == a.shape.mapper_layers
    state = torch.load(tiny_accm[1] / CAPTION_FILE, weights_only=True)
    assert set(k for k in state if k.startswith("clip_project.")) == _accm_mapper_keys(a.shape.mapper_layers)
    assert set(torch.load(tiny_accm[1] / SELECTOR_FILE, weights_only=True)) == _accm_selector_keys(a.shape.selector_layers)
    for name, p in a.caption.state_dict().items():
        assert torch.equal(p, state[name]), name


def _edited(tiny_accm, tmp_path, name, edit):
    state = torch.load(tiny_accm[1] / name, weights_only=True)
    edit(state)
    path = tmp_path / name
    torch.save(state, path)
    return path


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("clip_project.prefix_const"), r"missing: clip_project.prefix_const \(expected shape \(20, 32\)\)"),
    (lambda s: s.update({"clip_project.linear.weight": torch.zeros(3, 3)}),
     r"wrong shape: clip_project.linear.weight expected \(32, 16\), found \(3, 3\)"),
    (lambda s: s["gpt.transformer.wte.weight"].view(-1)[0].fill_(float("nan")),
     "non-finite values: gpt.transformer.wte.weight has 1 NaN/Inf"),
    (lambda s: s.update({"clip_project.linear.bias": torch.zeros(32, dtype=torch.int32)}),
     "wrong dtype: clip_project.linear.bias is stored as torch.int32"),
    (lambda s: s.update({"clip_project.extra": torch.zeros(1)}), "unexpected: clip_project.extra"),
])
def test_caption_model_key_problems(tiny_accm, accm_models, tmp_path, edit, match):
    path = _edited(tiny_accm, tmp_path, CAPTION_FILE, edit)
    with pytest.raises(CheckpointError, match=match):
        load_caption_model(path, accm_models.shape)


def test_old_gpt2_mask_buffers_are_ignored(tiny_accm, accm_models, tmp_path):
    path = _edited(tiny_accm, tmp_path, CAPTION_FILE,
                   lambda s: s.update({"gpt.transformer.h.0.attn.bias": torch.ones(1, 1, 4, 4)}))
    assert load_caption_model(path, accm_models.shape) is not None


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("head.weight"), r"missing: head.weight \(expected shape \(1, 32\)\)"),
    (lambda s: s.update({"transformer_encoder.layers.1.linear1.weight": torch.zeros(64, 8)}),
     r"wrong shape: transformer_encoder.layers.1.linear1.weight expected \(64, 32\), found \(64, 8\)"),
])
def test_selector_key_problems(tiny_accm, accm_models, tmp_path, edit, match):
    path = _edited(tiny_accm, tmp_path, SELECTOR_FILE, edit)
    with pytest.raises(CheckpointError, match=match):
        load_selector(path, accm_models.shape)


def test_missing_and_corrupt_files(tiny_accm, accm_models, tmp_path):
    with pytest.raises(CheckpointError, match="ACCM caption model not found"):
        load_caption_model(tmp_path / CAPTION_FILE, accm_models.shape)
    (tmp_path / SELECTOR_FILE).write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_selector(tmp_path / SELECTOR_FILE, accm_models.shape)
    with pytest.raises(CheckpointError, match="ACCM directory not found"):
        load_accm(tmp_path / "nowhere")


@pytest.fixture()
def accm_copy(tiny_accm, tmp_path):
    dst = tmp_path / "accm"
    shutil.copytree(tiny_accm[1], dst)
    return dst


def test_longclip_must_have_248_positions(accm_copy):
    cfg_path = accm_copy / LONGCLIP_DIR / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["max_position_embeddings"] = 77
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has 77 positions, expected 248"):
        load_accm(accm_copy)


def test_clip_dir_needs_the_text_tower(accm_copy, tmp_path):
    vision_only = tmp_path / "clip"
    vision_only.mkdir()
    cfg = json.loads((accm_copy / "clip" / "config.json").read_text())
    (vision_only / "config.json").write_text(json.dumps(cfg["vision_config"]))
    with pytest.raises(CheckpointError, match="holds no text tower"):
        load_accm(accm_copy, vision_only)


def test_tokenizer_files_are_required(accm_copy):
    (accm_copy / "gpt2" / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match="GPT-2 tokenizer files missing in .*: merges.txt"):
        load_accm(accm_copy)


def test_longclip_weights_mis_shaped(accm_copy):
    from safetensors.torch import load_file, save_file

    path = accm_copy / LONGCLIP_DIR / "model.safetensors"
    state = load_file(path)
    state["text_projection.weight"] = torch.zeros(5, 5)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"LongCLIP text tower .* wrong shape: text_projection.weight expected "
                                              r"\(32, 32\), found \(5, 5\)"):
        load_accm(accm_copy)
    state.pop("text_projection.weight")
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="LongCLIP text tower .* missing: text_projection.weight"):
        load_accm(accm_copy)


def test_tiny_accm_files_are_deterministic(lisa, tmp_path):
    from exporter.accm.tiny import make_tiny_accm

    a, b = (make_tiny_accm(tmp_path / name, lisa.model.vision_tower) for name in ("a", "b"))
    for rel in (CAPTION_FILE, SELECTOR_FILE, "gpt2/model.safetensors", "longclip/model.safetensors",
                "clip/model.safetensors", "gpt2/vocab.json", "gpt2/merges.txt"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_tiny_full_clip_carries_the_lisa_vision_tower(tiny_accm, lisa):
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(tiny_accm[1] / "clip")
    got, want = tower.state_dict(), lisa.model.vision_tower.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
