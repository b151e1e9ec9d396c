"""`csprt flops` through the CLI entry point."""

from __future__ import annotations

import json

import pytest

from tools import cli


@pytest.fixture(autouse=True)
def only_flops(monkeypatch):
    # Register only this subcommand, so these tests do not depend on the other tools' imports.
    monkeypatch.setattr(cli, "COMMANDS", {"flops": "tools.flops"})


def flops_json(capsys, *argv) -> dict:
    assert cli.main(["flops", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_csp_on_lisa_7b(capsys):
    r = flops_json(capsys, "--shape", "lisa-7b", "--schedule", "csp")
    assert r["schedule"] == "csp" and r["n_layers"] == 32 and r["n_image_tokens"] == 256
    assert r["avg_image_tokens_per_layer"] == 88
    assert round(r["image_token_reduction_pct"], 1) == 65.6
    assert r["image_token_reduction_pct"] == pytest.approx(65.625)
    assert r["text_tokens"] == 40
    assert set(r["flops"]["llm"]) == {"fastv", "swiglu"}


def test_csp_70_and_full(capsys):
    assert 69.5 <= flops_json(capsys, "--shape", "lisa-7b", "--schedule", "csp-70")["image_token_reduction_pct"] <= 70.5
    full = flops_json(capsys, "--shape", "lisa-7b", "--schedule", "full")
    assert full["image_token_reduction_pct"] == 0 and full["image_token_flops_reduction_pct"] == 0


def test_lisa_13b_and_text_tokens(capsys):
    r = flops_json(capsys, "--shape", "lisa-13b", "--schedule", "csp", "--text-tokens", "64")
    assert r["n_layers"] == 40 and r["text_tokens"] == 64 and len(r["tokens_per_layer"]) == 40


def test_human_table(capsys):
    assert cli.main(["flops", "--shape", "small", "--schedule", "evtp"]) == 0
    out = capsys.readouterr().out
    assert "image tokens / layer" in out and "sam_encoder" in out and "swiglu" in out
    assert "cached question     skips vision, sam_encoder: " in out


def test_schedule_json_file(capsys, tmp_path):
    from graphs.schedule import resolve

    path = tmp_path / "s.json"
    path.write_text(resolve("csp", 32, 256).to_json())
    assert flops_json(capsys, "--shape", "lisa-7b", "--schedule", str(path))["avg_image_tokens_per_layer"] == 88


@pytest.mark.parametrize("argv, needle", [
    (["--shape", "lisa-7b", "--schedule", "nope"], "csp-70"),
    (["--shape", "lisa-70b", "--schedule", "csp"], "lisa-13b"),
    (["--schedule", "csp"], "exactly one of --checkpoint"),
    (["--shape", "lisa-7b", "--checkpoint", ".", "--schedule", "csp"], "exactly one of --checkpoint"),
    (["--shape", "lisa-7b", "--vision-tower", ".", "--schedule", "csp"], "--vision-tower goes with --checkpoint"),
], ids=["unknown-schedule", "unknown-shape", "neither", "both", "tower-without-checkpoint"])
def test_errors_exit_2(capsys, argv, needle):
    assert cli.main(["flops", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("csprt flops: error:") and needle in err


LLAMA = {"num_hidden_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64,
         "vocab_size": 100}
CLIP = {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
        "image_size": 56, "patch_size": 14}


def write_checkpoint(root, config, clip=CLIP):
    (root / "clip").mkdir(parents=True)
    (root / "clip" / "config.json").write_text(json.dumps(clip))
    if config is not None:
        (root / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return root


def test_checkpoint_with_relative_vision_tower(capsys, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", {**LLAMA, "mm_vision_tower": "clip"})
    r = flops_json(capsys, "--checkpoint", str(ckpt), "--schedule", "csp")
    assert r["n_layers"] == 4 and r["n_image_tokens"] == 16
    assert r["shape"]["llm"]["hidden"] == 32


def test_checkpoint_with_explicit_vision_tower(capsys, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", {**LLAMA, "mm_vision_tower": "openai/clip-vit-large-patch14"})
    r = flops_json(capsys, "--checkpoint", str(ckpt), "--vision-tower", str(ckpt / "clip"), "--schedule", "full")
    assert r["n_image_tokens"] == 16


@pytest.mark.parametrize("config, needle", [
    (None, "checkpoint config not found"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ({**LLAMA, "mm_vision_tower": "openai/clip-vit-large-patch14"}, "pass --vision-tower DIR"),
    ({"hidden_size": 32, "mm_vision_tower": "clip"}, "checkpoint config.json lacks"),
], ids=["missing", "corrupt", "not-object", "hub-tower", "missing-key"])
def test_bad_checkpoint_exits_2(capsys, tmp_path, config, needle):
    ckpt = write_checkpoint(tmp_path / "ckpt", config)
    assert cli.main(["flops", "--checkpoint", str(ckpt), "--schedule", "csp"]) == 2
    assert needle in capsys.readouterr().err


def test_missing_checkpoint_dir_exits_2(capsys, tmp_path):
    assert cli.main(["flops", "--checkpoint", str(tmp_path / "nowhere"), "--schedule", "csp"]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
