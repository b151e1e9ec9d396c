"""The PyTorch reference: LISA with a static token schedule, single-pass or generate.

Decoder layers run one stage at a time. The hidden-state tensor is always laid out as

    [ text prefix (P) | image rows (the stage's budget, original order) | text suffix (S) ]

and every row keeps its original RoPE position (P + image index for image rows), so a `full`
schedule is exactly the unpruned model. Stage entry ops come from `exporter.selection`, the
same functions the export wrappers trace. Generate mode keeps one KV cache per layer; each
holds only the image rows its stage saw.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from exporter import selection
from exporter.model import LisaModel
from exporter.preprocess import binarize, clip_pixels, postprocess_masks, sam_pixels
from graphs.errors import InputError
from graphs.prompt import PromptIds, tokenize_prompt
from graphs.schedule import Schedule, Stage


@dataclass
class ReferenceOutput:
    seg_embeddings: torch.Tensor        # [K, out_dim] SAM prompts, one per [SEG]
    seg_hidden: torch.Tensor            # [K, H] final post-norm hidden states they came from
    low_res_logits: torch.Tensor        # [K, 4g, 4g] SAM decoder output
    mask_logits: torch.Tensor           # [K, H_img, W_img] at the input image's size
    masks: np.ndarray                   # [K, H_img, W_img] bool
    generated_ids: list[int]            # generate mode; empty in single-pass
    answer: str
    image_tokens_per_layer: list[int]   # counted from the hidden states of each layer (prefill)
    kv_image_tokens_per_layer: list[int] = field(default_factory=list)  # generate: image rows in each layer's cache
    step_hidden: torch.Tensor | None = None  # generate: [n, H] post-norm hidden state each generated token came from
    stage_indices: dict[str, list[int]] = field(default_factory=dict)   # original image indices each stage saw
    timings_ms: dict[str, float] = field(default_factory=dict)


class KVStore:
    """Per-layer KV cache with the one method transformers' attention calls (`update`).

    Layers may hold different lengths: a layer's cache has exactly the rows its stage saw.
    """

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key, value, layer_idx, *args, **kwargs):  # key: [1, kv_heads, T, hd]
        if layer_idx in self.keys:
            key = torch.cat([self.keys[layer_idx], key], dim=2)
            value = torch.cat([self.values[layer_idx], value], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def length(self, layer_idx: int) -> int:
        return self.keys[layer_idx].shape[2]


def causal_mask(t: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[1, 1, T, T] additive mask. Rows are in position order, so causal by row is causal by position."""
    m = torch.full((t, t), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.triu(m, diagonal=1)[None, None]


class _Timer:
    def __init__(self, device):
        self.sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        self.ms: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                timer.sync()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.sync()
                timer.ms[name] = timer.ms.get(name, 0.0) + 1e3 * (time.perf_counter() - self.t0)

        return _Span()


class Reference:
    """Runs a `LisaModel` under a `Schedule`.

    Args:
        model (LisaModel): weights loaded, on its target device and dtype.
        tokenizer: the checkpoint's HF tokenizer.
        clip_processor_config (dict): the CLIP `preprocessor_config.json` contents.
        schedule (Schedule): resolved against this model.
    """

    def __init__(self, model: LisaModel, tokenizer, clip_processor_config: dict, schedule: Schedule):
        shape = model.shape
        self.schedule = schedule.check_against(shape.llm.layers, shape.num_image_tokens)
        self.model, self.tokenizer, self.clip_cfg = model, tokenizer, clip_processor_config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    # -- inputs -------------------------------------------------------------------------------
    def prompt(self, query: str, mode: str) -> PromptIds:
        shape = self.model.shape
        return tokenize_prompt(self.tokenizer, query, mode, shape.num_image_tokens, shape.llm.max_positions)

    def _embed(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model.llm.model.embed_tokens(t)  # [1, len, H]

    # -- stage entry --------------------------------------------------------------------------
    def select_first(self, stage: Stage, feats_proj: torch.Tensor, cls_attn, instance_masks) -> torch.Tensor:
        """Original indices of the image tokens the first stage sees. feats_proj: [N, H]."""
        if instance_masks is not None:
            instance_masks = torch.as_tensor(np.asarray(instance_masks), device=self.device)
        return selection.first_stage_indices(self.schedule, stage, feats_proj, cls_attn, self.model.shape.vision.grid,
                                             instance_masks)

    def _query_rows(self, t: int, s: int, ids: PromptIds, mode: str) -> torch.Tensor:
        query = self.schedule.prune_query
        if query == "mean":
            return torch.arange(t, device=self.device)
        if query == "seg" and mode == "single-pass":
            return torch.tensor([t - s + ids.seg_rows()[0]], device=self.device)
        return torch.tensor([t - 1], device=self.device)  # "last", or "seg" in generate mode: last prompt token

    # -- forward ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, image: np.ndarray, query: str | PromptIds, mode: str = "single-pass", max_new_tokens: int = 32,
                 instance_masks=None) -> ReferenceOutput:
        """Segment `image` for `query`.

        Args:
            image (ndarray): [H, W, 3] uint8 RGB.
            query (str | PromptIds): the user's question, or its already tokenised prompt (benchmarks
                with random-weight models have no real tokenizer).
            mode (str): "single-pass" or "generate". Defaults to "single-pass".
            max_new_tokens (int): generate-mode decode limit. Defaults to 32.
            instance_masks: [M, grid, grid] masks for cluster_method "seg_first". Defaults to None.
        """
        m, sched, timer = self.model, self.schedule, _Timer(self.device)
        ids = query if isinstance(query, PromptIds) else self.prompt(query, mode)
        with timer("preprocess"):
            clip_in = clip_pixels(image, self.clip_cfg).to(self.device, self.dtype)
            sam_in, resized_hw = sam_pixels(image, m.shape.sam.image_size)
            sam_in = sam_in.to(self.device, self.dtype)
        with timer("vision"):
            want_cls = sched.stages[0].op == "cluster" and sched.cluster_method == "cls_attention"
            _, emb, cls_attn = m.vision_features(clip_in, with_cls_attention=want_cls)
            emb = emb[0]  # [N, H]
        with timer("sam_encoder"):
            image_embeddings = m.sam_image_embeddings(sam_in)
        with timer("llm"):
            state = self._prefill(emb, cls_attn, ids, mode, instance_masks)
        with timer("llm_decode"):
            generated, seg_hidden = self._generate(state, ids, max_new_tokens) if mode == "generate" else ([], None)
            step_hidden = state.get("step_hidden")
        if mode == "single-pass":
            s = len(ids.suffix)
            rows = [state["h"].shape[1] - s + j for j in ids.seg_rows()]
            seg_hidden = state["normed"][0, rows]  # [K, H]
        with timer("seg_head"):
            seg_emb = m.seg_head(seg_hidden)
        with timer("sam_decoder"):
            low_res = m.sam_decode(image_embeddings, seg_emb) if len(seg_emb) else image_embeddings.new_zeros((0, 1, 1))
        with timer("postprocess"):
            if len(seg_emb):
                logits = postprocess_masks(low_res.float(), resized_hw, image.shape[:2], m.shape.sam.image_size)
            else:
                logits = torch.zeros((0, *image.shape[:2]))
            masks = binarize(logits)
        masks = masks.cpu().numpy()
        answer = " [SEG]." if mode == "single-pass" else (
            self.tokenizer.decode(generated, skip_special_tokens=False) if self.tokenizer is not None else "")
        return ReferenceOutput(
            seg_embeddings=seg_emb, seg_hidden=seg_hidden, low_res_logits=low_res, mask_logits=logits,
            masks=masks, generated_ids=generated, answer=answer.strip(),
            image_tokens_per_layer=state["counts"], kv_image_tokens_per_layer=state.get("kv_counts", []),
            stage_indices=state["stage_indices"], timings_ms=timer.ms, step_hidden=step_hidden,
        )

    @torch.no_grad()
    def batch(self, images: list[np.ndarray], queries: list, mode: str = "single-pass",
              max_new_tokens: int | list[int] = 32) -> list[ReferenceOutput]:
        """A batch of requests in one forward pass per stage (and per decode step): what `__call__` gives each alone.

        The template prefix is shared, the suffixes right-padded (causal attention keeps padding out of every
        real row of the prompt; decode steps mask each request's padded cache rows), each request's selections
        are its own (its image), and every per-request row (the prune query, the [SEG] rows, the first decode
        input, positions) uses the request's own length. Generate mode decodes greedily for the whole batch, one
        step per token, with a per-request stop (its stop token or its own limit); a stopped request's later
        tokens are ignored.

        Args:
            images (list[ndarray]): [H, W, 3] uint8 RGB, one per request.
            queries (list[str | PromptIds]): one per request.
            mode (str): "single-pass" or "generate". Defaults to "single-pass".
            max_new_tokens (int | list[int]): generate mode's limit, one for all or one per request.
                Defaults to 32.
        """
        m, sched, timer = self.model, self.schedule, _Timer(self.device)
        ids = [q if isinstance(q, PromptIds) else self.prompt(q, mode) for q in queries]
        limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(ids)
        if len(limits) != len(ids):
            raise InputError(f"max_new_tokens: {len(limits)} limits for {len(ids)} requests; give one per request "
                             "or a single int for all")
        with timer("preprocess"):
            clip_in = torch.cat([clip_pixels(im, self.clip_cfg) for im in images]).to(self.device, self.dtype)
            sams = [sam_pixels(im, m.shape.sam.image_size) for im in images]
            sam_in = torch.cat([x for x, _ in sams]).to(self.device, self.dtype)
        with timer("vision"):
            want_cls = sched.stages[0].op == "cluster" and sched.cluster_method == "cls_attention"
            _, emb, cls_attn = m.vision_features(clip_in, with_cls_attention=want_cls)  # [B, N, H]
        with timer("sam_encoder"):
            image_embeddings = m.sam_image_embeddings(sam_in)  # [B, C, g, g]
        kv = KVStore() if mode == "generate" else None
        with timer("llm"):
            normed, rows, counts, stage_indices = self._prefill_batch(emb, cls_attn, ids, mode, kv)
        gen = None
        if mode == "generate":
            with timer("llm_decode"):
                gen = self._generate_batch(normed, kv, ids, limits, emb.shape[1])
        outs = []
        for b, (image, (_, resized_hw)) in enumerate(zip(images, sams)):
            seg_hidden = normed[b, rows[b]] if gen is None else gen["seg_hidden"][b]  # [K, H]
            with timer("seg_head"):
                seg_emb = m.seg_head(seg_hidden)
            with timer("sam_decoder"):
                low_res = (m.sam_decode(image_embeddings[b:b + 1], seg_emb) if len(seg_emb)
                           else image_embeddings.new_zeros((0, 1, 1)))
            with timer("postprocess"):
                if len(seg_emb):
                    logits = postprocess_masks(low_res.float(), resized_hw, image.shape[:2], m.shape.sam.image_size)
                else:
                    logits = torch.zeros((0, *image.shape[:2]))
                masks = binarize(logits).cpu().numpy()
            generated = [] if gen is None else gen["generated"][b]
            answer = "[SEG]." if gen is None else ("" if self.tokenizer is None else
                                                    self.tokenizer.decode(generated, skip_special_tokens=False).strip())
            outs.append(ReferenceOutput(
                seg_embeddings=seg_emb, seg_hidden=seg_hidden, low_res_logits=low_res, mask_logits=logits,
                masks=masks, generated_ids=generated, answer=answer, image_tokens_per_layer=counts,
                kv_image_tokens_per_layer=[] if gen is None else gen["kv_counts"],
                step_hidden=None if gen is None else gen["step_hidden"][b],
                stage_indices={k: v[b] for k, v in stage_indices.items()}, timings_ms=timer.ms))
        return outs

    def _prefill_batch(self, emb: torch.Tensor, cls_attn, ids: list[PromptIds], mode: str = "single-pass",
                       kv: KVStore | None = None):
        """Every decoder layer over the batch's rows [prefix | image rows | right-padded suffix] (into `kv` when
        given: generate mode; padded rows are cached too, and each decode step masks them).

        Returns (final post-norm rows [B, T, H], each request's [SEG] rows, image rows per layer, stage indices).
        """
        m, sched, dev = self.model, self.schedule, self.device
        b_size, n = emb.shape[0], emb.shape[1]
        p, s = len(ids[0].prefix), max(len(i.suffix) for i in ids)
        lens = torch.tensor([len(i.suffix) for i in ids], device=dev)
        embed = m.llm.model.embed_tokens
        prefix = embed(torch.tensor([ids[0].prefix] * b_size, device=dev))
        suffix = embed(torch.tensor([i.suffix + [0] * (s - len(i.suffix)) for i in ids], device=dev))
        text_pos = (torch.arange(s, device=dev) + p + n)[None].expand(b_size, -1)
        counts, stage_indices = [], {}
        h = img_idx = rep_idx = assign = scores = None
        for i, stage in enumerate(sched.stages):
            if i == 0:
                img_idx = selection.first_stage_indices(sched, stage, emb, cls_attn, m.shape.vision.grid, None)
                if stage.op == "cluster":
                    rep_idx = img_idx
                    assign = selection.assign_to_representatives(emb, rep_idx)
                new_img = selection.gather_rows(emb, img_idx)
            else:
                cur = h[:, p:h.shape[1] - s]
                if stage.op == "scatter":
                    new_img = selection.scatter_tokens(cur, emb, rep_idx, assign, sched.scatter_mode)
                    img_idx = torch.arange(n, device=dev)[None].expand(b_size, -1)
                elif stage.op == "prune":
                    keep = selection.topk_sorted(scores[:, p:p + cur.shape[1]], stage.budget)
                    img_idx, new_img = torch.gather(img_idx, 1, keep), selection.gather_rows(cur, keep)
                else:
                    new_img = cur
            h = torch.cat([prefix, new_img, suffix], dim=1) if i == 0 else torch.cat(
                [h[:, :p], new_img, h[:, h.shape[1] - s:]], dim=1)
            stage_indices[stage.name] = img_idx.tolist()
            budget = new_img.shape[1]
            pos = torch.cat([torch.arange(p, device=dev)[None].expand(b_size, -1), p + img_idx, text_pos], dim=1)
            cos, sin = m.llm.model.rotary_emb(h, pos)
            mask = causal_mask(h.shape[1], h.dtype, dev)
            next_prunes = i + 1 < len(sched.stages) and sched.stages[i + 1].op == "prune"
            for layer_idx in stage.layers:
                counts.append(budget)
                layer = m.decoder_layers[layer_idx]
                if next_prunes and layer_idx == stage.end - 1:
                    row_lens = lens + p + budget
                    scores = selection.query_attention(layer, h, cos, sin, mask.expand(b_size, -1, -1, -1),
                                                       self._query_rows_batch(ids, p + budget, row_lens, mode),
                                                       row_lens)
                h = layer(h, attention_mask=mask, position_ids=pos, past_key_values=kv,
                          position_embeddings=(cos, sin))
        start = h.shape[1] - s  # the suffix's first row
        rows = [[start + j for j in i.seg_rows()] for i in ids]
        return m.llm.model.norm(h), rows, counts, stage_indices

    def _query_rows_batch(self, ids: list[PromptIds], suffix_start: int, row_lens: torch.Tensor,
                          mode: str = "single-pass") -> torch.Tensor:
        """[B, R] query rows per request (`_query_rows` with each request's own length)."""
        query = self.schedule.prune_query
        if query == "mean":  # every row; rows past a request's length are left out of its mean (row_lens)
            t = suffix_start + max(len(i.suffix) for i in ids)
            return torch.arange(t, device=self.device)[None].expand(len(ids), -1)
        if query == "seg" and mode == "single-pass":
            return torch.tensor([[suffix_start + i.seg_rows()[0]] for i in ids], device=self.device)
        return (row_lens - 1)[:, None]  # "last", or "seg" in generate mode: each request's last prompt token

    def _prefill(self, emb: torch.Tensor, cls_attn, ids: PromptIds, mode: str, instance_masks) -> dict:
        """Run all decoder layers over the prompt. Returns the state the decode loop continues from."""
        m, sched = self.model, self.schedule
        layers, n = m.decoder_layers, emb.shape[0]
        p, s = len(ids.prefix), len(ids.suffix)
        text_pos_suffix = torch.arange(p + n, p + n + s, device=self.device)
        h = None
        img_idx = rep_idx = assign = scores = None
        kv = KVStore() if mode == "generate" else None
        counts, stage_indices = [], {}
        for i, stage in enumerate(sched.stages):
            if i == 0:
                img_idx = self.select_first(stage, emb, cls_attn, instance_masks)
                if stage.op == "cluster":
                    rep_idx = img_idx
                    assign = selection.assign_to_representatives(emb, rep_idx)
                img_h = emb[img_idx][None]
                h = torch.cat([self._embed(ids.prefix), img_h, self._embed(ids.suffix)], dim=1)
            else:
                cur = h[:, p:h.shape[1] - s]  # [1, b, H] image rows
                if stage.op == "scatter":
                    new_img = selection.scatter_tokens(cur[0], emb, rep_idx, assign, sched.scatter_mode)[None]
                    img_idx = torch.arange(n, device=self.device)
                elif stage.op == "prune":
                    keep = selection.topk_sorted(scores[p:p + cur.shape[1]], stage.budget)
                    img_idx, new_img = img_idx[keep], cur[:, keep]
                else:  # "all" after a stage that kept every token: nothing changes
                    new_img = cur
                h = torch.cat([h[:, :p], new_img, h[:, h.shape[1] - s:]], dim=1)
            stage_indices[stage.name] = img_idx.tolist()
            pos = torch.cat([torch.arange(p, device=self.device), p + img_idx, text_pos_suffix])[None]
            cos, sin = m.llm.model.rotary_emb(h, pos)
            mask = causal_mask(h.shape[1], h.dtype, self.device)
            next_prunes = i + 1 < len(sched.stages) and sched.stages[i + 1].op == "prune"
            for layer_idx in stage.layers:
                counts.append(h.shape[1] - p - s)  # counted from the tensor, not from the schedule
                layer = layers[layer_idx]
                if next_prunes and layer_idx == stage.end - 1:
                    scores = selection.query_attention(layer, h, cos, sin, mask, self._query_rows(h.shape[1], s, ids, mode))
                h = layer(h, attention_mask=mask, position_ids=pos, past_key_values=kv,
                          position_embeddings=(cos, sin))
        normed = m.llm.model.norm(h)
        state = {"h": h, "normed": normed, "counts": counts, "stage_indices": stage_indices, "kv": kv,
                 "text_rows": p + s, "next_pos": p + n + s}
        return state

    def _generate(self, state: dict, ids: PromptIds, max_new_tokens: int):
        """Greedy decode from the prefill state. Returns (generated ids, [K, H] hidden states before each [SEG])."""
        m, kv = self.model, state["kv"]
        layers = m.decoder_layers
        last = state["normed"][:, -1:]  # [1, 1, H]
        generated, seg_rows, steps = [], [], []
        pos = state["next_pos"]
        fed = 0
        for _ in range(max_new_tokens):
            tok = int(torch.argmax(m.llm.lm_head(last)[0, -1]))
            generated.append(tok)
            steps.append(last[0, -1])
            if tok == ids.seg_token_id:
                seg_rows.append(last[0, -1])
            if tok == ids.eos_token_id or len(generated) == max_new_tokens:
                break
            x = self._embed([tok])
            position = torch.tensor([[pos]], device=self.device)
            cos, sin = m.llm.model.rotary_emb(x, position)
            for layer_idx, layer in enumerate(layers):
                mask = torch.zeros((1, 1, 1, kv.length(layer_idx) + 1), dtype=x.dtype, device=self.device)
                x = layer(x, attention_mask=mask, position_ids=position, past_key_values=kv, position_embeddings=(cos, sin))
            last = m.llm.model.norm(x)
            pos += 1
            fed += 1
        state["kv_counts"] = [kv.length(i) - state["text_rows"] - fed for i in range(len(layers))]
        state["step_hidden"] = torch.stack(steps)
        hidden = torch.stack(seg_rows) if seg_rows else last.new_zeros((0, last.shape[-1]))
        return generated, hidden

    def _generate_batch(self, normed: torch.Tensor, kv: KVStore, ids: list[PromptIds], limits: list[int],
                        n_image: int) -> dict:
        """Greedy decode for a batch from `_prefill_batch`'s state: one step per token for every request.

        Request b starts from its own last prompt row, at position P + N + its suffix length, and stops at its
        stop token or after limits[b] tokens; the loop ends when every request has stopped (a stopped request
        keeps stepping, its tokens are dropped: rows never see each other). Each step's mask hides, per layer,
        the request's right-padded prompt rows in the cache.

        Returns {"generated": [ids per request], "seg_hidden": [[K, H] per request], "step_hidden":
        [[n, H] per request], "kv_counts": image rows in each layer's cache}.
        """
        m, dev = self.model, self.device
        lens = [len(i.suffix) for i in ids]
        b_size, s_max = len(ids), max(lens)
        start = normed.shape[1] - s_max
        last = normed[torch.arange(b_size, device=dev), torch.tensor([start + n - 1 for n in lens], device=dev)]
        pos = torch.tensor([len(ids[0].prefix) + n_image + n for n in lens], device=dev)  # [B]
        generated, steps, seg = [[] for _ in ids], [[] for _ in ids], [[] for _ in ids]
        done = [limit <= 0 for limit in limits]
        fed = 0
        while not all(done):
            toks = torch.argmax(m.llm.lm_head(last), dim=-1)  # [B]
            for b, tok in enumerate(toks.tolist()):
                if done[b]:
                    continue
                generated[b].append(tok)
                steps[b].append(last[b])
                if tok == ids[b].seg_token_id:
                    seg[b].append(last[b])
                done[b] = tok == ids[b].eos_token_id or len(generated[b]) == limits[b]
            if all(done):
                break
            x = m.llm.model.embed_tokens(toks[:, None])  # [B, 1, H]
            position = pos[:, None]
            cos, sin = m.llm.model.rotary_emb(x, position)
            for layer_idx, layer in enumerate(m.decoder_layers):
                length = kv.length(layer_idx)
                suffix_at = length - fed - s_max  # P + this layer's image rows
                mask = torch.zeros((b_size, 1, 1, length + 1), dtype=x.dtype, device=dev)
                for b, n in enumerate(lens):
                    mask[b, :, :, suffix_at + n:suffix_at + s_max] = torch.finfo(x.dtype).min
                x = layer(x, attention_mask=mask, position_ids=position, past_key_values=kv,
                          position_embeddings=(cos, sin))
            last = m.llm.model.norm(x)[:, 0]
            pos, fed = pos + 1, fed + 1
        text_rows = len(ids[0].prefix) + s_max + fed
        empty = last.new_zeros((0, last.shape[-1]))
        return {"generated": generated,
                "seg_hidden": [torch.stack(r) if r else empty for r in seg],
                "step_hidden": [torch.stack(r) if r else empty for r in steps],
                "kv_counts": [kv.length(i) - text_rows for i in range(len(m.decoder_layers))]}
