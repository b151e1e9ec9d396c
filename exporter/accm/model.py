"""ACCM's own models, built from the field's parts, with module names that are ACCM's state-dict keys.

    kept-out CLIP tokens [1, M, P] -> linear -> ++ prefix_const [20, D] -> 4 x TransformerLayer -> last 20 rows
    CaptionModel: clip_project (the mapper above) + gpt (transformers' GPT2LMHeadModel)     keys clip_project.*, gpt.*
    Selector: nn.TransformerEncoder (pre-norm, GELU) over the candidates -> head -> softmax  keys transformer_encoder.*, head.*

Names follow ClipCap's `TransformerMapper` as ACCM ships it (clipcap_model.py at 50f1bd8), so a released
`.pt` state dict loads one to one; the code is csprt's own.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from graphs.accm import AccmShape


class MapperAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from one Linear (`to_keys_values`), as ClipCap's.

    Args:
        dim (int): model width.
        heads (int): attention heads.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, D]
        b, t, d = x.shape
        hd = d // self.heads
        q = self.to_queries(x).reshape(b, t, self.heads, hd).transpose(1, 2)          # [B, h, T, hd]
        kv = self.to_keys_values(x).reshape(b, t, 2, self.heads, hd)                  # keys first, then values
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        att = torch.softmax((q @ k.transpose(-1, -2)) * hd**-0.5, dim=-1)              # no mask: every row sees all
        return self.project((att @ v).transpose(1, 2).reshape(b, t, d))


class MapperMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class MapperLayer(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MapperAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MapperMlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MapperTransformer(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int, mlp_ratio: int):
        super().__init__()
        self.layers = nn.ModuleList(MapperLayer(dim, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Mapper(nn.Module):
    """ClipCap's transformer mapper: CLIP tokens -> `prefix_length` GPT-2 input rows.

    Args:
        shape (AccmShape): clip_projection (input width), gpt_hidden (output width), mapper sizes.
    """

    def __init__(self, shape: AccmShape):
        super().__init__()
        d = shape.gpt_hidden
        self.linear = nn.Linear(shape.clip_projection, d)
        self.prefix_const = nn.Parameter(torch.randn(shape.prefix_length, d))
        self.transformer = MapperTransformer(d, shape.mapper_heads, shape.mapper_layers, shape.mapper_mlp_ratio)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, M, clip_projection] projected CLIP tokens (any M) -> [B, prefix_length, gpt_hidden].

        ACCM slices `[:, clip_length:]` with clip_length = 576 - budget, i.e. exactly the prefix rows,
        which are the last `prefix_length` rows for any M.
        """
        x = self.linear(tokens)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.transformer(torch.cat([x, prefix], dim=1))[:, -self.prefix_const.shape[0]:]


def gpt2_config(shape: AccmShape) -> GPT2Config:
    return GPT2Config(vocab_size=shape.gpt_vocab, n_positions=shape.gpt_positions, n_embd=shape.gpt_hidden,
                      n_layer=shape.gpt_layers, n_head=shape.gpt_heads, bos_token_id=shape.gpt_vocab - 1,
                      eos_token_id=shape.gpt_vocab - 1)


class CaptionModel(nn.Module):
    """ClipCap's ClipCaptionModel as ACCM uses it: `clip_project` (the mapper) and `gpt` (GPT-2 with its LM head).

    Args:
        shape (AccmShape): sizes.
        gpt (GPT2LMHeadModel | None): a loaded GPT-2; None builds one from `shape`. Defaults to None.
    """

    def __init__(self, shape: AccmShape, gpt: GPT2LMHeadModel | None = None):
        super().__init__()
        self.shape = shape
        self.clip_project = Mapper(shape)
        self.gpt = gpt if gpt is not None else GPT2LMHeadModel(gpt2_config(shape))
        self.eval()

    def prefix_embeds(self, question_ids: torch.Tensor, kept_out: torch.Tensor) -> torch.Tensor:
        """GPT-2's input for the caption: wte(question) ++ mapper(tokens pruned away) (clip_encoder.py: q + v).

        Args:
            question_ids (Tensor): [1, Q] GPT-2 ids of the question.
            kept_out (Tensor): [1, M, clip_projection] projected CLIP embeddings of the tokens not picked.

        Returns:
            Tensor: [1, Q + prefix_length, gpt_hidden].
        """
        q = self.gpt.transformer.wte(question_ids)
        return torch.cat([q, self.clip_project(kept_out).to(q.dtype)], dim=1)


class Selector(nn.Module):
    """ACCM's TransformerSelector: scores the candidate captions' LongCLIP text features against each other.

    Args:
        shape (AccmShape): selector sizes; its width is LongCLIP's projection.
    """

    def __init__(self, shape: AccmShape):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=shape.selector_dim, nhead=shape.selector_heads,
                                           dim_feedforward=shape.selector_ffn, dropout=0.1, activation="gelu",
                                           norm_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, num_layers=shape.selector_layers,
                                                         enable_nested_tensor=False)
        self.head = nn.Linear(shape.selector_dim, 1)
        self.eval()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[C, D] candidates' text features -> [C] probabilities (softmax over the candidates).

        The encoder is sequence-first: the C candidates are its sequence, one batch (selector_transformer.py).
        """
        x = self.transformer_encoder(features.to(self.head.weight.dtype)[:, None])  # [C, 1, D]
        # softmax over [1, C], not a 1-D tensor: TensorRT-RTX's parser rejects a 1-D Softmax
        return self.head(x)[:, :, 0].transpose(0, 1).softmax(-1)[0]
