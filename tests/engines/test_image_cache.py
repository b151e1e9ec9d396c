"""Encode an image once, answer many questions: bit-identical to running every stage, on both chains; the
image cache's keys, LRU byte bound under threads, and what never enters it."""

from __future__ import annotations

import io
import json
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from engines.image_cache import ImageCache, ImageKey, image_key
from engines.serving import ERROR_OUTPUT, SegmentModel
from graphs.imageio import unpack_masks
from graphs.errors import InputError
from graphs.manifest import sealed

Q1, Q2 = "Where is the cat in this picture?", "What would you drink from?"


@pytest.fixture(scope="module")
def art(export_tiny):
    return export_tiny("csp", "both")


@pytest.fixture(scope="module")
def session(art):
    from engines.session import ArtifactSession

    with ArtifactSession(art) as s:
        yield s


@pytest.fixture(scope="module")
def image():
    from exporter.export import sample_image

    return sample_image()


def _same(got, want) -> None:
    """Masks, logits and ids bit for bit."""
    assert np.array_equal(got.masks, want.masks) and got.masks.shape == want.masks.shape
    assert np.array_equal(got.mask_logits, want.mask_logits)
    assert got.generated_ids == want.generated_ids and got.answer == want.answer
    for name, value in want.pipeline.outputs.items():
        assert np.array_equal(np.asarray(got.pipeline.outputs[name]), value), name
    assert got.image_tokens_per_layer == want.image_tokens_per_layer


@pytest.mark.parametrize("mode", ["single-pass", "generate"])
def test_cached_answer_equals_uncached(session, image, mode):
    kw = {"mode": mode, "max_new_tokens": 8 if mode == "generate" else None}
    want1, want2 = session.segment(image, Q1, **kw), session.segment(image, Q2, **kw)
    assert want1.masks.shape[0] == 1  # the tiny checkpoint answers Q1 with one [SEG]: masks are compared for real
    enc = session.encode_image(image)
    assert set(enc.timings_ms) == {"vision", "sam_encoder"} and enc.nbytes > 0
    for query, want in ((Q1, want1), (Q2, want2), (Q1, want1)):
        got = session.segment(enc, query, **kw)
        _same(got, want)
        assert "vision" not in got.timings_ms and "sam_encoder" not in got.timings_ms  # not run again
    kept = session.segment(image, Q2, keep_encoding=True, **kw)  # a full run that also returns its encoding
    _same(kept, want2)
    _same(session.segment(kept.encoding, Q1, **kw), want1)
    assert {k: v.tobytes() for k, v in kept.encoding.tensors.items()} == {k: v.tobytes() for k, v in enc.tensors.items()}


def test_encoding_stays_on_the_device_and_survives_reused_buffers(art, session, image):
    """CudaChain on CPU stand-ins (tests/device_fakes.py): engine outputs live in buffers the next run overwrites,
    so an encoding is a copy, kept as torch tensors (device memory on a GPU) and counted in bytes there."""
    torch = pytest.importorskip("torch")
    from engines.cuda_chain import CudaChain
    from engines.pipeline import Pipeline
    from engines.session import ArtifactSession
    from tests.device_fakes import FakeCuda, device_ort_runner_for

    want = session.segment(image, Q1)
    cuda = FakeCuda()
    with ArtifactSession(art, verify=False) as dev:
        layout = dev.artifact.layout
        dev.pipeline = Pipeline(layout, device_ort_runner_for(layout, dev.artifact.graph_path, cuda.log),
                                chain=CudaChain(layout, "cuda", cuda=cuda, alloc_device="cpu"))
        enc = dev.encode_image(image)
        dev.encode_image(image[::-1].copy())  # same size, other pixels: overwrites every image-stage buffer
        dev.segment(image[:, ::-1].copy(), Q2)  # and a full run
        assert all(isinstance(v, torch.Tensor) for k, v in enc.tensors.items() if not k.startswith("host."))
        assert enc.nbytes == sum(v.numel() * v.element_size() for v in enc.tensors.values())
        got = dev.segment(enc, Q1)
    _same(got, want)
    ran = [e[2] for e in cuda.log if e[0] == "run"]
    assert ran[-len(layout.sequence("single-pass")) + 2:] == [s.name for s in layout.sequence("single-pass")
                                                             if s.name not in ("vision", "sam_encoder")]


@pytest.fixture(scope="module")
def other_session(art, tmp_path_factory):
    """The same artifact with another CLIP normalisation: another preprocessing setting."""
    from engines.session import ArtifactSession

    copy = tmp_path_factory.mktemp("other") / "art"
    shutil.copytree(art, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["preprocessing"]["clip"]["image_mean"] = [0.5, 0.5, 0.5]
    (copy / "manifest.json").write_text(json.dumps(sealed(manifest)))
    with ArtifactSession(copy) as s:
        yield s


def test_an_encoding_from_other_settings_is_refused(session, other_session, image):
    assert other_session.image_settings != session.image_settings
    with pytest.raises(InputError, match="another artifact, backend, device or preprocessing setting"):
        other_session.segment(session.encode_image(image), Q1)


# -- the served path (SegmentModel) with a shared cache -------------------------------------------------------
def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _req(data: bytes, query: str = Q1) -> dict:
    return {"image": np.array([[data]], dtype=object), "query": np.array([[query.encode()]], dtype=object),
            "return_logits": np.array([[True]])}


def _hit(response: dict) -> int:
    return json.loads(bytes(response["timings"][0, 0]))["image_cache_hit"]


def _outputs(response: dict) -> tuple:
    return (unpack_masks(response["masks_packed"], response["masks_shape"][0]).tobytes(),
            response["mask_logits"].tobytes(), bytes(response["answer"][0, 0]))


def test_served_hits_equal_misses_and_keys_separate_images_and_settings(session, other_session, image):
    cache = ImageCache(64 * 2**20)
    model, other = SegmentModel(session, cache=cache), SegmentModel(session)  # `other`: cache off
    a, b = _png(image), _png(image[::-1].copy())  # two images of the same size
    first, again = model([_req(a)])[0], model([_req(a)])[0]
    assert (_hit(first), _hit(again)) == (0, 1) and _outputs(again) == _outputs(first) == _outputs(other([_req(a)])[0])
    b1 = model([_req(b)])[0]
    assert _hit(b1) == 0 and _outputs(b1) == _outputs(other([_req(b)])[0]) and _outputs(b1) != _outputs(first)
    assert len(cache) == 2
    assert _hit(model([_req(b, Q2)])[0]) == 1 and _outputs(model([_req(b, Q2)])[0]) == _outputs(other([_req(b, Q2)])[0])
    # the same bytes under another preprocessing setting: a miss, its own entry
    assert _hit(SegmentModel(other_session, cache=cache)([_req(a)])[0]) == 0 and len(cache) == 3
    assert cache.stats()["hits"] == 3 and cache.stats()["misses"] == 3


def test_corrupt_image_never_enters_the_cache(session, image):
    cache = ImageCache(64 * 2**20)
    model = SegmentModel(session, cache=cache)
    good = _png(image)
    for bad in (b"\x89PNG\r\n\x1a\n not really", good[: len(good) // 2]):  # not an image; a truncated PNG
        for _ in range(2):
            out = model([_req(bad)])[0]
            assert ERROR_OUTPUT in out and len(cache) == 0 and cache.stats()["hits"] == 0
    out = model([_req(good, " ")])[0]  # a decodable image with a bad query: nothing runs, nothing is cached
    assert ERROR_OUTPUT in out and len(cache) == 0


# -- the cache alone, under threads -----------------------------------------------------------------------------
class _Enc:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes


class _WatchedCache(ImageCache):
    """Records the bytes held after every put, read under the cache's own lock."""

    def put(self, key, encoding):
        ok = super().put(key, encoding)
        with self._lock:
            self.peak = max(getattr(self, "peak", 0), self.bytes)
            assert self.bytes == sum(size for _, size in self._entries.values())
        return ok


def test_byte_bound_holds_under_8_clients_with_20_images():
    sizes = {i: 1000 + 100 * i for i in range(20)}  # 20 distinct images, 1000..2900 bytes
    cache = _WatchedCache(8000)
    start, lookups = threading.Barrier(8), []

    def client(c: int):
        rng = np.random.default_rng(c)
        start.wait(timeout=10)
        for _ in range(500):
            i = int(rng.integers(20))
            key = ImageKey(f"img{i}", "s")
            enc = cache.get(key)
            lookups.append(1)
            if enc is None:
                cache.put(key, _Enc(sizes[i]))
            else:
                assert enc.nbytes == sizes[i]  # a hit is that image's encoding, never another's

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    s = cache.stats()
    assert cache.peak <= 8000 and s["bytes"] <= 8000
    assert s["hits"] + s["misses"] == len(lookups) == 4000
    assert s["evictions"] > 0 and s["misses"] == s["entries"] + s["evictions"] + s["replaced"]


def test_lru_order_too_large_and_off():
    cache = ImageCache(300)
    for name in "abc":
        assert cache.put(ImageKey(name, "s"), _Enc(100))
    assert cache.get(ImageKey("a", "s")) is not None  # a is now the most recent: b goes first
    cache.put(ImageKey("d", "s"), _Enc(100))
    assert cache.get(ImageKey("b", "s")) is None and cache.get(ImageKey("a", "s")) is not None
    assert not cache.put(ImageKey("e", "s"), _Enc(301)) and cache.stats()["too_large"] == 1
    assert cache.stats()["evictions"] == 1 and cache.bytes == 300
    off = ImageCache(0)
    assert not off.put(ImageKey("a", "s"), _Enc(1)) and off.get(ImageKey("a", "s")) is None
    assert off.stats()["misses"] == 0 and off.summary() == "image cache off"


def test_key_covers_bytes_settings_and_instance_masks():
    m = np.zeros((1, 4, 4), np.float32)
    assert image_key(b"x", "s") == image_key(b"x", "s") != image_key(b"y", "s")
    assert image_key(b"x", "s") != image_key(b"x", "t")
    assert image_key(b"x", "s", m) != image_key(b"x", "s") and image_key(b"x", "s", m) != image_key(b"x", "s", m + 1)


def test_served_byte_bound_with_two_instances_8_clients_20_images(art, session, image):
    """Two instances (own sessions, one cache), 8 client threads, 20 distinct images, a bound of 3 encodings: the
    bound holds after every put, evictions are counted, and every hit answers as its image's miss did."""
    from engines.session import ArtifactSession

    images = [_png(np.roll(image, 7 * i, axis=1)) for i in range(20)]
    size = session.encode_image(image).nbytes
    cache = _WatchedCache(3 * size)
    with ArtifactSession(art) as second:
        models = [SegmentModel(session, cache=cache), SegmentModel(second, cache=cache)]
        locks = [threading.Lock(), threading.Lock()]  # Triton runs each instance on its own thread
        seen, failures, start = {}, [], threading.Barrier(8)

        def client(c: int):
            start.wait(timeout=30)
            for j in range(5):
                k = (c * 5 + j) % 20 if j < 3 else (c * 5 + j - 3) % 20  # each client asks twice about 2 images
                with locks[c % 2]:
                    out = models[c % 2]([_req(images[k])])[0]
                if ERROR_OUTPUT in out:
                    failures.append(bytes(out[ERROR_OUTPUT][1, 0]))
                    continue
                if seen.setdefault(k, _outputs(out)) != _outputs(out):
                    failures.append(f"image {k}: hit {_hit(out)} differs")

        threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    s = cache.stats()
    assert not failures, failures[:3]
    assert cache.peak <= 3 * size and s["entries"] <= 3 and s["hits"] + s["misses"] == 40
    assert s["evictions"] >= 20 - 3 and s["misses"] == s["entries"] + s["evictions"] + s["replaced"]


def test_encode_bench_and_serve_bench_cases(art):
    """The benchmark tools behind docs/benchmarks.md: first vs second question, and 5 photos x 4 questions."""
    from tools.encode_bench import run
    from tools.serve_bench import QUESTIONS, image_cases

    r = run(art, repeat=2, warmup=1, threads=1)
    assert r["image_only_stages"] == ["vision", "sam_encoder"] and r["encoding_mib"] > 0
    assert r["first_ms"] > 0 and r["second_ms"] > 0
    assert r["ratio"] == pytest.approx(r["first_ms"] / r["second_ms"], rel=0.05)
    assert r["stages_first_ms"]["vision"] > 0 and r["stages_second_ms"]["vision"] is None
    cases = image_cases(5)
    assert len(cases) == 20 and len({c[0] for c in cases}) == 5 and {c[1] for c in cases} == set(QUESTIONS)
    assert len({c[0] for c in cases[:5]}) == 5  # consecutive requests are about different photos
