"""Config values of the wrong type or range never reach torch: one line naming the config key (issue 15)."""

from __future__ import annotations

import dataclasses

import pytest

from graphs.errors import CheckpointError, ToolchainError
from graphs.shapes import MAX_SIZE, SHAPES, ModelShape

LISA = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 2048, "out_dim": 32,
        "csprt_sam": {"image_size": 128, "patch_size": 16, "hidden": 32, "layers": 2, "heads": 2, "mlp_dim": 64,
                      "window": 4, "global_attn": [1], "decoder_layers": 2, "decoder_heads": 2, "decoder_mlp": 64}}
CLIP = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
        "image_size": 32, "patch_size": 4}


def test_a_good_config_and_every_preset_pass():
    assert ModelShape.from_hf_configs(LISA, CLIP).problems() == []
    assert all(not s.problems() for s in SHAPES.values())


@pytest.mark.parametrize("key, value, says", [
    ("num_hidden_layers", "two", "llm.layers (num_hidden_layers) must be an integer, got 'two'"),
    ("hidden_size", True, "llm.hidden (hidden_size) must be an integer, got True"),
    ("hidden_size", 0, "llm.hidden (hidden_size) must be 1 to"),
    ("vocab_size", 10**12, f"llm.vocab (vocab_size) must be 1 to {MAX_SIZE}"),
    ("rms_norm_eps", -1e-6, "llm.rms_norm_eps (rms_norm_eps) must be a positive finite number"),
    ("rope_theta", "ten thousand", "llm.rope_theta (rope_theta) must be a positive finite number"),
    ("num_attention_heads", 3, "llm.hidden 64 is not a multiple of llm.heads 3"),
    ("num_key_value_heads", 3, "llm.heads 4 is not a multiple of llm.kv_heads 3"),
    ("mm_vision_select_layer", 9, "vision.select_layer 9 is outside the tower's 2 layers"),
    ("max_position_embeddings", 64, "64 image tokens leave no room in llm.max_positions 64"),
    ("out_dim", 2.5, "sam.out_chans (out_dim) must be an integer, got 2.5"),
], ids=lambda x: x if isinstance(x, str) and len(x) < 30 else None)
def test_bad_config_values_are_one_checkpoint_error(key, value, says):
    with pytest.raises(CheckpointError) as err:
        ModelShape.from_hf_configs({**LISA, key: value}, CLIP)
    msg = str(err.value)
    assert says in msg and "\n" not in msg and "config.json" in msg


def test_malformed_sam_block():
    with pytest.raises(CheckpointError, match="csprt_sam"):
        ModelShape.from_hf_configs({**LISA, "csprt_sam": {**LISA["csprt_sam"], "global_attn": 7}}, CLIP)


def test_a_tampered_manifest_shape_is_refused():
    data = dataclasses.asdict(SHAPES["small"])
    data["llm"]["max_positions"] = 10**15
    with pytest.raises(ToolchainError, match="llm.max_positions"):
        ModelShape.from_dict(data)
