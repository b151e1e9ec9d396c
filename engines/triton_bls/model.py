"""csprt's BLS orchestrator for Triton's Python backend: a group of requests through an artifact's stage models.

`csprt triton-repo` copies this file to <repo>/<name>/1/model.py, beside artifact/ (the manifest and
tokenizer) and stages.json (stage -> Triton model, and the inputs that model takes; a block built in
pieces -> its piece models in run order, each with its inputs and outputs). It needs csprt
installed in the Python backend's environment: the wiring, decode loop, tokenisation and pre/post-
processing are csprt's own (`engines.pipeline.Pipeline`, `engines.host.HostIO`), so nothing here
duplicates them. The only Triton-specific step is `TritonStageRunner._request`, a BLS request:

    execute(requests): one dynamic-batcher group (config max_batch_size, at most the artifact's --max-batch)
      per request {image, query[, mode, return_logits, max_new_tokens, instance_masks]}: checked alone
        (tensors, mode, query against the exported text ranges, image); a bad one gets its own error response
        --image cache (sha256 of the bytes + settings)--> hit: its encoding; miss: the decoded image
      engines.batching.run_items: ArtifactSession.segment_batch per mode (hits and misses in one batch),
        HostIO + Pipeline; per stage ONE BLS request for the whole batch:
        pb_utils.InferenceRequest(<name>_<stage>, tensors [B, ...]).exec()
        (a block built in pieces: <name>_<stage>_p0, _p1 ... in turn, each fed the stage inputs it reads
         and the interface tensors (hidden rows, cos/sin, mask) earlier pieces returned)
      --> per request {mask_png, masks_packed, masks_shape, answer, generated_ids, timings [, mask_logits]}

The image cache (engines.image_cache, `csprt triton-repo --image-cache-mb`, config parameter
csprt_image_cache_mb) keeps each image's encoding for further questions about it. Triton's Python backend
runs every instance in its own process, so each instance has its own cache of that size. Hits, misses and
evictions are Triton metrics (csprt_image_cache_*, where this Triton has custom metrics) and log lines.

The request and response tensors are `csprt serve`'s (graphs.triton_config.BLS_INPUTS / BLS_OUTPUTS), so
one client (tools/triton_client.py) talks to either.

A bad request (not an image, empty query, unknown mode, prompt too long ...) gets an error response
naming what to fix; it never raises out of `execute`.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    from engines.batching import Item, check_query, run_items
    from engines.image_cache import MIB, ImageCache, image_key
    from engines.session import ArtifactSession
    from graphs.errors import ArtifactError, InputError, ToolchainError
    from graphs.imageio import decode_image_bytes, mask_png_bytes, pack_masks
    from graphs.manifest import load_artifact
    from graphs.prompt import MODES
    from graphs.runner import BaseRunner
    from graphs.stages import StageSpec
except ImportError as exc:  # the Python backend's own interpreter, not the one that wrote the repository
    raise ImportError(f"csprt is not importable in Triton's Python backend environment ({exc}); install it there "
                      "(pip install csprt, the version that wrote this repository, see its csprt_repo.json)") from exc

STAGES_FILE = "stages.json"
ARTIFACT_DIR = "artifact"
CACHE_PARAMETER = "csprt_image_cache_mb"
DEFAULT_IMAGE_CACHE_MB = 512


class TritonStageRunner(BaseRunner):
    """Runs one stage on its Triton model by a BLS request (`BaseRunner` checks the feed against the spec); a block
    built in pieces (`csprt build --max-build-memory`) by one request per piece model, in order.

    Args:
        stage (StageSpec): the stage.
        dims (dict[str, DimRange]): the artifact's named dims.
        entry (dict): its stages.json entry: {"model", "inputs"} (the inputs that model takes: a graph may drop
            spec inputs it never reads), or {"pieces": [{"model", "inputs", "outputs"}, ...]} in run order, each
            piece fed the stage inputs it reads and the interface tensors earlier pieces returned.
    """

    def __init__(self, stage: StageSpec, dims, entry: dict):
        super().__init__(stage, dims)
        outputs = [t.name for t in stage.outputs]
        calls = entry["pieces"] if "pieces" in entry else [{**entry, "outputs": outputs}]
        self.calls = [(c["model"], list(c["inputs"]), list(c["outputs"])) for c in calls]
        unmade = [n for n in outputs if not any(n in outs for _, _, outs in self.calls)]
        if unmade:
            raise ArtifactError(f"stage {self.name!r}: no Triton model in {STAGES_FILE} returns {', '.join(unmade)}; "
                                "regenerate the repository with csprt triton-repo")

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = dict(feed)
        for model, inputs, outputs in self.calls:  # one call for a whole stage
            values.update(self._request(model, inputs, outputs, values))
        return {t.name: values[t.name] for t in self.stage.outputs}

    def _request(self, model: str, inputs: list[str], outputs: list[str], values: dict) -> dict[str, np.ndarray]:
        request = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=outputs,
            inputs=[pb_utils.Tensor(n, np.ascontiguousarray(values[n])) for n in inputs],
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0))  # as_numpy needs host memory
        response = request.exec()
        if response.has_error():
            raise ToolchainError(f"stage {self.name!r}: Triton model {model!r} failed: {response.error().message()}")
        out = {}
        for n in outputs:
            tensor = pb_utils.get_output_tensor_by_name(response, n)
            if tensor is None:
                raise ArtifactError(f"stage {self.name!r}: Triton model {model!r} returned no output {n!r}; "
                                    "its model file does not match the manifest, regenerate the repository")
            out[n] = tensor.as_numpy()
        return out


class TritonPythonModel:
    """The Python backend's entry point."""

    def initialize(self, args: dict) -> None:
        here = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args["model_config"])
        max_batch_size = int(config.get("max_batch_size", 0))
        self.batched = max_batch_size > 0  # then every tensor has Triton's batch axis
        self.artifact = load_artifact(here / ARTIFACT_DIR, verify=False)  # graphs live in the stage models
        self.layout = self.artifact.layout
        models = json.loads((here / STAGES_FILE).read_text(encoding="utf-8"))["stage_models"]
        missing = [s.name for s in self.layout.stages if s.name not in models]
        if missing:
            raise ArtifactError(f"{here / STAGES_FILE} names no Triton model for stages {missing}; regenerate the "
                                "repository with csprt triton-repo")

        def runner_for(stage: StageSpec) -> BaseRunner:
            return TritonStageRunner(stage, self.layout.dims, models[stage.name])

        self.session = ArtifactSession(here / ARTIFACT_DIR, verify=False, runner_for=runner_for)
        self.host, self.pipeline = self.session.host, self.session.pipeline
        # requests per pipeline call: the dynamic batcher's group (at most the exported batch), split above it
        self.max_batch = min(max_batch_size or self.session.max_batch, self.session.max_batch)
        self._warm_up()
        loop = self.layout.loop
        self.default_max_new_tokens = min(32, loop.max_new_tokens) if loop else 0  # as csprt run and csprt serve
        mb = config.get("parameters", {}).get(CACHE_PARAMETER, {}).get("string_value", str(DEFAULT_IMAGE_CACHE_MB))
        self.cache = ImageCache(int(mb) * MIB)
        self.metrics = _cache_metrics(args.get("model_name", "csprt")) if self.cache.enabled else None

    def _warm_up(self) -> None:
        """Preprocess a blank image now: the first call loads the tokenizer and imports transformers' CLIP
        image processor (seconds), which the first request should not pay for."""
        grid = self.artifact.shape.vision.grid
        seg_first = any(t.name == "instance_masks" for t in self.layout.host_inputs)
        masks = np.ones((1, grid, grid), np.float32) if seg_first else None
        self.host.inputs(np.zeros((32, 32, 3), np.uint8), "warm up", self.layout.modes[0], instance_masks=masks)

    def finalize(self) -> None:
        if self.cache.enabled:
            print(f"[csprt] {self.cache.summary()}", file=sys.stderr, flush=True)
        self.session.close()

    def execute(self, requests) -> list:
        """A dynamic-batcher group: each request checked alone (a bad one gets its own error response), the good
        ones run as batched pipeline calls (engines.batching: one segment_batch per mode and max_new_tokens, at
        most max_batch requests each, every stage one BLS request for the whole batch)."""
        responses: list = [None] * len(requests)
        items, checked = [], {}
        for i, request in enumerate(requests):
            try:
                items.append(self._check(i, request, checked))
            except Exception as exc:  # noqa: BLE001  this request's error only
                responses[i] = _error_response(exc)
        t0 = time.perf_counter()
        keep = self.cache.enabled and any(checked[it.index]["encoding"] is None for it in items)
        results = run_items(self.session, items, self.max_batch, keep_encoding=keep, on_error=lambda exc: print(
            f"[csprt] a batch failed as a whole ({type(exc).__name__}: {exc}); running its requests one by one",
            file=sys.stderr, flush=True))
        segment_ms = 1e3 * (time.perf_counter() - t0)
        for it in items:
            try:
                responses[it.index] = self._respond(checked[it.index], results[it.index], results, segment_ms)
            except Exception as exc:  # noqa: BLE001  this request's error only
                responses[it.index] = _error_response(exc)
        return responses

    # -- one request ----------------------------------------------------------------------------
    def _check(self, i: int, request, checked: dict) -> Item:
        """Request i alone: its tensors, mode, query against the exported ranges, its image (cache or decode)."""
        t0 = time.perf_counter()
        data = self._bytes(request, "image")
        query = self._text(request, "query")
        mode = self._text(request, "mode", "single-pass")
        logits_wanted = bool(self._scalar(request, "return_logits", False))
        max_new = self._scalar(request, "max_new_tokens", self.default_max_new_tokens)
        masks_in = self._array(request, "instance_masks")
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; this artifact serves: {', '.join(self.layout.modes)}")
        if mode not in self.layout.modes:
            raise InputError(f"mode {mode!r} is not in this artifact (exported for {', '.join(self.layout.modes)}); "
                             f"re-export it with --mode both: {self.artifact.rebuild_command}")
        prompt = check_query(self.session, query, mode)
        key = image_key(data, self.session.image_settings, masks_in) if self.cache.enabled else None
        encoding = self._lookup(key)
        if encoding is None:  # bytes that do not decode fail here, before anything could be cached
            source = decode_image_bytes(data, name="(request input 'image')")
        else:
            source, masks_in = encoding, None  # the instance masks are part of the encoding (and of its key)
        checked[i] = {"t0": t0, "t1": time.perf_counter(), "key": key, "encoding": encoding, "logits": logits_wanted}
        return Item(i, source, query, mode, int(max_new) if mode == "generate" else None, masks_in, prompt)

    def _respond(self, checked: dict, seg, results: dict, segment_ms: float):
        if isinstance(seg, Exception):
            return _error_response(seg)
        t2 = time.perf_counter()
        if checked["key"] is not None and checked["encoding"] is None:
            self._store(checked["key"], seg.encoding)
        masks = seg.masks
        union = masks.any(axis=0) if len(masks) else np.zeros(masks.shape[1:], dtype=bool)
        outputs = {"mask_png": np.array([mask_png_bytes(union)], dtype=np.object_),
                   "masks_packed": pack_masks(masks),  # [ceil(K*H*W / 8)] uint8
                   "masks_shape": np.asarray(masks.shape, dtype=np.int64),  # [3]: K, H, W
                   "answer": np.array([seg.answer.encode("utf-8")], dtype=np.object_),
                   "generated_ids": np.asarray(seg.generated_ids, dtype=np.int64).reshape(-1)}
        if checked["logits"]:
            outputs["mask_logits"] = np.ascontiguousarray(seg.mask_logits, dtype=np.float32)  # [K, H, W]
        if seg.host_steps:  # ACCM: the candidate captions and the chosen one
            outputs["host_steps"] = np.array([json.dumps(seg.host_steps).encode("utf-8")], dtype=np.object_)
        t3 = time.perf_counter()
        ms = lambda a, b: 1e3 * (b - a)  # noqa: E731
        batch = sum(1 for r in results.values() if getattr(r, "pipeline", None) is seg.pipeline)
        timings = {"decode_image": ms(checked["t0"], checked["t1"]), **seg.timings_ms, "segment": segment_ms,
                   "encode": ms(t2, t3), "total": ms(checked["t0"], t3), "batch_size": batch,
                   "image_cache_hit": int(checked["encoding"] is not None)}
        timings = {k: v if isinstance(v, int) else round(float(v), 3) for k, v in timings.items()}  # counts: int
        outputs["timings"] = np.array([json.dumps(timings).encode("utf-8")], dtype=np.object_)
        tensors = [pb_utils.Tensor(k, v[None] if self.batched else v) for k, v in outputs.items()]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    # -- image cache ------------------------------------------------------------------------------
    def _lookup(self, key):
        if key is None:
            return None
        encoding = self.cache.get(key)
        if self.metrics:
            self.metrics["hit" if encoding is not None else "miss"].increment(1)
        stats = self.cache.stats()
        if (stats["hits"] + stats["misses"]) % 100 == 0:
            print(f"[csprt] {self.cache.summary()}", file=sys.stderr, flush=True)  # into Triton's log
        return encoding

    def _store(self, key, encoding) -> None:
        before = self.cache.stats()["evictions"]
        self.cache.put(key, encoding)
        if self.metrics:
            self.metrics["eviction"].increment(self.cache.stats()["evictions"] - before)

    # -- request tensors ------------------------------------------------------------------------
    def _array(self, request, name: str):
        """The input as an array without Triton's batch axis, or None when the request lacks it."""
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        value = tensor.as_numpy()
        if self.batched:
            if value.shape[:1] != (1,):
                raise InputError(f"input {name!r} has batch size {value.shape[0] if value.ndim else 0}; send one "
                                 "image per request (Triton's dynamic batcher groups requests)")
            value = value[0]
        return value

    def _bytes(self, request, name: str) -> bytes:
        value = self._array(request, name)
        if value is None:
            raise InputError(f"the request has no {name!r} input; send it as a BYTES tensor of shape [1]")
        flat = np.asarray(value, dtype=np.object_).reshape(-1)
        if flat.size != 1:
            raise InputError(f"input {name!r} has {flat.size} elements; send exactly one (shape [1])")
        item = flat[0]
        return item.encode("utf-8") if isinstance(item, str) else bytes(item)

    def _text(self, request, name: str, default: str | None = None) -> str:
        if default is not None and pb_utils.get_input_tensor_by_name(request, name) is None:
            return default
        data = self._bytes(request, name)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"input {name!r} is not UTF-8 text") from None

    def _scalar(self, request, name: str, default):
        value = self._array(request, name)
        if value is None:
            return default
        flat = np.asarray(value).reshape(-1)
        if flat.size != 1:
            raise InputError(f"input {name!r} has {flat.size} elements; send exactly one (shape [1])")
        return flat[0].item()


def _error_response(exc: Exception):
    """One request's error response: InputError is the client's to fix (HTTP 400 / gRPC INVALID_ARGUMENT), another
    ToolchainError the deployment's (artifact, stage model), anything else a bug (traceback into Triton's log)."""
    if isinstance(exc, InputError):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
            str(exc), pb_utils.TritonError.INVALID_ARG))
    if isinstance(exc, ToolchainError):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc)))
    traceback.print_exception(exc, file=sys.stderr)  # into Triton's log
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
        f"csprt internal error (please report; traceback in the server log): {type(exc).__name__}: {exc}"))


def _cache_metrics(model: str) -> dict | None:
    """Triton custom metrics for the image cache (Triton >= 23.04), or None where this Triton has none."""
    family = getattr(pb_utils, "MetricFamily", None)
    if family is None:
        return None
    lookups = family(name="csprt_image_cache_lookups_total", description="csprt image cache lookups, by result",
                     kind=family.COUNTER)
    evictions = family(name="csprt_image_cache_evictions_total", description="csprt image cache evictions",
                       kind=family.COUNTER)
    return {"hit": lookups.Metric(labels={"model": model, "result": "hit"}),
            "miss": lookups.Metric(labels={"model": model, "result": "miss"}),
            "eviction": evictions.Metric(labels={"model": model})}
