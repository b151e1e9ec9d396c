"""`csprt serve` end to end: one real server (PyTriton's tritonserver) per module, HTTP and gRPC clients.

The server runs as `python -m tools serve` in a subprocess (tools.serve_bench.serving) on free loopback
ports with 2 instances and dynamic batching; it counts as started when /v2/health/ready first answers 200, and
a request is sent at that moment. The SIGTERM test runs last and stops it. Signals while loading and while
Triton starts get servers of their own. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import re
import signal
import threading
import time
import types

import numpy as np
import pytest
from PIL import Image

from engines.serving import INPUTS, MODEL_NAME, OUTPUTS
from graphs.imageio import decode_image_bytes, write_mask_png
from tests.cli_io import call, error_lines
from tools.serve_bench import free_ports, load, serving, summary
from tools.serve_lifecycle import SHUTDOWN_S
from tools.triton_client import client_module, segment

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("pytriton", "tritonclient", "psutil")),
    reason="needs nvidia-pytriton, tritonclient and psutil (pip install -e '.[serve,bench]')")

START_TIMEOUT_S = 300   # load + warm-up + tritonserver start; ~30 s on 2 busy cores
REQUEST_TIMEOUT_S = 60
STOP_TIMEOUT_S = 90     # a bound for the test's waits; csprt serve's own is SHUTDOWN_S
MAX_IMAGE_BYTES = 1_000_000
MAX_IMAGE_PIXELS = 400_000  # chelsea is 451 x 300 = 135,300


def _encode(image: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kw)
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def _images() -> dict[str, bytes]:
    from skimage import data

    return {"chelsea.png": _encode(data.chelsea(), "PNG"),
            "astronaut.jpg": _encode(data.astronaut()[::4, ::4], "JPEG", quality=90)}  # 128 x 128


CASES = [("chelsea.png", "Where is the cat?", "single-pass"), ("astronaut.jpg", "Segment the person.", "generate")]


@pytest.fixture(scope="module")
def server(export_tiny, tmp_path_factory):
    art = export_tiny()
    flags = ["--instances", "2", "--max-batch-size", "8", "--max-image-bytes", str(MAX_IMAGE_BYTES),
             "--max-image-pixels", str(MAX_IMAGE_PIXELS)]
    with serving(art, flags, tmp_path_factory.mktemp("serve"), START_TIMEOUT_S, STOP_TIMEOUT_S, ready="probe") as s:
        s.art, s.urls = art, {"http": s.http, "grpc": s.grpc}
        case = CASES[0]
        try:  # what a readiness probe promises: the first request after it answers
            s.first_answer = _request(s, "http", _images()[case[0]], case[1], case[2])
        except Exception as e:  # noqa: BLE001 - test_ready_means_answering reports it
            s.first_answer = e
        deadline = time.monotonic() + START_TIMEOUT_S
        while "] ready on " not in s.stderr.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        yield s


@pytest.fixture(scope="module")
def expected(server, tmp_path_factory):
    """(image name, query, mode) -> what ArtifactSession.segment gives in-process, and the mask.png bytes."""
    from engines.session import ArtifactSession

    images, out, tmp = _images(), {}, tmp_path_factory.mktemp("expected")
    with ArtifactSession(server.art) as session:
        loop = session.artifact.layout.loop
        for name, query, mode in CASES:
            seg = session.segment(decode_image_bytes(images[name]), query, mode=mode,
                                  max_new_tokens=min(32, loop.max_new_tokens) if mode == "generate" else None)
            write_mask_png(seg.masks.any(axis=0), tmp / "mask.png")
            out[name, query, mode] = types.SimpleNamespace(image=images[name], seg=seg,
                                                           png=(tmp / "mask.png").read_bytes())
    return out


def _client(server, protocol: str):
    mod = client_module(protocol)
    if protocol == "http":
        return mod, mod.InferenceServerClient(server.urls["http"], connection_timeout=REQUEST_TIMEOUT_S,
                                              network_timeout=REQUEST_TIMEOUT_S)
    return mod, mod.InferenceServerClient(server.urls["grpc"])


def _request(server, protocol: str, image: bytes, query: str, mode: str = "single-pass", logits: bool = False):
    mod, client = _client(server, protocol)
    try:
        return segment(client, mod, image, query, mode, logits, timeout_s=REQUEST_TIMEOUT_S)
    finally:
        client.close()


def _check(result: dict, want) -> None:
    assert result["mask_png"] == want.png
    assert np.array_equal(result["masks"], want.seg.masks)
    assert result["answer"] == want.seg.answer and result["generated_ids"] == list(want.seg.generated_ids)
    assert result["host_steps"] == {}  # a plain artifact: no host steps, the output left out


# -- flags (fail before anything loads) ----------------------------------------------------------
def test_flag_errors_are_one_line_exit_2(export_tiny, tmp_path):
    import socket

    art = str(export_tiny())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port, (free,) = taken.getsockname()[1], free_ports(1)
        for argv, message in [
            ([str(tmp_path)], "is not an artifact (no manifest.json)"),
            ([art, "--instances", "0"], "--instances 0: expected >= 1"),
            ([art, "--max-batch-size", "9"], "--max-batch-size 9 is more than this artifact's exported maximum batch "
                                             "of 8; pass --max-batch-size 8 or less, or re-export with csprt export "
                                             "--max-batch 9"),
            ([art, "--max-batch-size", "0"], "--max-batch-size 0: expected 1 (no batching) or more"),
            ([art, "--max-queue-delay-us", "-1"], "--max-queue-delay-us -1: expected >= 0"),
            ([art, "--image-cache-mb", "-1"], "--image-cache-mb -1: expected >= 0"),
            ([art, "--http-port", "70000"], "--http-port 70000: expected 1..65535"),
            ([art, "--http-port", str(free), "--grpc-port", str(free)], f"--grpc-port {free} is also --http-port"),
            ([art, "--http-port", str(port)], f"port {port} on 127.0.0.1 is in use; pass another --http-port"),
        ]:
            rc, out, err = call(["serve", *argv])
            lines = error_lines(err)
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("csprt serve: error: "), err
            assert message in lines[0], err


# -- happy path ---------------------------------------------------------------------------------
def test_ready_means_answering(server, expected):
    """The request sent the moment /v2/health/ready first said 200 got the right answer (it used to get 404:
    ready turned true ~2 s before the model was loaded)."""
    assert not isinstance(server.first_answer, Exception), server.first_answer
    _check(server.first_answer, expected[CASES[0]])


def test_warm_up_covers_a_decode_step(server):
    warm = re.findall(r"warm-up generate: \d+ ms \((\d+) decode steps?\)", server.stderr.read_text())
    assert warm == ["1", "1"], server.stderr.read_text()  # both instances


def test_ready_with_everything_loaded(server):
    mod, client = _client(server, "http")
    assert client.is_server_ready() and client.is_model_ready(MODEL_NAME)
    meta = client.get_model_metadata(MODEL_NAME)
    assert {t["name"] for t in meta["inputs"]} == set(INPUTS)
    assert {t["name"] for t in meta["outputs"]} == set(OUTPUTS)
    config = client.get_model_config(MODEL_NAME)
    assert config["max_batch_size"] == 8 and "dynamic_batching" in config
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 2000
    assert sum(g["count"] for g in config["instance_group"]) == 2
    stages = re.findall(r"loading stage (\w+)", server.stderr.read_text())
    assert len(stages) == 2 * len(set(stages)) and "vision" in stages  # both instances, every stage


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[2])
def test_masks_match_in_process(server, expected, protocol, case):
    want = expected[case]
    result = _request(server, protocol, want.image, case[1], case[2], logits=True)
    _check(result, want)
    np.testing.assert_allclose(result["mask_logits"], want.seg.mask_logits, rtol=0, atol=1e-5)
    timings = result["timings_ms"]
    skipped = set(want.seg.timings_ms) - set(timings)  # an image cache hit skips the image-only stages
    assert skipped == ({"vision", "sam_encoder"} if timings["image_cache_hit"] else set()) and "segment" in timings


def test_image_cache_second_question_is_a_hit(server, expected):
    """New image bytes: the first question misses, the next ones hit (shared by the 2 instances) with the same
    answer bit for bit; bytes that do not decode are never cached (each such request fails on its own)."""
    (name, query, mode), = [c for c in CASES if c[2] == "single-pass"]
    image = _encode(decode_image_bytes(expected[name, query, mode].image)[:, ::-1].copy(), "PNG")  # unseen bytes
    got = [_request(server, protocol, image, q, logits=True) for protocol, q in
           (("http", query), ("grpc", query), ("http", "Segment the ears."), ("http", query))]
    assert [g["timings_ms"]["image_cache_hit"] for g in got] == [0, 1, 1, 1]
    for g in got[1::2]:
        assert g["mask_png"] == got[0]["mask_png"] and np.array_equal(g["mask_logits"], got[0]["mask_logits"])
    assert "vision" in got[0]["timings_ms"] and "vision" not in got[1]["timings_ms"]
    from tritonclient.utils import InferenceServerException

    for _ in range(2):
        with pytest.raises(InferenceServerException, match="not an image format"):
            _request(server, "http", b"GIF89a cached? never", query)


def test_mask_png_is_csprt_runs(server, expected, tmp_path):
    (name, query, mode), = [c for c in CASES if c[2] == "single-pass"]
    (tmp_path / name).write_bytes(expected[name, query, mode].image)
    rc, _, err = call(["run", str(server.art), "--image", str(tmp_path / name), "--query", query,
                       "--out", str(tmp_path / "run")])
    assert rc == 0, err
    assert _request(server, "http", expected[name, query, mode].image, query)["mask_png"] == \
        (tmp_path / "run" / "mask.png").read_bytes()


def test_concurrent_clients(server, expected):
    """8 clients x 25 requests (HTTP and gRPC, both cases), all correct. Prints throughput and latency."""
    stats = load(server, [(expected[c].image, c[1], c[2]) for c in CASES], clients=8, per_client=25,
                 check=lambda k, r: _check(r, expected[CASES[k]]), timeout_s=REQUEST_TIMEOUT_S)
    assert not stats.failures, "\n".join(stats.failures[:5])
    assert len(stats.latencies_s) == 8 * 25
    assert 1 <= stats.pipeline_batch <= 8  # each response says how many requests shared its pipeline call
    print(f"\n[serve load] 8 clients: {summary(stats)}")


# -- bad requests -------------------------------------------------------------------------------
def _bytes(mod, name: str, value, shape=(1, 1)):
    t = mod.InferInput(name, list(shape), "BYTES")
    t.set_data_from_numpy(np.array(value, dtype=object).reshape(shape))
    return t


def _good(mod, images):
    return [_bytes(mod, "image", images["chelsea.png"]), _bytes(mod, "query", b"Where is the cat?")]


def _int32(mod, name: str):
    t = mod.InferInput(name, [1, 1], "INT32")
    t.set_data_from_numpy(np.array([[3]], dtype=np.int32))
    return t


def _png() -> bytes:
    return _images()["chelsea.png"]


BAD = {  # kind -> (inputs(mod), message pattern)
    "missing-image": (lambda m: [_bytes(m, "query", b"q")], "missing required input.*image"),
    "wrong-dtype": (lambda m: [_bytes(m, "image", _png()), _int32(m, "query")], "data-type is 'INT32'.*expects 'BYTES'"),
    "wrong-shape": (lambda m: [_bytes(m, "image", [_png(), _png()], (1, 2)), _bytes(m, "query", b"q")],
                    "unexpected shape for input 'image'"),
    "batch-of-2": (lambda m: [_bytes(m, "image", [_png(), _png()], (2, 1)), _bytes(m, "query", [b"q", b"q"], (2, 1))],
                   r"expected shape \[1, 1\]"),
    "not-an-image": (lambda m: [_bytes(m, "image", b"GIF89a but not really"), _bytes(m, "query", b"q")],
                     "not an image format"),
    "empty-query": (lambda m: [_bytes(m, "image", _png()), _bytes(m, "query", b"  ")], "query is empty"),
    "query-too-long": (lambda m: [_bytes(m, "image", _png()), _bytes(m, "query", b"cat " * 400)],
                       "suffix_len.*outside the exported range"),
    "unknown-mode": (lambda m: [_bytes(m, "image", _png()), _bytes(m, "query", b"q"), _bytes(m, "mode", b"fast")],
                     "unknown mode 'fast'"),
    "too-many-bytes": (lambda m: [_bytes(m, "image", _png() + b"\0" * MAX_IMAGE_BYTES), _bytes(m, "query", b"q")],
                       f"over this server's limit of {MAX_IMAGE_BYTES} bytes"),
    "too-many-pixels": (lambda m: [_bytes(m, "image", _encode(np.zeros((700, 700, 3), np.uint8), "PNG")),
                                   _bytes(m, "query", b"q")], "700x700 is 490000 pixels, over"),
}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_request_gets_its_error_and_server_goes_on(server, expected, protocol, kind):
    from tritonclient.utils import InferenceServerException

    inputs, pattern = BAD[kind]
    mod, client = _client(server, protocol)
    kwargs = {"client_timeout": REQUEST_TIMEOUT_S} if protocol == "grpc" else {}
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL_NAME, inputs(mod), **kwargs)
        assert re.search(pattern, info.value.message(), re.S), info.value.message()
        assert str(info.value.status()) in ("400", "StatusCode.INVALID_ARGUMENT")
        assert "Traceback" not in info.value.message()
        case = CASES[0]
        _check(segment(client, mod, expected[case].image, case[1], case[2], timeout_s=REQUEST_TIMEOUT_S),
               expected[case])
    finally:
        client.close()


def test_bad_requests_do_not_fail_their_batch(server, expected):
    """Good and bad requests sent together (Triton may group them): only the bad ones fail."""
    from tritonclient.utils import InferenceServerException

    case, results = CASES[0], {}
    start = threading.Barrier(8)

    def send(i: int):
        mod, client = _client(server, "http")
        try:
            inputs = _good(mod, {"chelsea.png": expected[case].image})
            if i % 4 == 3:
                inputs = BAD["not-an-image"][0](mod)
            start.wait(timeout=30)
            try:
                res = client.infer(MODEL_NAME, inputs)
                results[i] = bytes(res.as_numpy("mask_png")[0, 0])
            except InferenceServerException as e:
                results[i] = e
        finally:
            client.close()

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=3 * REQUEST_TIMEOUT_S)
    assert len(results) == 8
    for i, r in results.items():
        if i % 4 == 3:
            assert isinstance(r, InferenceServerException) and "not an image format" in r.message()
        else:
            assert r == expected[case].png, r


# -- shutdown (last: stops the module's server) ---------------------------------------------------
def test_quiet_console(server):
    """stdout stays empty (tritonserver's NVML/CUDA warnings go to the log dir); stderr has only progress."""
    assert server.stdout.read_text() == ""
    noise = [ln for ln in server.stderr.read_text().splitlines() if ln and not ln.startswith("[csprt serve]")]
    assert not noise, noise
    assert (server.log_dir / "triton" / "tritonserver.log").stat().st_size > 0


def test_sigterm_stops_cleanly(server, expected):
    import psutil

    from tritonclient.utils import InferenceServerException

    proc = psutil.Process(server.proc.pid)
    children = proc.children(recursive=True)
    assert any("tritonserver" in c.name() for c in children), [c.name() for c in children]
    case, outcome = CASES[1], []

    def in_flight():
        try:
            _check(_request(server, "grpc", expected[case].image, case[1], case[2]), expected[case])
            outcome.append("answered")
        except InferenceServerException as e:
            outcome.append(f"rejected: {e.message()}")

    import socket

    host, port = server.urls["http"].split(":")
    idle = socket.create_connection((host, int(port)))
    idle.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: csprt\r\nConnection: keep-alive\r\n\r\n")
    assert b" 200 " in idle.recv(1000)  # an idle keep-alive client stays connected through the shutdown
    t = threading.Thread(target=in_flight, daemon=True)
    t.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    t.join(timeout=STOP_TIMEOUT_S)
    assert outcome == ["answered"], outcome  # in flight when the signal came: finished first
    assert server.proc.wait(STOP_TIMEOUT_S) == 0
    took = time.monotonic() - t0
    idle.close()
    assert took < SHUTDOWN_S, f"SIGTERM took {took:.1f} s"
    assert not _left(children), _left(children)  # no process, zombies included
    assert "SIGTERM: stopping" in server.stderr.read_text() and "] stopped" in server.stderr.read_text()
    summary = re.search(r"image cache: (\d+) hits, (\d+) misses, (\d+) evictions", server.stderr.read_text())
    assert summary and int(summary[1]) > 0 and int(summary[2]) > 0, server.stderr.read_text()


def _left(procs) -> list[str]:
    """Those of `procs` (psutil.Process) that still exist, zombies included (same pid and start time)."""
    import psutil

    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {p.name()} {p.status()}")
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.parametrize("moment, sig, group", [("loading stage", signal.SIGTERM, False),
                                                ("warm-up single-pass", signal.SIGINT, False),
                                                ("starting Triton", signal.SIGINT, True)],
                         ids=["sigterm-loading", "sigint-warm-up", "sigint-group-triton-start"])
def test_signal_at_any_moment_stops_within_the_bound(export_tiny, tmp_path, moment, sig, group):
    """SIGTERM/SIGINT (to csprt serve, or to its whole process group as Ctrl-C sends it) while it loads, warms up
    or starts Triton: exit 0 within SHUTDOWN_S, one progress line, no traceback, no process left."""
    import os
    import subprocess
    import sys

    import psutil

    from tools.serve_bench import REPO

    http, grpc, metrics = free_ports(3)
    err = tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "tools", "serve", str(export_tiny()), "--http-port", str(http), "--grpc-port",
           str(grpc), "--metrics-port", str(metrics), "--log-dir", str(tmp_path / "logs")]
    with open(err, "w") as fe:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=fe, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    names: dict[int, str] = {}
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while moment not in err.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.01)
        if group:  # let tritonserver come up far enough to have started its children
            until = time.monotonic() + 1.0
            while time.monotonic() < until:
                for c in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        names[c.pid] = c.name()
                        seen[c.pid] = c
                time.sleep(0.05)
        t0 = time.monotonic()
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        rc = proc.wait(STOP_TIMEOUT_S)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = err.read_text()
    assert rc == 0 and took < SHUTDOWN_S, (rc, took, text)
    assert "Traceback" not in text and all(ln.startswith("[csprt serve]") for ln in text.splitlines() if ln), text
    assert f"{signal.Signals(sig).name}: stop" in text, text
    assert not _left(seen.values()), _left(seen.values())
    if group:
        assert "tritonserver" in names.values(), names  # the signal came with Triton's processes running
