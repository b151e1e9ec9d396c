"""engines.host: HostIO on a real tiny checkpoint's tokenizer, against graphs.prompt and the torch postprocessing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from engines.host import HostIO
from exporter.preprocess import binarize, postprocess_masks
from exporter.tiny import CLIP_SUBDIR, tiny_shape
from graphs.errors import ArtifactError, InputError
from graphs.preprocessing import clip_pixels_np, sam_pixels_np
from graphs.prompt import tokenize_prompt
from graphs.schedule import resolve
from graphs.stages import LayoutOptions, build_layout


def _manifest(ckpt, precision="fp32", schedule="full", **knobs):
    from transformers import AutoTokenizer

    shape = tiny_shape()
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    seg = tok.convert_tokens_to_ids("[SEG]")
    sched = resolve(schedule, shape.llm.layers, shape.num_image_tokens, **knobs)
    layout = build_layout(sched, shape, LayoutOptions(precision=precision), seg, (tok.eos_token_id,))
    clip_cfg = json.loads((ckpt / CLIP_SUBDIR / "preprocessor_config.json").read_text())
    return {
        "tokenizer": {"dir": "tokenizer", "seg_token_id": seg, "eos_token_id": tok.eos_token_id, "prompt": {}},
        "model": shape.to_dict(),
        "preprocessing": {"clip": clip_cfg, "sam": {"image_size": shape.sam.image_size}},
        "precision": precision,
        "host_inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in layout.host_inputs],
    }


@pytest.fixture(scope="module")
def art_dir(tiny_ckpt_st, tmp_path_factory):
    art = tmp_path_factory.mktemp("artifact")
    (art / "tokenizer").mkdir()
    for f in tiny_ckpt_st.glob("tokenizer*"):
        shutil.copy(f, art / "tokenizer" / f.name)
    return art


def _image(h=90, w=130):
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["single-pass", "generate"])
def test_inputs_match_prompt_and_preprocessing(tiny_ckpt_st, art_dir, mode):
    manifest = _manifest(tiny_ckpt_st)
    io = HostIO(manifest, art_dir)
    image = _image()
    feed, meta = io.inputs(image, "Where is the cat?", mode)
    shape = tiny_shape()
    ids = tokenize_prompt(io.tokenizer, "Where is the cat?", mode, shape.num_image_tokens, shape.llm.max_positions)
    base = {"clip_pixels", "sam_pixels", "prefix_ids", "suffix_ids", "suffix_lens"}
    assert set(feed) == (base | {"seg_rows", "seg_batch"} if mode == "single-pass" else base)
    if mode == "single-pass":  # the row before the [SEG] in the suffix, of request 0
        np.testing.assert_array_equal(feed["seg_rows"], [j - 1 for j in ids.seg_suffix_positions()])
        np.testing.assert_array_equal(feed["seg_batch"], [0] * len(ids.seg_suffix_positions()))
        assert feed["seg_rows"].dtype == np.int64
    np.testing.assert_array_equal(feed["prefix_ids"], [ids.prefix])  # a batch of one
    np.testing.assert_array_equal(feed["suffix_ids"], [ids.suffix])
    np.testing.assert_array_equal(feed["suffix_lens"], [len(ids.suffix)])
    assert feed["prefix_ids"].dtype == np.int64 and feed["suffix_ids"].dtype == np.int64
    assert (feed["suffix_ids"] == manifest["tokenizer"]["seg_token_id"]).sum() == (mode == "single-pass")
    np.testing.assert_array_equal(feed["clip_pixels"], clip_pixels_np(image, manifest["preprocessing"]["clip"]))
    sam, resized = sam_pixels_np(image, shape.sam.image_size)
    np.testing.assert_array_equal(feed["sam_pixels"], sam)
    assert feed["clip_pixels"].shape == (1, 3, 64, 64) and feed["sam_pixels"].shape == (1, 3, 128, 128)
    assert meta.resized_hw == resized == (89, 128) and meta.original_hw == (90, 130) and meta.mode == mode


def test_fp16_inputs_cast_to_the_manifest_dtype(tiny_ckpt_st, art_dir):
    io = HostIO(_manifest(tiny_ckpt_st, precision="fp16"), art_dir)
    feed, _ = io.inputs(_image(), "Where is the cat?", "single-pass")
    assert feed["clip_pixels"].dtype == np.float16 and feed["sam_pixels"].dtype == np.float16
    assert feed["prefix_ids"].dtype == np.int64


def test_instance_masks_for_seg_first(tiny_ckpt_st, art_dir):
    manifest = _manifest(tiny_ckpt_st, schedule="csp", cluster_method="seg_first")
    assert "instance_masks" in [t["name"] for t in manifest["host_inputs"]]
    io = HostIO(manifest, art_dir)
    grid = tiny_shape().vision.grid
    masks = np.zeros((2, grid, grid), bool)
    masks[0, :2], masks[1, 4:] = True, True
    feed, _ = io.inputs(_image(), "Where is the cat?", "single-pass", instance_masks=masks)
    assert feed["instance_masks"].dtype == np.float32 and feed["instance_masks"].shape == (1, 2, grid, grid)
    with pytest.raises(InputError, match="clusters with seg_first"):
        io.inputs(_image(), "Where is the cat?", "single-pass")
    with pytest.raises(InputError, match=rf"expected shape \[M, {grid}, {grid}\]"):
        io.inputs(_image(), "Where is the cat?", "single-pass", instance_masks=np.zeros((2, 3, 3)))
    plain = HostIO(_manifest(tiny_ckpt_st), art_dir)
    with pytest.raises(InputError, match="takes no instance masks"):
        plain.inputs(_image(), "Where is the cat?", "single-pass", instance_masks=masks)


def test_masks_match_lisa_postprocessing(tiny_ckpt_st, art_dir):
    io = HostIO(_manifest(tiny_ckpt_st), art_dir)
    image = _image(90, 130)
    _, meta = io.inputs(image, "Where is the cat?", "single-pass")
    low_res = torch.from_numpy(2 * np.random.default_rng(2).standard_normal((2, 32, 32)).astype(np.float32))
    want = postprocess_masks(low_res, meta.resized_hw, meta.original_hw, sam_size=128)
    padded = torch.nn.functional.interpolate(low_res[:, None], (128, 128), mode="bilinear",
                                             align_corners=False)[:, 0].numpy()  # the sam_decoder graph's output
    logits, masks = io.masks(padded, meta)
    assert logits.shape == (2, 90, 130) and logits.dtype == np.float32 and masks.dtype == bool
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-5, rtol=0)
    mismatched = (masks != binarize(want).numpy()).sum()
    assert mismatched <= int(((want.abs() < 1e-5).sum()))  # only where the logit is ~0 can the sign differ
    empty_logits, empty_masks = io.masks(np.zeros((0, 128, 128), np.float32), meta)
    assert empty_logits.shape == (0, 90, 130) and empty_masks.shape == (0, 90, 130)


def test_answer(tiny_ckpt_st, art_dir):
    io = HostIO(_manifest(tiny_ckpt_st), art_dir)
    tok = io.tokenizer
    ids = tok(" Sure, it is [SEG].", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert io.answer(ids) == tok.decode(ids, skip_special_tokens=False).strip()
    assert "[SEG]" in io.answer(ids) and io.answer(ids).endswith("</s>")
    assert io.answer([], mode="single-pass") == "[SEG]."


def test_broken_artifacts(tiny_ckpt_st, art_dir, tmp_path):
    manifest = _manifest(tiny_ckpt_st)
    with pytest.raises(ArtifactError, match="tokenizer directory .* is missing"):
        HostIO(manifest, tmp_path).inputs(_image(), "Where is the cat?", "single-pass")
    with pytest.raises(ArtifactError, match="manifest lacks 'preprocessing'"):
        HostIO({k: v for k, v in manifest.items() if k != "preprocessing"}, art_dir)
    wrong = {**manifest, "tokenizer": {**manifest["tokenizer"], "seg_token_id": 3}}
    with pytest.raises(ArtifactError, match=r"\[SEG\] id is \d+ but the manifest says 3"):
        HostIO(wrong, art_dir).inputs(_image(), "Where is the cat?", "single-pass")


def test_query_batch_right_pads_suffixes_and_lists_seg_rows_flat(tiny_ckpt_st, art_dir):
    io = HostIO(_manifest(tiny_ckpt_st), art_dir)
    queries = ["Where is the cat?", "Where is the big black cat on the left of the sofa?"]
    feed, ids = io.query_batch(queries, "single-pass", pad_id=5)
    lens = [len(i.suffix) for i in ids]
    assert lens[0] < lens[1] and feed["suffix_ids"].shape == (2, lens[1]) and feed["suffix_lens"].tolist() == lens
    assert (feed["suffix_ids"][0, lens[0]:] == 5).all()  # right padding
    assert (feed["prefix_ids"][0] == feed["prefix_ids"][1]).all()  # the template's prefix, shared
    assert feed["seg_batch"].tolist() == [0, 1] and feed["seg_rows"].tolist() == [i.seg_rows()[0] for i in ids]
    images, _, _ = io.image_batch([_image(), _image(40, 50)])
    assert images["clip_pixels"].shape[0] == 2 and images["sam_pixels"].shape[0] == 2
