"""The host steps a manifest declares (`graphs.stages.HostStep`), run on the host: numpy and tokenizers, no torch.

    kind                 reads                                  does                                  gives
    accm_question        the request's query                    CLIP ids (BOS, EOS, <= 77), GPT-2 ids  clip_ids, gpt_ids
    accm_beam_search     accm_mapper's rows                     graphs.accm_loop.beam_loop over the    candidate_ids,
                                                                stages it runs (accm_gpt2, _beam_step) beam_scores
    accm_selector_text   candidate_ids, the query               GPT-2 decode -> "Question: ..." ->     selector_ids
                                                                LongCLIP ids, padded
    accm_splice          probs, candidate_ids, suffix ids/lens, argmax -> "additional information: ..." suffix_ids,
                         seg_rows                               -> LLM ids (no BOS) after the image's  suffix_lens,
                                                                newline; [SEG] rows shifted            seg_rows, chosen

Every text, file and number comes from the step's `params` in the manifest; the tokenizers are the files the
export copied into the artifact (`files`). `report` turns a run's ACCM outputs into what `csprt run`, `serve` and
Triton return: the candidate captions and the one chosen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from graphs.accm import splice_position
from graphs.accm_loop import beam_loop
from graphs.errors import ArtifactError, InputError, internal_error
from graphs.prompt import IM_END, check_query
from graphs.stages import HostStep, Layout

GPT2, CLIP = "GPT2Tokenizer", "CLIPTokenizer"  # a step's *gpt2_tokenizer / *clip_tokenizer param: which files
RunStage = Callable[[str, dict], dict]  # stage name, feed -> outputs (the Pipeline runs it on its runner)


class HostSteps:
    """Runs an artifact's host steps. `__call__` is the `Pipeline`'s `host_steps` hook.

    Args:
        layout (Layout): the artifact's layout (its `host_steps`).
        art_dir (Path): the artifact directory (tokenizer files are relative to it).
        llm_tokenizer (Callable[[], JsonTokenizer]): the LLM's tokenizer, loaded on first use (`HostIO.tokenizer`).
    """

    def __init__(self, layout: Layout, art_dir: str | Path, llm_tokenizer: Callable[[], object]):
        self.layout, self.art_dir, self._llm = layout, Path(art_dir), llm_tokenizer
        self._tokenizers: dict[str, object] = {}
        self._kinds = {"accm_question": self._question, "accm_beam_search": self._beam_search,
                       "accm_selector_text": self._selector_text, "accm_splice": self._splice}

    def __call__(self, step: HostStep, feed: dict, context: dict, run_stage: RunStage) -> dict:
        fn = self._kinds.get(step.kind)
        if fn is None:
            raise ArtifactError(f"host step {step.name!r} has kind {step.kind!r}, which this csprt does not know; "
                                f"it knows {', '.join(self._kinds)}: upgrade csprt")
        queries = context.get("queries") or []
        if len(queries) != 1:
            raise InputError(f"host step {step.name!r} runs one request at a time (ACCM's graphs are batch 1); got a "
                             f"batch of {len(queries)}: send one image and one query per call")
        return fn(step, feed, check_query(queries[0]), run_stage)

    def _tokenizer(self, rel: str, cls: str):
        """The slow HF tokenizer `cls` (GPT2Tokenizer, CLIPTokenizer: the ids ACCM's reference uses) from `rel`."""
        if rel not in self._tokenizers:
            import transformers

            path = self.art_dir / rel
            if not path.is_dir():
                raise ArtifactError(f"the artifact's ACCM tokenizer directory {path} is missing; re-run csprt export")
            self._tokenizers[rel] = getattr(transformers, cls).from_pretrained(str(path), local_files_only=True)
        return self._tokenizers[rel]

    # -- the ACCM steps -------------------------------------------------------------------------
    def _question(self, step: HostStep, feed: dict, query: str, run_stage: RunStage) -> dict:
        p = step.params
        clip_max = self.layout.dims["clip_question_len"].max
        gpt_max = self.layout.dims["gpt_question_len"].max
        clip = self._tokenizer(p["clip_tokenizer"], CLIP)(query, truncation=True, max_length=clip_max)["input_ids"]
        gpt = self._tokenizer(p["gpt2_tokenizer"], GPT2).encode(query)
        if len(gpt) > gpt_max:
            raise InputError(f"the question is {len(gpt)} GPT-2 tokens; this ACCM artifact's caption model takes at "
                             f"most {gpt_max} (its positions less the prefix rows and the caption); shorten the "
                             "question")
        return {"clip_ids": np.asarray([clip], np.int64), "gpt_ids": np.asarray([gpt], np.int64)}

    def _beam_search(self, step: HostStep, feed: dict, query: str, run_stage: RunStage) -> dict:
        p = step.params

        def step_fn(f: dict) -> dict:
            out = run_stage(p["step"], {**f, "stopped": np.asarray(f["stopped"], np.int64)})
            return {"token": out["token"], "source": out["source"], "scores": out["scores_out"],
                    "lengths": out["lengths_out"], "stopped": out["stopped_out"] > 0}

        ids, scores = beam_loop(lambda f: run_stage(p["graph"], f), step_fn, feed, p["layers"], p["heads"],
                                p["head_dim"], p["stop_id"], beams=p["beams"], max_tokens=p["max_tokens"])
        width = max(1, max(len(i) for i in ids))
        return {"candidate_ids": np.asarray([i + [-1] * (width - len(i)) for i in ids], np.int64),
                "beam_scores": np.asarray(scores, np.float32)}

    def captions(self, step_params: dict, candidate_ids: np.ndarray) -> list[str]:
        """The candidates' texts: GPT-2 decode of each row's ids up to its -1 padding."""
        gpt = self._tokenizer(step_params["gpt2_tokenizer"], GPT2)
        return [gpt.decode([int(t) for t in row if t >= 0]) for row in np.asarray(candidate_ids)]

    def _selector_text(self, step: HostStep, feed: dict, query: str, run_stage: RunStage) -> dict:
        p = step.params
        question = query.strip()
        texts = []
        for caption in self.captions(p, feed["candidate_ids"]):
            text = p["template"].replace("{caption}", "\0")  # the caption last: strip only what the question brought
            text = text.replace("{question}", question)
            for s in p["strip"]:
                text = text.replace(s, "")
            texts.append(text.replace("\0", caption))
        tok = self._tokenizer(p["longclip_tokenizer"], CLIP)
        ids = tok(texts, padding=True, truncation=True, max_length=self.layout.dims["selector_len"].max)["input_ids"]
        return {"selector_ids": np.asarray(ids, np.int64)}

    def _splice(self, step: HostStep, feed: dict, query: str, run_stage: RunStage) -> dict:
        p = step.params
        probs = np.asarray(feed["probs"]).reshape(-1)
        chosen = int(np.argmax(probs))
        caption = self.captions(p, feed["candidate_ids"])[chosen]
        llm = self._llm()
        got = llm(p["template"].replace("{caption}", caption), add_special_tokens=True)["input_ids"]
        if not p["bos"] and got and got[0] == llm.bos_token_id:
            got = got[1:]
        if len(got) > p["caption_budget"]:
            raise InputError(f"the ACCM caption is {len(got)} LLM tokens with its prefix, over the artifact's caption "
                             f"budget of {p['caption_budget']}; re-export with a larger accm.caption_budget in the "
                             "schedule JSON")
        suffix_ids, lens = np.asarray(feed["suffix_ids"]), np.asarray(feed["suffix_lens"]).reshape(-1)
        if suffix_ids.shape[0] != 1:
            raise internal_error("accm_splice: a batch of more than one request")
        suffix = [int(t) for t in suffix_ids[0, :int(lens[0])]]
        head = llm(IM_END + "\n", add_special_tokens=False)["input_ids"]
        at = splice_position(suffix, head, lambda t: llm.decode(t, skip_special_tokens=False))
        new = suffix[:at] + got + suffix[at:]
        limit = self.layout.dims["suffix_len"].max
        if len(new) > limit:
            raise InputError(f"the prompt with the ACCM caption has {len(new)} tokens after the image, over the "
                             f"exported {limit}; shorten the query, or re-export with a larger --max-text-len")
        out = {"suffix_ids": np.asarray([new], np.int64), "suffix_lens": np.asarray([len(new)], np.int64),
               "chosen": np.asarray([chosen], np.int64)}
        if "seg_rows" in feed:  # rows at or past the splice move by its length
            rows = np.asarray(feed["seg_rows"], np.int64)
            out["seg_rows"] = np.where(rows >= at, rows + len(got), rows).astype(np.int64)
        return out

    # -- results --------------------------------------------------------------------------------
    def report(self, outputs: dict) -> dict:
        """What a run's response says about its host steps: {"accm": {candidates, chosen, caption, ...}} for an
        ACCM artifact (the layout's `accm_*` outputs), else {}."""
        if "accm_candidate_ids" not in outputs:
            return {}
        step = next(h for h in self.layout.host_steps if h.kind == "accm_selector_text")
        ids = np.asarray(outputs["accm_candidate_ids"])
        captions = self.captions(step.params, ids)
        chosen = int(np.asarray(outputs["accm_chosen"]).reshape(-1)[0])
        return {"accm": {"candidates": captions, "candidate_ids": [[int(t) for t in r if t >= 0] for r in ids],
                         "beam_scores": [float(x) for x in np.asarray(outputs["accm_beam_scores"]).reshape(-1)],
                         "selector_probs": [float(x) for x in np.asarray(outputs["accm_selector_probs"]).reshape(-1)],
                         "chosen": chosen, "caption": captions[chosen],
                         "picks": [int(x) for x in np.asarray(outputs["accm_picks"]).reshape(-1)]}}
