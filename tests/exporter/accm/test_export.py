"""ACCM's graphs on ONNX Runtime equal torch (picks, selector, the caption decode loop), and build with TensorRT-RTX."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from exporter.accm.export import PicksGraph, SelectorGraph, export_graph
from exporter.accm.picks import pick_tokens
from exporter.export import sample_image
from graphs.accm import selector_text


def _case(seed, n, p=16):
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(n, generator=g) * 0.01
    k = int(torch.randint(0, 12, (1,), generator=g))
    attn[torch.randperm(n, generator=g)[:k]] += torch.rand(k, generator=g)
    return attn, torch.randn(1, p, generator=g), torch.randn(n, p, generator=g)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("accm_onnx")


@pytest.fixture(scope="module")
def picks_onnx(onnx_dir):
    """The tiny accm-36's picks graph: N = 64, budget 4, 2 text picks (P = 16, the tiny CLIP's projection)."""
    return export_graph(PicksGraph(budget=4, n_text=2), _case(0, 64), onnx_dir / "accm_picks.onnx",
                        ["cls_attn", "text_embeds", "patch_embeds"], ["image_indices"])


def test_picks_graph_on_onnxruntime(picks_onnx):
    sess = ort.InferenceSession(str(picks_onnx), providers=["CPUExecutionProvider"])
    for seed in range(12):
        attn, text, patches = _case(seed, 64)
        got = sess.run(None, {"cls_attn": attn.numpy(), "text_embeds": text.numpy(),
                              "patch_embeds": patches.numpy()})[0]
        assert got.tolist() == pick_tokens(attn, text, patches, 4, 2).sorted_indices, seed


TEXTS = [selector_text("Where is the cat?", c) for c in ("a cat on a sofa.", "a dog.", "two chairs near a window.")]


@pytest.fixture(scope="module")
def selector_onnx(accm_models, onnx_dir):
    a = accm_models
    ids = a.longclip_tokenizer(TEXTS, padding=True, truncation=True, max_length=248, return_tensors="pt")["input_ids"]
    dim = torch.export.Dim("selector_len", min=2, max=248)
    return export_graph(SelectorGraph(a.longclip_text, a.selector), (ids,), onnx_dir / "accm_selector.onnx",
                        ["candidate_ids"], ["probs"], dynamic=({1: dim},))


def test_selector_graph_on_onnxruntime(accm_models, selector_onnx):
    a, texts = accm_models, TEXTS
    enc = a.longclip_tokenizer(texts, padding=True, truncation=True, max_length=248, return_tensors="pt")
    ids = enc["input_ids"]
    eot = a.longclip_tokenizer.eos_token_id
    assert int(ids.max()) == eot and a.longclip_tokenizer.pad_token_id == eot  # pooled at the first EOT
    graph = SelectorGraph(a.longclip_text, a.selector)
    with torch.no_grad():
        want = graph(ids)
        # The graph's probabilities are the selector's over each candidate's own, unpadded text features.
        feats = torch.stack([a.longclip_text(input_ids=a.longclip_tokenizer(t, return_tensors="pt")["input_ids"])
                             .text_embeds[0] for t in texts])
        assert torch.allclose(want, a.selector(feats), atol=1e-5)
    sess = ort.InferenceSession(str(selector_onnx), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"candidate_ids": ids.numpy()})[0]
    assert np.allclose(got, want.numpy(), atol=1e-5) and got.sum() == pytest.approx(1.0, abs=1e-5)
    short = ids[:, :ids.shape[1] - 1].clone()  # another length through the same graph
    short[:, -1] = eot
    with torch.no_grad():
        assert np.allclose(sess.run(None, {"candidate_ids": short.numpy()})[0], graph(short).numpy(), atol=1e-5)


def _sess(path):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return lambda feed: dict(zip(names, s.run(None, {i.name: feed[i.name] for i in s.get_inputs()})))


@pytest.fixture(scope="module")
def caption_graphs(accm_models, onnx_dir):
    """accm_mapper, accm_gpt2 and accm_beam_step of the tiny ACCM, exported once."""
    from exporter.accm.export import BeamStepGraph, Gpt2CacheGraph, MapperGraph

    a, d = accm_models, onnx_dir
    gpt = a.caption.gpt
    layers, heads = gpt.config.n_layer, gpt.config.n_head
    hd = gpt.config.n_embd // heads
    q = torch.tensor([a.gpt_tokenizer.encode("where is the cat?")])
    kept = torch.randn(60, a.shape.clip_projection)
    qd, md = torch.export.Dim("question_len", min=1, max=64), torch.export.Dim("kept_out", min=1, max=1024)
    mapper = export_graph(MapperGraph(a.caption.clip_project), (q, kept), d / "accm_mapper.onnx",
                          ["question_ids", "kept_out"], ["token_ids", "row_embeds", "use_embeds"],
                          dynamic=({1: qd}, {0: md}))
    names = [f"{k}_{i}" for i in range(layers) for k in ("key", "value")]
    bd, rd, cd = (torch.export.Dim(n, min=1, max=m) for n, m in (("batch", 8), ("rows", 128), ("cache", 256)))
    past = tuple(torch.randn(3, heads, 9, hd) for _ in names)
    args = (torch.randint(0, 50, (3, 2)), torch.randn(3, 2, gpt.config.n_embd), torch.tensor([[0, 1]] * 3),
            torch.tensor([5]), *past)
    gpt2 = export_graph(Gpt2CacheGraph(gpt), args, d / "accm_gpt2.onnx",
                        ["token_ids", "row_embeds", "use_embeds", "past_len", *[f"past_{n}" for n in names]],
                        ["logp", *names], dynamic=({0: bd, 1: rd}, {0: bd, 1: rd}, {0: bd, 1: rd}, None,
                                                   *({0: bd, 2: cd} for _ in names)))
    step_args = (torch.randn(3, gpt.config.vocab_size).log_softmax(-1), torch.tensor([0.0, -float("inf"), -float("inf")]),
                 torch.zeros(3), torch.zeros(3, dtype=torch.bool), torch.tensor([7]))
    step = export_graph(BeamStepGraph(3), step_args, d / "accm_beam_step.onnx",
                        ["logp", "scores", "lengths", "stopped", "stop_id"],
                        ["token", "source", "scores_out", "lengths_out", "stopped_out"])
    return {"mapper": _sess(mapper), "gpt2": _sess(gpt2), "step": _sess(step), "dims": (layers, heads, hd)}


def test_gpt2_cache_graph_equals_gpt2(accm_models):
    from exporter.accm.beam import log_probs
    from exporter.accm.export import Gpt2CacheGraph, MapperGraph

    a = accm_models
    gpt = a.caption.gpt
    q = torch.tensor([a.gpt_tokenizer.encode("where is the cat?")])
    kept = torch.randn(1, 50, a.shape.clip_projection)
    with torch.no_grad():
        tok, rows, use = MapperGraph(a.caption.clip_project)(q, kept[0])
        heads, hd = gpt.config.n_head, gpt.config.n_embd // gpt.config.n_head
        empty = [torch.zeros(1, heads, 1, hd) for _ in range(2 * gpt.config.n_layer)]
        out = Gpt2CacheGraph(gpt)(tok, rows, use, torch.tensor([0]), *empty)
        want = log_probs(gpt(inputs_embeds=a.caption.prefix_embeds(q, kept)).logits[:, -1])
        assert torch.allclose(out[0], want, atol=1e-5)


# "." ends the tiny's captions within a few tokens; "<|endoftext|>" never comes, so all 12 steps run.
@pytest.mark.parametrize("seed,stop_text,max_tokens", [(0, ".", 67), (1, ".", 67), (2, "<|endoftext|>", 12)])
def test_caption_decode_on_onnxruntime_equals_the_reference(accm_models, caption_graphs, seed, stop_text, max_tokens):
    """mapper -> gpt2 prefill -> (beam step, cache reorder, gpt2 on 3 rows)*: the reference's ids and scores."""
    from exporter.accm.beam import beam_search
    from graphs.accm_loop import beam_loop

    a, g = accm_models, caption_graphs
    q = torch.tensor([a.gpt_tokenizer.encode("where is the cat?")])
    kept = torch.randn(40 + seed, a.shape.clip_projection, generator=torch.Generator().manual_seed(seed))
    stop = a.gpt_tokenizer.convert_tokens_to_ids(stop_text) if stop_text.startswith("<") else a.gpt_tokenizer.encode(stop_text)[0]
    with torch.no_grad():
        want = beam_search(a.caption.gpt, a.caption.prefix_embeds(q, kept[None]), stop, beams=3, max_tokens=max_tokens)
    prefill = g["mapper"]({"question_ids": q.numpy(), "kept_out": kept.numpy()})
    layers, heads, hd = g["dims"]
    ids, scores = beam_loop(g["gpt2"], lambda f: _renamed(g["step"](f)), prefill, layers, heads, hd, stop,
                            max_tokens=max_tokens)
    assert ids == want.ids and len({tuple(i) for i in ids}) == 3
    if max_tokens == 12:
        assert [len(i) for i in ids] == [12, 12, 12]
    assert scores == pytest.approx(want.scores, abs=1e-4)


def _renamed(out):
    return {k.removesuffix("_out"): v for k, v in out.items()}


@pytest.mark.trt
def test_accm_graphs_build_with_tensorrt_rtx(lisa, accm_models, onnx_dir, picks_onnx, selector_onnx, caption_graphs,
                                             vision_onnx, clip_text_onnx):
    """Every ACCM graph parses (strongly typed) and builds for SM86 on this CPU-only host, over its dims' range."""
    from engines.trt import load_trt

    trt = load_trt("auto")[0]
    gpt = accm_models.caption.gpt
    heads, hd, d, v = gpt.config.n_head, gpt.config.n_embd // gpt.config.n_head, gpt.config.n_embd, gpt.config.vocab_size
    kv = {f"past_{k}_{i}": [(1, heads, 1, hd), (3, heads, 100, hd), (8, heads, 256, hd)]
          for i in range(gpt.config.n_layer) for k in ("key", "value")}
    rows = lambda *tail: [(1, 1, *tail), (3, 1, *tail), (8, 128, *tail)]  # noqa: E731
    p = accm_models.shape.clip_projection
    size = lisa.shape.vision.image_size
    profiles = {
        "accm_vision": {"clip_pixels": [(1, 3, size, size)] * 3},
        "accm_clip_text": {"question_ids": [(1, 2), (1, 16), (1, 77)]},
        "accm_picks": {"cls_attn": [(64,)] * 3, "text_embeds": [(1, p)] * 3, "patch_embeds": [(64, p)] * 3},
        "accm_selector": {"candidate_ids": [(3, 2), (3, 64), (3, 248)]},
        "accm_mapper": {"question_ids": [(1, 1), (1, 16), (1, 64)], "kept_out": [(1, p), (240, p), (1024, p)]},
        "accm_gpt2": {"token_ids": rows(), "row_embeds": rows(d), "use_embeds": rows(), "past_len": [(1,)] * 3, **kv},
        "accm_beam_step": {"logp": [(3, v)] * 3, "scores": [(3,)] * 3, "lengths": [(3,)] * 3, "stopped": [(3,)] * 3,
                           "stop_id": [(1,)] * 3},
    }
    logger = trt.Logger(trt.Logger.ERROR)
    for name, shapes in profiles.items():
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        assert parser.parse_from_file(str(onnx_dir / f"{name}.onnx")), [str(parser.get_error(i))
                                                                         for i in range(parser.num_errors)]
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            profile.set_shape(network.get_input(i).name, *shapes[network.get_input(i).name])
        config.add_optimization_profile(profile)
        if hasattr(config, "num_compute_capabilities"):  # TensorRT-RTX: ahead of time, no GPU needed
            config.num_compute_capabilities = 1
            config.set_compute_capability(trt.ComputeCapability.SM86, 0)
        assert builder.build_serialized_network(network, config) is not None, name


@pytest.fixture(scope="module")
def vision_onnx(lisa, accm_models, onnx_dir):
    from exporter.accm.export import AccmVisionGraph
    from exporter.preprocess import clip_pixels

    pixels = clip_pixels(sample_image(), lisa.image_processor_config)
    return export_graph(AccmVisionGraph(lisa.model, accm_models.visual_projection), (pixels,),
                        onnx_dir / "accm_vision.onnx", ["clip_pixels"], ["image_embeds", "cls_attn", "patch_embeds"])


@pytest.fixture(scope="module")
def clip_text_onnx(accm_models, onnx_dir):
    from exporter.accm.export import ClipTextGraph

    ids = accm_models.clip_tokenizer("where is it?", return_tensors="pt")["input_ids"]
    return export_graph(ClipTextGraph(accm_models.clip_text), (ids,), onnx_dir / "accm_clip_text.onnx",
                        ["question_ids"], ["text_embeds"], dynamic=({1: torch.export.Dim("question_len", min=2, max=77)},))


def test_accm_chain_on_onnxruntime_chooses_the_references_caption(lisa, accm_models, picks_onnx, selector_onnx,
                                                                   caption_graphs, vision_onnx, clip_text_onnx):
    """vision -> CLIP text -> picks -> mapper -> GPT-2 beams -> selector on ONNX Runtime, the host owning the
    tokenizers: the same picks, candidates, scores, choice and splice as AccmReference, for two questions."""
    from exporter.accm.reference import AccmReference
    from exporter.preprocess import clip_pixels
    from graphs.accm_loop import beam_loop
    from graphs.schedule import resolve

    a, m = accm_models, lisa.model
    schedule = resolve("accm-36", lisa.shape.llm.layers, lisa.shape.num_image_tokens)
    ref = AccmReference(m, lisa.tokenizer, lisa.image_processor_config, schedule, a)
    image = sample_image()
    pixels = clip_pixels(image, lisa.image_processor_config)
    vision, clip_text = _sess(vision_onnx), _sess(clip_text_onnx)
    assert (schedule.stages[0].budget, schedule.accm.text_picks) == (4, 2)  # picks_onnx's
    picks = _sess(picks_onnx)
    g = caption_graphs
    layers, heads, hd = g["dims"]
    selector = _sess(selector_onnx)
    stop = a.gpt_tokenizer.encode(".")[0]
    with torch.no_grad():
        want_embeds = m.mm_projector(m.vision_features(pixels)[0][0])
    for query in ("Where is the cat in this picture?", "Which object is red?"):
        want = ref(image, query).accm
        v = vision({"clip_pixels": pixels.numpy()})
        assert np.allclose(v["image_embeds"], want_embeds.numpy(), atol=1e-5)
        t = clip_text({"question_ids": a.clip_tokenizer(query, truncation=True, max_length=77,
                                                        return_tensors="np")["input_ids"]})
        idx = picks({"cls_attn": v["cls_attn"], "text_embeds": t["text_embeds"], "patch_embeds": v["patch_embeds"]})
        assert idx["image_indices"].tolist() == want.picks.sorted_indices
        kept = np.setdiff1d(np.arange(v["patch_embeds"].shape[0]), idx["image_indices"])
        prefill = g["mapper"]({"question_ids": np.array([a.gpt_tokenizer.encode(query)]),
                               "kept_out": v["patch_embeds"][kept]})
        ids, scores = beam_loop(g["gpt2"], lambda f: _renamed(g["step"](f)), prefill, layers, heads, hd, stop)
        assert ids == want.candidate_ids and scores == pytest.approx(want.beam_scores, abs=1e-4)
        captions = [a.gpt_tokenizer.decode(i) for i in ids]  # host step: GPT-2 ids -> text
        texts = [selector_text(query, c) for c in captions]
        cand = a.longclip_tokenizer(texts, padding=True, truncation=True, max_length=248, return_tensors="np")
        probs = selector({"candidate_ids": cand["input_ids"]})["probs"]
        assert np.allclose(probs, want.selector_probs, atol=1e-5) and int(np.argmax(probs)) == want.chosen
        splice = lisa.tokenizer("additional information: " + captions[int(np.argmax(probs))],
                                add_special_tokens=False)["input_ids"]  # host step: text -> LLM ids
        assert splice == want.splice_ids
