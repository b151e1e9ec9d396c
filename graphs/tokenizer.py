"""An artifact's tokenizer on `tokenizers` alone (no transformers, no sentencepiece), and the prompt corpus
whose ids every tokenizer of a checkpoint and its artifact must agree on.

    tokenizer/tokenizer.json --Tokenizer.from_file--> JsonTokenizer(text) -> {"input_ids": [...]}
    special tokens (bos/eos/unk) from tokenizer/special_tokens_map.json, else tokenizer_config.json

`JsonTokenizer` has the few methods `graphs.prompt` uses (call, `convert_tokens_to_ids`, `decode`,
the bos/eos/unk ids), so the runtime and the servers tokenise exactly what `csprt export` checked.
"""

from __future__ import annotations

import json
from pathlib import Path

from graphs.errors import ArtifactError
from graphs.prompt import IM_END, IM_START, IMAGE_TOKEN, llava_v1_text

FAST_FILE = "tokenizer.json"

# Queries the corpus wraps in LISA's llava_v1 prompt; the empty one included (LISA's chat.py accepts it).
CORPUS_QUERIES = (
    "Where is the cat in this picture?",
    "",
    "What is the food with the most vitamin C in this picture? Please respond with a mask.",
    "  leading spaces,   repeated   spaces and a trailing one ",
    "Digits 0 1 12 2024 3.14159 and 1,000,000 apples",
    "Unicode: café naïve Straße 東京 😀 — “quotes” ½",
    "tabs\tand\nnew\nlines",
    "Segment [SEG] twice [SEG]. <im_start>inline<im_end> tokens",
    "Is there an </s> or a <s> or <unk> in the text?",
)
# Raw texts: added tokens with and without surrounding spaces, answers as LISA trains them.
CORPUS_TEXTS = (
    "",
    " ",
    "Sure, it is [SEG].",
    "Sure, [SEG].",
    "[SEG]",
    " [SEG] ",
    "a[SEG]b",
    "It is [SEG] and [SEG].",
    f"{IM_START}{IM_END}",
    f"{IM_START} {IM_END}\n",
    "<im_patch><im_patch>",
    "The quick brown fox jumps over the lazy dog.",
    "   ",
    "\n\n",
    "1234567890",
    "ÿ ĀĂ ﬁ 𝔘 ẞ",
)


def corpus() -> list[tuple[str, bool]]:
    """(text, add_special_tokens) pairs: each prompt split at `<image>` as `graphs.prompt` tokenises it
    (the prefix with BOS, the suffix without), in both modes, then the raw texts with and without BOS."""
    items: list[tuple[str, bool]] = []
    for query in CORPUS_QUERIES:
        for mode in ("generate", "single-pass"):  # the order the checked-in reference ids were made in
            before, after = llava_v1_text(query, mode).split(IMAGE_TOKEN)
            items += [(before, True), (after, False)]
    for text in CORPUS_TEXTS:
        items += [(text, True), (text, False)]
    return items


def corpus_ids(tokenizer) -> list[list[int]]:
    """The ids of every `corpus()` item under `tokenizer` (anything with the transformers call signature)."""
    return [list(tokenizer(text, add_special_tokens=special)["input_ids"]) for text, special in corpus()]


def compare_corpus(reference, candidate) -> dict:
    """Token ids of `candidate` vs `reference` over the corpus.

    Returns:
        dict: prompts (corpus items), tokens (reference ids compared), mismatches (items whose ids differ),
        and `first_mismatch` (text, reference ids, candidate ids) when there is one.
    """
    ref, got = corpus_ids(reference), corpus_ids(candidate)
    bad = [i for i, (a, b) in enumerate(zip(ref, got)) if a != b]
    report = {"prompts": len(ref), "tokens": sum(len(a) for a in ref), "mismatches": len(bad)}
    if bad:
        text = corpus()[bad[0]][0]
        report["first_mismatch"] = {"text": text, "reference": ref[bad[0]], "candidate": got[bad[0]]}
    return report


def _special(tok_dir: Path, name: str) -> str | None:
    """A special token's text from special_tokens_map.json, else tokenizer_config.json (string or AddedToken dict)."""
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        path = tok_dir / file
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text()).get(name)
        except (OSError, ValueError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    return None


class JsonTokenizer:
    """A `tokenizers.Tokenizer` from a `tokenizer.json` with the interface `graphs.prompt` needs.

    Args:
        tokenizer (tokenizers.Tokenizer): the fast tokenizer (its post-processor adds BOS).
        bos (str | None), eos (str | None), unk (str | None): the special tokens' texts.
    """

    def __init__(self, tokenizer, bos: str | None, eos: str | None, unk: str | None):
        self._tok = tokenizer
        self.bos_token, self.eos_token, self.unk_token = bos, eos, unk
        self.bos_token_id = self.convert_tokens_to_ids(bos)
        self.eos_token_id = self.convert_tokens_to_ids(eos)
        self.unk_token_id = self.convert_tokens_to_ids(unk)

    @classmethod
    def from_dir(cls, tok_dir: str | Path) -> "JsonTokenizer":
        """Load `tok_dir/tokenizer.json`; special tokens from the directory's HF files (LLaMA's by default)."""
        from tokenizers import Tokenizer

        tok_dir = Path(tok_dir)
        path = tok_dir / FAST_FILE
        if not path.is_file():
            raise ArtifactError(f"tokenizer directory {tok_dir} has no {FAST_FILE}; re-run csprt export")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ArtifactError(f"{path} is not a valid tokenizers file ({exc}); re-run csprt export") from None
        return cls(tok, _special(tok_dir, "bos_token") or "<s>", _special(tok_dir, "eos_token") or "</s>",
                   _special(tok_dir, "unk_token") or "<unk>")

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self._tok.encode(text, add_special_tokens=add_special_tokens).ids}

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, token):
        """A token's id (None when unknown), or the ids of a list of tokens."""
        if isinstance(token, (list, tuple)):
            return [self.convert_tokens_to_ids(t) for t in token]
        return None if token is None else self._tok.token_to_id(token)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
