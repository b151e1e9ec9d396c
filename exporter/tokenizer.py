"""An offline LLaMA-like tokenizer for tiny checkpoints: byte-level BPE trained on a built-in corpus.

Byte-level so any query text tokenizes (no unknown characters); ids 0/1/2 are `<unk>`/`<s>`/`</s>`
as in LLaMA, a BOS is prepended, and LISA's added tokens come last, so `len(tokenizer) == vocab`.
"""

from __future__ import annotations

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
