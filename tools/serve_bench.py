"""Benchmark `csprt serve`: dynamic batching off and on, the image cache off and on; throughput and latency.

    python -m tools.serve_bench ART [--clients 8] [--requests 25 | --total N] [--max-batch-sizes 8,1]
        [--image-cache-mb 512] [--images 2] [--instances 1] [--protocol http|grpc] [--rounds 1]
        [--max-queue-delay-us US] [--json PATH]

Starts one `csprt serve` per (max batch size, image cache size) on free loopback ports (max batch size
1 = no batching, cache 0 = off), all of them before any measurement, then runs the configurations in
turn, --rounds times (interleaved: 8, 1, 8, 1 ..., so drift on a shared machine hits each alike; an idle
server costs no CPU). Each run sends clients x requests requests (or --total, spread over the clients),
checks every answer against the first one for the same input, and prints requests/s, p50/p99 latency,
the mean number of requests Triton grouped per model call (from its metrics), the mean batch of the
pipeline calls that answered them and how many were image cache hits (from each response's timings).

Inputs: --images 2 (default) is two photos, single-pass and generate, alternating. --images N > 2 is N
photos from scikit-image with 4 single-pass questions each, interleaved so that consecutive requests
are about different images (many questions about a few images: what the image cache is for). The
warm-up uses an image of its own, so the cache starts empty.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from engines.serving import MODEL_NAME
from tools.triton_client import client_module, segment

REPO = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (free now; a race with other processes is possible)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def serving(art: str | Path, flags: Sequence[str] = (), log_dir: str | Path | None = None, start_timeout_s: float = 300,
            stop_timeout_s: float = 90, ready: str = "line"):
    """`csprt serve ART` in a subprocess on free ports, ready when the context is entered; SIGTERM on exit
    (SIGKILL to its process group if it outlives stop_timeout_s).

    Args:
        ready (str): "line": ready once csprt serve prints "ready on"; "probe": once its /v2/health/ready
            answers 200 (what an orchestrator's readiness probe sees). Defaults to "line".

    Yields:
        SimpleNamespace: proc, http / grpc ("host:port"), metrics (URL), stdout / stderr (paths), log_dir.
    """
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="csprt-serve-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "tools", "serve", str(art), "--http-port", str(http), "--grpc-port", str(grpc),
           "--metrics-port", str(metrics), "--log-dir", str(log_dir / "triton"), *flags]
    out, err = log_dir / "stdout.txt", log_dir / "stderr.txt"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        def up() -> bool:
            if ready == "line":
                return "] ready on " in err.read_text()
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2).status == 200
            except OSError:
                return False

        while not up():
            if proc.poll() is not None:
                raise RuntimeError(f"csprt serve exited with {proc.returncode} before ready:\n{err.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"csprt serve not ready after {start_timeout_s} s:\n{err.read_text()}")
            time.sleep(0.5 if ready == "line" else 0.02)
        yield types.SimpleNamespace(proc=proc, http=f"127.0.0.1:{http}", grpc=f"127.0.0.1:{grpc}",
                                    metrics=f"http://127.0.0.1:{metrics}/metrics", stdout=out, stderr=err,
                                    log_dir=log_dir)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                import os

                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(v) for v in re.findall(rf'^{name}{{[^}}]*model="{MODEL_NAME}"[^}}]*}} (\S+)', text, re.M))


def load(server, cases: Sequence[tuple[bytes, str, str]], clients: int = 8, per_client: int = 25,
         protocol: str | None = None, check: Callable[[int, dict], None] | None = None,
         timeout_s: float = 60, deadline_s: float = 1200, total: int | None = None) -> types.SimpleNamespace:
    """clients threads x per_client requests; client i's request j is cases[(i + j) % len(cases)] (with `total`:
    cases[(i + j * clients) % len(cases)], so every case is sent equally often).

    Args:
        server: what `serving` yields.
        cases (Sequence[tuple[bytes, str, str]]): (encoded image, query, mode).
        clients (int): concurrent clients, each with its own connection. Defaults to 8.
        per_client (int): requests per client, sent one after another. Defaults to 25.
        protocol (str | None): "http" or "grpc"; None alternates by client. Defaults to None.
        check (Callable[[int, dict], None] | None): called with (case index, result); raise to fail. Defaults to None.
        timeout_s (float): per request. Defaults to 60.
        deadline_s (float): for the whole run. Defaults to 1200.
        total (int | None): requests in all, spread over the clients (overrides per_client). Defaults to None.

    Returns:
        SimpleNamespace: wall_s, latencies_s (list), failures (list of str), mean_batch (requests per model call),
        cache_hits (responses whose timings say image_cache_hit), pipeline_batch (mean batch_size of the
        pipeline calls that answered, per request).
    """
    latencies, failures, hits, batches = [], [], [], []
    requests0, calls0 = _metric(server.metrics, "nv_inference_request_success"), _metric(server.metrics, "nv_inference_exec_count")
    counts = [per_client] * clients if total is None else [total // clients + (i < total % clients) for i in range(clients)]

    def work(i: int):
        proto = protocol or ("http", "grpc")[i % 2]
        mod = client_module(proto)
        url = server.http if proto == "http" else server.grpc
        client = (mod.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
                  if proto == "http" else mod.InferenceServerClient(url))
        try:
            for j in range(counts[i]):
                k = (i + j if total is None else i + j * clients) % len(cases)
                t0 = time.perf_counter()
                try:
                    r = segment(client, mod, *cases[k], timeout_s=timeout_s)
                    latencies.append(time.perf_counter() - t0)
                    hits.append(int(r["timings_ms"].get("image_cache_hit", 0)))
                    batches.append(int(r["timings_ms"].get("batch_size", 1)))
                    if check is not None:
                        check(k, r)
                except Exception as e:  # noqa: BLE001 - collected for the caller
                    failures.append(f"client {i} request {j} ({proto}, case {k}): {type(e).__name__}: {e}")
        finally:
            client.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.1, t0 + deadline_s - time.perf_counter()))
    wall = time.perf_counter() - t0
    if any(t.is_alive() for t in threads):
        failures.append(f"clients still running after {deadline_s} s")
    requests = _metric(server.metrics, "nv_inference_request_success") - requests0
    calls = _metric(server.metrics, "nv_inference_exec_count") - calls0
    return types.SimpleNamespace(wall_s=wall, latencies_s=list(latencies), failures=failures,
                                 mean_batch=requests / calls if calls else float("nan"), cache_hits=sum(hits),
                                 pipeline_batch=float(np.mean(batches)) if batches else float("nan"))


def figures(stats) -> dict:
    """requests, wall_s, req_per_s, p50_ms, p99_ms, mean_triton_batch, mean_pipeline_batch, cache_hits, failures."""
    ms = np.percentile(np.asarray(stats.latencies_s) * 1000, [50, 99]) if stats.latencies_s else (np.nan, np.nan)
    n = len(stats.latencies_s)
    return {"requests": n, "wall_s": round(stats.wall_s, 3), "req_per_s": round(n / stats.wall_s, 3),
            "p50_ms": round(float(ms[0]), 1), "p99_ms": round(float(ms[1]), 1),
            "mean_triton_batch": round(stats.mean_batch, 3),
            "mean_pipeline_batch": round(getattr(stats, "pipeline_batch", float("nan")), 3),
            "cache_hits": stats.cache_hits, "failures": len(stats.failures)}


def summary(stats) -> str:
    f = figures(stats)
    return (f"{f['requests']} requests in {f['wall_s']:.1f} s: {f['req_per_s']:.2f} req/s, p50 {f['p50_ms']:.0f} ms, "
            f"p99 {f['p99_ms']:.0f} ms, mean Triton batch {f['mean_triton_batch']:.2f}, mean pipeline batch "
            f"{f['mean_pipeline_batch']:.2f}, image cache hits {f['cache_hits']}")


def _enc(image, fmt, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kw)
    return buf.getvalue()


def default_cases() -> list[tuple[bytes, str, str]]:
    """scikit-image's chelsea (PNG, single-pass) and astronaut (128 x 128 JPEG, generate)."""
    from skimage import data

    return [(_enc(data.chelsea(), "PNG"), "Where is the cat?", "single-pass"),
            (_enc(data.astronaut()[::4, ::4], "JPEG", quality=90), "Segment the person.", "generate")]


QUESTIONS = ("What is the main object?", "Segment the thing on the left.", "What would you pick up first?",
             "Where is the brightest part?")
_PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "immunohistochemistry", "camera", "coins")  # bundled


def image_cases(n: int) -> list[tuple[bytes, str, str]]:
    """n distinct photos (JPEG, longest side <= 512) x the 4 QUESTIONS, single-pass, interleaved by image."""
    from skimage import data

    if not 1 <= n <= len(_PHOTOS):
        raise SystemExit(f"--images {n}: choose 1..{len(_PHOTOS)}")
    photos = []
    for name in _PHOTOS[:n]:
        image = getattr(data, name)()
        image = np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]
        step = max(1, -(-max(image.shape[:2]) // 512))
        photos.append(_enc(np.ascontiguousarray(image[::step, ::step]), "JPEG", quality=90))
    return [(photo, q, "single-pass") for q in QUESTIONS for photo in photos]


def _warmup_case() -> tuple[bytes, str, str]:
    noise = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    return (_enc(noise, "PNG"), "warm up", "single-pass")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.serve_bench", description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="per client")
    p.add_argument("--total", type=int, default=None, help="requests in all, spread over the clients (instead of --requests)")
    p.add_argument("--max-batch-sizes", default="8,1", help="comma-separated, run in this order; 1 = no batching")
    p.add_argument("--image-cache-mb", default=None, help="comma-separated csprt serve --image-cache-mb values; 0 = off. "
                                                          "Defaults to csprt serve's default")
    p.add_argument("--images", type=int, default=2, help="distinct images (see the module doc)")
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--protocol", choices=("http", "grpc"), default=None, help="Defaults to alternating by client.")
    p.add_argument("--rounds", type=int, default=1, help="runs of every configuration, interleaved. Defaults to 1.")
    p.add_argument("--max-queue-delay-us", type=int, default=None, help="csprt serve's. Defaults to its default.")
    p.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    args = p.parse_args(argv)

    cases, first = (default_cases() if args.images == 2 else image_cases(args.images)), {}

    def same_as_first(k: int, r: dict) -> None:
        key = (r["mask_png"], r["answer"], tuple(r["generated_ids"]))
        if first.setdefault(k, key) != key:
            raise AssertionError(f"case {k}: result differs from the first one")

    caches = [None] if args.image_cache_mb is None else [int(v) for v in args.image_cache_mb.split(",")]
    configs = [(int(mbs), mb) for mbs in args.max_batch_sizes.split(",") for mb in caches]
    runs, failed = [], False
    with contextlib.ExitStack() as stack:
        servers = {}
        for mbs, mb in configs:  # every server up (loaded, warmed) before the first measurement
            flags = ["--max-batch-size", str(mbs), "--instances", str(args.instances)]
            flags += [] if mb is None else ["--image-cache-mb", str(mb)]
            flags += [] if args.max_queue_delay_us is None else ["--max-queue-delay-us", str(args.max_queue_delay_us)]
            print(f"[serve-bench] starting csprt serve {' '.join(flags)}", file=sys.stderr, flush=True)
            servers[mbs, mb] = server = stack.enter_context(serving(args.artifact, flags))
            load(server, [_warmup_case()], clients=2, per_client=2, protocol=args.protocol)  # connections warm
        for r in range(args.rounds):
            for mbs, mb in configs:
                what = f"max batch size {mbs}" + ("" if mb is None else f", image cache {mb} MiB" if mb else ", image cache off")
                stats = load(servers[mbs, mb], cases, args.clients, args.requests, args.protocol, check=same_as_first,
                             total=args.total)
                print(f"round {r + 1}, {what}, {args.instances} instance(s): {summary(stats)}", flush=True)
                for f in stats.failures[:5]:
                    print(f"  failed: {f}", flush=True)
                failed |= bool(stats.failures)
                runs.append({"round": r + 1, "max_batch_size": mbs, "image_cache_mb": mb, "instances": args.instances,
                             "clients": args.clients, **figures(stats)})
    if args.json is not None:
        import json

        args.json.write_text(json.dumps({"artifact": str(args.artifact), "argv": sys.argv[1:] if argv is None else argv,
                                         "runs": runs}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
