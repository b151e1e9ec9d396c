"""An ACCM schedule end to end on the PyTorch reference (tiny models): picks, 3 candidates, selector, splice, mask."""

import dataclasses

import numpy as np
import pytest
import torch

from exporter.accm.reference import AccmReference
from exporter.export import sample_image
from exporter.reference import Reference
from exporter.tokenizer import build_tokenizer
from graphs.accm import splice_position
from graphs.errors import InputError, ScheduleError
from graphs.prompt import IM_END, IMAGE_TOKEN, SYSTEM, llava_v1_text
from graphs.schedule import AccmKnobs, Stage, resolve

QUERY = "Where is the cat in this picture?"


def _ref(lisa, accm_models, schedule):
    return AccmReference(lisa.model, lisa.tokenizer, lisa.image_processor_config, schedule, accm_models)


def _schedule(lisa, name="accm-36", **changes):
    s = resolve(name, lisa.shape.llm.layers, lisa.shape.num_image_tokens)
    return dataclasses.replace(s, **changes).check() if changes else s


@pytest.fixture(scope="module")
def run36(lisa, accm_models):
    ref = _ref(lisa, accm_models, _schedule(lisa))
    return ref, ref(sample_image(), QUERY)


def test_single_pass_end_to_end(lisa, run36):
    ref, out = run36
    c = out.accm
    budget = ref.schedule.stages[0].budget
    assert out.image_tokens_per_layer == [budget] * lisa.shape.llm.layers
    assert out.stage_indices["llm_0"] == sorted(c.picks.indices) and len(c.picks.indices) == budget
    assert len(c.candidates) == 3 and c.beam_scores == sorted(c.beam_scores, reverse=True)
    assert sum(c.selector_probs) == pytest.approx(1.0) and c.chosen == int(np.argmax(c.selector_probs))
    assert c.caption == c.candidates[c.chosen] and all(ids[-1] == ref.accm.gpt_tokenizer.encode(".")[0]
                                                       for ids in c.candidate_ids)
    assert out.masks.shape == (1, *sample_image().shape[:2])
    assert {"accm_picks", "accm_caption", "accm_selector"} <= set(out.timings_ms)
    # The splice: "additional information: {caption}" in LLaMA ids without BOS, after <im_end> (and the newline).
    want = lisa.tokenizer("additional information: " + c.caption, add_special_tokens=False)["input_ids"]
    assert c.splice_ids == want and c.splice_ids[0] != lisa.tokenizer.bos_token_id


def test_the_chosen_caption_reaches_the_llm(lisa, accm_models, run36):
    """Another selector choice (a selector that prefers the last candidate) changes the [SEG] embedding."""
    _, out = run36
    assert out.accm.chosen != 2 and out.accm.candidates[2] != out.accm.caption  # the tiny's own choice is not 2

    class Last(torch.nn.Module):
        def forward(self, feats):
            return torch.tensor([0.1, 0.2, 0.7])

    other = _ref(lisa, dataclasses.replace(accm_models, selector=Last()), _schedule(lisa))(sample_image(), QUERY)
    assert other.accm.chosen == 2 and other.accm.picks.indices == out.accm.picks.indices
    assert not torch.allclose(other.seg_hidden, out.seg_hidden)


def test_generate_mode_and_a_later_prune_stage(lisa, accm_models):
    L = lisa.shape.llm.layers
    s = _schedule(lisa, name="accm-36", stages=(Stage("llm_0", 0, L // 2, "accm", 4), Stage("llm_1", L // 2, L, "prune", 2)))
    out = _ref(lisa, accm_models, s)(sample_image(), QUERY, mode="generate", max_new_tokens=4)
    assert out.image_tokens_per_layer == [4] * (L // 2) + [2] * (L - L // 2)
    assert set(out.stage_indices["llm_1"]) <= set(out.stage_indices["llm_0"])
    assert out.generated_ids and len(out.accm.candidates) == 3


def test_caption_longer_than_the_budget_is_refused(lisa, accm_models):
    s = _schedule(lisa, accm=AccmKnobs(text_picks=2, caption_budget=3))
    with pytest.raises(InputError, match=r"LLM tokens with its prefix, over the schedule's caption budget of 3; "
                                         "raise accm.caption_budget"):
        _ref(lisa, accm_models, s)(sample_image(), QUERY)


def test_plain_reference_and_export_without_accm_models_refuse_accm_schedules(lisa, tiny_accm, tmp_path):
    from exporter.export import export_artifact

    s = _schedule(lisa)
    with pytest.raises(ScheduleError, match="which need ACCM's own models: run it with exporter.accm.reference.AccmReference"):
        Reference(lisa.model, lisa.tokenizer, lisa.image_processor_config, s)(sample_image(), QUERY)
    with pytest.raises(ScheduleError, match="it needs ACCM's models"):  # the export itself: test_artifact.py
        export_artifact(tiny_accm[0], s, tmp_path / "art")
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
@pytest.mark.parametrize("tokenizer", ["sentencepiece", "bpe"])
def test_splice_goes_after_the_image_newline(lisa, system, tokenizer):
    """With or without the system message, the caption lands after `<im_end>` and the newline, before the question.

    The tiny SentencePiece has no byte fallback and drops the newline; the byte-level BPE keeps it."""
    tok = lisa.tokenizer if tokenizer == "sentencepiece" else build_tokenizer(lisa.shape.llm.vocab)
    text = llava_v1_text(QUERY, "single-pass")
    if not system:
        text = text.replace(SYSTEM + " ", "")
    before, after = text.split(IMAGE_TOKEN)
    prefix = tok(before, add_special_tokens=True)["input_ids"]
    suffix = tok(after, add_special_tokens=False)["input_ids"]
    head = tok(IM_END + "\n", add_special_tokens=False)["input_ids"]
    at = splice_position(suffix, head, lambda t: tok.decode(t, skip_special_tokens=False))
    assert tok.decode(suffix[:at], skip_special_tokens=False).rstrip(" ") in (IM_END + "\n", IM_END)
    assert tok.decode(suffix[at:], skip_special_tokens=False).strip().startswith(QUERY)
    assert (SYSTEM in tok.decode(prefix)) == system
    assert at == (2 if tokenizer == "bpe" else 1)


def test_question_longer_than_gpt2_positions_is_refused(lisa, accm_models):
    # the tiny GPT-2 has 256 positions: 256 - 20 prefix rows - 67 caption tokens leaves 169 for the question
    with pytest.raises(InputError, match=r"the question is \d+ GPT-2 tokens; .* room for 169 question tokens"):
        _ref(lisa, accm_models, _schedule(lisa))(sample_image(), "where is the cat? " * 60)
