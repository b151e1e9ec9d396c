"""Benchmark `csprt serve` with Triton's dynamic batching off and on: throughput and latency under load.

    python -m tools.serve_bench ART [--clients 8] [--requests 25] [--max-batch-sizes 1,8] [--instances 1]
        [--protocol http|grpc]

Starts one `csprt serve` per max batch size (1 = no grouping) on free loopback ports, sends
clients x requests requests (two photos, single-pass and generate, alternating), checks every
answer against the first one for the same input, and prints requests/s, p50/p99 latency and the
mean number of requests Triton grouped per model call (from its metrics).
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
            stop_timeout_s: float = 90):
    """`csprt serve ART` in a subprocess on free ports, ready when the context is entered; SIGTERM on exit
    (SIGKILL to its process group if it outlives stop_timeout_s).

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
        while "] ready on " not in err.read_text():
            if proc.poll() is not None:
                raise RuntimeError(f"csprt serve exited with {proc.returncode} before ready:\n{err.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"csprt serve not ready after {start_timeout_s} s:\n{err.read_text()}")
            time.sleep(0.5)
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
         timeout_s: float = 60, deadline_s: float = 1200) -> types.SimpleNamespace:
    """clients threads x per_client requests; client i's request j is cases[(i + j) % len(cases)].

    Args:
        server: what `serving` yields.
        cases (Sequence[tuple[bytes, str, str]]): (encoded image, query, mode).
        clients (int): concurrent clients, each with its own connection. Defaults to 8.
        per_client (int): requests per client, sent one after another. Defaults to 25.
        protocol (str | None): "http" or "grpc"; None alternates by client. Defaults to None.
        check (Callable[[int, dict], None] | None): called with (case index, result); raise to fail. Defaults to None.
        timeout_s (float): per request. Defaults to 60.
        deadline_s (float): for the whole run. Defaults to 1200.

    Returns:
        SimpleNamespace: wall_s, latencies_s (list), failures (list of str), mean_batch (requests per model call).
    """
    latencies, failures = [], []
    requests0, calls0 = _metric(server.metrics, "nv_inference_request_success"), _metric(server.metrics, "nv_inference_exec_count")

    def work(i: int):
        proto = protocol or ("http", "grpc")[i % 2]
        mod = client_module(proto)
        url = server.http if proto == "http" else server.grpc
        client = (mod.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
                  if proto == "http" else mod.InferenceServerClient(url))
        try:
            for j in range(per_client):
                k = (i + j) % len(cases)
                t0 = time.perf_counter()
                try:
                    r = segment(client, mod, *cases[k], timeout_s=timeout_s)
                    latencies.append(time.perf_counter() - t0)
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
                                 mean_batch=requests / calls if calls else float("nan"))


def summary(stats) -> str:
    ms = np.percentile(np.asarray(stats.latencies_s) * 1000, [50, 99]) if stats.latencies_s else (np.nan, np.nan)
    n = len(stats.latencies_s)
    return (f"{n} requests in {stats.wall_s:.1f} s: {n / stats.wall_s:.2f} req/s, p50 {ms[0]:.0f} ms, "
            f"p99 {ms[1]:.0f} ms, mean Triton batch {stats.mean_batch:.2f}")


def default_cases() -> list[tuple[bytes, str, str]]:
    """scikit-image's chelsea (PNG, single-pass) and astronaut (128 x 128 JPEG, generate)."""
    from PIL import Image
    from skimage import data

    def enc(image, fmt, **kw):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=fmt, **kw)
        return buf.getvalue()

    return [(enc(data.chelsea(), "PNG"), "Where is the cat?", "single-pass"),
            (enc(data.astronaut()[::4, ::4], "JPEG", quality=90), "Segment the person.", "generate")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.serve_bench", description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="per client")
    p.add_argument("--max-batch-sizes", default="1,8", help="comma-separated; 1 = no dynamic batching")
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--protocol", choices=("http", "grpc"), default=None, help="Defaults to alternating by client.")
    args = p.parse_args(argv)

    cases, first = default_cases(), {}

    def same_as_first(k: int, r: dict) -> None:
        key = (r["mask_png"], r["answer"], tuple(r["generated_ids"]))
        if first.setdefault(k, key) != key:
            raise AssertionError(f"case {k}: result differs from the first one")

    failed = False
    for mbs in (int(v) for v in args.max_batch_sizes.split(",")):
        print(f"[serve-bench] max batch size {mbs}, {args.instances} instance(s): starting csprt serve",
              file=sys.stderr, flush=True)
        with serving(args.artifact, ["--max-batch-size", str(mbs), "--instances", str(args.instances)]) as server:
            load(server, cases, clients=2, per_client=2, protocol=args.protocol)  # connections and caches warm
            stats = load(server, cases, args.clients, args.requests, args.protocol, check=same_as_first)
        print(f"max batch size {mbs}: {summary(stats)}", flush=True)
        for f in stats.failures[:5]:
            print(f"  failed: {f}", flush=True)
        failed |= bool(stats.failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
