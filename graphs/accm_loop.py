"""The host side of ACCM's caption decode over exported graphs (numpy only): prefill, then beams as a batch.

    feed = accm_mapper(question_ids, kept_out)                       # token_ids, row_embeds, use_embeds [1, T0]
    accm_gpt2(feed, empty cache, past_len 0) -> logp [1, V], K/V of T0 rows -> written at 0; past_len = T0
    caches tiled to `beams`; logp repeated; scores, lengths, stopped = [0, -inf, ...], 0, False
    repeat up to max_tokens:  accm_beam_step -> token, source, state; caches[:, source]; ids[source] + token
                              stop when all stopped or at max_tokens, else accm_gpt2(token as one row per beam)
                              -> logp [beams, V], K/V written at past_len; past_len += 1
    candidates: ids cut to their lengths, best score / length first

The caches are preallocated at T0 + max_tokens rows and written in place, as the LLM blocks' caches are.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def beam_loop(gpt2: Runner, step: Runner, prefill: dict[str, np.ndarray], layers: int, heads: int, head_dim: int,
              stop_id: int, beams: int = 3, max_tokens: int = 67) -> tuple[list[list[int]], list[float]]:
    """Run the caption decode. Returns (ids per candidate, score per candidate), best first.

    Args:
        gpt2: runs accm_gpt2 (feeds and outputs by name).
        step: runs accm_beam_step.
        prefill (dict): accm_mapper's outputs (token_ids, row_embeds, use_embeds).
        layers (int): GPT-2's layers (cache inputs past_{key,value}_<l>).
        heads (int): GPT-2's attention heads.
        head_dim (int): their width.
        stop_id (int): the stop token's id.
        beams (int): beam width. Defaults to 3.
        max_tokens (int): tokens per caption. Defaults to 67.
    """
    t0 = prefill["token_ids"].shape[1]
    names = [f"{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    # The prefill's cache: one zero row (past_len 0: nothing in it is read).
    out = gpt2({**prefill, "past_len": np.array([0], np.int64),
                **{f"past_{n}": np.zeros((1, heads, 1, head_dim), np.float32) for n in names}})
    caches = {}
    for n in names:
        new = out[n]                                                   # [1, H, T0, hd]
        buf = np.zeros((beams, new.shape[1], t0 + max_tokens, new.shape[3]), new.dtype)
        buf[:, :, :t0] = new
        caches[n] = buf
    past_len = t0
    logp = np.repeat(out["logp"], beams, axis=0)
    scores = np.full(beams, -np.inf, np.float32)
    scores[0] = 0.0
    lengths, stopped = np.zeros(beams, np.float32), np.zeros(beams, bool)
    ids = np.zeros((beams, 0), np.int64)
    for i in range(max_tokens):
        if i:
            out = gpt2({"token_ids": ids[:, -1:], "row_embeds": np.zeros((beams, 1, heads * head_dim), np.float32),
                        "use_embeds": np.zeros((beams, 1), np.int64), "past_len": np.array([past_len], np.int64),
                        **{f"past_{n}": caches[n] for n in names}})
            for n in names:
                caches[n][:, :, past_len] = out[n][:, :, 0]
            past_len += 1
            logp = out["logp"]
        r = step({"logp": logp, "scores": scores, "lengths": lengths, "stopped": stopped,
                  "stop_id": np.array([stop_id], np.int64)})
        source = r["source"]
        ids = np.concatenate([ids[source], r["token"][:, None]], axis=1)
        scores, lengths, stopped = r["scores"], r["lengths"], r["stopped"]
        for n in names:
            caches[n] = caches[n][source]
        if stopped.all():
            break
    final = scores / lengths
    order = sorted(range(beams), key=lambda b: -final[b])
    return [ids[b, :int(lengths[b])].tolist() for b in order], [float(final[b]) for b in order]

