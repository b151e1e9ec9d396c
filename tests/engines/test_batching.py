"""engines/batching.py with a recording session: grouping, splitting, instance masks, a failed batch rerun alone."""

from __future__ import annotations

import types

import numpy as np
import pytest

from engines.batching import Item, group_items, run_items, served_max_batch
from graphs.errors import InputError


class Recorder:
    """segment_batch -> one namespace per request; raises for a batch holding `fail_on` (alone too if `always`)."""

    def __init__(self, fail_on: str | None = None, always: bool = False):
        self.calls, self.fail_on, self.always, self.prompts = [], fail_on, always, []

    def segment_batch(self, images, queries, mode="single-pass", max_new_tokens=None, instance_masks=None,
                      keep_encoding=False, prompts=None):
        self.calls.append((list(queries), mode, max_new_tokens, instance_masks, keep_encoding))
        self.prompts.append(prompts)
        if self.fail_on in queries and (self.always or len(queries) > 1):
            raise InputError(f"bad batch {queries}")
        return [types.SimpleNamespace(query=q, batch=len(queries)) for q in queries]


def _items(spec):
    """spec: (query, mode, max_new_tokens) per item."""
    return [Item(i, np.zeros((2, 2, 3), np.uint8), q, m, n) for i, (q, m, n) in enumerate(spec)]


def test_groups_by_mode_and_token_limit_in_arrival_order_and_splits_at_max_batch():
    items = _items([("a", "single-pass", None), ("b", "generate", 4), ("c", "single-pass", None),
                    ("d", "generate", 8), ("e", "single-pass", None), ("f", "generate", 4)])
    assert [[it.query for it in b] for b in group_items(items, 8)] == [["a", "c", "e"], ["b", "f"], ["d"]]
    assert [[it.query for it in b] for b in group_items(items, 2)] == [["a", "c"], ["e"], ["b", "f"], ["d"]]
    with pytest.raises(ValueError):
        group_items(items, 0)


def test_run_items_one_call_per_batch():
    session = Recorder()
    items = _items([("a", "single-pass", None), ("b", "generate", 4), ("c", "single-pass", None)])
    out = run_items(session, items, max_batch=8, keep_encoding=True)
    assert [(q, m, n, keep) for q, m, n, _, keep in session.calls] == [
        (["a", "c"], "single-pass", None, True), (["b"], "generate", 4, True)]
    assert {i: (r.query, r.batch) for i, r in out.items()} == {0: ("a", 2), 1: ("b", 1), 2: ("c", 2)}


def test_a_failed_batch_is_rerun_request_by_request():
    errors = []
    session = Recorder(fail_on="bad")
    out = run_items(session, _items([("a", "single-pass", None), ("bad", "single-pass", None)]), 8,
                    on_error=errors.append)
    assert [c[0] for c in session.calls] == [["a", "bad"], ["a"], ["bad"]]
    assert out[0].query == "a" and out[1].query == "bad" and len(errors) == 1
    session = Recorder(fail_on="bad", always=True)  # the request itself is at fault: its own error only
    out = run_items(session, _items([("a", "single-pass", None), ("bad", "single-pass", None)]), 8)
    assert out[0].query == "a" and isinstance(out[1], InputError)


def test_instance_masks_go_with_array_images_only():
    """seg_first: a cache hit (an encoding, masks inside it) shares a batch with a miss (an array and its masks)."""
    session, masks = Recorder(), np.ones((1, 4, 4), np.float32)
    items = [Item(0, "an encoding", "a", "single-pass"), Item(1, np.zeros((2, 2, 3), np.uint8), "b", "single-pass",
                                                              instance_masks=masks)]
    run_items(session, items, 8)
    [(queries, _, _, passed, _)] = session.calls
    assert queries == ["a", "b"] and passed[0] is None and passed[1] is masks
    run_items(session, items[:1], 8)
    assert session.calls[-1][3] is None  # no masks at all: none passed


def test_checked_prompts_ride_to_segment_batch():
    """The ids check_query made go with their batch (not tokenised again); a batch missing any is tokenised whole."""
    session = Recorder()
    a, b = Item(0, "enc", "a", "single-pass", prompt="ids a"), Item(1, "enc", "b", "single-pass", prompt="ids b")
    run_items(session, [a, b, Item(2, "enc", "c", "generate", 4, prompt="ids c")], 8)
    assert session.prompts == [["ids a", "ids b"], ["ids c"]]
    run_items(session, [a, Item(3, "enc", "d", "single-pass")], 8)
    assert session.prompts[-1] is None


def test_served_max_batch():
    art = types.SimpleNamespace(layout=types.SimpleNamespace(dims={"batch": types.SimpleNamespace(max=4)}),
                                rebuild_command="csprt export CKPT --schedule csp --out ART")
    assert served_max_batch(None, art) == 4 and served_max_batch(3, art) == 3
    with pytest.raises(InputError, match=r"--max-batch-size 5 is more than this artifact's exported maximum batch "
                                         r"of 4; pass --max-batch-size 4 or less, or re-export with csprt export "
                                         r"--max-batch 5 \(csprt export CKPT --schedule csp --out ART --max-batch 5\)"):
        served_max_batch(5, art)
    with pytest.raises(InputError, match="--max-batch-size 0: expected 1"):
        served_max_batch(0, art)
