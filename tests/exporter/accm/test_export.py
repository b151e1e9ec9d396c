"""ACCM's first graphs on ONNX Runtime equal torch: the picks (the same indices) and the selector."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from exporter.accm.export import PicksGraph, SelectorGraph, export_graph
from exporter.accm.picks import pick_tokens
from graphs.accm import selector_text


def _case(seed, n, p=16):
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(n, generator=g) * 0.01
    k = int(torch.randint(0, 12, (1,), generator=g))
    attn[torch.randperm(n, generator=g)[:k]] += torch.rand(k, generator=g)
    return attn, torch.randn(1, p, generator=g), torch.randn(n, p, generator=g)


def test_picks_graph_on_onnxruntime(tmp_path):
    path = export_graph(PicksGraph(budget=16, n_text=9), _case(0, 256), tmp_path / "accm_picks.onnx",
                        ["cls_attn", "text_embeds", "patch_embeds"], ["image_indices"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed in range(12):
        attn, text, patches = _case(seed, 256)
        got = sess.run(None, {"cls_attn": attn.numpy(), "text_embeds": text.numpy(),
                              "patch_embeds": patches.numpy()})[0]
        assert got.tolist() == pick_tokens(attn, text, patches, 16, 9).sorted_indices, seed


def test_selector_graph_on_onnxruntime(accm_models, tmp_path):
    a = accm_models
    texts = [selector_text("Where is the cat?", c) for c in ("a cat on a sofa.", "a dog.", "two chairs near a window.")]
    enc = a.longclip_tokenizer(texts, padding=True, truncation=True, max_length=248, return_tensors="pt")
    ids = enc["input_ids"]
    eot = a.longclip_tokenizer.eos_token_id
    assert int(ids.max()) == eot and a.longclip_tokenizer.pad_token_id == eot  # pooled at the first EOT
    graph = SelectorGraph(a.longclip_text, a.selector)
    with torch.no_grad():
        want = graph(ids)
        # The graph's probabilities are the selector's over each candidate's own, unpadded text features.
        feats = torch.stack([a.longclip_text(input_ids=a.longclip_tokenizer(t, return_tensors="pt")["input_ids"])
                             .text_embeds[0] for t in texts])
        assert torch.allclose(want, a.selector(feats), atol=1e-5)
    dim = torch.export.Dim("selector_len", min=2, max=248)
    path = export_graph(graph, (ids,), tmp_path / "accm_selector.onnx", ["candidate_ids"], ["probs"],
                        dynamic=({1: dim},))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"candidate_ids": ids.numpy()})[0]
    assert np.allclose(got, want.numpy(), atol=1e-5) and got.sum() == pytest.approx(1.0, abs=1e-5)
    short = ids[:, :ids.shape[1] - 1].clone()  # another length through the same graph
    short[:, -1] = eot
    with torch.no_grad():
        assert np.allclose(sess.run(None, {"candidate_ids": short.numpy()})[0], graph(short).numpy(), atol=1e-5)
