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


def beam_step(logp: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor, stopped: torch.Tensor, stop_id,
              beams: int):
    """One ranking step of ClipCap's beam search, static shapes (the `accm_beam_step` graph traces this).

    Args:
        logp (Tensor): [beams, V] log-probabilities of each beam's next token.
        scores (Tensor): [beams] summed log-probabilities. The first step starts from [0, -inf, ...] with
            lengths 0, which makes it ClipCap's first step (the top `beams` tokens of beam 0).
        lengths (Tensor): [beams] float lengths.
        stopped (Tensor): [beams] bool.
        stop_id: the stop token's id (int or [1] int64 tensor).
        beams (int): beam width.

    Returns:
        (token [beams], source [beams], scores, lengths, stopped): the winners, the beams they extend, their state.
    """
    col0 = torch.arange(logp.shape[1], device=logp.device)[None] == 0
    stopped_row = torch.where(col0, torch.zeros_like(logp), torch.full_like(logp, -float("inf")))
    logp = torch.where(stopped[:, None], stopped_row, logp)
    lengths = lengths + (~stopped).to(lengths.dtype)
    best, flat = ((scores[:, None] + logp) / lengths[:, None]).reshape(1, -1).topk(beams, dim=-1)  # 2-D: TensorRT
    best, flat = best[0], flat[0]
    source, token = flat // logp.shape[1], flat % logp.shape[1]
    lengths = lengths[source]
    return token, source, best * lengths, lengths, stopped[source] | (token == stop_id)


def first_step_state(beams: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, lengths, stopped) before the first step: only beam 0 is live, nothing is generated yet."""
    scores = torch.full((beams,), -float("inf"), device=device)
    scores[0] = 0.0
    return scores, torch.zeros(beams, device=device), torch.zeros(beams, dtype=torch.bool, device=device)


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
    logp = log_probs(out.logits[:, -1]).expand(beams, -1)                  # [beams, V]: beam 0 is the live one
    scores, lengths, stopped = first_step_state(beams, logp.device)
    cache.batch_repeat_interleave(beams)
    tokens = torch.zeros((beams, 0), dtype=torch.long, device=logp.device)
    for step in range(max_tokens):
        if step:
            logp = log_probs(gpt(input_ids=tokens[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1])
        token, source, scores, lengths, stopped = beam_step(logp, scores, lengths, stopped, stop_id, beams)
        tokens = torch.cat([tokens[source], token[:, None]], dim=1)
        cache.reorder_cache(source)
        if bool(stopped.all()):
            break
    final = scores / lengths
    order = final.argsort(descending=True).tolist()
    return BeamResult(ids=[tokens[b, :int(lengths[b])].tolist() for b in order], scores=[float(final[b]) for b in order],
                      steps=tokens.shape[1])
