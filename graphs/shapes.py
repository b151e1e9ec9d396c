"""Model shapes: the dimensions a schedule resolves against and FLOPs are counted from.

Plain data, no torch, so the exporter (which builds modules from them), `csprt flops` and the
engine side all read one description. A checkpoint's shape comes from its `config.json` plus the
CLIP directory's `config.json` (`ModelShape.from_hf_configs`); named presets give real sizes for
FLOPs and random-weight speed runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from graphs.errors import CheckpointError, ToolchainError


@dataclass(frozen=True)
class VisionShape:
    """CLIP vision tower. Features come from `hidden_states[select_layer]`, CLS dropped."""

    layers: int = 24
    hidden: int = 1024
    heads: int = 16
    intermediate: int = 4096
    image_size: int = 224
    patch_size: int = 14
    select_layer: int = -2

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class LlmShape:
    """LLaMA decoder (HF `LlamaConfig` field meanings)."""

    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 32
    intermediate: int = 11008
    vocab: int = 32004
    rms_norm_eps: float = 1e-6
    max_positions: int = 2048
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class SamShape:
    """SAM: ViT image encoder, prompt encoder, two-way mask decoder. Defaults are ViT-H."""

    image_size: int = 1024
    patch_size: int = 16
    hidden: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_dim: int = 5120
    window: int = 14
    global_attn: tuple[int, ...] = (7, 15, 23, 31)
    out_chans: int = 256  # embedding channels == prompt dim == [SEG] head output dim
    decoder_layers: int = 2
    decoder_heads: int = 8
    decoder_mlp: int = 2048
    initializer_range: float = 0.02

    @property
    def embed_grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class ModelShape:
    vision: VisionShape = field(default_factory=VisionShape)
    llm: LlmShape = field(default_factory=LlmShape)
    sam: SamShape = field(default_factory=SamShape)

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_tokens

    @property
    def out_dim(self) -> int:
        return self.sam.out_chans

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelShape":
        try:
            sam = dict(data.get("sam", {}))
            if "global_attn" in sam:
                sam["global_attn"] = tuple(sam["global_attn"])
            return cls(
                vision=VisionShape(**data.get("vision", {})),
                llm=LlmShape(**data.get("llm", {})),
                sam=SamShape(**sam),
            )
        except TypeError as exc:
            raise ToolchainError(f"model shape has an unknown field: {exc}") from None

    @classmethod
    def from_hf_configs(cls, lisa_config: dict, clip_config: dict) -> "ModelShape":
        """Shape of a LISA checkpoint from its `config.json` and the CLIP tower's `config.json`.

        Args:
            lisa_config: the checkpoint's config.json (LLaVA/LLaMA fields, LISA's `out_dim`, and an
                optional `csprt_sam` block written by `csprt make-tiny`; without it SAM is ViT-H).
            clip_config: the CLIP directory's config.json (a `CLIPVisionConfig` or a full `CLIPConfig`
                with a `vision_config` block).
        """
        try:
            heads = lisa_config["num_attention_heads"]
            llm = LlmShape(
                layers=lisa_config["num_hidden_layers"],
                hidden=lisa_config["hidden_size"],
                heads=heads,
                kv_heads=lisa_config.get("num_key_value_heads") or heads,
                intermediate=lisa_config["intermediate_size"],
                vocab=lisa_config["vocab_size"],
                rms_norm_eps=lisa_config.get("rms_norm_eps", 1e-6),
                max_positions=lisa_config.get("max_position_embeddings", 2048),
                rope_theta=lisa_config.get("rope_theta", 10000.0),
            )
        except KeyError as exc:
            raise CheckpointError(
                f"checkpoint config.json lacks {exc.args[0]!r}: expected a LLaMA/LLaVA config "
                "(num_hidden_layers, hidden_size, num_attention_heads, intermediate_size, vocab_size)"
            ) from None
        vc = clip_config.get("vision_config", clip_config)
        try:
            vision = VisionShape(
                layers=vc["num_hidden_layers"],
                hidden=vc["hidden_size"],
                heads=vc["num_attention_heads"],
                intermediate=vc["intermediate_size"],
                image_size=vc["image_size"],
                patch_size=vc["patch_size"],
                select_layer=lisa_config.get("mm_vision_select_layer", -2),
            )
        except KeyError as exc:
            raise CheckpointError(
                f"CLIP config.json lacks {exc.args[0]!r}: expected a CLIPVisionConfig "
                "(num_hidden_layers, hidden_size, num_attention_heads, intermediate_size, image_size, patch_size)"
            ) from None
        sam = dict(lisa_config.get("csprt_sam", {}))
        if "global_attn" in sam:
            sam["global_attn"] = tuple(sam["global_attn"])
        sam.setdefault("out_chans", lisa_config.get("out_dim", 256))
        try:
            sam_shape = SamShape(**sam)
        except TypeError as exc:
            raise CheckpointError(f"config.json csprt_sam block has an unknown field: {exc}") from None
        return cls(vision=vision, llm=llm, sam=sam_shape)


# Named shapes for FLOPs and random-weight speed runs. LISA-7B/13B are DESIGN.md section 1.
SHAPES: dict[str, ModelShape] = {
    "lisa-7b": ModelShape(),
    "lisa-13b": ModelShape(llm=LlmShape(layers=40, hidden=5120, heads=40, kv_heads=40, intermediate=13824)),
    # `small`: CPU-benchmark size, big enough that matmuls dominate, small enough for 2 cores.
    "small": ModelShape(
        vision=VisionShape(layers=4, hidden=256, heads=4, intermediate=1024, image_size=224, patch_size=14),
        llm=LlmShape(layers=8, hidden=512, heads=8, kv_heads=8, intermediate=1376, vocab=1024),
        sam=SamShape(image_size=256, patch_size=16, hidden=128, layers=2, heads=4, mlp_dim=512, window=4,
                     global_attn=(1,), out_chans=64, decoder_heads=4, decoder_mlp=256),
    ),
}


def shape_named(name: str) -> ModelShape:
    if name not in SHAPES:
        raise ToolchainError(f"unknown model shape {name!r}; choose one of: {', '.join(sorted(SHAPES))}")
    return SHAPES[name]
