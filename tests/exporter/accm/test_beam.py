"""The caption decode: csprt's KV-cache beam search equals a plain one that re-runs GPT-2 over the whole sequence
each step, as ClipCap's generate_beam does (ids and scores), with and without beams that stop early."""

import pytest
import torch

from exporter.accm.beam import beam_search
from exporter.accm.model import CaptionModel
from exporter.accm.tiny import tiny_accm_shape


@torch.no_grad()
def plain_beam_search(gpt, embeds, stop_id, beams, max_tokens):
    """ClipCap's ranking written out independently: no cache, full sequence every step, log(softmax)."""
    wte = gpt.transformer.wte
    seqs = [[]]
    embeds_per = [embeds[0]]
    scores = None
    lengths = None
    stopped = None
    for step in range(max_tokens):
        logits = torch.stack([gpt(inputs_embeds=e[None]).logits[0, -1] for e in embeds_per]).float()
        logp = logits.softmax(-1).log()
        if step == 0:
            top, tok = logp[0].topk(beams)
            seqs = [[int(t)] for t in tok]
            scores, lengths = top.clone(), [1.0] * beams
            stopped = [int(t) == stop_id for t in tok]
            embeds_per = [torch.cat([embeds[0], wte(t[None])]) for t in tok]
        else:
            rows = []
            for b in range(beams):
                if stopped[b]:  # only token 0, at log p 0: score and length stay
                    row = torch.full_like(logp[b], -float("inf"))
                    row[0] = scores[b] / lengths[b]
                else:
                    row = (scores[b] + logp[b]) / (lengths[b] + 1)
                rows.append(row)
            flat = torch.stack(rows).view(-1)
            # the flat top-k over beams x vocab: highest average first, lower flat index first on ties
            cands = []
            for i in torch.argsort(-flat, stable=True)[:beams].tolist():
                b, v = divmod(i, logp.shape[1])
                cands.append((float(flat[i]), b, v, lengths[b] if stopped[b] else lengths[b] + 1))
            new = cands[:beams]
            seqs = [seqs[b] + [v] for _, b, v, _ in new]
            embeds_per = [torch.cat([embeds_per[b], wte(torch.tensor([v]))]) for _, b, v, _ in new]
            stopped = [stopped[b] or v == stop_id for _, b, v, _ in new]
            lengths = [length for *_, length in new]
            scores = torch.tensor([avg * length for avg, *_, length in new])
        if all(stopped):
            break
    final = [float(scores[b]) / lengths[b] for b in range(beams)]
    order = sorted(range(beams), key=lambda b: -final[b])
    return [seqs[b][:int(lengths[b])] for b in order], [final[b] for b in order]


# Seeds chosen so beams overtake each other (all), and one beam stops at the stop token while others go on (3).
@pytest.mark.parametrize("seed,stop_id,max_tokens", [(0, 5, 8), (1, 17, 8), (2, 3, 12), (3, 7, 10)])
def test_kv_cache_beam_search_equals_the_plain_one(seed, stop_id, max_tokens):
    torch.manual_seed(seed)
    model = CaptionModel(tiny_accm_shape(gpt_vocab=40, clip_vocab=514))
    # An untied LM head of its own: logits spread enough that beams differ and ties are rare.
    model.gpt.lm_head.weight = torch.nn.Parameter(torch.randn(40, model.shape.gpt_hidden) * 0.5)
    embeds = torch.randn(1, 6, model.shape.gpt_hidden)
    got = beam_search(model.gpt, embeds, stop_id, beams=3, max_tokens=max_tokens)
    want_ids, want_scores = plain_beam_search(model.gpt, embeds, stop_id, 3, max_tokens)
    assert got.ids == want_ids
    assert got.scores == pytest.approx(want_scores, abs=1e-4)
    assert all(len(i) <= max_tokens for i in got.ids)
    assert len({tuple(i) for i in got.ids}) == 3
    if seed == 3:
        assert sorted(len(i) for i in got.ids) == [5, 10, 10] and stop_id in got.ids[1]


def test_beams_that_stop_early(accm_models):
    """The tiny ACCM GPT-2 is taught to end at '.': beams stop at different lengths, and the result still matches."""
    a = accm_models
    stop = a.gpt_tokenizer.encode(".")[0]
    q = torch.tensor([a.gpt_tokenizer.encode("where is the cat?")])
    for seed in range(2):
        torch.manual_seed(seed)
        embeds = a.caption.prefix_embeds(q, torch.randn(1, 30, a.shape.clip_projection))
        got = beam_search(a.caption.gpt, embeds, stop, beams=3, max_tokens=67)
        want_ids, want_scores = plain_beam_search(a.caption.gpt, embeds, stop, 3, 67)
        assert got.ids == want_ids and got.scores == pytest.approx(want_scores, abs=1e-4)
        assert all(ids[-1] == stop for ids in got.ids)  # every candidate ended at "."
