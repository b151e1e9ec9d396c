"""Generate mode on the static KV cache (ONNX Runtime, tiny checkpoint): 64 decode steps equal the PyTorch
reference for every preset, no step copies a cache, and the generate-mode limits fail before or at their step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from exporter.export import sample_image
from exporter.tiny import SEG_QUERY
from graphs.errors import InputError
from graphs.schedule import PRESETS
from graphs.stages import DimRange

STEPS = 64


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    from exporter.checkpoint import load_checkpoint

    return load_checkpoint(tiny_ckpt, attn="eager")


def _unstoppable(session, max_seg: int = STEPS):
    """The session's pipeline with no stop token and room for every [SEG]: all STEPS tokens are generated."""
    layout = session.pipeline.layout
    layout.dims["num_seg"] = DimRange(1, 1, max(max_seg, 1))  # in place: the runners check feeds against this dict
    session.pipeline.layout = dataclasses.replace(layout, loop=dataclasses.replace(layout.loop, stop_token_ids=(),
                                                                                   max_seg=max_seg))
    return session.pipeline


def _generate(art, query=SEG_QUERY, steps=STEPS, spy=None, max_seg=STEPS):
    from engines.session import ArtifactSession

    with ArtifactSession(art) as s:
        pipe = _unstoppable(s, max_seg)
        if spy is not None:
            spy(pipe)
        feed, _ = s.host.inputs(sample_image(), query, "generate")
        res = pipe.run(feed, "generate", max_new_tokens=steps)
        return res, s


@pytest.mark.parametrize("preset", list(PRESETS))
def test_64_step_decode_equals_reference(export_tiny, reference, preset):
    from exporter.reference import Reference
    from graphs.schedule import resolve

    art = export_tiny(preset, "both")
    res, _ = _generate(art)
    shape = reference.shape
    ref = Reference(reference.model, reference.tokenizer, reference.image_processor_config,
                    resolve(preset, shape.llm.layers, shape.num_image_tokens))
    ids = dataclasses.replace(ref.prompt(SEG_QUERY, "generate"), eos_token_id=-1)
    want = ref(sample_image(), ids, mode="generate", max_new_tokens=STEPS)
    assert len(res.generated_ids[0]) == STEPS and res.timings_ms["decode_steps"] == STEPS - 1
    assert res.generated_ids == [want.generated_ids]  # a batch of one
    np.testing.assert_allclose(res.outputs["seg_embeddings"], want.seg_embeddings.numpy(), atol=1e-4)


def test_no_decode_step_copies_a_cache(export_tiny):
    """Every block call gets the preallocated buffers themselves, ONNX Runtime binds them in place once, and
    each decode step writes only its one new row per layer."""
    calls = []

    def spy(pipe):
        real_infer, real_write = pipe.chain.infer, pipe.chain.write

        def infer(stage, runner, feed, timings):
            if stage.cache:
                buffers = pipe.kv.buffers[stage.graph_name]
                same = all(feed[name] is buffers[name] for name, _ in stage.cache)
                out = real_infer(stage, runner, feed, timings)
                calls.append((stage.graph_name, same, dict(runner.last_copied), runner.cache_bindings))
                return out
            return real_infer(stage, runner, feed, timings)

        def write(buffer, start, rows):
            assert rows.shape[2] < buffer.shape[2]  # never the whole cache
            return real_write(buffer, start, rows)

        pipe.chain.infer, pipe.chain.write = infer, write

    res, s = _generate(export_tiny("csp", "both"), steps=16, spy=spy)
    pipe = s.pipeline
    blocks = [st for st in s.artifact.layout.stages if st.cache]
    assert len(calls) == len(blocks) * 16  # prefill, then 15 decode steps
    assert all(same for _, same, _, _ in calls)
    assert all(copied["cache"] == 0 for _, _, copied, _ in calls)
    for b in blocks:  # one OrtValue per cache buffer for the whole request: bound once, not per step
        assert [n for g, _, _, n in calls if g == b.name] == [len(b.cache)] * 16
        kv = b.input(b.cache[0][0])
        row = 2 * len(b.layers) * kv.shape[1] * kv.shape[3] * 4  # key + value, fp32, one row per layer
        assert pipe.kv.buffers[b.name][b.cache[0][0]].shape[2] == res.tensors[f"entry_{blocks.index(b)}.hidden"].shape[1] + 15
    assert pipe.kv.last_bytes == row  # the last step wrote one row per layer of the last block


def test_positions_past_the_model_maximum_fail_before_decoding(export_tiny, monkeypatch):
    art = export_tiny("csp", "both")

    def spy(pipe):
        layout = pipe.layout
        pipe.layout = dataclasses.replace(layout, loop=dataclasses.replace(layout.loop, max_positions=40))
        monkeypatch.setattr(pipe, "_step", _no_decode_step(pipe._step))

    with pytest.raises(InputError, match=r"generate: the prompt ends at position \d+ and max_new_tokens 64 would "
                                         r"feed positions up to \d+, past the model's maximum 39; shorten the text or "
                                         r"pass max_new_tokens <= \d+"):
        _generate(art, spy=spy)


def _no_decode_step(step):
    def guarded(stage, *args, **kwargs):
        assert not stage.loop, "a decode step ran before the limit check"
        return step(stage, *args, **kwargs)
    return guarded


def test_more_seg_tokens_than_exported_fail_at_their_step(export_tiny):
    """The tiny checkpoint emits [SEG] first; with room for none, step 1 fails, before any decode step."""
    ran = []

    def spy(pipe):
        real = pipe._step
        pipe._step = lambda stage, *a, **k: (ran.append(stage.loop), real(stage, *a, **k))[1]

    with pytest.raises(InputError, match=r"generate: request 1 emitted \[SEG\] number 1 at step 1; this artifact was "
                                         r"exported for at most 0 masks per request; re-export with a larger --max-seg"):
        _generate(export_tiny("csp", "both"), spy=spy, max_seg=0)
    assert not any(ran)  # no decode step ran: the prefill's token was already one too many
