"""The Pipeline over real `build_layout` layouts (every preset, both modes), with a spec-driven fake backend.

It checks that the layout's wiring is runnable as the Pipeline reads it: every source exists when its
stage runs, every feed passes the runner's spec checks (dtypes, named dims, profiles), the decode loop's
steps feed every block input, and the result has the outputs the layout promises.
"""

from __future__ import annotations

import numpy as np
import pytest

from engines.pipeline import Pipeline
from exporter.tiny import tiny_shape
from graphs.runner import BaseRunner
from graphs.schedule import resolve
from graphs.stages import LayoutOptions, build_layout

SEG, EOS = 508, 2


def _size(dim, bound: dict) -> int:
    """A static dim, a named one, or a sum such as "prefix_len + 16 + suffix_len"; unknown names are 1."""
    if isinstance(dim, int):
        return dim
    return sum(int(t) if t.strip().isdigit() else bound.get(t.strip(), 1) for t in dim.split("+"))


class FakeRunner(BaseRunner):
    """Zeros of each output's spec shape; `next_token` follows a script (prefill first, then decode steps)."""

    script: list[int] = []

    def _infer(self, feed):
        out = {o.name: np.zeros(tuple(_size(d, self.last_dims) for d in o.shape), dtype=o.dtype)
               for o in self.stage.outputs}
        if "next_token" in out:
            out["next_token"][:] = FakeRunner.script.pop(0)
        if "last_hidden" in out:
            out["last_hidden"][:] = len(FakeRunner.script)  # tells the steps apart
        return out


@pytest.mark.parametrize("preset,knobs", [("full", {}), ("csp", {}), ("csp", {"cluster_method": "seg_first"}),
                                          ("evtp", {}), ("fastv", {})],
                         ids=["full", "csp", "csp-seg_first", "evtp", "fastv"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_pipeline_runs_every_layout(preset, knobs, precision):
    shape = tiny_shape()
    sched = resolve(preset, shape.llm.layers, shape.num_image_tokens, **knobs)
    layout = build_layout(sched, shape, LayoutOptions(precision=precision, mode="both", max_new_tokens=8),
                          SEG, (EOS,))
    sizes = {"prefix_len": 3, "suffix_len": 5, "instances": 2}
    host = {t.name: np.zeros(tuple(_size(d, sizes) for d in t.shape), dtype=t.dtype) for t in layout.host_inputs}
    with Pipeline(layout, lambda stage: FakeRunner(stage, layout.dims)) as pipe:
        FakeRunner.script = [5]
        single = pipe.run(host, "single-pass")
        FakeRunner.script = [5, SEG, 7, EOS]
        gen = pipe.run(host, "generate", record=True)
    assert set(single.outputs) == {"masks", "low_res_masks", "seg_embeddings", "seg_batch"}
    assert single.outputs["masks"].shape[0] == 1 and single.generated_ids == []
    assert gen.generated_ids == [[5, SEG, 7, EOS]] and gen.timings_ms["decode_steps"] == 3
    assert gen.outputs["generated_ids"].tolist() == [[5, SEG, 7, EOS]] and gen.outputs["seg_batch"].tolist() == [0]
    np.testing.assert_array_equal(gen.tensors["loop.seg_hidden"][:, 0], [2])  # the step that emitted [SEG]
    assert gen.tensors["loop.seg_hidden"].dtype == np.dtype(layout.stage("seg_head").inputs[0].dtype)
    assert gen.outputs["masks"].shape == (1, shape.sam.image_size, shape.sam.image_size)
    steps = [s.name for s in layout.loop.steps]  # embed, then every block over its own cache
    n_past = {k for name in steps for k in gen.feeds[name] if k.startswith("past_key") or k.startswith("past_value")}
    assert len(n_past) == 2 * shape.llm.layers
    assert all(gen.feeds[name]["hidden"].shape[1] == 1 for name in steps[1:])  # one row per decode step
