"""LISA's published checkpoint format: its SentencePiece tokenizer, config, `.bin` shards, v0/v1 layouts, CLIP placement."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from exporter.checkpoint import load_checkpoint, load_tokenizer
from exporter.tiny import CLIP_HUB_ID, TinyOptions, make_tiny, separate_clip_dir, tiny_shape
from exporter.tokenizer import LISA_ADDED_TOKENS, SlowLlamaTokenizer, TokenizerExport, fast_tokenizer
from graphs.checkpoint_config import read_checkpoint_config
from graphs.errors import CheckpointError
from graphs.tokenizer import JsonTokenizer, compare_corpus, corpus, corpus_ids
from tools.cli import main

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parents[2]


# ---- the tokenizer --------------------------------------------------------------------------------------------
def test_slow_tokenizer_equals_transformers_4_31():
    """Golden ids from LISA's own stack (transformers 4.31.0, use_fast=False; data/make_golden_ids.py)."""
    golden = json.loads((DATA / "lisa_tokenizer_ids_tf431.json").read_text())
    assert golden["transformers"] == "4.31.0"
    got = corpus_ids(SlowLlamaTokenizer(DATA / "lisa_tokenizer"))
    assert len(got) == len(golden["ids"]) == len(corpus())
    assert got == golden["ids"]
    # The corpus reaches the cases that differ between tokenizer implementations.
    flat = [i for ids in golden["ids"] for i in ids]
    assert {509, 510, 511} <= set(flat)  # [SEG], <im_start>, <im_end> (v1 ids)
    assert any(0x03 <= i < 0x103 for i in flat)  # byte-fallback pieces (unicode not in the tiny vocabulary)


def test_fast_tokenizer_equals_slow_on_the_corpus():
    slow = SlowLlamaTokenizer(DATA / "lisa_tokenizer")
    fast = JsonTokenizer(fast_tokenizer(slow), "<s>", "</s>", "<unk>")
    report = compare_corpus(slow, fast)
    assert report == {"prompts": len(corpus()), "tokens": report["tokens"], "mismatches": 0} and report["tokens"] > 2000
    # LISA's legacy handling: added tokens strip the whitespace around them; each chunk gets SentencePiece's "▁".
    text = "USER: <im_start> \n<im_end>\n Sure, it is [SEG] ."
    assert slow.tokenize(text)[3:6] == ["<im_start>", "<im_end>", "▁S"]
    assert fast(text)["input_ids"] == slow(text)["input_ids"]
    # A tokenizer that does not strip differs, and the comparison says where.
    broken = fast_tokenizer(slow)
    from tokenizers import AddedToken
    broken.add_tokens([AddedToken("[SEG]", normalized=False)])  # re-added without stripping
    report = compare_corpus(slow, JsonTokenizer(broken, "<s>", "</s>", "<unk>"))
    assert report["mismatches"] > 0 and "[SEG]" in report["first_mismatch"]["text"]


def test_sentencepiece_tiny_tokenizer(tiny_ckpt):
    tok = load_tokenizer(tiny_ckpt, 512)
    assert isinstance(tok, SlowLlamaTokenizer) and len(tok) == 512
    proto = tok.sp
    assert [proto.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert proto.get_piece_size() == 508 and proto.id_to_piece(3) == "<0x00>"  # byte fallback pieces follow
    assert tok.added == {t: 508 + i for i, t in enumerate(LISA_ADDED_TOKENS["v1"])}
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.convert_tokens_to_ids("[SEG]") == 509
    assert tok.sp.encode("2024") == [tok.sp.piece_to_id(p) for p in ("▁", "2", "0", "2", "4")]  # split digits
    # Deterministic: the same trainer run gives the same model, byte for byte.
    assert (tiny_ckpt / "tokenizer.model").read_bytes() == (DATA / "lisa_tokenizer" / "tokenizer.model").read_bytes()


# ---- the checkpoint format ------------------------------------------------------------------------------------
def test_make_tiny_writes_lisas_published_format(tiny_ckpt):
    names = {p.name for p in tiny_ckpt.iterdir()}
    assert {"config.json", "pytorch_model.bin.index.json", "tokenizer.model", "tokenizer_config.json",
            "special_tokens_map.json", "added_tokens.json"} <= names
    assert "tokenizer.json" not in names and not any(n.endswith(".safetensors") for n in names)
    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LISAForCausalLM"]
    assert config["mm_vision_tower"] == config["vision_tower"] == CLIP_HUB_ID
    assert config["torch_dtype"] == "bfloat16" and config["vocab_size"] == 512 and config["out_dim"] == 32
    assert config["mm_use_im_start_end"] is True and config["mm_vision_select_layer"] == -2
    tok_config = json.loads((tiny_ckpt / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "LlamaTokenizer" and tok_config["model_max_length"] == 512
    index = json.loads((tiny_ckpt / "pytorch_model.bin.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(re.fullmatch(r"pytorch_model-\d{5}-of-\d{5}\.bin", s) for s in shards)
    clip = [k for k in index["weight_map"] if k.startswith("model.vision_tower.")]
    assert "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight" in clip
    cfg = read_checkpoint_config(tiny_ckpt)  # CLIP geometry from the .bin headers, no CLIP directory
    assert cfg.clip_in_weights and cfg.clip_dir == tiny_ckpt and cfg.shape == tiny_shape()


@pytest.fixture(scope="module")
def v0_separate(tmp_path_factory):
    """LISA v0's layout without CLIP weights (the CLIP directory is beside it), in LISA's bfloat16."""
    return make_tiny(tmp_path_factory.mktemp("v0") / "lisa-v0", TinyOptions(layout="v0", clip="separate",
                                                                            weights="bf16"))


def test_v0_layout_and_separate_clip(v0_separate, tiny_ckpt, capsys):
    names = {p.name for p in v0_separate.iterdir()}
    assert {"pytorch_model-visual_model.bin", "pytorch_model-text_hidden_fcs.bin", "pytorch_model.bin.index.json",
            "tokenizer.model", "added_tokens.json"} <= names
    assert set(torch.load(v0_separate / "pytorch_model-text_hidden_fcs.bin", weights_only=True)) == {
        "text_hidden_fcs.0.0.weight", "text_hidden_fcs.0.0.bias", "text_hidden_fcs.0.2.weight",
        "text_hidden_fcs.0.2.bias"}
    base = json.loads((v0_separate / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert not any(k.startswith(("model.visual_model.", "model.text_hidden_fcs.", "model.vision_tower.")) for k in base)
    config = json.loads((v0_separate / "config.json").read_text())
    assert config["architectures"] == ["LlavaLlamaForCausalLM"] and "out_dim" not in config
    assert config["torch_dtype"] == "bfloat16"
    shard = torch.load(v0_separate / sorted(set(base.values()))[0], weights_only=True)
    assert {t.dtype for t in shard.values() if t.is_floating_point()} == {torch.bfloat16}
    assert json.loads((v0_separate / "added_tokens.json").read_text())["[SEG]"] == 508  # v0: chat.py adds it first

    # A Hub id and no CLIP weights: one line naming the flag.
    assert main(["flops", "--checkpoint", str(v0_separate), "--schedule", "csp"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--vision-tower DIR" in err and CLIP_HUB_ID in err

    v0 = load_checkpoint(v0_separate, vision_tower=separate_clip_dir(v0_separate))
    v1 = load_checkpoint(tiny_ckpt)
    assert v0.tokenizer.convert_tokens_to_ids("[SEG]") == 508
    # Same seed, same weights (rounded to bf16): only the LM head's taught rows differ ([SEG] has another id in v0).
    a, b = v0.model.state_dict(), v1.model.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k].to(torch.bfloat16).float())] == ["llm.lm_head.weight"]


# ---- errors: one line each ------------------------------------------------------------------------------------
def _copy_without_weights(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("pytorch_model-0*.bin"))
    for shard in src.glob("pytorch_model-0*.bin"):
        (dst / shard.name).symlink_to(shard)
    return dst


def _export_error(ckpt: Path, tmp_path: Path, capsys) -> str:
    assert main(["export", str(ckpt), "--schedule", "full", "--out", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_corrupt_and_mismatched_tokenizer(tiny_ckpt, tmp_path, capsys):
    ckpt = _copy_without_weights(tiny_ckpt, tmp_path / "c")
    (ckpt / "tokenizer.model").unlink()
    err = _export_error(ckpt, tmp_path, capsys)
    assert "tokenizer.model is missing" in err and str(ckpt) in err

    (ckpt / "tokenizer.model").write_bytes((tiny_ckpt / "tokenizer.model").read_bytes()[:1000])
    err = _export_error(ckpt, tmp_path, capsys)
    assert "is not a SentencePiece model" in err and "corrupt" in err

    shutil.copy(tiny_ckpt / "tokenizer.model", ckpt / "tokenizer.model")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "vocab_size": 510}))
    err = _export_error(ckpt, tmp_path, capsys)
    assert "added_tokens.json" in err and "vocab_size 510" in err and "'<im_end>'=511" in err

    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "added_tokens.json").write_text(json.dumps({"[SEG]": 600}))
    err = _export_error(ckpt, tmp_path, capsys)
    assert "'[SEG]' id 600" in err and "right after the 508 pieces" in err


# ---- the artifact ---------------------------------------------------------------------------------------------
def test_artifact_tokenizer_provenance_and_ids(export_tiny, tiny_ckpt):
    art = export_tiny()
    tok = json.loads((art / "manifest.json").read_text())["tokenizer"]
    assert tok["fast"] == "tokenizer.json" and tok["converted_from"] == "tokenizer.model"
    assert set(tok["source_files"]) == {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                                        "added_tokens.json"}
    assert set(tok["files"]) == set(tok["source_files"]) | {"tokenizer.json"}
    from graphs.manifest import file_sha256
    assert tok["source_files"]["tokenizer.model"] == file_sha256(tiny_ckpt / "tokenizer.model")
    assert all(file_sha256(art / "tokenizer" / n) == h for n, h in tok["files"].items())
    assert tok["corpus_check"]["mismatches"] == 0 and tok["corpus_check"]["prompts"] == len(corpus())

    # A fresh process with torch, transformers and sentencepiece unavailable tokenises the corpus from the artifact
    # (HostIO: tokenizers alone), with exactly the slow tokenizer's ids.
    code = ("import sys, json\n"
            "for m in ('torch', 'transformers', 'sentencepiece'): sys.modules[m] = None\n"
            "from engines.host import HostIO\nfrom graphs.tokenizer import corpus_ids\n"
            f"m = json.load(open({str(art / 'manifest.json')!r}))\n"
            f"print(json.dumps(corpus_ids(HostIO(m, {str(art)!r}).tokenizer)))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == corpus_ids(load_tokenizer(tiny_ckpt))


def test_validate_checks_the_artifacts_ids(export_tiny, tiny_ckpt, tmp_path):
    from graphs.manifest import load_artifact
    from tools.validate import check_tokenizer

    art = tmp_path / "art"
    shutil.copytree(export_tiny(), art)
    slow = load_tokenizer(tiny_ckpt)
    assert check_tokenizer(load_artifact(art), slow, progress=lambda _m: None)["passed"]
    data = json.loads((art / "tokenizer" / "tokenizer.json").read_text())
    for entry in data["added_tokens"]:
        if entry["content"] == "[SEG]":
            entry["lstrip"] = entry["rstrip"] = False  # the fast tokenizer transformers 4.31 itself would build
    (art / "tokenizer" / "tokenizer.json").write_text(json.dumps(data))
    report = check_tokenizer(load_artifact(art, verify=False), slow, progress=lambda _m: None)
    assert not report["passed"] and report["mismatches"] > 0


def test_export_converts_a_tokenizer_json_only_checkpoint(tiny_ckpt_st, tmp_path):
    """A checkpoint with only a tokenizer.json (csprt's byte-level tiny one) keeps it, unconverted."""
    out = tmp_path / "tok"
    record = TokenizerExport(tiny_ckpt_st, 512).write(out)
    assert record["converted_from"] is None and record["corpus_check"] is None
    assert (out / "tokenizer.json").read_text() == (tiny_ckpt_st / "tokenizer.json").read_text()
    with pytest.raises(CheckpointError, match="vocab_size 500"):
        TokenizerExport(tiny_ckpt_st, 500)
