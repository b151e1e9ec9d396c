"""LISA's llava_v1 prompt and its tokenisation around the image placeholder (no torch).

    <s> {system} USER: <im_start> | N image tokens | <im_end>\\n{query} Please output segmentation mask. ASSISTANT:[ [SEG].]

The text is split at `<image>` and each side tokenised on its own (LLaVA's tokenizer_image_token),
so it works whether or not the tokenizer knows `<image>` as a token. Single-pass mode appends the
answer ` [SEG].`; the [SEG] embedding is the hidden state one position before each [SEG] token.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphs.errors import CheckpointError, InputError

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SEG_TOKEN = "[SEG]"
IMAGE_TOKEN = "<image>"
IM_START, IM_END = "<im_start>", "<im_end>"
SINGLE_PASS_ANSWER = "[SEG]."
INSTRUCTION = "Please output segmentation mask."
MODES = ("single-pass", "generate")
# The model's own control tokens: in a query they would add an image slot, a mask request or an end of text the
# user never asked for (and `<image>` would split the prompt in three), so a query may not contain them.
CONTROL_TOKENS = (SEG_TOKEN, IMAGE_TOKEN, IM_START, IM_END, "<s>", "</s>", "<unk>")
# No tokenizer here packs more than this many characters into one token (LLaMA's longest piece is 16), so a query
# longer than this many characters per model position is too long without tokenising it.
MAX_CHARS_PER_TOKEN = 64


@dataclass(frozen=True)
class PromptIds:
    prefix: list[int]   # BOS ... <im_start>: before the image tokens
    suffix: list[int]   # <im_end> ... ASSISTANT:[ [SEG].]: after them
    seg_token_id: int
    eos_token_id: int

    def seg_suffix_positions(self) -> list[int]:
        """Indices in `suffix` of each [SEG] token."""
        return [i for i, t in enumerate(self.suffix) if t == self.seg_token_id]

    def seg_rows(self) -> list[int]:
        """Suffix rows whose hidden state is each [SEG] embedding: the row just before each [SEG], the one that
        predicts it (LISA's `seg_token_mask` shifted by one). The one place this rule is written on the host side;
        `exporter.wrappers` computes the same row in-graph for the prune query."""
        return [j - 1 for j in self.seg_suffix_positions()]


def check_query(query: str, max_positions: int | None = None) -> str:
    """The query, stripped; InputError if it is not text, empty, not UTF-8, holds a control token, or is
    longer than `max_positions` could hold (checked before any tokenisation, so its cost is bounded)."""
    if not isinstance(query, str):
        raise InputError(f"the query must be text, got {type(query).__name__}")
    if max_positions is not None and len(query) > MAX_CHARS_PER_TOKEN * max_positions:
        raise InputError(f"the query is {len(query)} characters, far more than the model's {max_positions} "
                         "positions can hold; shorten it")
    try:
        query.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise InputError("the query is not valid UTF-8 text; pass it UTF-8 encoded") from None
    query = query.strip()
    if not query:
        raise InputError("the query is empty; pass a question such as 'Where is the cat?'")
    found = [t for t in CONTROL_TOKENS if t in query]
    if found:
        raise InputError(f"the query contains the model's control token(s) {', '.join(found)}; "
                         "remove them (the prompt adds the image and [SEG] itself)")
    return query


def llava_v1_text(query: str, mode: str) -> str:
    """LISA's llava_v1 prompt around `query` as given (no checks: the tokenizer corpus wraps texts a user may not
    send); single-pass appends the answer " [SEG].". The one place the template is written."""
    text = f"{SYSTEM} USER: {IM_START}{IMAGE_TOKEN}{IM_END}\n{query} {INSTRUCTION} ASSISTANT:"
    return text + (f" {SINGLE_PASS_ANSWER}" if mode == "single-pass" else "")


def prompt_text(query: str, mode: str) -> str:
    """The prompt of a user's query: mode and query checked (`check_query`), then `llava_v1_text`."""
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    return llava_v1_text(check_query(query), mode)


def token_id(tokenizer, token: str) -> int:
    """Look an added token's id up; never hard-code it."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise CheckpointError(f"the tokenizer has no {token!r} token; LISA checkpoints add it (re-create with csprt make-tiny)")
    return tid


def tokenize_prompt(tokenizer, query: str, mode: str, n_image_tokens: int, max_positions: int) -> PromptIds:
    """Token ids either side of the image, checked against the model's position limit."""
    check_query(query, max_positions)
    before, after = prompt_text(query, mode).split(IMAGE_TOKEN)
    prefix = tokenizer(before, add_special_tokens=True)["input_ids"]
    suffix = tokenizer(after, add_special_tokens=False)["input_ids"]
    total = len(prefix) + n_image_tokens + len(suffix)
    if total > max_positions:
        raise InputError(
            f"the prompt is {total} tokens ({len(prefix) + len(suffix)} text + {n_image_tokens} image), over the model's "
            f"maximum of {max_positions}; shorten the query"
        )
    ids = PromptIds(prefix=prefix, suffix=suffix, seg_token_id=token_id(tokenizer, SEG_TOKEN),
                    eos_token_id=tokenizer.eos_token_id)
    if mode == "single-pass" and not ids.seg_suffix_positions():
        raise InputError("the single-pass prompt lost its [SEG] token in tokenisation; check the tokenizer")
    return ids


def query_of_length(tokenizer, text_tokens: int, mode: str, n_image_tokens: int, max_positions: int) -> str:
    """A benchmark query whose prompt has about `text_tokens` text tokens (prefix + suffix; at least the template's).

    Pads "Where is the cat?" with words until the tokenised prompt reaches the length, so a benchmark
    drives every backend through the same tokenizer with the same ids.
    """
    base = "Where is the cat?"
    words, query = 0, base
    step = 16
    while True:
        ids = tokenize_prompt(tokenizer, query, mode, n_image_tokens, max_positions)
        have = len(ids.prefix) + len(ids.suffix)
        if have >= text_tokens:
            if step == 1 or words == 0:
                return query
            words, step = words - step, max(1, step // 4)  # overshot: back off and go finer
        words += step
        query = base + " cat" * words
