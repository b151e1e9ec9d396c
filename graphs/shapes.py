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


# A size past this is no model csprt can build (and no torch allocation would survive it): a config value there is
# corrupt, not ambitious. Layer counts, heads and grids are far below; LLaMA-3's vocabulary is 128k.
MAX_SIZE = 1 << 24


# The HF config keys the shape fields come from (`from_hf_configs`), so a problem names the key to fix.
HF_KEYS = {
    "llm.layers": "num_hidden_layers", "llm.hidden": "hidden_size", "llm.heads": "num_attention_heads",
    "llm.kv_heads": "num_key_value_heads", "llm.intermediate": "intermediate_size", "llm.vocab": "vocab_size",
    "llm.rms_norm_eps": "rms_norm_eps", "llm.max_positions": "max_position_embeddings", "llm.rope_theta": "rope_theta",
    "vision.layers": "CLIP num_hidden_layers", "vision.hidden": "CLIP hidden_size",
    "vision.heads": "CLIP num_attention_heads", "vision.intermediate": "CLIP intermediate_size",
    "vision.image_size": "CLIP image_size", "vision.patch_size": "CLIP patch_size",
    "vision.select_layer": "mm_vision_select_layer", "sam.out_chans": "out_dim",
}


def _problems(part: str, shape) -> list[str]:
    """What is wrong with one sub-shape's field values: wrong type, out of range, or inconsistent."""
    out = []
    for f in dataclasses.fields(shape):
        v = getattr(shape, f.name)
        where = f"{part}.{f.name}"
        where += f" ({HF_KEYS[where]})" if where in HF_KEYS else ""
        if f.type == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                out.append(f"{where} must be an integer, got {v!r}")
            elif f.name != "select_layer" and not 1 <= v <= MAX_SIZE:
                out.append(f"{where} must be 1 to {MAX_SIZE}, got {v}")
        elif f.type == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < float(v) < float("inf"):
                out.append(f"{where} must be a positive finite number, got {v!r}")
        elif f.type == "tuple[int, ...]":
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
                out.append(f"{where} must be a list of non-negative integers, got {list(v)!r}")
    return out


def _consistency(shape: "ModelShape") -> list[str]:
    v, llm, sam = shape.vision, shape.llm, shape.sam
    out = []
    for part, hidden, heads in (("vision", v.hidden, v.heads), ("llm", llm.hidden, llm.heads),
                                ("sam", sam.hidden, sam.heads)):
        if hidden % heads:
            out.append(f"{part}.hidden {hidden} is not a multiple of {part}.heads {heads}")
    if llm.heads % llm.kv_heads:
        out.append(f"llm.heads {llm.heads} is not a multiple of llm.kv_heads {llm.kv_heads}")
    if (llm.hidden // llm.heads) % 2:
        out.append(f"llm head size {llm.hidden // llm.heads} is odd; rotary embeddings need it even")
    if v.image_size < v.patch_size or sam.image_size < sam.patch_size:
        out.append("an image_size is smaller than its patch_size")
    if not -v.layers <= v.select_layer < v.layers:
        out.append(f"vision.select_layer {v.select_layer} is outside the tower's {v.layers} layers")
    if v.num_tokens >= llm.max_positions:
        out.append(f"{v.num_tokens} image tokens leave no room in llm.max_positions {llm.max_positions}")
    return out


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

    def problems(self) -> list[str]:
        """Every field of the wrong type or out of range, and every inconsistency; [] for a usable shape."""
        out = [p for part in ("vision", "llm", "sam") for p in _problems(part, getattr(self, part))]
        return out or _consistency(self)  # consistency only means something once the types are right

    @classmethod
    def from_dict(cls, data: dict) -> "ModelShape":
        try:
            sam = dict(data.get("sam", {}))
            if "global_attn" in sam:
                sam["global_attn"] = tuple(sam["global_attn"])
            shape = cls(
                vision=VisionShape(**data.get("vision", {})),
                llm=LlmShape(**data.get("llm", {})),
                sam=SamShape(**sam),
            )
        except (TypeError, AttributeError) as exc:
            raise ToolchainError(f"model shape has an unknown or malformed field: {exc}") from None
        bad = shape.problems()
        if bad:
            raise ToolchainError(f"model shape: {'; '.join(bad)}")
        return shape

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
        try:
            sam = dict(lisa_config.get("csprt_sam", {}))
            if "global_attn" in sam:
                sam["global_attn"] = tuple(sam["global_attn"])
            sam.setdefault("out_chans", lisa_config.get("out_dim", 256))
            sam_shape = SamShape(**sam)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"config.json csprt_sam block has an unknown or malformed field: {exc}") from None
        shape = cls(vision=vision, llm=llm, sam=sam_shape)
        bad = shape.problems()
        if bad:
            # Named by the model field; the config keys are the HF ones (num_hidden_layers = layers, ...).
            raise CheckpointError(f"checkpoint config.json (with its CLIP config.json) describes no usable model: "
                                  f"{'; '.join(bad)}; fix the config or re-create the checkpoint")
        return shape


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
