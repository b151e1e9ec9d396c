"""Tokenizers of LISA checkpoints: LLaMA's SentencePiece set as LISA ships it, its fast twin, and tiny ones.

    checkpoint: tokenizer.model + tokenizer_config.json (LlamaTokenizer) + special_tokens_map.json + added_tokens.json
        --SlowLlamaTokenizer--> ids exactly as LISA's `AutoTokenizer(..., use_fast=False)` under transformers 4.31
        --fast_tokenizer()----> tokenizers.Tokenizer (transformers' SentencePiece extractor, LlamaConverter's legacy
                                pipeline), written to the artifact as tokenizer.json once its ids equal the slow
                                tokenizer's over `graphs.tokenizer.corpus()`

transformers 5 has no slow LlamaTokenizer any more (`use_fast` is ignored and tokenizer.model is converted with
non-legacy prefix handling), so `SlowLlamaTokenizer` is that tokenizer's algorithm on `sentencepiece`: the text is
split at added and special tokens (longest first); added tokens that are not special strip the whitespace on both
sides (transformers 4.31's default for tokens without an AddedToken entry); every other chunk goes through
SentencePiece, which prepends its dummy "▁" per chunk (legacy behaviour); BOS comes first.

Tiny checkpoints get either a SentencePiece BPE model trained offline here (LLaMA's trainer settings: byte
fallback, split digits, identity normalisation, no whitespace folding; ids 0-2 `<unk>`, `<s>`, `</s>`) with LISA's
added tokens after it (`write_sentencepiece_tokenizer`), or the older byte-level BPE (`build_tokenizer`).
"""

from __future__ import annotations

import re
from pathlib import Path

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as LLaMA
ADDED_TOKENS = ("[SEG]", "<image>", "<im_start>", "<im_end>")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + len(ADDED_TOKENS)  # the byte alphabet must fit

# Enough varied English for a few hundred merges; content is irrelevant beyond that.
_CORPUS = """\
USER: <image> Can you segment the object in this image that people use to sit on? Please output segmentation mask.
ASSISTANT: Sure, it is [SEG]. What is the food with the most vitamin C in this picture? Please respond with a mask.
Segment the animal that is most likely to bark at strangers. Where should I put the dirty dishes after dinner?
The quick brown fox jumps over the lazy dog. A man is riding a bicycle down the street next to a red car.
Two children are playing football in the park while their parents watch from a wooden bench under a tree.
There is a cat sleeping on the sofa, a lamp on the table, and a window with white curtains behind them.
Which part of the kitchen would you use to keep the milk cold? Highlight the thing that tells the time.
In the morning the sun rises over the mountains and the river shines; birds fly above the green fields.
She opened the door, picked up the umbrella, and walked to the station because it was raining heavily.
Please identify the tallest building, the nearest traffic light, the person wearing a yellow jacket, and
the vehicle that carries the most passengers. Numbers like 1, 2, 3, 10, 42, 100 and 2024 also appear here.
What would a person use to cut paper? Show me the region where someone could charge a phone or a laptop.
"""


def build_tokenizer(vocab: int):
    """A `PreTrainedTokenizerFast` with exactly `vocab` tokens, trained deterministically offline.

    Args:
        vocab (int): total size including the special and added tokens (the LLM vocab size).

    Returns:
        PreTrainedTokenizerFast: bos `<s>`=1, eos `</s>`=2, unk = pad = `<unk>`=0, and
        `[SEG]`, `<image>`, `<im_start>`, `<im_end>` as added special tokens (the last ids).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab < MIN_VOCAB:
        raise ValueError(f"vocab {vocab} is too small for a byte-level tokenizer; use at least {MIN_VOCAB}")
    base_size = vocab - len(ADDED_TOKENS)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=base_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    # A large --vocab outgrows the corpus' merges: pad with inert tokens so the size is exact.
    fillers = [f"<unused_{i}>" for i in range(base_size - tok.get_vocab_size())]
    tok.add_tokens(fillers)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", model_max_length=2048)
    fast.add_special_tokens({"additional_special_tokens": list(ADDED_TOKENS)})
    if len(fast) != vocab:
        raise AssertionError(f"tokenizer has {len(fast)} tokens, wanted {vocab}")
    return fast


# --- LISA's SentencePiece tokenizer ------------------------------------------------------------------------------
SP_FILE = "tokenizer.model"
FAST_FILE = "tokenizer.json"
# The files a LISA checkpoint's tokenizer may have; the artifact keeps them all (tokenizer.json converted).
TOKENIZER_FILES = (SP_FILE, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", FAST_FILE)
# LISA's added tokens in id order after the base vocabulary, per published layout:
#   v1: the LLaVA base's <im_patch> (LLaVA's train.py adds it by default), then train_ds.py's [SEG], <im_start>, <im_end>;
#   v0: chat.py's [SEG], then the v0 LISA module's <im_patch>, <im_start>, <im_end>.
LISA_ADDED_TOKENS = {"v1": ("<im_patch>", "[SEG]", "<im_start>", "<im_end>"),
                     "v0": ("[SEG]", "<im_patch>", "<im_start>", "<im_end>")}
LISA_MODEL_MAX_LENGTH = 512  # chat.py's --model_max_length
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_LLAMA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def _train_sentencepiece(base_size: int) -> bytes:
    """A SentencePiece BPE model of exactly `base_size` pieces, trained offline on `_CORPUS` with LLaMA's settings."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_CORPUS.splitlines()), model_writer=buf, model_type="bpe", vocab_size=base_size,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, allow_whitespace_only_pieces=True, character_coverage=1.0, max_sentencepiece_length=16,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, hard_vocab_limit=True)
    except RuntimeError as exc:  # "Vocabulary size is too high/small": the corpus bounds the piece count
        raise ValueError(f"a SentencePiece BPE model of {base_size} pieces cannot be trained on the built-in corpus "
                         f"({exc}); pick --vocab between {SP_VOCAB_RANGE[0]} and {SP_VOCAB_RANGE[1]}, or --tokenizer bpe"
                         ) from None
    return buf.getvalue()


# --vocab bounds for the SentencePiece tiny tokenizer: 3 specials + 256 bytes + the corpus' characters at least, the
# merges the corpus offers at most (measured: 314..1260 pieces trainable), plus the 4 added tokens, with margin.
SP_VOCAB_RANGE = (320, 1200)


def _added_token(content: str) -> dict:
    """An AddedToken entry as transformers 4.31's save_pretrained wrote LLaMA's special tokens."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_sentencepiece_tokenizer(out_dir: str | Path, vocab: int, added: tuple[str, ...] = LISA_ADDED_TOKENS["v1"]) -> None:
    """Write LISA's tokenizer file set: tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json.

    Args:
        out_dir (path): the checkpoint directory.
        vocab (int): total tokens (SentencePiece pieces + `added`), the config's vocab_size.
        added (tuple[str, ...]): added tokens in id order. Defaults to LISA v1's.
    """
    from graphs.atomic import atomic_path, write_json

    if not SP_VOCAB_RANGE[0] <= vocab <= SP_VOCAB_RANGE[1]:
        raise ValueError(f"vocab {vocab} is outside what the SentencePiece tiny tokenizer can be trained to "
                         f"({SP_VOCAB_RANGE[0]}..{SP_VOCAB_RANGE[1]}); pick a --vocab in that range, or --tokenizer bpe")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = vocab - len(added)
    model = _train_sentencepiece(base)
    with atomic_path(out / SP_FILE) as tmp:
        tmp.write_bytes(model)
    specials = {name: _added_token(text) for name, text in _LLAMA_SPECIALS.items()}
    write_json({**specials, "pad_token": "<unk>"}, out / "special_tokens_map.json")  # chat.py: pad = unk
    write_json({"add_bos_token": True, "add_eos_token": False, **specials, "clean_up_tokenization_spaces": False,
                "model_max_length": LISA_MODEL_MAX_LENGTH, "pad_token": None, "padding_side": "right",
                "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer"}, out / "tokenizer_config.json")
    write_json({tok: base + i for i, tok in enumerate(added)}, out / "added_tokens.json")


def _read_optional_json(path: Path) -> dict:
    from graphs.checkpoint_config import read_json

    return read_json(path, "tokenizer file") if path.is_file() else {}


class SlowLlamaTokenizer:
    """LISA's slow `LlamaTokenizer` (transformers 4.31, legacy) on `sentencepiece`, from a checkpoint's files.

    Args:
        tok_dir (path): directory with tokenizer.model and, optionally, tokenizer_config.json,
            special_tokens_map.json and added_tokens.json.

    Raises:
        CheckpointError: tokenizer.model missing or not a SentencePiece model, added tokens not numbered
            right after the SentencePiece pieces, or a non-legacy tokenizer config.
    """

    legacy = True            # read by transformers' Llama converter
    add_prefix_space = True

    def __init__(self, tok_dir: str | Path):
        import sentencepiece as spm

        from graphs.errors import CheckpointError

        self.dir = Path(tok_dir)
        path = self.dir / SP_FILE
        if not path.is_file():
            raise CheckpointError(f"the tokenizer's {SP_FILE} is missing from {self.dir}: a LISA checkpoint ships "
                                  f"LLaMA's SentencePiece model there; copy it from the checkpoint's release")
        self.vocab_file = str(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.vocab_file)
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{path} is not a SentencePiece model ({str(exc).strip()}); it is corrupt or "
                                  "truncated: copy it again from the checkpoint's release") from None
        config = _read_optional_json(self.dir / "tokenizer_config.json")
        if config.get("legacy") is False:
            # transformers 4.31's non-legacy mode strips the "▁" of the first piece after an added token and maps the
            # rest to <unk> when it is no piece (measured with 4.31.0): no tokenizers pipeline reproduces that.
            raise CheckpointError(f"{self.dir / 'tokenizer_config.json'} sets legacy=false: csprt reproduces the "
                                  "legacy LlamaTokenizer only (non-legacy is not supported yet)")
        self.add_bos_token = bool(config.get("add_bos_token", True))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        special_map = {**config, **_read_optional_json(self.dir / "special_tokens_map.json")}
        self._strip: dict[str, tuple[bool, bool]] = {}  # special token -> (lstrip, rstrip) for AddedToken entries
        specials = {}
        for name in _SPECIAL_NAMES:
            value = special_map.get(name, _LLAMA_SPECIALS.get(name))
            if isinstance(value, dict):
                self._strip[value["content"]] = (bool(value.get("lstrip")), bool(value.get("rstrip")))
                value = value["content"]
            specials[name] = value
        self.bos_token, self.eos_token, self.unk_token = specials["bos_token"], specials["eos_token"], specials["unk_token"]
        extra = [t["content"] if isinstance(t, dict) else t for t in special_map.get("additional_special_tokens") or []]
        self.all_special_tokens = {t for t in (*specials.values(), *extra) if t}
        self.added = self._read_added(self.dir / "added_tokens.json")
        self._by_id = {i: t for t, i in self.added.items()}
        no_split = sorted(self.all_special_tokens | set(self.added), key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in no_split) + ")")
        self.bos_token_id = self.convert_tokens_to_ids(self.bos_token)
        self.eos_token_id = self.convert_tokens_to_ids(self.eos_token)
        self.unk_token_id = self.convert_tokens_to_ids(self.unk_token)

    def _read_added(self, path: Path) -> dict[str, int]:
        """added_tokens.json, checked as transformers 4.31 checks a slow tokenizer's: ids follow the pieces in order."""
        from graphs.errors import CheckpointError

        added = _read_optional_json(path)
        n = self.sp.get_piece_size()
        for i, (token, index) in enumerate(sorted(added.items(), key=lambda kv: kv[1])):
            if index != n + i:
                raise CheckpointError(
                    f"{path} gives {token!r} id {index}, but added tokens must be numbered right after the {n} pieces of "
                    f"{SP_FILE} ({n}, {n + 1}, ...); this added_tokens.json belongs to another tokenizer.model")
        return dict(added)

    def check_vocab(self, vocab_size: int, config_path: str | Path) -> None:
        """Every token id must have an embedding row: len(tokenizer) <= config.json's vocab_size."""
        from graphs.errors import CheckpointError

        if len(self) > vocab_size:
            last = max(self.added, key=self.added.get) if self.added else None
            raise CheckpointError(
                f"the tokenizer has {len(self)} tokens ({self.sp.get_piece_size()} in {SP_FILE}"
                + (f", added_tokens.json up to {last!r}={self.added[last]}" if last else "")
                + f") but {config_path} has vocab_size {vocab_size}: the added tokens and the embedding rows disagree; "
                "use the added_tokens.json and config.json of the same checkpoint")

    def __len__(self) -> int:
        return self.sp.get_piece_size() + len(self.added)

    def tokenize(self, text: str) -> list[str]:
        """Pieces and added tokens of `text`, as transformers 4.31's `PreTrainedTokenizer.tokenize` + legacy `_tokenize`."""
        chunks = self._split.split(text)
        for i, chunk in enumerate(chunks):
            if i % 2 == 0:
                continue  # odd indices are the matched no-split tokens
            lstrip, rstrip = self._strip.get(chunk, (True, True))  # tokens without an AddedToken entry strip both sides
            if rstrip and i + 1 < len(chunks):
                chunks[i + 1] = chunks[i + 1].lstrip()
            if lstrip:
                chunks[i - 1] = chunks[i - 1].rstrip()
        tokens: list[str] = []
        for i, chunk in enumerate(chunks):
            if not chunk:
                continue
            tokens += [chunk] if i % 2 else self.sp.encode(chunk, out_type=str)
        return tokens

    def convert_tokens_to_ids(self, token):
        """A token's id (unknown pieces give the unk id, as transformers 4.31), or the ids of a list of tokens."""
        if isinstance(token, (list, tuple)):
            return [self.convert_tokens_to_ids(t) for t in token]
        if token is None:
            return None
        return self.added[token] if token in self.added else self.sp.piece_to_id(token)

    def convert_ids_to_tokens(self, index: int) -> str:
        return self._by_id[index] if index in self._by_id else self.sp.id_to_piece(index)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [self.convert_tokens_to_ids(t) for t in self.tokenize(text)]
        if add_special_tokens:
            ids = [self.bos_token_id] * self.add_bos_token + ids + [self.eos_token_id] * self.add_eos_token
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`: SentencePiece runs decoded, added and special tokens kept verbatim."""
        special_ids = {self.convert_tokens_to_ids(t) for t in self.all_special_tokens}
        parts, run = [], []
        for i in map(int, ids):
            if skip_special_tokens and i in special_ids:
                continue
            if i in self._by_id or i in special_ids:
                parts += [self.sp.decode(run)] if run else []
                parts.append(self.convert_ids_to_tokens(i))
                run = []
            else:
                run.append(i)
        parts += [self.sp.decode(run)] if run else []
        return " ".join(p for p in parts if p)


def fast_tokenizer(slow: SlowLlamaTokenizer):
    """The `tokenizers.Tokenizer` of `slow`: transformers' SentencePiece extractor for the BPE vocabulary and merges,
    LlamaConverter's legacy pipeline (prepend "▁" per chunk, spaces to "▁", byte fallback), LLaMA's BOS
    post-processor, and the added tokens with the whitespace stripping the slow tokenizer applies.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    extracted = SentencePieceExtractor(slow.vocab_file).extract(BPE)
    vocab, merges = extracted["vocab"], extracted["merges"]
    tok = Tokenizer(BPE(vocab, merges, unk_token=slow.sp.id_to_piece(slow.sp.unk_id()), fuse_unk=True,
                        byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])

    def added_token(text: str) -> AddedToken:
        lstrip, rstrip = slow._strip.get(text, (True, True))
        return AddedToken(text, lstrip=lstrip, rstrip=rstrip, normalized=False,
                          special=text in slow.all_special_tokens)

    in_vocab = sorted((t for t in slow.all_special_tokens if t not in slow.added), key=slow.convert_tokens_to_ids)
    tok.add_special_tokens([added_token(t) for t in in_vocab])
    for text in sorted(slow.added, key=slow.added.get):  # one at a time: ids follow added_tokens.json's order
        if text in slow.all_special_tokens:
            tok.add_special_tokens([added_token(text)])
        else:
            tok.add_tokens([added_token(text)])
    wrong = {t: (tok.token_to_id(t), i) for t, i in slow.added.items() if tok.token_to_id(t) != i}
    if wrong:
        raise AssertionError(f"converted added-token ids differ from added_tokens.json: {wrong}")
    if slow.add_bos_token:
        bos = slow.bos_token
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, slow.bos_token_id)])
    return tok


# --- the artifact's tokenizer --------------------------------------------------------------------------------------
class TokenizerExport:
    """The artifact's tokenizer directory, prepared (converted and checked) before the stages export.

    `tokenizer.json` is converted from tokenizer.model when the checkpoint has one (LISA's own files are what its
    chat.py reads; a tokenizer.json beside them is not trusted), and its ids are compared with the slow tokenizer's
    over `graphs.tokenizer.corpus()`; any mismatch fails the export. A checkpoint with only a tokenizer.json keeps it.

    Args:
        ckpt_dir (path): the checkpoint directory.
        vocab_size (int): config.json's vocab_size (every token id must be below it).

    Raises:
        CheckpointError: no tokenizer, a broken one, or a converted tokenizer whose ids differ from the slow one's.
    """

    def __init__(self, ckpt_dir: str | Path, vocab_size: int):
        from exporter.checkpoint import load_tokenizer
        from graphs.errors import CheckpointError
        from graphs.manifest import file_sha256
        from graphs.tokenizer import JsonTokenizer, compare_corpus

        self.ckpt_dir = Path(ckpt_dir)
        self.reference = load_tokenizer(self.ckpt_dir, vocab_size)
        self.sources = {n: self.ckpt_dir / n for n in TOKENIZER_FILES if (self.ckpt_dir / n).is_file()}
        check = None
        if isinstance(self.reference, SlowLlamaTokenizer):
            fast = fast_tokenizer(self.reference)
            self.fast_json = fast.to_str(pretty=True)
            candidate = JsonTokenizer(fast, self.reference.bos_token, self.reference.eos_token, self.reference.unk_token)
            check = compare_corpus(self.reference, candidate)
            if check["mismatches"]:
                first = check["first_mismatch"]
                raise CheckpointError(
                    f"the fast tokenizer converted from {self.ckpt_dir / SP_FILE} gives other ids than the slow one on "
                    f"{check['mismatches']} of {check['prompts']} corpus texts (first: {first['text']!r}: slow "
                    f"{first['reference']}, fast {first['candidate']}); this tokenizer cannot be exported faithfully")
        else:
            self.fast_json = self.sources[FAST_FILE].read_text()
        self.record = {
            "fast": FAST_FILE,
            "converted_from": SP_FILE if check is not None else None,
            "source_files": {n: file_sha256(p) for n, p in sorted(self.sources.items())},
            "corpus_check": check,
        }

    def write(self, dest: str | Path) -> dict:
        """Write the tokenizer directory; returns the manifest's tokenizer provenance (files and their sha256)."""
        import shutil

        from graphs.atomic import atomic_path
        from graphs.manifest import file_sha256

        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        written = {}
        for name in TOKENIZER_FILES:
            if name != FAST_FILE and name not in self.sources:
                continue
            with atomic_path(dest / name) as tmp:
                if name == FAST_FILE:
                    tmp.write_text(self.fast_json)
                else:
                    shutil.copyfile(self.sources[name], tmp)
            written[name] = file_sha256(dest / name)
        for stale in (p for p in dest.iterdir() if p.is_file() and p.name not in written):
            stale.unlink()  # e.g. a tokenizer.model left by an export of another checkpoint
        return {**self.record, "files": written}
