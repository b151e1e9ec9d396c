"""make-tiny --llm-weights trained-like: heavy-tailed LLM weights and outlier channels, seeded."""

from __future__ import annotations

import torch

from exporter.model import LisaModel
from exporter.tiny import tiny_shape, trained_like_llm


def _model(seed: int = 0) -> LisaModel:
    torch.manual_seed(0)
    model = LisaModel(tiny_shape())
    trained_like_llm(model, seed)
    return model


def test_weights_get_heavy_tails_at_the_same_scale_and_outlier_channels():
    plain = LisaModel(tiny_shape())
    model = _model()
    q, q0 = (m.llm.model.layers[0].self_attn.q_proj.weight.detach() for m in (model, plain))
    z = (q - q.mean()) / q.std()
    assert float((z ** 4).mean()) > 5.0  # a Gaussian's kurtosis is 3
    assert abs(float(q.std() / q0.std()) - 1) < 0.05
    gain = model.llm.model.layers[1].input_layernorm.weight
    assert int((gain == 8.0).sum()) == 2 and int((gain == 1.0).sum()) == gain.numel() - 2


def test_same_seed_same_weights():
    a, b = _model(3), _model(3)
    assert all(torch.equal(x, y) for x, y in zip(a.llm.parameters(), b.llm.parameters()))
    assert not torch.equal(_model(4).llm.lm_head.weight, a.llm.lm_head.weight)
