"""Host-side I/O of an artifact, without torch: request -> host inputs, and graph outputs -> masks and text.

    image uint8 [H, W, 3], query --inputs()--> {prefix_ids, suffix_ids, suffix_lens, clip_pixels, sam_pixels
                                                [, seg_rows, seg_batch][, instance_masks]}, meta   (a batch of 1)
    queries --prompt_ids()--> PromptIds per request (tokenised once) --query_feed()--> prefix_ids [B, P] (the
                               template's, tiled), suffix_ids [B, S] right-padded to the longest, suffix_lens [B],
                               seg_rows / seg_batch [K] flat over the batch      (query_batch(): both in one call)
    images --image_batch()--> clip_pixels / sam_pixels [B, 3, S, S] (instance_masks [B, M, g, g], padded by empty masks)
    sam_decoder.masks [K, S, S] --masks()--> crop [:h', :w'] -> bilinear to [K, H, W] -> logits, logits > 0
    generated ids --answer()--> text

Everything it needs comes from the manifest: the tokenizer directory, the model shape, the CLIP and
SAM preprocessing config, the precision and the host inputs' dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphs.errors import ArtifactError, InputError, internal_error
from graphs.image_encoding import IMAGE_HOST_INPUTS
from graphs.preprocessing import clip_pixels_np, resize_bilinear_np, sam_pixels_np
from graphs.prompt import SINGLE_PASS_ANSWER, PromptIds, tokenize_prompt
from graphs.runner import bind_dims
from graphs.shapes import ModelShape
from graphs.stages import Layout, StageSpec
from graphs.tokenizer import JsonTokenizer


@dataclass(frozen=True)
class HostMeta:
    """What postprocessing needs to know about a request."""

    original_hw: tuple[int, int]   # the input image (H, W)
    resized_hw: tuple[int, int]    # the unpadded part of the SAM input (h', w')
    mode: str
    prompt: PromptIds


class HostIO:
    """Preprocessing, tokenisation and postprocessing for one artifact.

    Args:
        manifest (dict): the artifact's manifest.json contents (tokenizer, model, preprocessing, host_inputs).
        art_dir (str | Path): the artifact directory (the tokenizer directory is relative to it).
    """

    def __init__(self, manifest: dict, art_dir: str | Path):
        try:
            self.tok_cfg = manifest["tokenizer"]
            self.shape = ModelShape.from_dict(manifest["model"])
            self.clip_cfg = manifest["preprocessing"]["clip"]
            self.sam_size = int(manifest["preprocessing"]["sam"]["image_size"])
            self.host_inputs = {t["name"]: t for t in manifest["host_inputs"]}
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"manifest lacks {exc}; re-run csprt export") from None
        self.art_dir = Path(art_dir)
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The artifact's tokenizer.json on `tokenizers` alone, loaded on first use (the ids `csprt export` checked)."""
        if self._tokenizer is None:
            path = self.art_dir / self.tok_cfg.get("dir", "tokenizer")
            if not path.is_dir():
                raise ArtifactError(f"the artifact's tokenizer directory {path} is missing; re-run csprt export")
            self._tokenizer = JsonTokenizer.from_dir(path)
        return self._tokenizer

    # -- request -> host inputs -----------------------------------------------------------------
    def inputs(self, image: np.ndarray, query: str, mode: str,
               instance_masks: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], HostMeta]:
        """The host inputs of one request.

        Args:
            image (np.ndarray): uint8 RGB, shape [H, W, 3].
            query (str): the user's question.
            mode (str): "single-pass" or "generate".
            instance_masks (np.ndarray | None): [M, grid, grid] instance masks at token-grid resolution,
                for artifacts whose schedule clusters with seg_first. Defaults to None.

        Returns:
            tuple[dict[str, np.ndarray], HostMeta]: host input name -> array (dtypes as the manifest
            lists them), and what `masks` needs.
        """
        query_feed, ids = self.query_inputs(query, mode)
        image_feed, original_hw, resized_hw = self.image_inputs(image, instance_masks)
        values = {**query_feed, **image_feed}
        feed = {name: values[name] for name in self.host_inputs if name in values}  # manifest order
        meta = HostMeta(original_hw=original_hw, resized_hw=resized_hw, mode=mode, prompt=ids)
        return feed, meta

    def query_inputs(self, query: str, mode: str) -> tuple[dict[str, np.ndarray], PromptIds]:
        """The host inputs computed from the query alone (token ids, [SEG] rows), a batch of one, and its ids."""
        feed, ids = self.query_batch([query], mode)
        return feed, ids[0]

    def query_batch(self, queries: list[str], mode: str, pad_id: int = 0) -> tuple[dict[str, np.ndarray], list[PromptIds]]:
        """The host inputs of a batch of queries, and each prompt's ids (`prompt_ids`, then `query_feed`).

        Args:
            queries (list[str]): one question per request.
            mode (str): "single-pass" or "generate".
            pad_id (int): what fills the padding (no output depends on it). Defaults to 0.
        """
        ids = self.prompt_ids(queries, mode)
        return self.query_feed(ids, mode, pad_id), ids

    def prompt_ids(self, queries: list[str], mode: str) -> list[PromptIds]:
        """Each query's prompt tokenised for `mode` (the one tokenisation of a request), [SEG] id checked against
        the manifest's."""
        ids = [tokenize_prompt(self.tokenizer, q, mode, self.shape.num_image_tokens, self.shape.llm.max_positions)
               for q in queries]
        want_seg = self.tok_cfg.get("seg_token_id")
        if want_seg is not None and ids and ids[0].seg_token_id != want_seg:
            raise ArtifactError(f"the tokenizer's [SEG] id is {ids[0].seg_token_id} but the manifest says {want_seg}; "
                                "the tokenizer directory was modified, re-run csprt export")
        return ids

    def query_feed(self, ids: list[PromptIds], mode: str, pad_id: int = 0) -> dict[str, np.ndarray]:
        """The host inputs of a batch of tokenised prompts (`prompt_ids` for this `mode`).

        Every prompt starts with the template's prefix (the same ids); suffixes are right-padded with `pad_id` to
        the longest, their real lengths in `suffix_lens`. The [SEG] rows are flat over the batch: `seg_rows[k]` is
        a row of request `seg_batch[k]`'s suffix (ascending by request).

        Args:
            ids (list[PromptIds]): one per request.
            mode (str): "single-pass" or "generate", the mode `ids` were tokenised for.
            pad_id (int): what fills the padding (no output depends on it). Defaults to 0.
        """
        if len({tuple(i.prefix) for i in ids}) != 1:
            raise internal_error("prompts of one batch have different prefixes; the template's prefix holds no query")
        width = max(len(i.suffix) for i in ids)
        values = {"prefix_ids": np.asarray([i.prefix for i in ids], dtype=np.int64),
                  "suffix_ids": np.asarray([i.suffix + [pad_id] * (width - len(i.suffix)) for i in ids], dtype=np.int64),
                  "suffix_lens": np.asarray([len(i.suffix) for i in ids], dtype=np.int64)}
        if mode == "single-pass":  # the suffix row predicting each [SEG] (the position just before it)
            values["seg_rows"] = np.asarray([r for i in ids for r in i.seg_rows()], dtype=np.int64)
            values["seg_batch"] = np.asarray([b for b, i in enumerate(ids) for _ in i.seg_rows()], dtype=np.int64)
        return self._cast(values, IMAGE_HOST_INPUTS, mode)

    def image_batch(self, images: list[np.ndarray], instance_masks: list | None = None
                    ) -> tuple[dict[str, np.ndarray], list[tuple[int, int]], list[tuple[int, int]]]:
        """`image_inputs` of several images joined along the batch axis; instance masks padded with empty masks
        (which change no selection) to the most any image has."""
        masks = instance_masks if instance_masks is not None else [None] * len(images)
        if len(masks) != len(images):
            raise InputError(f"{len(images)} images but {len(masks)} instance mask sets; pass one per image")
        feeds, original, resized = [], [], []
        for image, m in zip(images, masks):
            feed, o, r = self.image_inputs(image, m)
            feeds.append(feed)
            original.append(o)
            resized.append(r)
        if "instance_masks" in feeds[0]:
            most = max(f["instance_masks"].shape[1] for f in feeds)
            for f in feeds:
                m = f["instance_masks"]
                f["instance_masks"] = np.pad(m, ((0, 0), (0, most - m.shape[1]), (0, 0), (0, 0)))
        return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}, original, resized

    def image_inputs(self, image: np.ndarray, instance_masks: np.ndarray | None = None
                     ) -> tuple[dict[str, np.ndarray], tuple[int, int], tuple[int, int]]:
        """The host inputs computed from the image alone (graphs.image_encoding.IMAGE_HOST_INPUTS), the image's
        (H, W) and the unpadded (h', w') of its SAM input."""
        sam, resized_hw = sam_pixels_np(image, self.sam_size)
        values = {"clip_pixels": clip_pixels_np(image, self.clip_cfg), "sam_pixels": sam}
        if "instance_masks" in self.host_inputs:
            values["instance_masks"] = self._instance_masks(instance_masks)
        elif instance_masks is not None:
            raise InputError("this artifact takes no instance masks (its schedule does not cluster with seg_first)")
        feed = self._cast(values, set(self.host_inputs) - IMAGE_HOST_INPUTS, None)
        return feed, (int(image.shape[0]), int(image.shape[1])), resized_hw

    def _cast(self, values: dict, others, mode: str | None) -> dict[str, np.ndarray]:
        """`values` in the manifest's dtypes, for every manifest host input not in `others`."""
        feed = {}
        for name, spec in self.host_inputs.items():
            if name in others or (name in ("seg_rows", "seg_batch") and mode != "single-pass"):
                continue  # the other half's, or read only by single-pass stages
            if name not in values:
                raise ArtifactError(f"manifest host input {name!r} is unknown to this csprt; "
                                    f"it knows {', '.join([*values, *sorted(others)])}")
            feed[name] = np.ascontiguousarray(values[name], dtype=spec["dtype"])
        return feed

    def _instance_masks(self, masks) -> np.ndarray:
        grid = self.shape.vision.grid
        if masks is None:
            raise InputError(f"this artifact clusters with seg_first: pass instance masks [M, {grid}, {grid}] "
                             "at token-grid resolution from your instance segmenter")
        masks = np.asarray(masks)
        if masks.ndim != 3 or masks.shape[1:] != (grid, grid) or masks.shape[0] < 1:
            raise InputError(f"instance masks: expected shape [M, {grid}, {grid}] with M >= 1, got {list(masks.shape)}")
        return masks.astype(np.float32)[None]  # [1, M, grid, grid]: a batch of one

    # -- outputs -> masks and text --------------------------------------------------------------
    def masks(self, padded_mask_logits: np.ndarray | None, meta: HostMeta) -> tuple[np.ndarray, np.ndarray]:
        """Mask logits and masks at the original image size (LISA `postprocess_masks` after its first upsample).

        Args:
            padded_mask_logits (np.ndarray | None): float logits over the padded SAM input, shape [K, S, S]
                (`sam_decoder.masks`); None when the pipeline produced no masks (no [SEG] generated).
            meta (HostMeta): from `inputs`.

        Returns:
            tuple[np.ndarray, np.ndarray]: float32 logits [K, H, W] and bool masks [K, H, W] (logits > 0).
        """
        if padded_mask_logits is None:
            empty = np.zeros((0, *meta.original_hw), dtype=np.float32)
            return empty, empty > 0
        x = np.asarray(padded_mask_logits)
        if x.ndim != 3:
            raise InputError(f"mask logits must be [K, S, S], got shape {list(x.shape)}")
        h, w = meta.resized_hw
        if x.shape[1] < h or x.shape[2] < w:
            raise InputError(f"mask logits {list(x.shape)} are smaller than the resized image ({h}, {w})")
        if x.shape[0] == 0:
            logits = np.zeros((0, *meta.original_hw), dtype=np.float32)
        else:
            logits = resize_bilinear_np(x[:, :h, :w].astype(np.float32), meta.original_hw)  # [K, H, W]
        return logits, logits > 0

    def answer(self, generated_ids: list[int], mode: str = "generate") -> str:
        """The text answer: the decoded generated ids, or "[SEG]." in single-pass mode (as exporter.reference)."""
        if mode == "single-pass":
            return SINGLE_PASS_ANSWER
        return self.tokenizer.decode(list(generated_ids), skip_special_tokens=False).strip()


def check_host_feed(layout: Layout, feed: dict[str, np.ndarray]) -> None:
    """Check a request's host inputs against the layout's dim ranges before any stage runs, so a text over
    the exported range fails naming the dim and its range (`bind_dims`' message)."""
    present = tuple(t for t in layout.host_inputs if t.name in feed)
    bind_dims(StageSpec("host inputs", "host", present, ()), {t.name: feed[t.name] for t in present}, layout.dims)
