"""ACCM's caption decode: ClipCap's beam search (decoding_scheme.py `generate_beam`), with a KV cache.

ClipCap re-runs GPT-2 over the whole sequence at every step; this runs the prefix once (prefill, batch 1),
then one row per beam per step (beams as a batch of 3) against a cache reordered by each step's winners,
which is the loop an exported decode graph runs. The ranking is ClipCap's exactly:

    step 0      log p = log(softmax(logits)); the top `beams` tokens start the beams
    step i > 0  a stopped beam may only continue with token 0 at log p 0 (its score and length stay);
                every live beam's length grows by one; candidates rank by (score + log p) / length over
                beams x vocab; the winners' cache rows, lengths and stop flags follow them
    stop        a beam stops on the stop token ("."); the loop ends when all have, or after
                `max_tokens` steps
    result      score / length per beam, tokens cut to their length (the stop token included),
                beams sorted by that score, best first: all of them are the selector's candidates
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BeamResult:
    ids: list[list[int]]     # per candidate, best first: GPT-2 ids up to and including the stop token
    scores: list[float]      # per candidate: summed log-probability / length
    steps: int               # decode iterations run (prefill included)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """ClipCap's `logits.softmax(-1).log()` (not log_softmax: a probability that underflows is -inf, as there)."""
    return logits.float().softmax(-1).log()


@torch.no_grad()
def beam_search(gpt, prefix_embeds: torch.Tensor, stop_id: int, beams: int = 3, max_tokens: int = 67) -> BeamResult:
    """Decode `beams` captions from `prefix_embeds` with GPT-2 and a KV cache.

    Args:
        gpt (GPT2LMHeadModel): the caption model's GPT-2.
        prefix_embeds (Tensor): [1, T, D] input embeddings (question words ++ mapper prefix).
        stop_id (int): GPT-2 id of the stop token (".").
        beams (int): beam width. Defaults to 3.
        max_tokens (int): most tokens per caption (ClipCap's entry_length). Defaults to 67.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    out = gpt(inputs_embeds=prefix_embeds, past_key_values=cache, use_cache=True)
    logp = log_probs(out.logits[:, -1])[0]                              # [V]
    scores, tokens = logp.topk(beams)                                   # [beams]
    tokens = tokens[:, None]                                            # [beams, 1]
    cache.batch_repeat_interleave(beams)
    lengths = torch.ones(beams, device=logp.device)
    stopped = tokens[:, 0] == stop_id
    steps = 1
    while steps < max_tokens and not bool(stopped.all()):
        out = gpt(input_ids=tokens[:, -1:], past_key_values=cache, use_cache=True)
        logp = log_probs(out.logits[:, -1])                             # [beams, V]
        logp[stopped] = -float("inf")
        logp[stopped, 0] = 0.0
        total = scores[:, None] + logp
        lengths = lengths + (~stopped).float()
        best, flat = (total / lengths[:, None]).view(-1).topk(beams)
        source, token = flat // logp.shape[1], flat % logp.shape[1]
        lengths = lengths[source]
        tokens = torch.cat([tokens[source], token[:, None]], dim=1)
        scores = best * lengths
        stopped = stopped[source] | (token == stop_id)
        cache.reorder_cache(source)
        steps += 1
    final = scores / lengths
    order = final.argsort(descending=True).tolist()
    return BeamResult(ids=[tokens[b, :int(lengths[b])].tolist() for b in order], scores=[float(final[b]) for b in order],
                      steps=steps)
