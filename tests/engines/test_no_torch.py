"""engines/ and graphs/ import and run with torch unavailable (a CPU-only ONNX Runtime host has no torch)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_BLOCK_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` now raises ImportError, and find_spec says it is absent
"""


def _run(code: str, tmp_path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _BLOCK_TORCH + textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_engines_run_without_torch(tmp_path, toy_graphs, make_toy_layout):
    graphs_dir = Path(toy_graphs["s1"]).parent
    out = _run(f"""
        import numpy as np
        import engines.compare, engines.host, engines.ort_runner, engines.pipeline, graphs.runner, graphs.preprocessing
        from engines.compare import compare
        from engines.ort_runner import OrtRunner
        from engines.pipeline import Pipeline
        from graphs.stages import DimRange, StageSpec, TensorSpec
        stage = StageSpec("s1", "vision", (TensorSpec("a", "float32", (1, "n")), TensorSpec("b", "float32", (1, "n"))),
                          (TensorSpec("sum", "float32", (1, "n")),))
        with OrtRunner(stage, {{"n": DimRange(1, 4, 8)}}, {str(graphs_dir / "s1.onnx")!r}) as r:
            y = r.infer({{"a": np.ones((1, 3), np.float32), "b": np.ones((1, 3), np.float32)}})["sum"]
        assert compare({{"y": y}}, {{"y": np.full((1, 3), 2, np.float32)}}, atol=0, rtol=0)
        assert "torch" not in [m.split(".")[0] for m, v in sys.modules.items() if v is not None]
        print("ok")
    """, tmp_path)
    assert out.strip().endswith("ok")


def test_host_tokenizer_without_torch(tmp_path, tiny_ckpt_st):
    out = _run(f"""
        import numpy as np
        from engines.host import HostIO
        from graphs.preprocessing import default_clip_processor_config
        tok_dir = {str(tiny_ckpt_st)!r}
        manifest = {{"tokenizer": {{"dir": tok_dir}}, "model": {{}},
                     "preprocessing": {{"clip": default_clip_processor_config(224), "sam": {{"image_size": 1024}}}},
                     "host_inputs": [{{"name": n, "dtype": d}} for n, d in [("clip_pixels", "float32"),
                         ("sam_pixels", "float32"), ("prefix_ids", "int64"), ("suffix_ids", "int64"),
                         ("suffix_lens", "int64")]]}}
        io = HostIO(manifest, "/")
        feed, meta = io.inputs(np.zeros((20, 30, 3), np.uint8), "Where is the cat?", "single-pass")
        assert feed["sam_pixels"].shape == (1, 3, 1024, 1024) and meta.resized_hw == (683, 1024)
        print(io.answer(feed["suffix_ids"][0].tolist()))  # request 0 of a batch of one
    """, tmp_path)
    assert "[SEG]" in out
