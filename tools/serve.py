"""`csprt serve`: serve an artifact's pipeline as a Triton model (KServe v2 HTTP and gRPC) through PyTriton.

Every stage is loaded and one warm-up request per mode runs before Triton starts, so /v2/health/ready
is true only when the whole pipeline works. Binds to 127.0.0.1 unless --host says otherwise.

Batching: Triton's dynamic batcher groups requests (up to --max-batch-size, waiting up to
--max-queue-delay-us for more once one is queued) into one call, and csprt runs the group as ONE batched
pipeline call (ArtifactSession.segment_batch; one per mode when modes mix). Each request is checked alone
first: a bad one gets its own error, the rest of its group is answered. --max-batch-size is at most the
artifact's exported maximum (csprt export --max-batch, default 8); --max-batch-size 1 turns batching off.

--image-cache-mb: the image-only stages' outputs (CLIP side, SAM image embedding) are kept per image
(key: sha256 of the bytes and the preprocessing settings), so a further question about the same
image runs only the stages that read the query. One cache serves every instance; least recently
used entries are evicted past the bound; cache hits and misses share a batch. Each response's timings
carry image_cache_hit (1 or 0) and batch_size (requests in its pipeline call); hits, misses and
evictions go to the log (every 100 lookups) and to stderr at shutdown. --instances runs N independent
copies of the pipeline, each on its own thread.

/v2/health/ready turns true only once model csprt is loaded and answers (the model is loaded while
tritonserver starts, before its endpoints open). SIGTERM or SIGINT at any moment (loading, warm-up, Triton
start, serving) ends csprt serve within 10 s, exit 0: requests in flight finish first (up to 5 s; idle
keep-alive connections are not waited for), then Triton stops, and no child process is left, zombies
included (tools/serve_lifecycle.py). Triton's own logs go to --log-dir.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import socket
import sys
import shutil
import tempfile
import time
from pathlib import Path

from graphs.errors import InputError, ToolchainError

BACKENDS = ("onnxruntime", "tensorrt")
DEFAULT_IMAGE_CACHE_MB = 512  # LISA-7B fp16 keeps ~4.7 MB per image (CLIP side + SAM embedding): ~100 images


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="serve an artifact through Triton (PyTriton): HTTP/gRPC, dynamic batching",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, help="artifact directory (from csprt export)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="Defaults to onnxruntime.")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N. Defaults to cpu (cuda for --backend tensorrt).")
    p.add_argument("--host", default=None, help="address to bind. Defaults to 127.0.0.1 (loopback only).")
    p.add_argument("--http-port", type=int, default=None, help="Defaults to 8000.")
    p.add_argument("--grpc-port", type=int, default=None, help="Defaults to 8001.")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics. Defaults to 8002.")
    p.add_argument("--instances", type=int, default=None,
                   help="model instances, each with its own pipeline and thread. Defaults to 1.")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="requests Triton groups into one batched pipeline call, at most the artifact's exported "
                        "maximum (csprt export --max-batch); 1 turns batching off. Defaults to 8, or the exported "
                        "maximum if lower.")
    p.add_argument("--max-queue-delay-us", type=int, default=None,
                   help="how long Triton's dynamic batcher may hold a request to fill a batch, in microseconds; 0: "
                        "only requests already queued are grouped. Defaults to 2000 (2 ms).")
    p.add_argument("--max-image-bytes", type=int, default=None, help="per-request encoded image limit. Defaults to 32 MiB.")
    p.add_argument("--max-image-pixels", type=int, default=None,
                   help="per-request width x height limit. Defaults to 64 Mi (8192 x 8192).")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generate mode only. Defaults to the artifact's exported limit, at most 32.")
    p.add_argument("--image-cache-mb", type=int, default=None,
                   help="image encodings kept for further questions about the same image (key: the image bytes' "
                        "sha256 and the preprocessing settings; shared by the instances; least recently used "
                        f"evicted; GPU memory with --backend tensorrt); 0 turns it off. Defaults to {DEFAULT_IMAGE_CACHE_MB}.")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="where tritonserver.log and pytriton.log go. Defaults to a new temporary directory.")
    p.set_defaults(func=run)


def _progress(msg: str) -> None:
    print(f"[csprt serve] {msg}", file=sys.stderr, flush=True)


def _positive(name: str, value: int | None, default: int, low: int = 1, high: int | None = None) -> int:
    value = default if value is None else value
    if value < low or (high is not None and value > high):
        rng = f"{low}..{high}" if high is not None else f">= {low}"
        raise InputError(f"--{name} {value}: expected {rng}")
    return value


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Fail early, with the flag to change, when a port is taken (tritonserver would exit with a log line)."""
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if port in seen:
            raise InputError(f"--{name} {port} is also --{seen[port]}; give each endpoint its own port")
        seen[port] = name
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
                raise InputError(f"port {port} on {host} {why}; pass another --{name}"
                                 + (" or another --host" if e.errno != errno.EADDRINUSE else "")) from None


@contextlib.contextmanager
def _quiet_stdout(path: Path):
    """PyTriton echoes tritonserver's console (NVML/CUDA warnings on CPU hosts) to stdout; send it to a file."""
    with open(path, "a", buffering=1) as f:
        saved, sys.stdout = sys.stdout, f
        try:
            yield
        finally:
            sys.stdout = saved


def _log_to(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("pytriton", "csprt.serve"):
        log = logging.getLogger(name)
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def run(args: argparse.Namespace) -> int:
    from engines.batching import DEFAULT_MAX_QUEUE_DELAY_US, served_max_batch
    from engines.serving import DEFAULT_MAX_IMAGE_BYTES, Limits, fix_libpython_env
    from graphs.imageio import MAX_IMAGE_PIXELS
    from graphs.manifest import is_artifact_dir, load_artifact

    if not is_artifact_dir(args.artifact):
        raise InputError(f"{args.artifact} is not an artifact (no manifest.json); export one first: "
                         f"csprt export CHECKPOINT --schedule NAME --out {args.artifact}")
    host = args.host or "127.0.0.1"
    ports = {"http-port": _positive("http-port", args.http_port, 8000, 1, 65535),
             "grpc-port": _positive("grpc-port", args.grpc_port, 8001, 1, 65535),
             "metrics-port": _positive("metrics-port", args.metrics_port, 8002, 1, 65535)}
    instances = _positive("instances", args.instances, 1)
    max_batch = served_max_batch(args.max_batch_size, load_artifact(args.artifact, verify=False))
    queue_delay = _positive("max-queue-delay-us", args.max_queue_delay_us, DEFAULT_MAX_QUEUE_DELAY_US, 0)
    limits = Limits(_positive("max-image-bytes", args.max_image_bytes, DEFAULT_MAX_IMAGE_BYTES),
                    _positive("max-image-pixels", args.max_image_pixels, MAX_IMAGE_PIXELS))
    if args.max_new_tokens is not None:
        _positive("max-new-tokens", args.max_new_tokens, 1)
    cache_mb = _positive("image-cache-mb", args.image_cache_mb, DEFAULT_IMAGE_CACHE_MB, 0)
    backend = args.backend or "onnxruntime"
    try:
        importlib.import_module("pytriton.triton")
    except ImportError as e:
        raise ToolchainError(f"csprt serve needs PyTriton ({e}); install it: pip install -e '.[serve]'") from None
    warning = fix_libpython_env()
    if warning:
        _progress(f"warning: {warning}")
    check_ports(host, ports)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="csprt-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    _log_to(log_dir / "pytriton.log")

    from engines.image_cache import MIB, ImageCache
    from engines.serving import SegmentModel, load_session
    from tools.serve_lifecycle import Lifecycle, Stopping

    sessions, cache, t0 = [], ImageCache(cache_mb * MIB), time.monotonic()
    with Lifecycle(_progress) as life:
        try:
            for i in range(instances):
                label = f"instance {i + 1}/{instances}: " if instances > 1 else ""
                sessions.append(load_session(args.artifact, backend, args.device, _progress, label))
            models = [SegmentModel(s, limits, args.max_new_tokens, cache=cache, max_batch=max_batch) for s in sessions]
            return _serve(models, host, ports, max_batch, queue_delay, log_dir, life, t0)
        except Stopping as stop:
            _progress(f"{stop}: stopped before serving")
            return 0
        except Exception:
            # A signal that lands inside a C extension's import or call surfaces as that call's error (an
            # interrupted `import onnxruntime` is "ImportError: initialization failed"), not as Stopping.
            if not life.stop.is_set():
                raise
            _progress(f"{life.why}: stopped before serving")
            return 0
        finally:
            for s in sessions:
                s.close()
            if cache.enabled:
                _progress(cache.summary())
                logging.getLogger("csprt.serve").info(cache.summary())


def _serve(models, host: str, ports: dict[str, int], max_batch: int, queue_delay_us: int, log_dir: Path, life,
           t0: float) -> int:
    """Start Triton with `models` loaded at its start, serve until a signal, stop within the lifecycle's budget."""
    from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy
    from pytriton.utils.workspace import Workspace

    from engines.serving import MODEL_NAME, bind, patch_model_store
    from tools.serve_lifecycle import DRAIN_S, TRITON_EXIT_S, stop_triton

    config = TritonConfig(http_address=host, http_port=ports["http-port"], grpc_address=host,
                          grpc_port=ports["grpc-port"], metrics_address=host, metrics_port=ports["metrics-port"],
                          allow_gpu_metrics=False, strict_readiness=True, exit_timeout_secs=TRITON_EXIT_S,
                          log_verbose=0, log_file=log_dir / "tritonserver.log")
    # A local model store: the model is written before tritonserver starts and loaded during its start, so its
    # endpoints open, and /v2/health/ready turns true, only with model csprt loaded (PyTriton's default loads
    # it through the API after the server reports ready: ready ~2 s before a request could succeed).
    policy = TritonLifecyclePolicy(launch_triton_on_startup=True, local_model_store=True)
    workspace = Workspace(Path(tempfile.mkdtemp(prefix="csprt-serve-workspace-")) / "ws")
    _progress(f"starting Triton (logs: {log_dir})")
    triton = None
    try:
        with _quiet_stdout(log_dir / "pytriton.log"):
            try:
                triton = Triton(config=config, workspace=workspace, triton_lifecycle_policy=policy)
                bind(triton, [life.counted(m) for m in models], max_batch, queue_delay_us)
                patch_model_store(workspace.model_store_path)
                try:
                    triton.run()
                except Exception as e:  # noqa: BLE001 - PyTriton raises several kinds; all mean "did not start"
                    raise ToolchainError(f"Triton did not start ({type(e).__name__}: {e}); "
                                         f"see {log_dir / 'tritonserver.log'}") from None
                life.serving()
                if life.stop.is_set():  # signalled between the start and this line
                    raise _stopped(life)
                _progress(f"ready on http://{host}:{ports['http-port']} grpc {host}:{ports['grpc-port']} "
                          f"metrics http://{host}:{ports['metrics-port']}/metrics: model {MODEL_NAME!r}, "
                          f"{len(models)} instance(s), max batch size {max_batch} "
                          f"(queue delay {queue_delay_us} us), image cache "
                          + (f"{models[0].cache.max_bytes // 2**20} MiB" if models[0].cache.enabled else "off")
                          + f"; {time.monotonic() - t0:.1f} s after start")
                while not life.stop.wait(0.5):
                    if not triton.is_alive():
                        raise ToolchainError(f"Triton stopped unexpectedly; see {log_dir / 'tritonserver.log'}")
                _progress(f"{life.why}: stopping; requests in flight get up to {DRAIN_S:g} s")
                running = life.drain(min(DRAIN_S, life.left() - 4.0))
                if running:
                    _progress(f"{running} request(s) still running after {DRAIN_S:g} s; stopping anyway")
            finally:
                stop_triton(triton, life)
    finally:
        shutil.rmtree(workspace.path.parent, ignore_errors=True)
    _progress("stopped")
    return 0


def _stopped(life):
    from tools.serve_lifecycle import Stopping

    return Stopping(life.why)
