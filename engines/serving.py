"""The artifact's pipeline as a Triton model (PyTriton): request tensors in, masks and text out.

    group of requests (Triton's dynamic batcher, up to --max-batch-size, waiting up to --max-queue-delay-us)
      -> per request: decode_request, check_query (exported text ranges), image cache (sha256 of the bytes +
         image settings; engines.image_cache): hit -> its ImageEncoding; miss -> decode the image
         (a bad request gets its own error here; identical image bytes in a group are decoded once)
      -> engines.batching.run_items: one ArtifactSession.segment_batch per mode, at most the artifact's
         --max-batch requests each; hits and misses in one batch; misses' encodings are cached
      -> encode_response per request
    response mask_png BYTES [1], masks_packed UINT8 [-1], masks_shape INT64 [3], mask_logits FP32 [-1, -1, -1]?,
             answer BYTES [1], generated_ids INT64 [-1], timings BYTES [1] (JSON)[, host_steps BYTES [1] (JSON:
             an ACCM artifact's candidate captions and the chosen one)]

Shapes are per request, without Triton's batch dim (clients send [1, 1] for a BYTES [1] input); an output
with no elements is left out of the response (PyTriton cannot send zero-size tensors). Each request's
result equals the request run alone (the stage graphs pad per request and mask the padding).

A bad request (HTTP 400 / gRPC INVALID_ARGUMENT) leaves the other requests of its group alone: PyTriton
0.7.0 would fail the whole group on an exception, so `install_per_request_errors` adds a small override
to the proxy model PyTriton loads into Triton.

PyTriton is imported lazily, so `engines` imports without it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sysconfig
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from engines.batching import DEFAULT_MAX_QUEUE_DELAY_US, Item, check_query, run_items
from engines.pipeline import DecodeIds
from graphs.errors import InputError, ToolchainError
from graphs.imageio import MAX_IMAGE_PIXELS, decode_image_bytes, mask_png_bytes, pack_masks
from graphs.prompt import MODES, prompt_text

MODEL_NAME = "csprt"
DEFAULT_MAX_IMAGE_BYTES = 32 * 2**20  # 32 MiB: a 64 MP JPEG is ~20 MB; Triton's HTTP input limit is 64 MB
ERROR_OUTPUT = "__csprt_error__"  # a response entry that becomes a per-request Triton error (see PROXY_PATCH)

LOGGER = logging.getLogger("csprt.serve")

# name -> (Triton dtype, shape without the batch dim, optional, what it is). The README documents this table.
INPUTS = {
    "image": ("BYTES", (1,), False, "encoded JPEG/PNG/WebP file"),
    "query": ("BYTES", (1,), False, "UTF-8 question, e.g. 'Where is the cat?'"),
    "mode": ("BYTES", (1,), True, "'single-pass' (default) or 'generate'"),
    "return_logits": ("BOOL", (1,), True, "also return mask_logits (default false)"),
}
OUTPUTS = {
    "mask_png": ("BYTES", (1,), "union of the masks at the input size, 8-bit PNG 0/255 (csprt run's mask.png)"),
    "masks_packed": ("UINT8", (-1,), "np.packbits of the bool masks [K, H, W] (C order, big bit order); absent if K = 0"),
    "masks_shape": ("INT64", (3,), "[K, H, W] of masks_packed"),
    "mask_logits": ("FP32", (-1, -1, -1), "[K, H, W] float32 logits; only with return_logits, absent if K = 0"),
    "answer": ("BYTES", (1,), "UTF-8 text answer"),
    "generated_ids": ("INT64", (-1,), "generated token ids; absent in single-pass mode (none generated)"),
    "timings": ("BYTES", (1,), "JSON: ms per stage, decode_image, segment, encode; image_cache_hit 1 or 0"),
    "host_steps": ("BYTES", (1,), "JSON of what the artifact's host steps report: an ACCM artifact's "
                                  "{\"accm\": {candidates, chosen, caption, beam_scores, selector_probs, picks}}; "
                                  "absent when the artifact has none"),
}
_NP = {"BYTES": bytes, "BOOL": np.bool_, "UINT8": np.uint8, "INT64": np.int64, "FP32": np.float32}


# -- libpython: the Python backend stub must load this interpreter's libpython -------------------
def libpython_ld_path(ld_path: str | None, libdir: str | None, soname: str | None,
                      exists: Callable[[str], bool] = os.path.exists) -> tuple[str | None, str | None]:
    """LD_LIBRARY_PATH with this interpreter's libpython directory first.

    Triton's Python backend stub links `libpython3.X.so`; the loader's first match must be the running
    interpreter's own, or model load fails ("'_thread.RLock' object has no attribute '_recursion_count'")
    when the system has another patch release of the same Python.

    Args:
        ld_path (str | None): the current LD_LIBRARY_PATH (None: unset).
        libdir (str | None): sysconfig LIBDIR.
        soname (str | None): sysconfig INSTSONAME, e.g. "libpython3.11.so.1.0".
        exists (Callable[[str], bool]): file test. Defaults to os.path.exists.

    Returns:
        tuple[str | None, str | None]: the new LD_LIBRARY_PATH (unchanged when nothing to do), and a
        one-line warning when this interpreter's libpython cannot be found.
    """
    if not libdir or not soname or not soname.startswith("libpython") or not exists(os.path.join(libdir, soname)):
        where = os.path.join(libdir, soname) if libdir and soname else "sysconfig LIBDIR/INSTSONAME"
        return ld_path, (f"cannot find this interpreter's shared libpython ({where}); if the model fails to load with "
                         "'_recursion_count', put the directory of a matching libpython3.X.so first on LD_LIBRARY_PATH")
    rest = [p for p in (ld_path or "").split(os.pathsep) if p and os.path.normpath(p) != os.path.normpath(libdir)]
    return os.pathsep.join([libdir, *rest]), None


def fix_libpython_env(environ: dict = os.environ) -> str | None:
    """Put this interpreter's libpython first on `environ["LD_LIBRARY_PATH"]` (PyTriton copies os.environ
    into tritonserver's environment when it starts it). Returns a one-line warning or None."""
    path, warning = libpython_ld_path(environ.get("LD_LIBRARY_PATH"), sysconfig.get_config_var("LIBDIR"),
                                      sysconfig.get_config_var("INSTSONAME"))
    if path:
        environ["LD_LIBRARY_PATH"] = path
    return warning


# -- requests --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """Per-request limits. max_image_bytes: encoded size; max_image_pixels: width x height."""

    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class SegmentRequest:
    image: bytes
    query: str
    mode: str
    return_logits: bool


def _scalar(request: Mapping[str, np.ndarray], name: str):
    """The one element of a per-request tensor [1, 1] (batch dim included), or None if absent."""
    if name not in request:
        return None
    value = np.asarray(request[name])
    if value.size != 1:
        raise InputError(f"input {name!r}: expected shape [1, 1] (one {INPUTS[name][0]} element per request, "
                         f"batch dim included), got {list(value.shape)}; send one image per request, Triton's "
                         "dynamic batcher groups requests on the server")
    return value.reshape(-1)[0]


def _bytes(request: Mapping[str, np.ndarray], name: str) -> bytes | None:
    v = _scalar(request, name)
    if v is None:
        return None
    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, (bytes, np.bytes_)):
        return bytes(v)
    raise InputError(f"input {name!r}: expected BYTES, got {type(v).__name__}")


def decode_request(request: Mapping[str, np.ndarray], limits: Limits = Limits(),
                   modes: Sequence[str] = MODES) -> SegmentRequest:
    """Check one request's tensors (Triton has checked names, dtypes and ranks against the model config).

    Args:
        request (Mapping[str, np.ndarray]): input name -> array [1, 1] (see INPUTS).
        limits (Limits): size limits. Defaults to Limits().
        modes (Sequence[str]): the artifact's modes. Defaults to both.

    Returns:
        SegmentRequest: the encoded image (not decoded yet), query, mode and return_logits.

    Raises:
        InputError: a missing or empty input, a wrong shape, a query that is not UTF-8 or empty,
            an unknown mode, or an image over `limits.max_image_bytes`.
    """
    image, raw_query = _bytes(request, "image"), _bytes(request, "query")
    for name, value in (("image", image), ("query", raw_query)):
        if value is None:
            raise InputError(f"input {name!r} is missing; send {name} as BYTES [1, 1] ({INPUTS[name][3]})")
    if len(image) > limits.max_image_bytes:
        raise InputError(f"input 'image': {len(image)} bytes, over this server's limit of {limits.max_image_bytes} "
                         "bytes (csprt serve --max-image-bytes); downscale or recompress it")
    try:
        query = raw_query.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"input 'query': not UTF-8 text ({e.reason} at byte {e.start}); encode the query as UTF-8") from None
    raw_mode = _bytes(request, "mode")
    mode = "single-pass" if raw_mode is None else raw_mode.decode("utf-8", "replace").strip()
    prompt_text(query, mode)  # empty query, unknown mode
    if mode not in modes:
        raise InputError(f"input 'mode': {mode!r} is not served by this artifact (exported for {', '.join(modes)}); "
                         f"send one of those, or re-export with --mode both")
    flag = _scalar(request, "return_logits")
    return SegmentRequest(image=image, query=query, mode=mode, return_logits=bool(flag) if flag is not None else False)


def decode_image(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """Encoded bytes -> uint8 RGB [H, W, 3], with the pixel limit checked from the header before decoding."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            w, h = Image.open(io.BytesIO(data)).size  # header only
    except Exception:  # noqa: BLE001 - decode_image_bytes below says what is wrong with the bytes
        w = h = 0
    if w * h > limits.max_image_pixels:
        raise InputError(f"input 'image': {w}x{h} is {w * h} pixels, over this server's limit of "
                         f"{limits.max_image_pixels}; downscale it first")
    return decode_image_bytes(data, name="(input 'image')")


# -- responses -------------------------------------------------------------------------------
def encode_response(seg, hw: tuple[int, int], return_logits: bool, timings_ms: dict[str, float],
                    wanted: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """One request's outputs, each with the batch dim 1 (see OUTPUTS).

    Args:
        seg (Segmentation): what ArtifactSession.segment returned.
        hw (tuple[int, int]): the input image's (H, W), for an empty mask set.
        return_logits (bool): include mask_logits.
        timings_ms (dict[str, float]): serialized as the timings JSON (an "encode" entry is added).
        wanted (Sequence[str] | None): the outputs the client asked for; None: all.

    Returns:
        dict[str, np.ndarray]: output name -> array [1, ...].
    """
    t0 = time.perf_counter()
    want = set(OUTPUTS if not wanted else wanted)
    masks = np.asarray(seg.masks, dtype=bool)  # [K, H, W]
    out = {}
    if "mask_png" in want:
        union = masks.any(axis=0) if len(masks) else np.zeros(hw, dtype=bool)
        out["mask_png"] = np.array([[mask_png_bytes(union)]], dtype=object)
    if want & {"masks_packed", "masks_shape"}:
        out["masks_packed"] = pack_masks(masks)[None]  # [1, ceil(K*H*W / 8)]
        out["masks_shape"] = np.asarray([masks.shape], dtype=np.int64)
    if return_logits and "mask_logits" in want:
        out["mask_logits"] = np.asarray(seg.mask_logits, dtype=np.float32)[None]
    out["answer"] = np.array([[seg.answer.encode("utf-8")]], dtype=object)
    out["generated_ids"] = np.asarray([list(seg.generated_ids)], dtype=np.int64).reshape(1, -1)
    if seg.host_steps:
        out["host_steps"] = np.array([[json.dumps(seg.host_steps).encode("utf-8")]], dtype=object)
    timings = {k: v if isinstance(v, int) else round(float(v), 3) for k, v in timings_ms.items()}  # counts stay ints
    timings["encode"] = round((time.perf_counter() - t0) * 1000, 3)
    out["timings"] = np.array([[json.dumps(timings).encode()]], dtype=object)
    # PyTriton 0.7.0 copies outputs into shared memory: they must be C-contiguous (resized logits are not)
    # and non-empty (a zero-size array fails the whole batch), so an output with no elements is left out.
    return {k: np.ascontiguousarray(v) for k, v in out.items() if k in want and v.size}


def error_response(message: str, internal: bool = False) -> dict[str, np.ndarray]:
    """A response entry the patched proxy turns into this request's Triton error (400, or 500 if internal)."""
    code = "INTERNAL" if internal else "INVALID_ARG"
    return {ERROR_OUTPUT: np.array([[code.encode()], [message.encode("utf-8")]], dtype=object)}


# -- the model callable ----------------------------------------------------------------------
def _log_batch_failure(exc: Exception) -> None:
    LOGGER.warning("a batch failed as a whole (%s: %s); running its requests one by one", type(exc).__name__, exc)


@dataclass(frozen=True)
class _Checked:
    """What SegmentModel keeps of a checked request until its batch is done."""

    key: object            # ImageKey, or None with the cache off
    hit: bool              # the image's encoding came from the cache
    hw: tuple[int, int]    # the input image's (H, W)
    return_logits: bool
    decode_ms: float       # cache lookup and image decoding


class SegmentModel:
    """PyTriton inference callable over one ArtifactSession (one per Triton model instance; an instance's
    requests run on its own thread, so a session is never used by two threads).

    A call gets the group Triton's dynamic batcher formed. Each request is checked alone (tensors, query length,
    image); a bad one gets its own error response. The good ones run as batched pipeline calls
    (engines.batching: one `segment_batch` per mode, at most `max_batch` requests each).

    With an image cache (shared by every instance): the image bytes' hash and the session's image settings are
    looked up first; a hit skips decoding the image and its image-only stages (its encoding joins the batch),
    a miss runs every stage and caches the encoding that run made. Bytes that fail to decode never enter it.

    Args:
        session (ArtifactSession): loaded and warmed up.
        limits (Limits): per-request limits. Defaults to Limits().
        max_new_tokens (int | None): generate-mode limit. Defaults to None (as csprt run: min(32, exported)).
        cache (ImageCache | None): shared image cache. Defaults to None (off).
        max_batch (int | None): the most requests per pipeline call; a larger group is split. Defaults to None
            (the artifact's exported maximum, `session.max_batch`).
    """

    LOG_EVERY = 100  # lookups between two cache summaries in the log

    def __init__(self, session, limits: Limits = Limits(), max_new_tokens: int | None = None, cache=None,
                 max_batch: int | None = None):
        from engines.image_cache import ImageCache

        self.session, self.limits = session, limits
        self.max_batch = min(max_batch or session.max_batch, session.max_batch)
        self.cache = cache if cache is not None else ImageCache(0)
        loop = session.artifact.layout.loop
        self.max_new_tokens = max_new_tokens if max_new_tokens is not None else min(32, loop.max_new_tokens if loop else 0)
        self.modes = tuple(session.artifact.modes)

    def __call__(self, requests: list) -> list[dict[str, np.ndarray]]:
        """One Triton call (a dynamic-batcher group): each request checked alone, the good ones segmented in
        batches of up to `max_batch` (engines.batching), one response per request in request order."""
        responses: list = [None] * len(requests)
        items, info = [], {}
        images: dict[bytes, np.ndarray] = {}  # identical image bytes in one group are decoded once
        for i, request in enumerate(requests):
            try:
                items.append(self._check(i, request, images, info))
            except Exception as exc:  # noqa: BLE001 - this request's error only
                responses[i] = self._error(exc)
        t0 = time.perf_counter()
        keep = self.cache.enabled and any(not info[it.index].hit for it in items)
        results = run_items(self.session, items, self.max_batch, keep_encoding=keep, on_error=_log_batch_failure)
        segment_ms = (time.perf_counter() - t0) * 1000
        for it in items:
            responses[it.index] = self._respond(requests[it.index], info[it.index], results[it.index], results,
                                                segment_ms)
        return responses

    def _check(self, i: int, request, images: dict, info: dict) -> Item:
        """Request i alone: its tensors, its query against the exported ranges, its image (cache or decode)."""
        req = decode_request(request, self.limits, self.modes)
        prompt = check_query(self.session, req.query, req.mode)
        t0 = time.perf_counter()
        encoding, key = self._lookup(req.image)
        if encoding is None:
            if req.image not in images:
                images[req.image] = decode_image(req.image, self.limits)
            source, hw = images[req.image], images[req.image].shape[:2]
        else:
            source, hw = encoding, encoding.original_hw
        info[i] = _Checked(key, encoding is not None, hw, req.return_logits, (time.perf_counter() - t0) * 1000)
        max_new = self.max_new_tokens if req.mode == "generate" else None
        return Item(i, source, req.query, req.mode, max_new, prompt=prompt)

    def _respond(self, request, checked: "_Checked", result, results: dict, segment_ms: float) -> dict[str, np.ndarray]:
        if isinstance(result, Exception):
            return self._error(result)
        try:
            if checked.key is not None and not checked.hit:
                self.cache.put(checked.key, result.encoding)
            batch = sum(1 for r in results.values() if getattr(r, "pipeline", None) is result.pipeline)
            timings = {**result.timings_ms, "decode_image": checked.decode_ms, "segment": segment_ms,
                       "batch_size": batch, "image_cache_hit": int(checked.hit)}
            wanted = getattr(request, "requested_output_names", None)
            return encode_response(result, checked.hw, checked.return_logits, timings, wanted)
        except Exception as exc:  # noqa: BLE001 - this request's error only
            return self._error(exc)

    @staticmethod
    def _error(exc: Exception) -> dict[str, np.ndarray]:
        if isinstance(exc, ToolchainError):
            return error_response(str(exc))
        LOGGER.error("request failed:\n%s", "".join(traceback.format_exception(exc)))
        return error_response(f"csprt internal error (please report; traceback in the server log): "
                              f"{type(exc).__name__}: {exc}", internal=True)

    def _lookup(self, data: bytes):
        """(cached encoding or None, key or None when the cache is off)."""
        if not self.cache.enabled:
            return None, None
        from engines.image_cache import image_key

        key = image_key(data, self.session.image_settings)
        encoding = self.cache.get(key)
        stats = self.cache.stats()
        if (stats["hits"] + stats["misses"]) % self.LOG_EVERY == 0:
            LOGGER.info(self.cache.summary())
        return encoding, key


# -- loading ---------------------------------------------------------------------------------
def load_session(art_dir, backend: str = "onnxruntime", device: str | None = None,
                 progress: Callable[[str], None] = lambda msg: None, label: str = ""):
    """An ArtifactSession with every stage loaded and one warm-up segment per mode on a synthetic image,
    so the server reports ready only when all of it works.

    Args:
        art_dir (path): the artifact.
        backend (str): as ArtifactSession. Defaults to "onnxruntime".
        device (str | None): as ArtifactSession. Defaults to None (the backend's default).
        progress (Callable[[str], None]): gets one line per stage and per warm-up. Defaults to silence.
        label (str): prefix for the progress lines (e.g. "instance 2/4: "). Defaults to "".
    """
    from engines.session import ArtifactSession

    session = ArtifactSession(art_dir, backend=backend, device=device)
    try:
        stages = session.artifact.layout.stages
        for i, stage in enumerate(stages, 1):
            progress(f"{label}loading stage {stage.name} ({i}/{len(stages)})")
            session.pipeline.runner(stage)
        image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)  # [H, W, 3]
        for mode in session.artifact.modes:
            t0 = time.perf_counter()
            steps = warm_up(session, image, mode)
            what = f" ({steps} decode step{'s' if steps != 1 else ''})" if mode == "generate" else ""
            progress(f"{label}warm-up {mode}: {(time.perf_counter() - t0) * 1000:.0f} ms{what}")
    except BaseException:
        session.close()
        raise
    return session


def warm_up(session, image: np.ndarray, mode: str) -> int:
    """One request of `mode` on `image`; in generate mode two tokens with the stop tokens set aside, so one decode
    step (each block at one row, writing its KV cache in place) runs whatever the first token is, and the first
    generate request does not pay for it. Returns the decode steps run.

    The warm-up's ids go to this call only (`decode_ids`): the session's layout, which requests share, is untouched.
    """
    layout = session.pipeline.layout
    loop = layout.loop
    if mode != "generate" or loop is None or loop.max_new_tokens < 2:
        seg = session.segment(image, "warm-up", mode=mode, max_new_tokens=1 if mode == "generate" else None)
        return int(seg.timings_ms.get("decode_steps", 0))
    max_seg = layout.dims["num_seg"].max if "num_seg" in layout.dims else 2
    # with one [SEG] allowed, two [SEG] tokens would be refused after the step: then no token counts as [SEG]
    warm = DecodeIds(stop_token_ids=(), seg_token_id=loop.seg_token_id if max_seg >= 2 else -1)
    seg = session.segment(image, "warm-up", mode=mode, max_new_tokens=2, decode_ids=warm)
    return int(seg.timings_ms.get("decode_steps", 0))


# -- PyTriton glue ---------------------------------------------------------------------------
PROXY_PATCH = f'''

# --- added by csprt serve (engines/serving.py): per-request errors. PyTriton 0.7.0 turns an exception in
# the inference callable into an error for every request of the dynamic batch; csprt returns
# {{"{ERROR_OUTPUT}": [[code], [message]]}} for a bad request instead, and this makes it that request's error.
_csprt_wrap_response = _wrap_response


def _wrap_response(response, requested_outputs_names, model_outputs_dict):
    error = response.data.get("{ERROR_OUTPUT}") if response.data is not None else None
    if error is None:
        return _csprt_wrap_response(response, requested_outputs_names, model_outputs_dict)
    code, message = (bytes(v).decode("utf-8", "replace") for v in error.reshape(-1)[:2])
    code = getattr(pb_utils.TritonError, code, pb_utils.TritonError.INTERNAL)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


# --- and instance start-up: with --instances > 1 a later instance fetches its config from the first one's
# handshake socket, once, within 1 s. Under load it can connect between the first one's bind and listen
# (ConnectionRefusedError: the model fails to load; seen in CI). Retry for up to 60 s instead.
_csprt_get_config = get_config_from_handshake_server


def get_config_from_handshake_server(socket_path, timeout_s=1.0):
    import time as _csprt_time

    deadline = _csprt_time.time() + 60.0
    while True:
        try:
            return _csprt_get_config(socket_path, timeout_s)
        except (ConnectionRefusedError, FileNotFoundError, TimeoutError):
            if _csprt_time.time() > deadline:
                raise
            _csprt_time.sleep(0.05)
'''.encode()


def install_per_request_errors() -> None:
    """Make PyTriton load its proxy model with PROXY_PATCH appended (idempotent, this process only):
    per-request errors, and a retried handshake between model instances."""
    from pytriton.models.model import Model

    original = Model.get_proxy_model_files
    if getattr(original, "_csprt", False):
        return

    def get_proxy_model_files(self) -> dict:
        files = original(self)
        key = f"file:{self.model_version}/model.py"
        source = files.get(key, b"")
        if b"def _wrap_response(" not in source or b"get_config_from_handshake_server" not in source:
            raise ToolchainError("this PyTriton's proxy model lacks what csprt patches (_wrap_response, "
                                 "get_config_from_handshake_server); csprt serve needs "
                                 "nvidia-pytriton==0.7.0 (pip install -e '.[serve]')")
        return {**files, key: files[key] + PROXY_PATCH}

    get_proxy_model_files._csprt = True
    Model.get_proxy_model_files = get_proxy_model_files


def patch_model_store(model_store) -> None:
    """Append PROXY_PATCH to the proxy model PyTriton wrote into a local model store (`Triton(...,
    triton_lifecycle_policy=TritonLifecyclePolicy(local_model_store=True))`, where tritonserver loads it at its
    start: `install_per_request_errors` covers only models loaded through the API). Idempotent.

    Args:
        model_store (path): the workspace's model store, after `bind`.
    """
    from pathlib import Path

    path = Path(model_store) / MODEL_NAME / "1" / "model.py"
    source = path.read_bytes()
    if PROXY_PATCH in source:
        return
    if b"def _wrap_response(" not in source or b"get_config_from_handshake_server" not in source:
        raise ToolchainError("this PyTriton's proxy model lacks what csprt patches (_wrap_response, "
                             "get_config_from_handshake_server); csprt serve needs "
                             "nvidia-pytriton==0.7.0 (pip install -e '.[serve]')")
    path.write_bytes(source + PROXY_PATCH)


def bind(triton, models: Sequence[SegmentModel], max_batch_size: int,
         max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US) -> None:
    """Bind `models` (one per instance) as MODEL_NAME with Triton's dynamic batcher: a group of up to
    `max_batch_size` requests, formed within `max_queue_delay_us` of the first, is one call of a model."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    install_per_request_errors()
    inputs = [Tensor(name=n, dtype=_NP[d], shape=s, optional=opt) for n, (d, s, opt, _) in INPUTS.items()]
    outputs = [Tensor(name=n, dtype=_NP[d], shape=s) for n, (d, s, _) in OUTPUTS.items()]
    # Requests queued while an instance is busy are grouped into its next call whatever the delay; the delay
    # lets requests that arrive close together on an idle server share one batched call too.
    config = ModelConfig(max_batch_size=max_batch_size,
                         batcher=DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us))
    triton.bind(model_name=MODEL_NAME, infer_func=list(models), inputs=inputs, outputs=outputs, config=config,
                strict=False)
