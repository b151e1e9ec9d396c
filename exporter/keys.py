"""Key mapping between LISA's checkpoint layout and `LisaModel.state_dict()` names.

LISA saves one flat state dict: the LLaMA part in HF Llama naming under `model.*` / `lm_head.*`,
its projector and [SEG] head under `model.`, and SAM under `model.visual_model.*` in the original
segment-anything naming. `LisaModel` uses transformers' `SamModel`, whose names differ, so SAM keys
are renamed by a table of prefix rules (the inverse of transformers' `convert_sam_to_hf.py`).

CLIP usually loads from its own HF directory. A checkpoint may embed it as LLaVA saves it:
`model.vision_tower.vision_tower.vision_model.*` (LLaVA v1's `CLIPVisionTower` wrapper) or
`model.vision_tower.vision_model.*` (the first LLaVA); both map to `vision_tower.*` (transformers 5 names CLIPVisionModel parameters without `vision_model.`).
LISA v0's two extra files hold `visual_model.*` and `text_hidden_fcs.*` (its `LISA` module's own names,
without the `model.` prefix): `lisa_to_module` reads them as `model.visual_model.*` / `model.text_hidden_fcs.*`.

The mapping is one to one except for one tensor: SAM's random Fourier matrix
(`prompt_encoder.pe_layer.positional_encoding_gaussian_matrix`) is a single parameter shared by two
HF modules, so it appears under two `state_dict()` names; `ALIASES` lists the second one.
"""

from __future__ import annotations

import re
from typing import Mapping, TypeVar

T = TypeVar("T")

# LISA prefix -> LisaModel prefix, outside SAM.
_TOP_RULES = (
    ("model.embed_tokens.", "llm.model.embed_tokens."),
    ("model.layers.", "llm.model.layers."),
    ("model.norm.", "llm.model.norm."),
    ("lm_head.", "llm.lm_head."),
    ("model.mm_projector.", "mm_projector."),
    ("model.text_hidden_fcs.", "text_hidden_fcs."),
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),  # LLaVA v1: the one written
)
# Read only: the first LLaVA's embedded CLIP naming.
_READ_ONLY_RULES = (("model.vision_tower.vision_model.", "vision_tower."),)
V0_PREFIXES = ("visual_model.", "text_hidden_fcs.")  # LISA v0's pytorch_model-{visual_model,text_hidden_fcs}.bin keys
CLIP_MODULE_PREFIX = "vision_tower."
LISA_SAM_PREFIX = "model.visual_model."
MODULE_SAM_PREFIX = "sam."

# Original segment-anything name -> transformers SamModel name, below the SAM prefix. `{i}` is a
# block index. The longest matching rule wins, so the generic ones only catch what is not renamed.
# nn.Sequential indices: neck = conv, LN2d, conv, LN2d; mask_downscaling = conv, LN2d, GELU, conv,
# LN2d, GELU, conv; output_upscaling = convT, LN2d, GELU, convT, GELU. SAM's MLP heads always have
# three layers, which HF names proj_in, layers.0, proj_out.
_SAM_RULES = (
    ("image_encoder.", "vision_encoder."),
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.blocks.{i}.", "vision_encoder.layers.{i}."),
    ("image_encoder.blocks.{i}.norm1.", "vision_encoder.layers.{i}.layer_norm1."),
    ("image_encoder.blocks.{i}.norm2.", "vision_encoder.layers.{i}.layer_norm2."),
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    ("prompt_encoder.", "prompt_encoder."),
    ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
     "prompt_encoder.shared_embedding.positional_embedding"),
    ("prompt_encoder.point_embeddings.", "prompt_encoder.point_embed."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("mask_decoder.", "mask_decoder."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    ("mask_decoder.output_hypernetworks_mlps.{i}.layers.0.", "mask_decoder.output_hypernetworks_mlps.{i}.proj_in."),
    ("mask_decoder.output_hypernetworks_mlps.{i}.layers.1.", "mask_decoder.output_hypernetworks_mlps.{i}.layers.0."),
    ("mask_decoder.output_hypernetworks_mlps.{i}.layers.2.", "mask_decoder.output_hypernetworks_mlps.{i}.proj_out."),
    ("mask_decoder.iou_prediction_head.layers.0.", "mask_decoder.iou_prediction_head.proj_in."),
    ("mask_decoder.iou_prediction_head.layers.1.", "mask_decoder.iou_prediction_head.layers.0."),
    ("mask_decoder.iou_prediction_head.layers.2.", "mask_decoder.iou_prediction_head.proj_out."),
    ("mask_decoder.transformer.layers.{i}.norm1.", "mask_decoder.transformer.layers.{i}.layer_norm1."),
    ("mask_decoder.transformer.layers.{i}.norm2.", "mask_decoder.transformer.layers.{i}.layer_norm2."),
    ("mask_decoder.transformer.layers.{i}.norm3.", "mask_decoder.transformer.layers.{i}.layer_norm3."),
    ("mask_decoder.transformer.layers.{i}.norm4.", "mask_decoder.transformer.layers.{i}.layer_norm4."),
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
)

# Second state_dict name of a shared tensor -> the name `module_to_lisa` maps.
ALIASES = {
    "sam.shared_image_embedding.positional_embedding": "sam.prompt_encoder.shared_embedding.positional_embedding",
}

# LISA keys a checkpoint may carry that LisaModel does not load: the rotary `inv_freq` buffers older
# transformers saved per layer (recomputed), and CLIP's `position_ids` buffer.
_IGNORED_LISA_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$|^model\.vision_tower\..*\.position_ids$")


def _compile(template: str) -> re.Pattern:
    """A prefix template -> a regex matching it at the start of a key, `{i}` capturing an index."""
    pattern = re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)")
    # A template not ending in "." names a whole key, so it must match to the end.
    return re.compile("^" + pattern + ("" if template.endswith(".") else "$"))


def _compile_rules(rules, prefix_from: str, prefix_to: str):
    return [(_compile(prefix_from + src), prefix_to + dst) for src, dst in rules]


_FORWARD = (_compile_rules(_TOP_RULES + _READ_ONLY_RULES, "", "")
            + _compile_rules(_SAM_RULES, LISA_SAM_PREFIX, MODULE_SAM_PREFIX))
_BACKWARD = _compile_rules([(d, s) for s, d in _TOP_RULES], "", "") + _compile_rules(
    [(d, s) for s, d in _SAM_RULES], MODULE_SAM_PREFIX, LISA_SAM_PREFIX)


def _rename(key: str, rules) -> str | None:
    best = None
    for pattern, template in rules:
        m = pattern.match(key)
        if m and (best is None or m.end() > best[0].end()):
            best = (m, template)
    if best is None:
        return None
    m, template = best
    head = template.replace("{i}", m.group("i")) if "{i}" in template else template
    return head + key[m.end():]


def is_ignored_lisa_key(key: str) -> bool:
    """True for checkpoint keys that are skipped on purpose (legacy rotary buffers, CLIP's position ids)."""
    return bool(_IGNORED_LISA_KEYS.search(key))


def lisa_to_module(key: str) -> str | None:
    """LISA checkpoint key -> `LisaModel.state_dict()` name, or None if no rule covers it.

    Args:
        key (str): e.g. "model.visual_model.image_encoder.blocks.0.norm1.weight".

    Returns:
        str | None: e.g. "sam.vision_encoder.layers.0.layer_norm1.weight". For the shared SAM
        Fourier matrix this is the prompt-encoder name; `ALIASES` holds the other one.
    """
    if key.startswith(V0_PREFIXES):
        key = "model." + key
    return _rename(key, _FORWARD)


def module_to_lisa(key: str) -> str | None:
    """`LisaModel.state_dict()` name -> LISA checkpoint key, or None (CLIP, unknown names).

    Args:
        key (str): e.g. "sam.mask_decoder.upscale_conv1.weight"; an `ALIASES` name maps like its target.
    """
    return _rename(ALIASES.get(key, key), _BACKWARD)


def module_state_to_lisa(state: Mapping[str, T], include_clip: bool = False) -> dict[str, T]:
    """A `LisaModel.state_dict()` -> LISA-layout dict: the alias (and CLIP, unless `include_clip`) dropped, the rest renamed.

    Args:
        state (Mapping[str, T]): module names to tensors (or shapes, or anything).
        include_clip (bool): keep CLIP as LLaVA v1 embeds it (`model.vision_tower.vision_tower.*`). Defaults to False.

    Raises:
        KeyError: a non-CLIP name no rule covers (LisaModel grew a module keys.py does not know).
    """
    out: dict[str, T] = {}
    for name, value in state.items():
        if name in ALIASES or name.startswith(CLIP_MODULE_PREFIX) and not include_clip:
            continue
        lisa = module_to_lisa(name)
        if lisa is None:
            raise KeyError(f"no LISA key for module parameter {name!r}")
        out[lisa] = value
    return out


def lisa_state_to_module(state: Mapping[str, T]) -> tuple[dict[str, T], list[str]]:
    """A LISA-layout dict -> module names (the shared SAM tensor under both names).

    Args:
        state (Mapping[str, T]): LISA checkpoint keys to tensors.

    Returns:
        (renamed, unknown): `renamed` maps module names to values; `unknown` lists the LISA keys
        no rule covers (ignored keys, see `is_ignored_lisa_key`, are dropped silently).
    """
    renamed: dict[str, T] = {}
    unknown: list[str] = []
    alias_of = {target: alias for alias, target in ALIASES.items()}
    for key, value in state.items():
        if is_ignored_lisa_key(key):
            continue
        name = lisa_to_module(key)
        if name is None:
            unknown.append(key)
            continue
        renamed[name] = value
        if name in alias_of:
            renamed[alias_of[name]] = value
    return renamed, unknown
