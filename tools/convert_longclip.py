"""Convert LongCLIP-L's released `longclip-L.pt` into the HF text-tower directory an ACCM directory holds.

    python -m tools.convert_longclip longclip-L.pt --clip CLIP_DIR --out ACCM_DIR/longclip

CLIP_DIR supplies the tokenizer files (LongCLIP uses CLIP's BPE), e.g. openai/clip-vit-large-patch14.
Exit 2 with one line on bad input. See docs/accm.md.
"""

from __future__ import annotations

import argparse
import sys

from graphs.errors import ToolchainError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.convert_longclip", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="LongCLIP's longclip-L.pt (OpenAI CLIP layout)")
    p.add_argument("--clip", required=True, help="a CLIP directory with vocab.json and merges.txt")
    p.add_argument("--out", required=True, help="directory to write, e.g. ACCM_DIR/longclip")
    args = p.parse_args(argv)
    from exporter.accm.longclip import convert_longclip

    try:
        out = convert_longclip(args.checkpoint, args.out, args.clip)
    except ToolchainError as exc:
        print(f"convert_longclip: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote LongCLIP's text tower (248 positions) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
