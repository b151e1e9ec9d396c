"""First vs further questions about one image: end-to-end ms with and without the image encoding reused.

    python -m tools.encode_bench ART [--repeat 7] [--warmup 1] [--threads N] [--mode single-pass|generate]

Per round, a new image (scikit-image's chelsea, shifted a few pixels so no two rounds share an image): the
first question runs every stage (`segment(image, q1, keep_encoding=True)`), the second runs only the stages
that read the query (`segment(encoding, q2)`). Times are wall clock around `ArtifactSession.segment`, host
pre- and postprocessing included. Prints the medians, their ratio and the per-stage medians; the second
answer is checked bit for bit against an uncached run of the same question.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

Q1, Q2 = "Where is the cat in this picture?", "What would you drink from?"


def _images(n: int):
    from skimage import data

    base = data.chelsea()  # [300, 451, 3]
    return [np.ascontiguousarray(np.roll(base, 3 * i, axis=1)) for i in range(n)]


def run(art: Path, repeat: int = 7, warmup: int = 1, threads: int | None = None, mode: str = "single-pass") -> dict:
    from engines.session import ArtifactSession

    first, second, stages1, stages2 = [], [], [], []
    with ArtifactSession(art, threads=threads) as s:
        for i, image in enumerate(_images(warmup + repeat)):
            t0 = time.perf_counter()
            a = s.segment(image, Q1, mode=mode, keep_encoding=True)
            t1 = time.perf_counter()
            b = s.segment(a.encoding, Q2, mode=mode)
            t2 = time.perf_counter()
            if i == warmup:
                ref = s.segment(image, Q2, mode=mode)
                if not (np.array_equal(ref.mask_logits, b.mask_logits) and ref.generated_ids == b.generated_ids):
                    raise AssertionError("the cached answer differs from the uncached one")
            if i >= warmup:
                first.append((t1 - t0) * 1e3)
                second.append((t2 - t1) * 1e3)
                stages1.append(a.timings_ms)
                stages2.append(b.timings_ms)
        encoding_mib = a.encoding.nbytes / 2**20
        plan = s.image_plan.stages

    def med(rows, key):
        vals = [r[key] for r in rows if key in r]
        return round(float(np.median(vals)), 1) if vals else None

    names = [k for k in stages1[0] if k != "decode_steps"]
    return {"artifact": str(art), "mode": mode, "repeat": repeat, "threads": threads, "image_only_stages": list(plan),
            "encoding_mib": round(encoding_mib, 3),
            "first_ms": round(float(np.median(first)), 1), "second_ms": round(float(np.median(second)), 1),
            "ratio": round(float(np.median(first) / np.median(second)), 2),
            "stages_first_ms": {k: med(stages1, k) for k in names},
            "stages_second_ms": {k: med(stages2, k) for k in names}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.encode_bench", description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads per stage")
    p.add_argument("--mode", default="single-pass")
    args = p.parse_args(argv)
    r = run(args.artifact, args.repeat, args.warmup, args.threads, args.mode)
    print(json.dumps(r, indent=2))
    print(f"first question {r['first_ms']} ms, second {r['second_ms']} ms (medians of {r['repeat']}): "
          f"{r['ratio']}x; encoding {r['encoding_mib']} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
