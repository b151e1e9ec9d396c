"""The torch reference on CUDA computes what it computes on CPU (same schedule, same weights)."""

import pytest

from exporter.checkpoint import load_checkpoint
from exporter.reference import Reference
from graphs.schedule import resolve

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["full", "csp", "evtp", "fastv"])
@pytest.mark.parametrize("mode", ["single-pass", "generate"])
def test_cuda_matches_cpu(tiny_ckpt, name, mode):
    from skimage import data

    image = data.chelsea()
    outs = {}
    for device in ("cpu", "cuda"):
        loaded = load_checkpoint(tiny_ckpt, attn="eager", device=device)
        sched = resolve(name, loaded.shape.llm.layers, loaded.shape.num_image_tokens)
        ref = Reference(loaded.model, loaded.tokenizer, loaded.image_processor_config, sched)
        outs[device] = ref(image, "Where is the cat?", mode=mode, max_new_tokens=4)
    cpu, gpu = outs["cpu"], outs["cuda"]
    assert gpu.image_tokens_per_layer == cpu.image_tokens_per_layer
    assert gpu.stage_indices == cpu.stage_indices
    assert gpu.generated_ids == cpu.generated_ids
    if mode == "single-pass":
        # fp32 on both; cuBLAS vs CPU BLAS summation order (TF32 is off by default for matmul).
        assert (gpu.seg_embeddings.cpu() - cpu.seg_embeddings).abs().max() <= 1e-4
        assert (gpu.mask_logits.cpu() - cpu.mask_logits).abs().max() <= 1e-3
        assert (gpu.masks == cpu.masks).mean() > 0.999
