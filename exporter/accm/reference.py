"""The PyTorch reference of an ACCM schedule: picks, caption, selector and splice, then LISA as usual.

    image -> CLIP (all layers) -> picks (exporter.accm.picks) -------------------------------+-> first stage's tokens
                               -> projected embeddings of the other tokens -> mapper --+     |
    query -> GPT-2 ids -> wte ----------------------------------------------------------+-> beam search (3)
    3 captions -> "Question: ..." -> LongCLIP text -> selector -> argmax -> "additional information: ..."
    -> LLM ids (no BOS) spliced into the prompt after the image's newline -> `Reference` (the schedule's
    stages after the "accm" entry run exactly as for any other schedule)

`AccmReference` is a `Reference` whose first-stage selection is the picks; everything after that
(later prune stages, both modes, SAM) is the LISA reference's own code.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from exporter.accm.beam import beam_search
from exporter.accm.checkpoint import AccmModels
from exporter.accm.picks import Picks, merged_cls_attention, pick_tokens
from exporter.preprocess import clip_pixels
from exporter.reference import Reference, ReferenceOutput
from graphs.accm import CLIP_TEXT_POSITIONS, LONGCLIP_POSITIONS, STOP_TEXT, selector_text, splice_position, splice_text
from graphs.errors import InputError, ScheduleError
from graphs.prompt import IM_END, PromptIds, check_query
from graphs.schedule import Schedule


@dataclass
class AccmCaption:
    picks: Picks
    candidates: list[str]             # the beams' captions, best beam score first
    candidate_ids: list[list[int]]    # their GPT-2 ids (stop token included)
    beam_scores: list[float]          # summed log-probability / length
    selector_probs: list[float]       # the selector's softmax over the candidates
    chosen: int                       # index into candidates
    splice_ids: list[int]             # LLM ids inserted into the prompt
    splice_at: int                    # where in the prompt's suffix ids

    @property
    def caption(self) -> str:
        return self.candidates[self.chosen]


@dataclass
class AccmReferenceOutput(ReferenceOutput):
    accm: AccmCaption | None = None


class AccmReference(Reference):
    """A `Reference` for schedules whose first op is "accm".

    Args:
        model (LisaModel): weights loaded.
        tokenizer: the checkpoint's tokenizer.
        clip_processor_config (dict): CLIP's preprocessor_config.json contents.
        schedule (Schedule): resolved against the model, first op "accm".
        accm (AccmModels): from `exporter.accm.checkpoint.load_accm`.
    """

    def __init__(self, model, tokenizer, clip_processor_config: dict, schedule: Schedule, accm: AccmModels):
        super().__init__(model, tokenizer, clip_processor_config, schedule)
        if schedule.accm is None:
            raise ScheduleError(f"schedule {schedule.name!r} has no ACCM entry; use the plain Reference for it")
        self.accm = accm
        self._picked: list[int] | None = None

    # -- ACCM's steps -------------------------------------------------------------------------
    @torch.no_grad()
    def picks(self, clip_in: torch.Tensor, query: str) -> tuple[Picks, torch.Tensor]:
        """ACCM's picks and the [N, P] per-patch projected embeddings (post-LN last layer, CLIP's visual_projection)."""
        a, tower = self.accm, self.model.vision_tower
        out = tower(pixel_values=clip_in, output_hidden_states=True)
        cls_attn = merged_cls_attention(tower, out.hidden_states[-2])
        patches = tower.post_layernorm(out.last_hidden_state)[0, 1:]
        patch_embeds = a.visual_projection(patches.to(a.visual_projection.weight.dtype))  # [N, P]
        ids = a.clip_tokenizer(query, truncation=True, max_length=CLIP_TEXT_POSITIONS, return_tensors="pt")
        text = a.clip_text(input_ids=ids["input_ids"].to(self.device)).text_embeds
        stage = self.schedule.stages[0]
        return pick_tokens(cls_attn, text, patch_embeds, stage.budget, self.schedule.accm.text_picks), patch_embeds

    @torch.no_grad()
    def caption(self, picks: Picks, patch_embeds: torch.Tensor, query: str):
        """The beam search's candidates for the tokens pruned away (BeamResult)."""
        a, knobs = self.accm, self.schedule.accm
        q = a.gpt_tokenizer.encode(query)
        room = a.shape.gpt_positions - a.shape.prefix_length - knobs.max_caption_tokens
        if len(q) > room:
            raise InputError(f"the question is {len(q)} GPT-2 tokens; ACCM's caption model has {a.shape.gpt_positions} "
                             f"positions, room for {room} question tokens besides its {a.shape.prefix_length} prefix "
                             f"rows and {knobs.max_caption_tokens} caption tokens; shorten the question")
        q_ids = torch.tensor([q], device=self.device)
        kept_out = patch_embeds[picks.kept_out][None]
        prefix = a.caption.prefix_embeds(q_ids, kept_out.to(next(a.caption.parameters()).dtype))
        stop = a.gpt_tokenizer.encode(STOP_TEXT)[0]
        return beam_search(a.caption.gpt, prefix, stop, beams=knobs.beams, max_tokens=knobs.max_caption_tokens)

    @torch.no_grad()
    def select(self, query: str, candidates: list[str]) -> list[float]:
        """The selector's probabilities over the candidates (LongCLIP text features, one candidate at a time)."""
        a = self.accm
        feats = []
        for c in candidates:
            ids = a.longclip_tokenizer(selector_text(query, c), truncation=True, max_length=LONGCLIP_POSITIONS,
                                       return_tensors="pt")
            feats.append(a.longclip_text(input_ids=ids["input_ids"].to(self.device)).text_embeds[0])
        return a.selector(torch.stack(feats)).float().tolist()

    def splice(self, ids: PromptIds, caption: str) -> tuple[PromptIds, list[int], int]:
        """The prompt with "additional information: {caption}" after the image's newline (ACCM's llava_arch.py)."""
        got = self.tokenizer(splice_text(caption), add_special_tokens=True)["input_ids"]
        if got and got[0] == self.tokenizer.bos_token_id:
            got = got[1:]  # ACCM drops the BOS its tokenizer call adds
        budget = self.schedule.accm.caption_budget
        if len(got) > budget:
            raise InputError(f"the ACCM caption is {len(got)} LLM tokens with its prefix, over the schedule's caption "
                             f"budget of {budget}; raise accm.caption_budget in the schedule JSON")
        head = self.tokenizer(IM_END + "\n", add_special_tokens=False)["input_ids"]
        at = splice_position(ids.suffix, head, lambda t: self.tokenizer.decode(t, skip_special_tokens=False))
        suffix = ids.suffix[:at] + got + ids.suffix[at:]
        total = len(ids.prefix) + self.schedule.n_image_tokens + len(suffix)
        if total > self.model.shape.llm.max_positions:
            raise InputError(f"the prompt with the ACCM caption is {total} tokens, over the model's maximum of "
                             f"{self.model.shape.llm.max_positions}; shorten the query")
        return dataclasses.replace(ids, suffix=suffix), got, at

    # -- the run ------------------------------------------------------------------------------
    def select_first(self, stage, feats_proj, cls_attn, instance_masks) -> torch.Tensor:
        if stage.op != "accm" or self._picked is None:
            return super().select_first(stage, feats_proj, cls_attn, instance_masks)
        return torch.tensor(self._picked, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def __call__(self, image: np.ndarray, query: str, mode: str = "single-pass", max_new_tokens: int = 32,
                 instance_masks=None) -> AccmReferenceOutput:
        """Segment `image` for `query` with ACCM's picks and caption (arguments as `Reference.__call__`)."""
        if not isinstance(query, str):
            raise InputError("an ACCM run needs the query text (its caption model reads the question)")
        query = check_query(query, self.model.shape.llm.max_positions)
        ms: dict[str, float] = {}
        t0 = time.perf_counter()
        clip_in = clip_pixels(image, self.clip_cfg).to(self.device, self.dtype)
        picks, patch_embeds = self.picks(clip_in, query)
        t1 = time.perf_counter()
        beams = self.caption(picks, patch_embeds, query)
        candidates = [self.accm.gpt_tokenizer.decode(i) for i in beams.ids]
        t2 = time.perf_counter()
        probs = self.select(query, candidates)
        chosen = int(np.argmax(probs))
        t3 = time.perf_counter()
        ids, splice_ids, at = self.splice(self.prompt(query, mode), candidates[chosen])
        ms.update(accm_picks=1e3 * (t1 - t0), accm_caption=1e3 * (t2 - t1), accm_selector=1e3 * (t3 - t2))
        self._picked = picks.sorted_indices
        try:
            out = super().__call__(image, ids, mode, max_new_tokens, instance_masks)
        finally:
            self._picked = None
        out.timings_ms.update(ms)
        cap = AccmCaption(picks=picks, candidates=candidates, candidate_ids=beams.ids, beam_scores=beams.scores,
                          selector_probs=probs, chosen=chosen, splice_ids=splice_ids, splice_at=at)
        return AccmReferenceOutput(**{f.name: getattr(out, f.name) for f in dataclasses.fields(out)}, accm=cap)
