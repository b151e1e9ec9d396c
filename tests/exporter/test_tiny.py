"""`csprt make-tiny`: a complete, deterministic, non-degenerate tiny LISA checkpoint.

These tests read csprt's earlier layout (`tiny_ckpt_st`: fp32 safetensors, byte-level BPE tokenizer.json, CLIP in
vision_tower/); LISA's published format, the default, is tested in test_lisa_format.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from exporter.checkpoint import load_checkpoint
from exporter.tiny import CLIP_SUBDIR, TinyOptions, make_tiny, tiny_shape
from exporter.tokenizer import ADDED_TOKENS, build_tokenizer
from graphs.shapes import ModelShape
from tools.cli import main


ST_OPTIONS = TinyOptions(format="safetensors", tokenizer="bpe", clip="local", weights="fp32")  # as tiny_ckpt_st


@pytest.fixture(scope="module")
def loaded(tiny_ckpt_st):
    return load_checkpoint(tiny_ckpt_st)


def test_writes_a_complete_checkpoint(tiny_ckpt_st):
    names = {p.relative_to(tiny_ckpt_st).as_posix() for p in tiny_ckpt_st.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            f"{CLIP_SUBDIR}/config.json", f"{CLIP_SUBDIR}/model.safetensors",
            f"{CLIP_SUBDIR}/preprocessor_config.json"} <= names
    config = json.loads((tiny_ckpt_st / "config.json").read_text())
    assert config["architectures"] == ["LISAForCausalLM"] and config["model_type"] == "llava"
    assert config["mm_vision_tower"] == CLIP_SUBDIR and config["mm_vision_select_layer"] == -2
    assert config["mm_use_im_start_end"] is True and config["mm_hidden_size"] == 32 and config["out_dim"] == 32
    clip_config = json.loads((tiny_ckpt_st / CLIP_SUBDIR / "config.json").read_text())
    assert ModelShape.from_hf_configs(config, clip_config) == tiny_shape()
    processor = json.loads((tiny_ckpt_st / CLIP_SUBDIR / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 64} and processor["crop_size"] == {"height": 64, "width": 64}
    # LISA-layout weights, without CLIP.
    state = load_file(str(tiny_ckpt_st / "model.safetensors"))
    assert "model.visual_model.image_encoder.patch_embed.proj.weight" in state
    assert not any("vision_tower" in k for k in state)


def test_clip_dir_loads_on_its_own(tiny_ckpt_st, monkeypatch):
    from transformers import CLIPVisionModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tower = CLIPVisionModel.from_pretrained(tiny_ckpt_st / CLIP_SUBDIR, local_files_only=True)
    out = tower(pixel_values=torch.randn(1, 3, 64, 64), output_hidden_states=True)
    assert out.hidden_states[-2].shape == (1, 1 + 64, 32)


def test_same_seed_gives_identical_weights(tiny_ckpt_st, tmp_path):
    again = make_tiny(tmp_path / "again", ST_OPTIONS)
    assert (again / "model.safetensors").read_bytes() == (tiny_ckpt_st / "model.safetensors").read_bytes()
    first, second = load_file(str(tiny_ckpt_st / CLIP_SUBDIR / "model.safetensors")), \
        load_file(str(again / CLIP_SUBDIR / "model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = load_file(str(make_tiny(tmp_path / "other", dataclasses.replace(ST_OPTIONS, seed=1)) / "model.safetensors"))
    base = load_file(str(tiny_ckpt_st / "model.safetensors"))
    assert not torch.equal(other["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_tokenizer(loaded):
    tok = loaded.tokenizer
    assert len(tok) == 512
    ids = tok.convert_tokens_to_ids(list(ADDED_TOKENS))
    assert sorted(ids) == [508, 509, 510, 511]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "USER: <im_start><image><im_end>\nWhere is the café's 招牌? Please output segmentation mask. ASSISTANT: [SEG]"
    encoded = tok(text)["input_ids"]
    assert encoded[0] == 1 and ids[0] in encoded and ids[1] in encoded
    assert tok.unk_token_id not in encoded  # byte-level: nothing is unknown
    assert tok.decode(encoded[1:]) == text


def test_tokenizer_size_is_exact_for_large_vocab():
    assert len(build_tokenizer(1000)) == 1000
    with pytest.raises(ValueError, match="too small"):
        build_tokenizer(100)


def test_weights_are_not_degenerate(loaded):
    model = loaded.model
    ids = torch.tensor([loaded.tokenizer("segment the dog please [SEG]")["input_ids"]])
    with torch.no_grad():
        hidden = model.llm(ids, output_hidden_states=True).hidden_states
        assert hidden[-2].std() > 1e-2  # pre-norm residual stream
        assert 0.5 < hidden[-1].std() < 2  # final post-norm state, what the [SEG] head reads
        seg = model.seg_head(hidden[-1][0, -2:])
        assert seg.std() > 0.05
        s = tiny_shape().sam
        torch.manual_seed(0)
        masks = model.sam_decode(model.sam_image_embeddings(torch.randn(1, 3, s.image_size, s.image_size)), seg)
    assert masks.std() > 0.1
    assert 0.05 < (masks > 0).float().mean() < 0.95


def test_cli_make_tiny(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["make-tiny", str(out), "--layers", "2", "--vocab", "400", "--format", "safetensors-sharded",
                 "--weights", "bf16"]) == 0
    assert str(out) in capsys.readouterr().out
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.model").is_file()
    got = load_checkpoint(out)
    assert got.shape.llm.layers == 2 and len(got.tokenizer) == 400
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_cli_rejects_a_vocab_too_small(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "x"), "--vocab", "100"]) == 2
    assert "pick a --vocab in that range" in capsys.readouterr().err
    assert main(["make-tiny", str(tmp_path / "y"), "--vocab", "100", "--tokenizer", "bpe"]) == 2
    assert "too small" in capsys.readouterr().err
