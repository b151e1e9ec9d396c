"""What `csprt export` needs for an ACCM schedule besides the LISA stages: the models, the sample's host-step
values and the tokenizer files the host reads.

    load_for_export(accm_dir)       -> AccmModels, AccmLayoutInfo (sizes, the stop token)
    sample_sources(accm, layout)    -> the host steps' outputs on the export sample, and the feeds of the stages a
                                       host step runs (accm_gpt2, accm_beam_step), for tracing and the parity check
    write_tokenizers(accm_dir, art) -> accm/{gpt2,clip,longclip}/ tokenizer files, {host step: {relpath: sha256}}
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from exporter.accm.checkpoint import CLIP_DIR, GPT2_DIR, LONGCLIP_DIR, load_accm
from graphs import manifest as mf
from graphs.accm import CLIP_TEXT_POSITIONS, LONGCLIP_POSITIONS, STOP_TEXT, selector_text
from graphs.accm_layout import AccmLayoutInfo, tokenizer_dir
from graphs.atomic import atomic_path
from graphs.stages import Layout, StageSpec

SAMPLE_QUERY = "Where is the cat in this picture?"
SAMPLE_CAPTIONS = ("a cat on a mat.", "a red disc.", ".")  # the selector's sample candidates
# Tokenizer files a host needs (GPT-2: vocab.json + merges.txt; CLIP: the same plus its config); copied as found.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
# Which of ACCM's tokenizers each host step reads.
STEP_TOKENIZERS = {"accm_question": ("clip", "gpt2"), "accm_selector_text": ("gpt2", "longclip"),
                   "accm_splice": ("gpt2",)}
_SOURCE_DIRS = {"gpt2": GPT2_DIR, "clip": CLIP_DIR, "longclip": LONGCLIP_DIR}


def load_for_export(accm_dir, shape, say=lambda _m: None):
    """ACCM's models (fp32, CPU; checked against LISA's CLIP width) and the layout's facts about them."""
    accm = load_accm(accm_dir, vision_hidden=shape.vision.hidden)
    stop = accm.gpt_tokenizer.encode(STOP_TEXT)[0]
    say(f"export: ACCM models from {accm_dir} (GPT-2 {accm.shape.gpt_layers} layers, stop token {stop}); "
        "ACCM's graphs run one request: batch max 1")
    return accm, AccmLayoutInfo(shape=accm.shape, stop_id=stop)


def sample_sources(accm, layout: Layout, host: dict[str, torch.Tensor]):
    """(given, owned_feed): the host steps' outputs on the export sample, by source, and the feed of a stage that a
    host step runs. Dynamic dims are >= 2 (torch.export specialises 0 and 1)."""
    clip_ids = accm.clip_tokenizer(SAMPLE_QUERY, truncation=True, max_length=CLIP_TEXT_POSITIONS,
                                   return_tensors="pt")["input_ids"]
    gpt_ids = torch.tensor([accm.gpt_tokenizer.encode(SAMPLE_QUERY)])
    texts = [selector_text(SAMPLE_QUERY, c) for c in SAMPLE_CAPTIONS]
    selector_ids = accm.longclip_tokenizer(texts, padding=True, truncation=True, max_length=LONGCLIP_POSITIONS,
                                           return_tensors="pt")["input_ids"]
    given = {"accm_question.clip_ids": clip_ids, "accm_question.gpt_ids": gpt_ids,
             "accm_selector_text.selector_ids": selector_ids,
             # the LLM side's sample runs without a caption (its graphs do not depend on the ids)
             "accm_splice.suffix_ids": host["suffix_ids"], "accm_splice.suffix_lens": host["suffix_lens"]}
    if "seg_rows" in host:
        given["accm_splice.seg_rows"] = host["seg_rows"]
    gen = torch.Generator().manual_seed(0)

    def owned_feed(spec: StageSpec) -> dict[str, torch.Tensor]:
        if spec.kind == "accm_gpt2":  # a decode step's shape: 3 beams, 2 rows, a cache of 9 with 5 valid
            b, rows, cache = 3, 2, 9
            feed = {"token_ids": torch.randint(0, accm.shape.gpt_vocab, (b, rows), generator=gen),
                    "use_embeds": torch.tensor([[0, 1]] * b), "past_len": torch.tensor([5])}
            for t in spec.inputs:
                if t.name == "row_embeds":
                    feed[t.name] = torch.randn((b, rows, t.shape[2]), generator=gen)
                elif t.name.startswith(("past_key_", "past_value_")):
                    feed[t.name] = torch.randn((b, t.shape[1], cache, t.shape[3]), generator=gen)
            return feed
        if spec.kind == "accm_beam_step":  # the second step: beams live, one stopped
            beams, vocab = spec.input("logp").shape
            return {"logp": torch.randn((beams, vocab), generator=gen).log_softmax(-1),
                    "scores": -torch.arange(beams, dtype=torch.float32) - 1.0,
                    "lengths": torch.ones(beams), "stopped": torch.tensor([0] * (beams - 1) + [1]),
                    "stop_id": torch.tensor([accm.gpt_tokenizer.encode(STOP_TEXT)[0]])}
        raise AssertionError(f"no sample feed for host-run stage {spec.name!r}")

    return given, owned_feed


def write_tokenizers(accm_dir: Path, art: Path, layout: Layout) -> dict[str, dict[str, str]]:
    """Copy ACCM's tokenizer files into `art`/accm/ (atomically, file by file); {host step: {relpath: sha256}}."""
    written: dict[str, dict[str, str]] = {}
    for name, src_dir in _SOURCE_DIRS.items():
        files = {}
        for fname in TOKENIZER_FILES:
            src = Path(accm_dir) / src_dir / fname
            if src.is_file():
                rel = f"{tokenizer_dir(name)}/{fname}"
                with atomic_path(art / rel) as tmp:
                    shutil.copyfile(src, tmp)
                files[rel] = mf.file_sha256(art / rel)
        written[name] = files
    return {h.name: {rel: digest for tok in STEP_TOKENIZERS.get(h.kind, ())
                     for rel, digest in written[tok].items()}
            for h in layout.host_steps}
