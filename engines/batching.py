"""A group of served requests as batched pipeline calls (`csprt serve`'s SegmentModel, the Triton BLS model).

    requests of one Triton call (dynamic batcher group), each checked alone by the caller:
        bad  -> its own error response
        good -> Item(index, source = image array | cached ImageEncoding, query, mode, max_new_tokens)
    check_query(session, query, mode)  tokenised and held to the exported text ranges, request by request; its
                                       ids ride in the Item to segment_batch (`prompts`: tokenised once)
    group_items(items, max_batch)      same (mode, max_new_tokens), arrival order, at most max_batch per
                                       batch (the artifact's `--max-batch`)
    run_items(session, items, ...)     one ArtifactSession.segment_batch per batch; hits and misses of the image
                                       cache mix in one batch (arrays among encodings are encoded first)
                                       -> {index: Segmentation | Exception}

A batch that fails as a whole (something the one-by-one checks did not catch) is run again request by
request, so a request's error never becomes its neighbours' and each result still equals the request alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from engines.host import check_host_feed
from graphs.prompt import PromptIds


@dataclass(frozen=True)
class Item:
    """One checked request of a group.

    index: its position in the group (responses go back in request order).
    source: uint8 RGB [H, W, 3], or the ImageEncoding a cache hit gave.
    instance_masks: [M, grid, grid] for seg_first artifacts, with an array source only. Defaults to None.
    prompt: the query's ids for `mode`, as `check_query` returned them. Defaults to None (tokenised when run).
    """

    index: int
    source: object
    query: str
    mode: str
    max_new_tokens: int | None = None
    instance_masks: object = None
    prompt: PromptIds | None = None


def check_query(session, query: str, mode: str) -> PromptIds:
    """Tokenise one request's prompt and hold it to the exported text ranges (the check segment_batch makes
    for the whole batch), so an over-long query fails alone, naming the dim and its range.

    Returns:
        PromptIds: the prompt's ids, for the Item (segment_batch then uses them instead of tokenising again).

    Raises:
        InputError: an empty query, an unknown mode, or a prompt outside the exported range.
    """
    ids = session.host.prompt_ids([query], mode)
    check_host_feed(session.artifact.layout, session.host.query_feed(ids, mode))
    return ids[0]


def group_items(items: list[Item], max_batch: int) -> list[list[Item]]:
    """Items that can share one segment_batch call, in arrival order, at most `max_batch` per batch.

    A batch has one mode and one max_new_tokens (segment_batch takes one of each).
    """
    if max_batch < 1:
        raise ValueError(f"max_batch {max_batch} < 1")
    groups: dict[tuple, list[Item]] = {}
    for it in items:
        groups.setdefault((it.mode, it.max_new_tokens), []).append(it)
    return [g[i:i + max_batch] for g in groups.values() for i in range(0, len(g), max_batch)]


def _segment(session, batch: list[Item], keep_encoding: bool) -> list:
    first = batch[0]  # instance masks: per array image (seg_first); an encoding has them already (None)
    masks = [it.instance_masks for it in batch] if any(it.instance_masks is not None for it in batch) else None
    prompts = [it.prompt for it in batch] if all(it.prompt is not None for it in batch) else None
    return session.segment_batch([it.source for it in batch], [it.query for it in batch], mode=first.mode,
                                 max_new_tokens=first.max_new_tokens, instance_masks=masks,
                                 keep_encoding=keep_encoding, prompts=prompts)


def run_items(session, items: list[Item], max_batch: int, keep_encoding: bool = False,
              on_error: Callable[[Exception], None] = lambda exc: None) -> dict[int, object]:
    """Segment every item, one `segment_batch` call per batch of `group_items`.

    Args:
        session (ArtifactSession): the pipeline.
        items (list[Item]): the group's checked requests.
        max_batch (int): the most requests per call (at most the artifact's `max_batch`).
        keep_encoding (bool): return each array image's encoding (`Segmentation.encoding`), for a cache.
            Defaults to False.
        on_error (Callable[[Exception], None]): told of a whole batch's failure before it is run again request
            by request (a log line). Defaults to nothing.

    Returns:
        dict[int, Segmentation | Exception]: item index -> its result, or the exception its run raised.
    """
    out: dict[int, object] = {}
    for batch in group_items(items, max_batch):
        try:
            out.update(zip((it.index for it in batch), _segment(session, batch, keep_encoding)))
            continue
        except Exception as exc:  # noqa: BLE001 - decided per request below
            if len(batch) == 1:
                out[batch[0].index] = exc
                continue
            on_error(exc)
        for it in batch:  # alone: only the request at fault fails
            try:
                out[it.index] = _segment(session, [it], keep_encoding)[0]
            except Exception as exc:  # noqa: BLE001 - returned to the caller as this request's error
                out[it.index] = exc
    return out


DEFAULT_MAX_BATCH_SIZE = 8  # csprt serve's and csprt triton-repo's dynamic batcher, when the artifact allows it
DEFAULT_MAX_QUEUE_DELAY_US = 2000  # 2 ms: a few % of one LISA-7B request on a GPU, enough for clients to meet


def served_max_batch(requested: int | None, artifact) -> int:
    """The dynamic batcher's max batch size for `artifact`: `requested`, or min(8, the exported maximum).

    Raises:
        InputError: `requested` below 1, or above the `batch` dim's exported maximum (`csprt export --max-batch`),
            naming both fixes.
    """
    from graphs.errors import InputError

    from graphs.triton_config import BATCH_DIM

    exported = artifact.layout.dims[BATCH_DIM].max
    if requested is None:
        return min(DEFAULT_MAX_BATCH_SIZE, exported)
    if requested < 1:
        raise InputError(f"--max-batch-size {requested}: expected 1 (no batching) or more")
    if requested > exported:
        raise InputError(f"--max-batch-size {requested} is more than this artifact's exported maximum batch of "
                         f"{exported}; pass --max-batch-size {exported} or less, or re-export with csprt export "
                         f"--max-batch {requested} ({artifact.rebuild_command} --max-batch {requested})")
    return requested
