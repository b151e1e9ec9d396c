"""Weights once: in a `both` artifact every checkpoint weight lives in exactly one graph file (generate mode's decode
steps run the prefill blocks), so it carries no more weight bytes than a `single-pass` artifact."""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

BIG = 1024  # elements: every matrix of the tiny model; norms and biases (which can repeat by value) are smaller


def _initializers(art):
    """graph file -> [(name, sha256 of the values, element count)] for every initializer."""
    out = {}
    for path in sorted((art / "graphs").glob("*.onnx")):
        model = onnx.load(str(path))
        out[path.name] = [(t.name, hashlib.sha256(np.ascontiguousarray(numpy_helper.to_array(t)).tobytes()).hexdigest(),
                           int(np.prod(t.dims))) for t in model.graph.initializer]
    return out


def test_every_weight_in_one_graph_only(export_tiny):
    graphs = _initializers(export_tiny("csp", "both"))
    by_name, by_hash = defaultdict(set), defaultdict(set)
    for graph, inits in graphs.items():
        for name, digest, size in inits:
            # rotary inv_freq is a buffer computed from the config, not a checkpoint weight: each block has it
            if name.startswith("model.") and not name.endswith("rotary_emb.inv_freq"):
                by_name[name].add(graph)
            if size >= BIG:
                by_hash[digest].add(graph)
    assert {n: g for n, g in by_name.items() if len(g) > 1} == {}
    assert {d: g for d, g in by_hash.items() if len(g) > 1} == {}
    llm = {n for n in by_name if n.startswith("model.llm.")}
    assert by_name["model.llm.model.embed_tokens.weight"] == {"embed.onnx"}
    assert by_name["model.llm.lm_head.weight"] == {"llm_2.onnx"}  # the last block holds the head
    assert {g for n in llm for g in by_name[n]} == {"embed.onnx", "llm_0.onnx", "llm_1.onnx", "llm_2.onnx"}
    weightless = [g for g, inits in graphs.items() if g.startswith(("entry_", "seg_gather"))]
    assert len(weightless) == 4 and all(size < BIG for g in weightless for _, _, size in graphs[g])


def test_both_costs_what_single_pass_costs(export_tiny):
    """Graph bytes of a `both` artifact within 2% of a `single-pass` one of the same checkpoint (schema 1: +LLM)."""
    size = lambda art: sum(p.stat().st_size for p in (art / "graphs").iterdir())  # noqa: E731
    both, single = size(export_tiny("full", "both")), size(export_tiny("full", "single-pass"))
    assert single <= both <= 1.02 * single
