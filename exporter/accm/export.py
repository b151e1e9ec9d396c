"""ACCM's first exportable pieces: the picks (weightless) and the selector (LongCLIP's text tower + selector).

Not wired into `csprt export` yet (docs/accm.md, "Not built yet"): these are the graphs a later layout
will name, each traced with torch.onnx.export (dynamo) and checked on ONNX Runtime against torch.

    accm_picks     cls_attn [N], text_embeds [1, P], patch_embeds [N, P] -> image_indices [budget] (ascending)
    accm_selector  candidate_ids [C, "selector_len"] (LongCLIP tokens, EOT the highest id, padded with it)
                   -> probs [C]
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from exporter.accm.picks import pick_indices_static


class PicksGraph(nn.Module):
    """ACCM's picks as one weightless graph (`pick_indices_static`)."""

    def __init__(self, budget: int, n_text: int):
        super().__init__()
        self.budget, self.n_text = budget, n_text

    def forward(self, cls_attn, text_embeds, patch_embeds):
        return pick_indices_static(cls_attn, text_embeds, patch_embeds, self.budget, self.n_text)


class SelectorGraph(nn.Module):
    """LongCLIP's text features of each candidate, then ACCM's selector: [C, L] ids -> [C] probabilities.

    The pooled row is each candidate's first highest id (EOT; padding with EOT leaves it first), as LongCLIP's
    encode_text takes `text.argmax(-1)`.
    """

    def __init__(self, longclip_text: nn.Module, selector: nn.Module):
        super().__init__()
        self.longclip_text, self.selector = longclip_text, selector

    def forward(self, candidate_ids):
        tm = self.longclip_text.text_model
        x = tm.embeddings(input_ids=candidate_ids)                                  # [C, L, W]
        n = candidate_ids.shape[1]
        causal = torch.full((n, n), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)
        x = tm.encoder(inputs_embeds=x, attention_mask=causal[None, None]).last_hidden_state
        x = tm.final_layer_norm(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), candidate_ids.argmax(-1)]  # [C, W]
        return self.selector(self.longclip_text.text_projection(pooled))


def export_graph(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                 dynamic: tuple | None = None, opset: int = 18) -> Path:
    """torch.onnx.export (dynamo) into `path`, exporter chatter silenced; returns `path`."""
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), args, dynamo=True, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic, opset_version=opset)
    program.save(str(path))
    return path
