"""engines/serving.py without a server: request checks, response encoding, per-request errors, libpython."""

from __future__ import annotations

import io
import json
import os
import types

import numpy as np
import pytest
from PIL import Image

from engines import serving
from engines.serving import (ERROR_OUTPUT, Limits, SegmentModel, decode_image, decode_request, encode_response,
                             error_response, libpython_ld_path)
from graphs.errors import InputError
from graphs.imageio import unpack_masks
from graphs.imageio import write_mask_png


def _png(w: int = 12, h: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(w * h * 3, dtype=np.uint8).reshape(h, w, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _req(**values) -> dict:
    """A PyTriton-style request: name -> array [1, 1]."""
    out = {}
    for name, v in values.items():
        out[name] = np.array([[v]], dtype=bool if isinstance(v, bool) else object)
    return out


def _seg(k: int = 2, h: int = 5, w: int = 7, seed: int = 0):
    logits = np.random.default_rng(seed).normal(size=(k, h, w)).astype(np.float32)
    logits = np.asfortranarray(logits)  # as a resize may return: not C-contiguous
    return types.SimpleNamespace(mask_logits=logits, masks=logits > 0, answer="[SEG].", generated_ids=[],
                                 timings_ms={"vision": 1.0}, host_steps={})


# -- libpython ---------------------------------------------------------------------------------
LIB, SO = "/py/lib", "libpython3.11.so.1.0"


@pytest.mark.parametrize("before, after", [
    (None, LIB),
    ("", LIB),
    ("/opt/x", f"{LIB}:/opt/x"),
    (f"{LIB}:/opt/x", f"{LIB}:/opt/x"),
    (f"/opt/x:{LIB}/:/opt/y", f"{LIB}:/opt/x:/opt/y"),  # moved to the front, not duplicated
], ids=["unset", "empty", "prepend", "already-first", "moved-first"])
def test_libpython_first(before, after):
    path, warning = libpython_ld_path(before, LIB, SO, exists=lambda p: p == f"{LIB}/{SO}")
    assert (path, warning) == (after, None)


@pytest.mark.parametrize("libdir, soname", [(LIB, SO), (None, SO), (LIB, None), (LIB, "libfoo.so")],
                         ids=["file-missing", "no-libdir", "static-python", "not-libpython"])
def test_libpython_missing_says_so_in_one_line(libdir, soname):
    path, warning = libpython_ld_path("/opt/x", libdir, soname, exists=lambda p: False)
    assert path == "/opt/x"
    assert "libpython" in warning and "LD_LIBRARY_PATH" in warning and "\n" not in warning


def test_fix_libpython_env_on_this_interpreter():
    import sysconfig

    env = {"LD_LIBRARY_PATH": "/opt/x"}
    warning = serving.fix_libpython_env(env)
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if os.path.exists(os.path.join(libdir or "", soname or "")) and str(soname).startswith("libpython"):
        assert warning is None and env["LD_LIBRARY_PATH"] == f"{libdir}:/opt/x"
    else:
        assert warning and env["LD_LIBRARY_PATH"] == "/opt/x"


# -- requests ----------------------------------------------------------------------------------
def test_decode_request_defaults_and_options():
    r = decode_request(_req(image=b"img", query=b"Where is the cat?"))
    assert (r.image, r.query, r.mode, r.return_logits) == (b"img", "Where is the cat?", "single-pass", False)
    r = decode_request(_req(image=b"img", query="caf\u00e9".encode(), mode=b"generate", return_logits=True))
    assert (r.query, r.mode, r.return_logits) == ("caf\u00e9", "generate", True)


@pytest.mark.parametrize("request_, limits, modes, match", [
    (_req(query=b"q"), Limits(), ("single-pass",), "input 'image' is missing"),
    (_req(image=b"img"), Limits(), ("single-pass",), "input 'query' is missing"),
    ({"image": np.array([[b"a"], [b"b"]], dtype=object), **_req(query=b"q")}, Limits(), ("single-pass",),
     r"expected shape \[1, 1\].*got \[2, 1\]"),
    (_req(image=b"img", query=b"\xff\xfe"), Limits(), ("single-pass",), "not UTF-8"),
    (_req(image=b"img", query=b"   "), Limits(), ("single-pass",), "query is empty"),
    (_req(image=b"img", query=b"q", mode=b"fast"), Limits(), ("single-pass",), "unknown mode 'fast'"),
    (_req(image=b"img", query=b"q", mode=b"generate"), Limits(), ("single-pass",), "not served by this artifact"),
    (_req(image=b"x" * 11, query=b"q"), Limits(max_image_bytes=10), ("single-pass",), "11 bytes, over .* 10 bytes"),
    ({"image": np.array([[3]], dtype=np.int32), **_req(query=b"q")}, Limits(), ("single-pass",), "expected BYTES"),
], ids=["no-image", "no-query", "batch-2", "not-utf8", "empty-query", "unknown-mode", "mode-not-exported",
        "too-many-bytes", "not-bytes"])
def test_decode_request_rejects(request_, limits, modes, match):
    with pytest.raises(InputError, match=match):
        decode_request(request_, limits, modes)


def test_decode_image_limits():
    assert decode_image(_png(12, 8)).shape == (8, 12, 3)
    with pytest.raises(InputError, match=r"12x8 is 96 pixels, over .* 95"):
        decode_image(_png(12, 8), Limits(max_image_pixels=95))
    with pytest.raises(InputError, match="not an image format"):
        decode_image(b"hello world")


# -- responses ---------------------------------------------------------------------------------
def test_encode_response_matches_csprt_run(tmp_path):
    seg = _seg()
    out = encode_response(seg, (5, 7), return_logits=True, timings_ms={"vision": 1.25})
    write_mask_png(seg.masks.any(axis=0), tmp_path / "mask.png")  # what csprt run writes
    assert bytes(out["mask_png"][0, 0]) == (tmp_path / "mask.png").read_bytes()
    assert out["masks_shape"].tolist() == [[2, 5, 7]] and out["masks_packed"].dtype == np.uint8
    assert np.array_equal(unpack_masks(out["masks_packed"][0], out["masks_shape"][0]), seg.masks)
    assert np.array_equal(out["mask_logits"][0], seg.mask_logits) and out["mask_logits"].flags.c_contiguous
    assert bytes(out["answer"][0, 0]) == b"[SEG]."
    timings = json.loads(bytes(out["timings"][0, 0]))
    assert timings["vision"] == 1.25 and timings["encode"] >= 0
    assert "generated_ids" not in out  # zero-size outputs are left out (PyTriton cannot send them)
    assert all(v.flags.c_contiguous and v.size for v in out.values())


def test_encode_response_options():
    seg = _seg()
    assert "mask_logits" not in encode_response(seg, (5, 7), return_logits=False, timings_ms={})
    only = encode_response(seg, (5, 7), return_logits=True, timings_ms={}, wanted=["masks_packed", "masks_shape"])
    assert set(only) == {"masks_packed", "masks_shape"}
    seg.generated_ids = [5, 6]
    assert encode_response(seg, (5, 7), False, {})["generated_ids"].tolist() == [[5, 6]]


def test_encode_response_no_masks(tmp_path):
    seg = _seg(k=0)
    out = encode_response(seg, (5, 7), return_logits=True, timings_ms={})
    write_mask_png(np.zeros((5, 7), bool), tmp_path / "mask.png")
    assert bytes(out["mask_png"][0, 0]) == (tmp_path / "mask.png").read_bytes()
    assert out["masks_shape"].tolist() == [[0, 5, 7]]
    assert "masks_packed" not in out and "mask_logits" not in out


# -- the model callable ------------------------------------------------------------------------
class FakeSession:
    """Records segment_batch calls; segments each image into a single mask of its top half."""

    def __init__(self, fail_on: str | None = None, max_batch: int = 8):
        self.artifact = types.SimpleNamespace(layout=types.SimpleNamespace(
            loop=types.SimpleNamespace(max_new_tokens=4), host_inputs=(), dims={}), modes=("single-pass", "generate"))
        self.host = types.SimpleNamespace(prompt_ids=self._prompt_ids, query_feed=lambda ids, mode: {})
        self.calls, self.fail_on, self.max_batch = [], fail_on, max_batch

    @staticmethod
    def _prompt_ids(queries, mode):
        if any(q == "too long" for q in queries):
            raise InputError("the prompt is too long")
        return [f"ids of {q}" for q in queries]

    def segment_batch(self, images, queries, mode="single-pass", max_new_tokens=None, instance_masks=None,
                      keep_encoding=False, prompts=None):
        assert prompts == [f"ids of {q}" for q in queries]  # each query's ids from its check, not tokenised again
        self.calls.append(([im.shape for im in images], list(queries), mode, max_new_tokens))
        if self.fail_on in queries:
            raise RuntimeError("boom")
        pipeline, out = object(), []  # one PipelineResult per call, shared by the batch
        for image in images:
            h, w = image.shape[:2]
            masks = np.zeros((1, h, w), bool)
            masks[:, : h // 2] = True
            out.append(types.SimpleNamespace(mask_logits=masks.astype(np.float32), masks=masks, answer="[SEG].",
                                             generated_ids=[1] if mode == "generate" else [], pipeline=pipeline,
                                             timings_ms={"vision": 0.5}, encoding=None, host_steps={}))
        return out


def _timings(response) -> dict:
    return json.loads(bytes(response["timings"][0, 0]))


def test_segment_model_errors_stay_per_request(monkeypatch):
    decoded = []
    monkeypatch.setattr(serving, "decode_image", lambda data, limits: decoded.append(data) or decode_image(data, limits))
    session = FakeSession(fail_on="crash")
    model = SegmentModel(session)
    png = _png()
    out = model([_req(image=png, query=b"a"), _req(image=b"not an image", query=b"b"), _req(image=png, query=b" "),
                 _req(image=png, query=b"too long"), _req(image=png, query=b"crash"),
                 _req(image=png, query=b"c", mode=b"generate"), _req(image=png, query=b"d")])
    assert len(out) == 7
    ok = [i for i, r in enumerate(out) if ERROR_OUTPUT not in r]
    assert ok == [0, 5, 6]
    codes = [bytes(out[i][ERROR_OUTPUT][0, 0]).decode() for i in (1, 2, 3, 4)]
    assert codes == ["INVALID_ARG"] * 3 + ["INTERNAL"]
    assert b"not an image format" in bytes(out[1][ERROR_OUTPUT][1, 0])
    assert b"the prompt is too long" in bytes(out[3][ERROR_OUTPUT][1, 0])
    assert b"RuntimeError: boom" in bytes(out[4][ERROR_OUTPUT][1, 0])
    assert decoded.count(png) == 1  # identical image bytes in one batch are decoded once
    # one batched call per mode; the failing batch is run again request by request
    assert [(q, m) for _, q, m, _ in session.calls] == [
        (["a", "crash", "d"], "single-pass"), (["a"], "single-pass"), (["crash"], "single-pass"),
        (["d"], "single-pass"), (["c"], "generate")]
    assert session.calls[-1] == ([(8, 12, 3)], ["c"], "generate", 4)
    assert out[5]["generated_ids"].tolist() == [[1]]
    assert [_timings(out[i])["batch_size"] for i in ok] == [1, 1, 1]


def test_segment_model_batches_a_group_and_splits_it_at_max_batch():
    session = FakeSession(max_batch=4)
    png = _png()
    group = [_req(image=png, query=f"q{i}".encode()) for i in range(6)]
    out = SegmentModel(session)(group)
    assert [len(q) for _, q, _, _ in session.calls] == [4, 2]
    assert [_timings(r)["batch_size"] for r in out] == [4] * 4 + [2] * 2
    session.calls.clear()
    out = SegmentModel(session, max_batch=3)(group)  # csprt serve --max-batch-size 3
    assert [q for _, q, _, _ in session.calls] == [["q0", "q1", "q2"], ["q3", "q4", "q5"]]
    assert SegmentModel(session, max_batch=16).max_batch == 4  # never above the exported maximum


def test_error_response_shape():
    e = error_response("bad image")
    assert e[ERROR_OUTPUT].dtype == object and e[ERROR_OUTPUT].reshape(-1).tolist() == [b"INVALID_ARG", b"bad image"]


# -- the proxy patch ---------------------------------------------------------------------------
def _fake_pb_utils():
    class TritonError:
        INTERNAL, INVALID_ARG = "internal", "invalid-arg"

        def __init__(self, message, code=None):
            self.message, self.code = message, code

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.output_tensors, self.error = output_tensors, error

    return types.SimpleNamespace(TritonError=TritonError, InferenceResponse=InferenceResponse)


def test_proxy_patch_turns_error_entry_into_that_requests_error():
    ns = {"pb_utils": _fake_pb_utils(), "_wrap_response": lambda resp, names, outs: ("original", resp.data),
          "get_config_from_handshake_server": None}
    exec(serving.PROXY_PATCH.decode(), ns)  # what PyTriton's proxy model.py gets appended
    Response = types.SimpleNamespace
    ok = ns["_wrap_response"](Response(data={"answer": np.array([[b"x"]], dtype=object)}), ["answer"], {})
    assert ok[0] == "original"
    bad = ns["_wrap_response"](Response(data=error_response("image: corrupt")), ["answer"], {})
    assert (bad.error.message, bad.error.code) == ("image: corrupt", "invalid-arg")
    bug = ns["_wrap_response"](Response(data=error_response("boom", internal=True)), ["answer"], {})
    assert bug.error.code == "internal"


def test_proxy_patch_retries_the_instance_handshake_until_the_first_instance_listens():
    calls = []

    def flaky(socket_path, timeout_s=1.0):  # refused twice (bind before listen), then the config
        calls.append(socket_path)
        if len(calls) < 3:
            raise ConnectionRefusedError(111, "Connection refused")
        return {"authkey": "k"}

    ns = {"pb_utils": _fake_pb_utils(), "_wrap_response": None, "get_config_from_handshake_server": flaky}
    exec(serving.PROXY_PATCH.decode(), ns)
    assert ns["get_config_from_handshake_server"]("/ws/csprt-config.sock") == {"authkey": "k"}
    assert calls == ["/ws/csprt-config.sock"] * 3

    def broken(socket_path, timeout_s=1.0):
        raise ValueError("invalid JSON")  # not a start-up race: no retry

    ns = {"pb_utils": _fake_pb_utils(), "_wrap_response": None, "get_config_from_handshake_server": broken}
    exec(serving.PROXY_PATCH.decode(), ns)
    with pytest.raises(ValueError):
        ns["get_config_from_handshake_server"]("/ws/csprt-config.sock")


def test_install_per_request_errors_appends_patch():
    pytest.importorskip("pytriton")
    from pytriton.models.model import Model

    serving.install_per_request_errors()
    serving.install_per_request_errors()  # idempotent
    fake = types.SimpleNamespace(SCRIPT_FILES_TO_COPY=Model.SCRIPT_FILES_TO_COPY, model_version=1)
    files = Model.get_proxy_model_files(fake)
    assert files["file:1/model.py"].endswith(serving.PROXY_PATCH)
    assert files["file:1/model.py"].count(serving.PROXY_PATCH) == 1


# -- a served group on the tiny artifact -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_session(export_tiny):
    from engines.session import ArtifactSession

    with ArtifactSession(export_tiny()) as session:
        yield session


def _photo(name: str) -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()[::4, ::4].copy()).save(buf, format="PNG")
    return buf.getvalue()


def test_served_group_mixing_bad_and_good_requests(tiny_session):
    """One Triton call with bad requests among good ones, cache hits and misses, both modes: the bad ones get
    their own errors; each good one equals the request run alone, from one batched call per mode."""
    from engines.image_cache import MIB, ImageCache

    cat, person = _photo("chelsea"), _photo("astronaut")
    model = SegmentModel(tiny_session, cache=ImageCache(64 * MIB))
    assert ERROR_OUTPUT not in model([_req(image=cat, query=b"warm the cache")])[0]
    group = [(cat, "Where is the cat?", "single-pass"), (b"GIF89a not an image", "q", "single-pass"),
             (person, "Segment the person.", "single-pass"), (cat, "cat " * 400, "single-pass"),
             (cat, "What is on the left?", "generate"), (person, "Where is the face?", "single-pass")]
    out = model([_req(image=im, query=q.encode(), mode=m.encode(), return_logits=True) for im, q, m in group])
    errors = {i: bytes(r[ERROR_OUTPUT][1, 0]).decode() for i, r in enumerate(out) if ERROR_OUTPUT in r}
    assert set(errors) == {1, 3}
    assert "not an image format" in errors[1] and "suffix_len" in errors[3] and "exported range" in errors[3]
    for i in (0, 2, 4, 5):
        image, query, mode = group[i]
        alone = tiny_session.segment(decode_image(image), query, mode=mode,
                                     max_new_tokens=model.max_new_tokens if mode == "generate" else None)
        got = out[i]
        assert np.array_equal(unpack_masks(got["masks_packed"][0], got["masks_shape"][0]) if "masks_packed" in got
                              else np.zeros(alone.masks.shape, bool), alone.masks), i
        if len(alone.masks):
            np.testing.assert_allclose(got["mask_logits"][0], alone.mask_logits, rtol=0, atol=1e-5)
        assert got.get("generated_ids", np.zeros((1, 0), np.int64))[0].tolist() == alone.generated_ids
        assert bytes(got["answer"][0, 0]).decode() == alone.answer
    timings = {i: _timings(out[i]) for i in (0, 2, 4, 5)}
    assert {i: t["batch_size"] for i, t in timings.items()} == {0: 3, 2: 3, 4: 1, 5: 3}
    assert {i: t["image_cache_hit"] for i, t in timings.items()} == {0: 1, 2: 0, 4: 1, 5: 0}
    stats = model.cache.stats()  # misses: the first cat, the bytes that do not decode, person twice
    assert (stats["hits"], stats["misses"]) == (2, 4)
    again = model([_req(image=person, query=b"Segment the person.")])[0]
    assert _timings(again)["image_cache_hit"] == 1  # the miss's encoding was cached from the batched run


class _CountingTokenizer:
    """The artifact's tokenizer, counting the texts it encodes."""

    def __init__(self, inner):
        self.inner, self.texts = inner, []

    def __call__(self, text, **kwargs):
        self.texts.append(text)
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_served_query_is_tokenised_once(tiny_session, monkeypatch):
    """check_query's ids go on to segment_batch: each served prompt is encoded once (its two sides of the image),
    not a second time by the batch's run."""
    counting = _CountingTokenizer(tiny_session.host.tokenizer)
    monkeypatch.setattr(tiny_session.host, "_tokenizer", counting)
    cat = _photo("chelsea")
    group = [(b"Where is the cat?", b"single-pass"), (b"What is on the left?", b"generate"),
             (b"Segment the ears.", b"single-pass")]
    out = SegmentModel(tiny_session)([_req(image=cat, query=q, mode=m) for q, m in group])
    assert all(ERROR_OUTPUT not in r for r in out)
    assert len(counting.texts) == 2 * len(group), counting.texts  # prefix and suffix of each prompt, once


class _FrozenPipeline:
    """A pipeline whose attributes cannot be reassigned: the warm-up must not swap the layout requests share."""

    def __init__(self, layout):
        object.__setattr__(self, "layout", layout)

    def __setattr__(self, name, value):
        raise AssertionError(f"the warm-up assigned pipeline.{name}")


@pytest.mark.parametrize("max_seg, seg_id", [(8, 5), (1, -1)])
def test_warm_up_passes_its_decode_ids_explicitly(max_seg, seg_id):
    """Generate's warm-up decodes two tokens with no stop token (and no [SEG] when only one is allowed) by giving
    the call its own ids; the shared layout stays the artifact's."""
    from engines.pipeline import DecodeIds
    from graphs.stages import DimRange

    loop = types.SimpleNamespace(max_new_tokens=4, stop_token_ids=(2,), seg_token_id=5)
    layout = types.SimpleNamespace(loop=loop, dims={"num_seg": DimRange(1, 1, max_seg)})
    calls = []

    class Session:
        pipeline = _FrozenPipeline(layout)

        def segment(self, image, query, mode, max_new_tokens=None, decode_ids=None):
            calls.append((mode, max_new_tokens, decode_ids))
            return types.SimpleNamespace(timings_ms={"decode_steps": 1} if mode == "generate" else {})

    image = np.zeros((4, 4, 3), np.uint8)
    assert serving.warm_up(Session(), image, "generate") == 1
    assert serving.warm_up(Session(), image, "single-pass") == 0
    assert calls == [("generate", 2, DecodeIds(stop_token_ids=(), seg_token_id=seg_id)), ("single-pass", None, None)]
    assert Session.pipeline.layout is layout and loop.stop_token_ids == (2,) and loop.seg_token_id == 5
