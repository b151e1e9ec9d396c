"""LongCLIP's OpenAI-layout longclip-L.pt converts to an HF text tower that computes what LongCLIP's encode_text does."""

import pytest
import torch
from torch import nn

from exporter.accm.checkpoint import load_text_tower
from exporter.accm.longclip import convert_longclip
from graphs.errors import CheckpointError

W, HEADS, LAYERS, VOCAB, EMBED, CTX = 128, 2, 2, 60, 24, 248  # OpenAI CLIP: heads = width / 64


def _openai_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    state = {"token_embedding.weight": r(VOCAB, W), "positional_embedding": r(CTX, W),
             "positional_embedding_res": r(CTX, W), "ln_final.weight": 1 + r(W), "ln_final.bias": r(W),
             "text_projection": r(W, EMBED),
             # the visual half and LongCLIP's own extras are in the file too; the text tower ignores them
             "visual.proj": r(4, 4), "logit_scale": torch.tensor(4.6)}
    for i in range(LAYERS):
        p = f"transformer.resblocks.{i}."
        state.update({p + "attn.in_proj_weight": r(3 * W, W), p + "attn.in_proj_bias": r(3 * W),
                      p + "attn.out_proj.weight": r(W, W), p + "attn.out_proj.bias": r(W),
                      p + "ln_1.weight": 1 + r(W), p + "ln_1.bias": r(W), p + "ln_2.weight": 1 + r(W),
                      p + "ln_2.bias": r(W), p + "mlp.c_fc.weight": r(4 * W, W), p + "mlp.c_fc.bias": r(4 * W),
                      p + "mlp.c_proj.weight": r(W, 4 * W), p + "mlp.c_proj.bias": r(W)})
    return state


def _encode_text_openai(state, ids):
    """LongCLIP's encode_text written from model_longclip.py: mask1/mask2 positions, causal pre-LN blocks with
    QuickGELU, ln_final, the EOT (highest id) row @ text_projection."""
    mask1 = torch.zeros(CTX, 1)
    mask1[:20] = 1
    x = state["token_embedding.weight"][ids] + (state["positional_embedding"] * mask1
                                                 + state["positional_embedding_res"] * (1 - mask1))[:ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(LAYERS):
        p = f"transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(W, HEADS, batch_first=True)
        attn.load_state_dict({k: state[p + "attn." + k] for k in ("in_proj_weight", "in_proj_bias",
                                                                  "out_proj.weight", "out_proj.bias")})
        h = nn.functional.layer_norm(x, (W,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        x = x + attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        h = nn.functional.layer_norm(x, (W,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = nn.functional.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)
        x = x + nn.functional.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
    x = nn.functional.layer_norm(x, (W,), state["ln_final.weight"], state["ln_final.bias"])
    return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ state["text_projection"]


def test_converted_longclip_matches_encode_text(tiny_accm, tmp_path):
    state = _openai_state()
    torch.save(state, tmp_path / "longclip-L.pt")
    out = convert_longclip(tmp_path / "longclip-L.pt", tmp_path / "longclip", tiny_accm[1] / "clip")
    tower = load_text_tower(out, "LongCLIP text tower")
    assert tower.config.max_position_embeddings == 248
    g = torch.Generator().manual_seed(1)
    for length in (5, 30, 248):  # past position 20, LongCLIP's stretched positions take over
        ids = torch.randint(1, VOCAB - 1, (1, length), generator=g)
        ids[0, -1] = VOCAB - 1  # EOT: the highest id
        with torch.no_grad():
            assert torch.allclose(tower(input_ids=ids).text_embeds, _encode_text_openai(state, ids), atol=1e-5)


def test_convert_longclip_names_a_missing_key(tiny_accm, tmp_path):
    state = _openai_state()
    del state["positional_embedding_res"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing: positional_embedding_res .* LongCLIP's longclip-L.pt"):
        convert_longclip(tmp_path / "bad.pt", tmp_path / "out", tiny_accm[1] / "clip")


def test_convert_longclip_cli(tiny_accm, tmp_path, capsys):
    from tools.convert_longclip import main

    torch.save(_openai_state(), tmp_path / "longclip-L.pt")
    assert main([str(tmp_path / "longclip-L.pt"), "--clip", str(tiny_accm[1] / "clip"), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "vocab.json").is_file() and "248 positions" in capsys.readouterr().out
    assert main([str(tmp_path / "nope.pt"), "--clip", str(tiny_accm[1] / "clip"), "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.strip() == f"convert_longclip: error: LongCLIP checkpoint not found: {tmp_path / 'nope.pt'}"
