"""Writes lisa_tokenizer_ids_tf431.json: the corpus ids of lisa_tokenizer/ under LISA's own tokenizer stack.

Run it in a separate virtualenv with LISA's pins (not csprt's): transformers==4.31.0, sentencepiece, protobuf<4
(no torch needed), from the repository root:

    python tests/exporter/data/make_golden_ids.py

lisa_tokenizer/ is `exporter.tokenizer.write_sentencepiece_tokenizer(dir, 512)` (LISA v1's added tokens).
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from transformers import AutoTokenizer, __version__  # noqa: E402

from graphs.tokenizer import corpus  # noqa: E402  (imports graphs.prompt and graphs.errors only)

assert __version__ == "4.31.0", __version__
# As LISA's chat.py loads it.
tok = AutoTokenizer.from_pretrained(HERE / "lisa_tokenizer", model_max_length=512, padding_side="right", use_fast=False)
assert type(tok).__name__ == "LlamaTokenizer"
ids = [tok(text, add_special_tokens=special).input_ids for text, special in corpus()]
(HERE / "lisa_tokenizer_ids_tf431.json").write_text(json.dumps({"transformers": __version__, "ids": ids}) + "\n")
print(f"{len(ids)} texts, {sum(map(len, ids))} tokens")
