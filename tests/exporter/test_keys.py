"""The LISA <-> LisaModel key mapping: a bijection, and the SAM side is segment-anything's real layout.

The SAM checks build the original `segment_anything` modules (pinned `segment-anything==1.0`, test
extra) with the same dimensions, compare key names and shapes, then load the original's weights
through the mapping into transformers' SamModel and compare outputs: a swapped rule between two
same-shaped tensors (proj_in vs layers.0) would pass a shape check but not this one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types
from functools import partial

import pytest
import torch

from exporter import keys
from exporter.model import LisaModel, sam_config
from exporter.tiny import tiny_shape
from graphs.shapes import ModelShape, SamShape


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return LisaModel(tiny_shape())


def test_mapping_is_a_bijection_over_the_state_dict(tiny_model):
    names = [n for n in tiny_model.state_dict() if not n.startswith("vision_tower.")]
    lisa = keys.module_state_to_lisa({n: n for n in names})
    # Every module name except the alias has its own LISA key, and maps back to itself.
    assert len(lisa) == len(names) - len(keys.ALIASES)
    for lisa_key, name in lisa.items():
        assert keys.lisa_to_module(lisa_key) == name
        assert keys.module_to_lisa(name) == lisa_key
    back, unknown = keys.lisa_state_to_module(lisa)
    assert unknown == []
    assert sorted(back) == sorted(names)  # the alias is restored too


@pytest.mark.parametrize("lisa_key, module_key", [
    ("model.embed_tokens.weight", "llm.model.embed_tokens.weight"),
    ("model.layers.3.self_attn.k_proj.weight", "llm.model.layers.3.self_attn.k_proj.weight"),
    ("model.norm.weight", "llm.model.norm.weight"),
    ("lm_head.weight", "llm.lm_head.weight"),
    ("model.mm_projector.bias", "mm_projector.bias"),
    ("model.text_hidden_fcs.0.2.weight", "text_hidden_fcs.0.2.weight"),
    ("model.visual_model.image_encoder.blocks.12.norm1.weight", "sam.vision_encoder.layers.12.layer_norm1.weight"),
    ("model.visual_model.image_encoder.blocks.0.attn.rel_pos_h", "sam.vision_encoder.layers.0.attn.rel_pos_h"),
    ("model.visual_model.image_encoder.patch_embed.proj.weight", "sam.vision_encoder.patch_embed.projection.weight"),
    ("model.visual_model.image_encoder.neck.0.weight", "sam.vision_encoder.neck.conv1.weight"),
    ("model.visual_model.image_encoder.pos_embed", "sam.vision_encoder.pos_embed"),
    ("model.visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
     "sam.prompt_encoder.shared_embedding.positional_embedding"),
    ("model.visual_model.prompt_encoder.point_embeddings.0.weight", "sam.prompt_encoder.point_embed.0.weight"),
    ("model.visual_model.prompt_encoder.mask_downscaling.0.weight", "sam.prompt_encoder.mask_embed.conv1.weight"),
    ("model.visual_model.mask_decoder.output_upscaling.0.weight", "sam.mask_decoder.upscale_conv1.weight"),
    ("model.visual_model.mask_decoder.output_hypernetworks_mlps.0.layers.0.weight",
     "sam.mask_decoder.output_hypernetworks_mlps.0.proj_in.weight"),
    ("model.visual_model.mask_decoder.output_hypernetworks_mlps.2.layers.1.bias",
     "sam.mask_decoder.output_hypernetworks_mlps.2.layers.0.bias"),
    ("model.visual_model.mask_decoder.iou_prediction_head.layers.2.weight",
     "sam.mask_decoder.iou_prediction_head.proj_out.weight"),
    ("model.visual_model.mask_decoder.transformer.norm_final_attn.weight",
     "sam.mask_decoder.transformer.layer_norm_final_attn.weight"),
    ("model.visual_model.mask_decoder.transformer.layers.1.norm4.bias",
     "sam.mask_decoder.transformer.layers.1.layer_norm4.bias"),
])
def test_known_keys_map_both_ways(lisa_key, module_key):
    assert keys.lisa_to_module(lisa_key) == module_key
    assert keys.module_to_lisa(module_key) == lisa_key


def test_shared_positional_matrix_is_restored_under_both_names():
    matrix = torch.zeros(2, 4)
    renamed, _ = keys.lisa_state_to_module(
        {"model.visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": matrix})
    assert renamed["sam.shared_image_embedding.positional_embedding"] is matrix
    assert renamed["sam.prompt_encoder.shared_embedding.positional_embedding"] is matrix
    assert keys.module_to_lisa("sam.shared_image_embedding.positional_embedding") == \
        "model.visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"


def test_unknown_and_ignored_keys():
    renamed, unknown = keys.lisa_state_to_module({
        "model.foo.weight": 1,
        "model.layers.0.self_attn.rotary_emb.inv_freq": 3,  # legacy buffer: recomputed
        "model.vision_tower.vision_tower.vision_model.embeddings.position_ids": 4,  # buffer: recomputed
    })
    assert unknown == ["model.foo.weight"] and renamed == {}


def test_embedded_clip_and_v0_keys():
    """CLIP as LLaVA v1 and the first LLaVA embed it, and LISA v0's extra files' own names."""
    renamed, unknown = keys.lisa_state_to_module({
        "model.vision_tower.vision_tower.vision_model.post_layernorm.weight": 1,  # LLaVA v1 (CLIPVisionTower)
        "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias": 2,  # the first LLaVA
        "visual_model.mask_decoder.iou_token.weight": 3,  # pytorch_model-visual_model.bin
        "text_hidden_fcs.0.2.bias": 4,  # pytorch_model-text_hidden_fcs.bin
    })
    assert not unknown and renamed == {"vision_tower.post_layernorm.weight": 1,
                                       "vision_tower.encoder.layers.0.mlp.fc1.bias": 2,
                                       "sam.mask_decoder.iou_token.weight": 3, "text_hidden_fcs.0.2.bias": 4}
    assert keys.module_to_lisa("vision_tower.post_layernorm.weight") == \
        "model.vision_tower.vision_tower.vision_model.post_layernorm.weight"
    assert "model.vision_tower.vision_tower.vision_model.post_layernorm.weight" not in keys.module_state_to_lisa(
        {"vision_tower.post_layernorm.weight": 0})
    assert keys.module_state_to_lisa({"vision_tower.post_layernorm.weight": 0}, include_clip=True) == {
        "model.vision_tower.vision_tower.vision_model.post_layernorm.weight": 0}
    with pytest.raises(KeyError, match="no LISA key"):
        keys.module_state_to_lisa({"sam.brand_new.weight": 0})


# ---- the SAM side against the original segment-anything code ----

def _import_segment_anything_modeling():
    """`segment_anything.modeling` without running the package `__init__`, which imports torchvision."""
    if "segment_anything.modeling" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None:
            pytest.skip("segment-anything==1.0 not installed (pip install -e .[test])")
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["segment_anything"] = package
    import segment_anything.modeling as modeling

    return modeling


def _original_sam(s: SamShape):
    """segment_anything's `Sam` built as `build_sam._build_sam` does, at the dimensions of `s`."""
    m = _import_segment_anything_modeling()
    g = s.embed_grid
    return m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=s.layers, embed_dim=s.hidden, img_size=s.image_size, mlp_ratio=s.mlp_dim / s.hidden,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=s.heads, patch_size=s.patch_size,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=s.global_attn, window_size=s.window,
            out_chans=s.out_chans),
        prompt_encoder=m.PromptEncoder(embed_dim=s.out_chans, image_embedding_size=(g, g),
                                       input_image_size=(s.image_size, s.image_size), mask_in_chans=16),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=s.decoder_layers, embedding_dim=s.out_chans,
                                            mlp_dim=s.decoder_mlp, num_heads=s.decoder_heads),
            transformer_dim=s.out_chans, iou_head_depth=3, iou_head_hidden_dim=s.out_chans),
    ).eval()


_SAM_SHAPES = {
    "tiny": tiny_shape().sam,
    "other": SamShape(image_size=128, patch_size=16, hidden=48, layers=3, heads=3, mlp_dim=96, window=2,
                      global_attn=(0, 2), out_chans=64, decoder_layers=1, decoder_heads=4, decoder_mlp=32),
}


def _hf_sam(s: SamShape):
    from transformers import SamModel

    return SamModel(sam_config(dataclasses.replace(ModelShape(), sam=s))).eval()


@pytest.mark.parametrize("name", sorted(_SAM_SHAPES))
def test_sam_keys_and_shapes_match_segment_anything(name):
    s = _SAM_SHAPES[name]
    original = {keys.LISA_SAM_PREFIX + k: tuple(v.shape) for k, v in _original_sam(s).state_dict().items()}
    hf = {keys.MODULE_SAM_PREFIX + k: tuple(v.shape) for k, v in _hf_sam(s).state_dict().items()}
    assert keys.module_state_to_lisa(hf) == original


def test_sam_outputs_match_segment_anything_through_the_mapping():
    """Original weights, renamed, give the same embeddings and masks in LisaModel's SAM path."""
    s = tiny_shape().sam
    torch.manual_seed(0)
    original = _original_sam(s)
    with torch.no_grad():  # torch's default init zeroes biases and sets norms to 1: randomise everything
        for p in original.parameters():
            p.normal_(0.0, 0.2)
    renamed, unknown = keys.lisa_state_to_module(
        {keys.LISA_SAM_PREFIX + k: v for k, v in original.state_dict().items()})
    assert unknown == []
    model = LisaModel(tiny_shape())
    model.sam.load_state_dict({k[len(keys.MODULE_SAM_PREFIX):]: v for k, v in renamed.items()}, strict=True)

    pixels = torch.randn(1, 3, s.image_size, s.image_size)
    seg = torch.randn(2, s.out_chans)
    with torch.no_grad():
        want_embed = original.image_encoder(pixels)
        got_embed = model.sam_image_embeddings(pixels)
        torch.testing.assert_close(got_embed, want_embed, atol=1e-4, rtol=1e-4)
        # LISA's prompt: the [SEG] embedding is the only sparse prompt, dense is "no mask".
        want_masks = []
        for k in range(seg.shape[0]):
            _, dense = original.prompt_encoder(points=None, boxes=None, masks=None)
            low_res, _ = original.mask_decoder(image_embeddings=want_embed, image_pe=original.prompt_encoder.get_dense_pe(),
                                               sparse_prompt_embeddings=seg[k].reshape(1, 1, -1),
                                               dense_prompt_embeddings=dense, multimask_output=False)
            want_masks.append(low_res[0, 0])
        got_masks = model.sam_decode(got_embed, seg)
    assert got_masks.shape == (2, 4 * s.embed_grid, 4 * s.embed_grid)
    # Decoder LayerNorm eps differs (1e-5 original, 1e-6 HF): agreement is close, not bitwise.
    torch.testing.assert_close(got_masks, torch.stack(want_masks), atol=2e-3, rtol=2e-3)
