"""The LISA model composed from the field's own parts.

    pixels(224) -> CLIPVisionModel -> hidden_states[select_layer][:, 1:] -> mm_projector --+
    prompt ids  -> embed_tokens ---------------------------------------------------------+-> LlamaForCausalLM
    final post-norm hidden state before each [SEG] -> text_hidden_fcs -> SAM prompt (sparse)
    pixels(1024) -> SAM image encoder -> mask decoder (multimask_output=False) -> mask logits

Module names follow LISA's key layout so `exporter/keys.py` maps checkpoints one to one:
`llm` holds `model.{embed_tokens,layers,norm}` and `lm_head`; `mm_projector`, `text_hidden_fcs`
sit beside it; `sam` is transformers' `SamModel` (the original segment-anything names are mapped).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, SamConfig, SamModel
from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

from graphs.shapes import ModelShape


def llama_config(shape: ModelShape, attn: str = "sdpa") -> LlamaConfig:
    llm = shape.llm
    cfg = LlamaConfig(
        vocab_size=llm.vocab, hidden_size=llm.hidden, intermediate_size=llm.intermediate,
        num_hidden_layers=llm.layers, num_attention_heads=llm.heads, num_key_value_heads=llm.kv_heads,
        rms_norm_eps=llm.rms_norm_eps, max_position_embeddings=llm.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cfg._attn_implementation = attn
    return cfg


def clip_config(shape: ModelShape) -> CLIPVisionConfig:
    v = shape.vision
    cfg = CLIPVisionConfig(
        hidden_size=v.hidden, intermediate_size=v.intermediate, num_hidden_layers=v.layers,
        num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    # Eager: cls_attention clustering reads the last layer's attention probabilities.
    cfg._attn_implementation = "eager"
    return cfg


def sam_config(shape: ModelShape) -> SamConfig:
    s = shape.sam
    vision = SamVisionConfig(
        hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads, mlp_dim=s.mlp_dim,
        image_size=s.image_size, patch_size=s.patch_size, output_channels=s.out_chans, window_size=s.window,
        global_attn_indexes=list(s.global_attn), num_pos_feats=s.out_chans // 2,
        # transformers' default 1e-10 initialises SAM to all-zero outputs; 0.02 gives real masks.
        initializer_range=s.initializer_range,
    )
    prompt = SamPromptEncoderConfig(hidden_size=s.out_chans, image_size=s.image_size, patch_size=s.patch_size,
                                    mask_input_channels=16, image_embedding_size=s.embed_grid)
    decoder = SamMaskDecoderConfig(hidden_size=s.out_chans, num_hidden_layers=s.decoder_layers,
                                   num_attention_heads=s.decoder_heads, mlp_dim=s.decoder_mlp,
                                   iou_head_hidden_dim=s.out_chans)
    cfg = SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder,
                    initializer_range=s.initializer_range)
    # Eager: the SAM encoder exports to ONNX only with eager attention.
    cfg._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    return cfg


class LisaModel(nn.Module):
    """CLIP + projector + LLaMA + [SEG] head + SAM with random init; weights come from `exporter.checkpoint`.

    Args:
        shape (ModelShape): dimensions of every part.
        attn (str): LLaMA attention implementation, "sdpa" or "eager". Defaults to "sdpa".
    """

    def __init__(self, shape: ModelShape, attn: str = "sdpa"):
        super().__init__()
        self.shape = shape
        self.vision_tower = CLIPVisionModel(clip_config(shape))
        self.mm_projector = nn.Linear(shape.vision.hidden, shape.llm.hidden)
        self.llm = LlamaForCausalLM(llama_config(shape, attn))
        h = shape.llm.hidden
        # ModuleList of one Sequential: LISA's exact layout, keys text_hidden_fcs.0.{0,2}.*
        self.text_hidden_fcs = nn.ModuleList(
            [nn.Sequential(nn.Linear(h, h), nn.ReLU(inplace=True), nn.Linear(h, shape.out_dim), nn.Dropout(0.0))]
        )
        self.sam = SamModel(sam_config(shape))
        self.eval()

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.llm.model.layers

    @torch.no_grad()
    def vision_features(self, clip_pixels: torch.Tensor, with_cls_attention: bool = False):
        """CLIP patch features and their projection.

        Args:
            clip_pixels (Tensor): [1, 3, S, S] CLIP-normalised pixels.
            with_cls_attention (bool): also return the last CLIP layer's CLS-row attention over the
                patches, mean over heads. Defaults to False.

        Returns:
            (features [1, N, Dv], projected [1, N, H], cls_attention [1, N] or None)
        """
        out = self.vision_tower(pixel_values=clip_pixels, output_hidden_states=True,
                                output_attentions=with_cls_attention)
        feats = out.hidden_states[self.shape.vision.select_layer][:, 1:]  # [1, N, Dv], CLS dropped
        cls_attn = out.attentions[-1][:, :, 0, 1:].mean(dim=1) if with_cls_attention else None
        return feats, self.mm_projector(feats), cls_attn

    def seg_head(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """[K, H] final post-norm hidden states -> [K, out_dim] SAM prompt embeddings."""
        return self.text_hidden_fcs[0](final_hidden)

    @torch.no_grad()
    def sam_image_embeddings(self, sam_pixels: torch.Tensor) -> torch.Tensor:
        """[1, 3, S, S] normalised, padded pixels -> [1, C, S/16, S/16]."""
        return self.sam.get_image_embeddings(sam_pixels)

    @torch.no_grad()
    def sam_decode(self, image_embeddings: torch.Tensor, seg_embeddings: torch.Tensor) -> torch.Tensor:
        """One low-resolution mask per [SEG] embedding, as LISA drives SAM.

        Args:
            image_embeddings (Tensor): [1, C, g, g], or [K, C, g, g]: one per mask.
            seg_embeddings (Tensor): [K, C], the [SEG] head outputs.

        Returns:
            Tensor: [K, 4g, 4g] low-resolution mask logits.
        """
        k, c = seg_embeddings.shape
        g = image_embeddings.shape[-1]
        sparse = seg_embeddings.reshape(k, 1, 1, c)  # [K, point_batch=1, points=1, C]: LISA's text_embeds prompt
        dense = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, c, 1, 1).expand(k, c, g, g)
        image_pe = self.sam.get_image_wide_positional_embeddings().expand(k, -1, -1, -1)
        masks, _ = self.sam.mask_decoder(
            image_embeddings=image_embeddings.expand(k, -1, -1, -1),
            image_positional_embeddings=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )[:2]
        return masks[:, 0, 0]  # [K, 4g, 4g]
