"""`csprt build`: one TensorRT / TensorRT-RTX engine per stage graph of an artifact.

    graphs/<stage>.onnx --NetworkFromOnnx--> strongly typed network --ConfigFromProfiles--> builder config
        (one optimization profile from the manifest's dims; TensorRT-RTX: target compute capabilities)
        --PlanFromNetwork--> engines/<flavor>/<stage>.plan + <stage>.json (sidecar), manifest "engines" entry

Strongly typed networks (TensorRT-RTX; TensorRT 11 drops weak typing) have no fp16 builder flag: an
engine computes in its graph's dtypes, so the precision is chosen at export. Builds are cached: a
stage whose build key (graph files, settings, flavor, version) matches its sidecar, and whose plan is
intact, is not rebuilt. Engines of each flavor get their own directory so building with TensorRT on a
GPU host does not replace the TensorRT-RTX plans CI built.

Build memory: stages build one at a time; external-data weights are mapped into the parser, never copied,
and let go while the builder runs (`MappedWeights`); the plan streams to disk (`PlanFromNetwork.to_file`).
Before any build, every stage's estimated peak (`estimate_stage_memory`) is checked against the budget
(`--max-build-memory`, default the host's available memory) and an over-budget build is refused in one line.
`--weights-as-inputs` (`BuildSettings.weights == "inputs"`): weight-free engines, the GEMM and embedding weights
engine inputs read by the runtime from the graphs' own files (`graphs.weight_inputs`); the parser never sees them.

The loaders follow Polygraphy's style (lazy callables) but use the TensorRT API directly: Polygraphy
0.53 imports TensorRT-RTX as `tensorrt_rtx` (the PyPI wheel is `tensorrt_rtx_bindings`), fixes the
flavor once per process, builds its profiles inside `CreateConfig` where tests cannot read them back,
and `EngineBytesFromNetwork` queries CUDA while logging the config, which fails loudly on a GPU-less host.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from engines.profiles import (InputShapes, Profile, apply_overrides, dims_to_json, parse_shapes, profile_names,
                              profiles_note, profiles_to_json, stage_dims, stage_profiles)
from engines.build_memory import (GIB, MappedWeights, StageMemory, external_initializers,  # noqa: F401
                                  external_initializers_of,
                                  check_build_memory, estimate_stage_memory, gib, host_memory_budget,
                                  trim_host_memory)
from engines.engine_check import ENGINES_DIR, check_engine, engine_paths  # noqa: F401 (re-exported)
from engines.split_build import (LayerOverBudget, SplitPlan, block_layers, build_split_stage, fits_layers, plan_split,
                                 split_intact, splittable)
from engines.trt import NO_GPU_NOISE, PRETTY, CaptureLogger, load_trt  # noqa: F401 (CaptureLogger re-exported)
from graphs.artifact_dir import export_lock
from graphs.atomic import atomic_path, exclusive_lock, write_json
from graphs.errors import ArtifactError, ToolchainError
from graphs.host_memory import PeakRss
from graphs.manifest import Artifact, check_stage_names, file_sha256, load_artifact, package_versions, write_manifest
from graphs.quantize import check_buildable, stage_quantization
from graphs.weight_inputs import WeightInput, as_weight_inputs, moved_bytes, weight_inputs

BUILD_FORMAT = 1  # bump when a build setting's meaning changes: every cached engine is rebuilt
PRECISIONS = ("fp16", "bf16", "fp32")
# TensorRT-RTX cannot compile FP32 GEMMs for Turing ("Cannot compile operation ... for Turing (SM75): FP32
# GEMM is not supported"), and fp16 graphs keep some matmuls in fp32 (seen: `vision`'s selection scores), so
# the default targets are Ampere and newer; SM75 only when asked for.
DEFAULT_MIN_SM = 80
_SM = re.compile(r"^(?:sm_?)?(\d+)(?:\.(\d+))?$", re.IGNORECASE)


class EngineBuildError(ToolchainError):
    """Some stages failed to build. `report` holds what `build_engines` returns for the ones that did."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


# --- settings -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildSettings:
    flavor: str                              # "tensorrt" | "tensorrt-rtx"
    trt_version: str                         # e.g. "1.7.1.116"
    precision: str                           # the artifact's: "fp32" | "fp16"
    compute_capabilities: tuple[str, ...]    # ("SM80", "SM86", ...); ("CURRENT",) = the build GPU
    workspace_gb: float | None = None        # builder workspace pool limit; None: TensorRT's default
    weights: str = "engine"                  # "engine" | "inputs" (graphs.weight_inputs: weight-free engines)

    def to_json(self) -> dict:
        out = {**asdict(self), "compute_capabilities": list(self.compute_capabilities), "strongly_typed": True}
        if self.weights == "engine":  # today's engines: their build keys (and caches) stay as they were
            del out["weights"]
        return out


def _with_precision(command: str, precision: str) -> str:
    words = shlex.split(command)
    if "--precision" in words[:-1]:
        words[words.index("--precision") + 1] = precision
    else:
        words += ["--precision", precision]
    return shlex.join(words)


def resolve_precision(requested: str | None, artifact: Artifact) -> str:
    """The engine precision: the artifact's. `requested` must equal it (strongly typed networks).

    Raises:
        ToolchainError: `requested` is not a precision, is bf16, or differs from the artifact's; the message
            names the re-export command.
    """
    have = artifact.precision
    if requested is None or requested == have:
        return have
    if requested not in PRECISIONS:
        raise ToolchainError(f"unknown precision {requested!r}; choose one of: {', '.join(PRECISIONS)}")
    why = ("TensorRT-RTX and TensorRT 11 build strongly typed networks, so an engine computes in its graph's "
           "dtypes (there is no fp16 builder flag)")
    if requested == "bf16":
        raise ToolchainError(f"--precision bf16: csprt cannot export bf16 graphs yet (export offers fp32 and fp16) "
                             f"and {why}; this artifact is {have}: build it as is, or re-export for fp16 with: "
                             f"{_with_precision(artifact.rebuild_command, 'fp16')}")
    raise ToolchainError(f"--precision {requested}: this artifact's graphs are {have}, and {why}; re-export with: "
                         f"{_with_precision(artifact.rebuild_command, requested)}")


def parse_compute_capability(text: str) -> str:
    """"SM86", "sm_86", "86" or "8.6" -> "SM86"; "current" -> "CURRENT" (the GPU present at build time)."""
    t = str(text).strip()
    if t.lower() == "current":
        return "CURRENT"
    m = _SM.match(t)
    if not m:
        raise ToolchainError(f"--compute-capability {text}: expected a compute capability like SM86, 8.6 or 86, "
                             "or 'current'")
    return f"SM{m.group(1)}{m.group(2) or ''}"


def _sm_number(name: str) -> int:
    return int(name[2:])


def targetable(trt) -> tuple[str, ...]:
    """The compute capabilities this TensorRT-RTX can build for, e.g. ("SM75", "SM80", ..., "SM121")."""
    names = [n for n in trt.ComputeCapability.__members__ if n.startswith("SM")]
    return tuple(sorted(names, key=_sm_number))


def resolve_compute_capabilities(trt, flavor: str, requested=None) -> tuple[str, ...]:
    """Targets of the build, sorted.

    TensorRT-RTX: `requested` (e.g. ["SM86", "8.9"]), or by default every capability from SM80 on that it
    can target (`DEFAULT_MIN_SM`). TensorRT builds for the GPU it runs on: ("CURRENT",), and `requested`
    must be empty.
    """
    asked = [parse_compute_capability(c) for c in (requested or ())]
    if flavor != "tensorrt-rtx":
        if asked and asked != ["CURRENT"]:
            raise ToolchainError("--compute-capability applies to TensorRT-RTX only (--flavor tensorrt-rtx); "
                                 "TensorRT builds for the GPU it runs on")
        return ("CURRENT",)
    valid = targetable(trt)
    if not asked:
        return tuple(c for c in valid if _sm_number(c) >= DEFAULT_MIN_SM)
    for c in asked:
        if c != "CURRENT" and c not in valid:
            raise ToolchainError(f"--compute-capability {c}: TensorRT-RTX {trt.__version__} cannot target it; it "
                                 f"targets: {', '.join(valid)} (or 'current', the GPU present at build time)")
    if "CURRENT" in asked and len(asked) > 1:
        raise ToolchainError("--compute-capability current cannot be combined with other compute capabilities")
    return tuple(sorted(set(asked), key=lambda c: -1 if c == "CURRENT" else _sm_number(c)))


# --- loaders (lazy callables) ---------------------------------------------------------------------

class NetworkFromOnnx:
    """() -> (builder, network, parser): a strongly typed network parsed from an ONNX file.

    A graph's external-data files are mapped read-only and handed to the parser by address
    (`OnnxParser.load_initializer`), so its weights are never copied into this process: the builder reads the
    file pages, and `MappedWeights.dropping` lets them go while it builds. Graphs without external data are
    parsed from file. The mapping lives as long as this loader (`self.weights`); build before dropping it.

    Args:
        trt (module): from `load_trt`.
        path (Path): the .onnx; external data is read from beside it.
        logger (trt.ILogger): e.g. `CaptureLogger(trt)`.
        what (str): how messages name the graph, e.g. "stage 'llm_0' (graphs/llm_0.onnx)".
        model (onnx.ModelProto | None): parse this instead of the file, e.g. a piece of it
            (`engines.split_build`); its external data is still read from beside `path`. Defaults to None.
    """

    def __init__(self, trt, path, logger, what: str, model=None):
        self.trt, self.path, self.logger, self.what, self.model = trt, Path(path), logger, what, model
        self.weights: MappedWeights | None = None

    def __call__(self):
        trt = self.trt
        builder = trt.Builder(self.logger)
        typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        network = builder.create_network(0 if typed is None else 1 << int(typed))
        parser = trt.OnnxParser(network, self.logger)
        external = []
        if self.model is not None:
            external = external_initializers_of(self.model)
        elif hasattr(parser, "load_initializer") and self.path.is_file():
            try:
                external = external_initializers(self.path)
            except Exception:  # noqa: BLE001  not ONNX: parse_from_file below names what is wrong
                external = []
        if external or self.model is not None:
            self.weights = MappedWeights(self.path.parent) if external else None
            proto = self.model.SerializeToString() if self.model is not None else self.path.read_bytes()
            ok = parser.load_model_proto(proto, str(self.path))
            del proto
            for name, location, offset, length in external if ok else ():
                if not parser.load_initializer(name, self.weights.address(location, offset, length), length):
                    ok = False
                    break
            ok = ok and parser.parse_model_proto()
        else:
            ok = parser.parse_from_file(str(self.path))
        if not ok or parser.num_errors:
            raise ToolchainError(f"{self.what}: {PRETTY.get(_flavor_of(trt), 'TensorRT')} {trt.__version__} cannot "
                                 f"import the graph: {_parser_errors(parser)}")
        shape_inputs = [network.get_input(i).name for i in range(network.num_inputs)
                        if network.get_input(i).is_shape_tensor]
        if shape_inputs:
            raise ToolchainError(f"{self.what}: inputs {', '.join(shape_inputs)} are shape tensors (their values "
                                 "set shapes); csprt engines take only execution tensors; re-export the artifact")
        return builder, network, parser


def _flavor_of(trt) -> str:
    return "tensorrt-rtx" if "rtx" in trt.__name__ else "tensorrt"


# Known parser failures on csprt graphs, and what the exporter must emit instead.
_PARSER_HINTS = (
    ("NonZero", "TensorRT-RTX imports NonZero only through a plugin it does not ship; the exporter must "
                "select data-dependent rows without NonZero (e.g. TopK with a data-dependent k)"),
    ("at least 2 dimensions are required", "TensorRT's ArgMax/ArgMin/TopK need a tensor of rank >= 2; the "
                                           "exporter must unsqueeze 1-D inputs first"),
)


def _parser_errors(parser) -> str:
    parts = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        lines = [ln.strip() for ln in str(err.desc()).splitlines() if ln.strip()]
        desc = " ".join(ln for ln in lines if not any(n in ln for n in NO_GPU_NOISE)) or " ".join(lines)
        node = f"node {err.node_name()!r} ({err.node_operator()}): " if err.node() >= 0 else ""
        parts.append(f"{node}{desc}")
    text = "; ".join(parts) or "the parser reported no error (is the file a valid ONNX model?)"
    hints = [h for key, h in _PARSER_HINTS if key in text]
    return text + (f" ({hints[0]})" if hints else "")


class ConfigFromProfiles:
    """(builder, network) -> (config, [IOptimizationProfile]): profiles, targets, workspace, timing cache.

    Args:
        trt (module): from `load_trt`.
        profiles (list[dict[str, InputShapes]]): from `engines.profiles.stage_profiles`; every network input
            must have shapes.
        settings (BuildSettings): flavor, compute capabilities, workspace.
        timing_cache (bytes | None): a serialized timing cache to start from. Defaults to None (empty).
    """

    def __init__(self, trt, profiles: list[Profile], settings: BuildSettings, timing_cache: bytes | None = None):
        self.trt, self.profiles, self.settings, self.timing_cache = trt, profiles, settings, timing_cache

    def __call__(self, builder, network):
        trt, s = self.trt, self.settings
        config = builder.create_builder_config()
        made = []
        for shapes in self.profiles:
            profile = builder.create_optimization_profile()
            for i in range(network.num_inputs):
                name = network.get_input(i).name
                if name not in shapes:
                    raise ArtifactError(f"graph input {name!r} is not an input of the stage spec; the graph and the "
                                        "manifest come from different exports, re-export the artifact")
                profile.set_shape(name, shapes[name].min, shapes[name].opt, shapes[name].max)
            config.add_optimization_profile(profile)
            made.append(profile)
        if s.flavor == "tensorrt-rtx":
            config.num_compute_capabilities = len(s.compute_capabilities)
            for i, cc in enumerate(s.compute_capabilities):
                config.set_compute_capability(getattr(trt.ComputeCapability, cc), i)
        if s.workspace_gb is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(s.workspace_gb * (1 << 30)))
        if s.flavor == "tensorrt":  # TensorRT-RTX's timing-cache calls are deprecated no-ops
            cache = config.create_timing_cache(self.timing_cache or b"")
            config.set_timing_cache(cache, ignore_mismatch=True)  # a cache from another version is ignored
        return config, made


class PlanFromNetwork:
    """() -> bytes: the serialized engine. Like Polygraphy's `EngineBytesFromNetwork`, without logging the config.

    `to_file(path)` streams the plan to disk instead (`build_serialized_network_to_stream`), so the plan is
    never held in memory: `csprt build` uses it.

    Args:
        network (tuple | callable): (builder, network, parser), or a callable returning it (`NetworkFromOnnx`).
        config (IBuilderConfig | callable): a config, or (builder, network) -> (config, profiles)
            (`ConfigFromProfiles`).
        logger: the logger `network` uses (its errors explain a failed build).
        what (str): how messages name the graph.
        save_timing_cache (Path | None): where to write the builder's timing cache afterwards (atomically).
            Defaults to None.
        weights (MappedWeights | None): the network's mapped weights, let go while building. Defaults to None
            (those of `network` when it is a `NetworkFromOnnx`).
    """

    def __init__(self, network, config, logger, what: str, save_timing_cache: Path | None = None,
                 weights: MappedWeights | None = None):
        self.network, self.config, self.logger, self.what = network, config, logger, what
        self.save_timing_cache, self.weights = save_timing_cache, weights

    def _setup(self):
        builder, network, _parser = self.network() if callable(self.network) else self.network  # parser owns weights
        config = self.config(builder, network)[0] if callable(self.config) else self.config
        weights = self.weights or getattr(self.network, "weights", None)
        return builder, network, _parser, config, weights.dropping() if weights else contextlib.nullcontext()

    def _failed(self) -> ToolchainError:
        errors = self.logger.errors()
        return ToolchainError(f"{self.what}: the TensorRT builder failed: "
                              f"{errors[-1] if errors else 'no error was logged'}")

    def _save_cache(self, config) -> None:
        if self.save_timing_cache is not None and config.get_timing_cache() is not None:
            with atomic_path(self.save_timing_cache) as tmp:
                tmp.write_bytes(bytes(config.get_timing_cache().serialize()))

    def __call__(self) -> bytes:
        builder, network, _parser, config, dropping = self._setup()
        with dropping:
            plan = builder.build_serialized_network(network, config)
        if plan is None or plan.nbytes == 0:
            raise self._failed()
        self._save_cache(config)
        return bytes(plan)

    def to_file(self, path: Path) -> tuple[int, str]:
        """Build and write the plan to `path` atomically, streamed. Returns (bytes, sha256)."""
        builder, network, _parser, config, dropping = self._setup()
        if not hasattr(builder, "build_serialized_network_to_stream"):  # an older TensorRT: in memory
            with dropping:
                plan = builder.build_serialized_network(network, config)
            if plan is None or plan.nbytes == 0:
                raise self._failed()
            with atomic_path(path) as tmp:
                tmp.write_bytes(plan)
            digest = hashlib.sha256(plan)
            nbytes = plan.nbytes
        else:
            trt = _module_of(builder)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                writer = _hashing_writer(trt, f)
                with dropping:
                    ok = builder.build_serialized_network_to_stream(network, config, writer)
                if not ok or writer.nbytes == 0:
                    raise self._failed()
            digest, nbytes = writer.digest, writer.nbytes
        self._save_cache(config)
        return nbytes, digest.hexdigest()


def _module_of(obj):
    """The TensorRT module a TensorRT object comes from (its `IStreamWriter`)."""
    import sys
    return sys.modules[type(obj).__module__.split(".")[0]]


def _hashing_writer(trt, f):
    """A `trt.IStreamWriter` writing to `f` and hashing what it writes (`.digest`, `.nbytes`)."""
    class _Writer(trt.IStreamWriter):
        def __init__(self):
            trt.IStreamWriter.__init__(self)
            self.digest, self.nbytes = hashlib.sha256(), 0

        def write(self, data) -> int:
            f.write(data)
            self.digest.update(data)
            self.nbytes += len(data)
            return len(data)

    return _Writer()


@dataclass
class Prepared:
    """A stage's parsed network and builder config, not built yet (for inspection and `PlanFromNetwork`)."""

    builder: object
    network: object
    parser: object
    config: object
    trt_profiles: list          # the IOptimizationProfile objects added to `config`
    profiles: list[Profile]     # what they were made from (the sidecar's "profiles")
    weights: MappedWeights | None = None  # the mapped external data `network` reads; keep it until built
    weight_inputs: list[WeightInput] = field(default_factory=list)  # weights the engine takes as inputs


def read_profile(profile, network) -> dict[str, InputShapes]:
    """What an IOptimizationProfile holds for each network input: {name: InputShapes}."""
    out = {}
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        lo, opt, hi = profile.get_shape(name)
        out[name] = InputShapes(tuple(lo), tuple(opt), tuple(hi))
    return out


def build_key(files: dict[str, str], stage: str, settings: BuildSettings, profiles: list[Profile]) -> str:
    """sha256 of everything that determines an engine: graph files' hashes, stage, settings, profiles."""
    blob = json.dumps({"format": BUILD_FORMAT, "stage": stage, "files": dict(sorted(files.items())),
                       "settings": settings.to_json(), "profiles": profiles_to_json(profiles)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class _Job:
    artifact: Artifact
    stage: str
    settings: BuildSettings
    dims: dict

    @property
    def what(self) -> str:
        return f"stage {self.stage!r} ({self.artifact.stage_entry(self.stage)['graph']})"

    @property
    def decode(self) -> bool:
        """A decode loop runs this stage's graph: a block's engine then has a decode profile too."""
        return self.artifact.layout.decodes(self.stage)


def prepare_stage(trt, job: _Job, logger=None, timing_cache: bytes | None = None, model=None,
                  profiles: list[Profile] | None = None, what: str | None = None) -> Prepared:
    """Parse a stage's graph and create its builder config with the stage's profiles, without building.

    `model`, `profiles` and `what` prepare a piece of it instead (`engines.split_build`): its ModelProto (external
    data read beside the stage's graph, `NetworkFromOnnx`), its own profiles, and how messages name it.

    Under `--weights-as-inputs` (`settings.weights == "inputs"`) the graph's GEMM and embedding weights become
    static engine inputs (`graphs.weight_inputs`): the parser never sees their bytes, and each profile gets their
    one shape. `Prepared.profiles` stays the stage's own (the sidecar's; the build key's).
    """
    logger = logger or CaptureLogger(trt)
    moved: list[WeightInput] = []
    if job.settings.weights == "inputs":
        model, moved = stage_weight_inputs(job, model)
    loader = NetworkFromOnnx(trt, job.artifact.graph_path(job.stage), logger, what or job.what, model=model)
    builder, network, parser = loader()
    if profiles is None:
        spec = job.artifact.layout.stage(job.stage)
        known = {t.name for t in spec.inputs}
        inputs = [network.get_input(i).name for i in range(network.num_inputs)]
        profiles = stage_profiles(spec, job.dims, inputs=[n for n in inputs if n in known], decode=job.decode)
    static = {w.name: InputShapes(w.shape, w.shape, w.shape) for w in moved}
    config, made = ConfigFromProfiles(trt, [{**p, **static} for p in profiles], job.settings,
                                      timing_cache)(builder, network)
    return Prepared(builder, network, parser, config, made, profiles, loader.weights, moved)


def stage_weight_inputs(job: _Job, model=None) -> tuple[object, list[WeightInput]]:
    """(the stage graph with its GEMM and embedding weights as inputs, those weights). `model`: the graph to
    rewrite (default: the stage's, read without its external data)."""
    model, moved = _moved_weights(job, model)
    return as_weight_inputs(model, moved), moved


def _moved_weights(job: _Job, model=None) -> tuple[object, list[WeightInput]]:
    """(the stage graph, or `model`; the weights its engine takes as inputs), the graph read without external data."""
    import onnx

    rel = job.artifact.stage_entry(job.stage)["graph"]
    if model is None:
        model = onnx.load(str(job.artifact.dir / rel), load_external_data=False)
    return model, weight_inputs(model, rel)


@dataclass
class BuiltPlan:
    """What `build_plan` built: the plan's bytes and sha256, the profiles it holds, and how the build went."""

    nbytes: int
    sha256: str
    profiles: list[Profile]
    seconds: float
    peak: int | None            # sampled peak RSS while parsing and building (None: not sampled)
    warnings: list[str]         # the builder's first 20
    weight_inputs: list[WeightInput] = field(default_factory=list)  # weights the engine takes as inputs

    def build_memory(self, memory: StageMemory) -> dict:
        """A sidecar's "build_memory": the estimate `memory` and the measured peak."""
        return {**memory.to_json(), "measured_peak_bytes": self.peak}


def build_plan(trt, prepare: Callable[[object, bytes | None], Prepared], what: str, path: Path,
               timing_cache: Path | None = None) -> BuiltPlan:
    """The one build step of every engine, a whole stage's or a piece's: parse and configure (`prepare(logger,
    timing cache bytes)`, i.e. `prepare_stage`), build, stream the plan to `path` (atomically), let the mapped
    weights go, all under a sampled peak RSS; then hand the freed memory back (`trim_host_memory`).

    Args:
        trt (module): from `load_trt`.
        prepare (callable): (logger, timing cache bytes | None) -> Prepared.
        what (str): how messages name the engine.
        path (Path): the plan file.
        timing_cache (Path | None): TensorRT's timing cache file, read first and updated after. Defaults to None.
    """
    logger = CaptureLogger(trt)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else None
    t0 = time.perf_counter()
    with PeakRss() as rss:
        prep = prepare(logger, cache_bytes)
        weights, profiles, moved = prep.weights, prep.profiles, prep.weight_inputs
        try:
            nbytes, digest = PlanFromNetwork((prep.builder, prep.network, prep.parser), prep.config, logger, what,
                                             save_timing_cache=timing_cache, weights=weights).to_file(path)
        finally:
            prep = None  # builder, network and parser go before the weights they point into
            if weights is not None:
                weights.close()
    trim_host_memory()
    return BuiltPlan(nbytes, digest, profiles, time.perf_counter() - t0, rss.peak,
                     [m for sev, m in logger.messages if sev == 2][:20], moved)


def _cached(art: Path, sidecar_rel: str, key: str, settings: BuildSettings) -> dict | None:
    """The sidecar of an intact plan built under `key` (and this flavor and version), else None."""
    try:
        sidecar = json.loads((art / sidecar_rel).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    plan = art / sidecar.get("plan", "")
    same = (sidecar.get("build_key"), sidecar.get("flavor"), sidecar.get("trt_version")) == (
        key, settings.flavor, settings.trt_version)
    if not same or not plan.is_file() or plan.stat().st_size != sidecar.get("plan_bytes"):
        return None
    if file_sha256(plan) != sidecar.get("plan_sha256"):
        return None
    return sidecar if split_intact(art, sidecar) else None


def _cache_state(job: _Job) -> tuple[str, dict | None]:
    """(build key, sidecar of the intact cached plan or None) of a stage."""
    spec = job.artifact.layout.stage(job.stage)
    key = build_key(job.artifact.stage_entry(job.stage)["files"], job.stage, job.settings,
                    stage_profiles(spec, job.dims, decode=job.decode))
    return key, _cached(job.artifact.dir, engine_paths(job.settings.flavor, job.stage)[1], key, job.settings)


def _build_stage(trt, job: _Job, timing_cache: Path | None, say: Callable[[str], None],
                 state: tuple[str, dict | None] | None = None, memory: StageMemory | None = None,
                 split: SplitPlan | None = None) -> tuple[dict, bool]:
    art, name, s = job.artifact.dir, job.stage, job.settings
    key, hit = state or _cache_state(job)
    plan_rel, sidecar_rel = engine_paths(s.flavor, name)
    if hit is not None:
        pieces = f", {len(hit['pieces'])} engines" if hit.get("pieces") else ""
        say(f"{name}: cached ({hit['plan']}{pieces}, build key {key[:12]})")
        return hit, False
    if split is not None:
        return build_split_stage(trt, job, split, key, say, timing_cache), True
    memory = memory or estimate_stage_memory(job.artifact, name)
    say(f"{name}: building with {PRETTY[s.flavor]} {s.trt_version} for {', '.join(s.compute_capabilities)} "
        f"(weights {gib(memory.inline_bytes + memory.external_bytes)}, estimated peak {gib(memory.peak_bytes)}) ...")
    built = build_plan(trt, lambda logger, cache: prepare_stage(trt, job, logger, cache), job.what, art / plan_rel,
                       timing_cache)
    sidecar = stage_sidecar(job, key, built.profiles, (plan_rel, built.sha256, built.nbytes), built.seconds,
                            built.build_memory(memory), built.warnings)
    if built.weight_inputs:  # none move from a stage without float GEMM weights (e.g. quantized blocks)
        sidecar.update(weight_inputs_sidecar(built.weight_inputs))
    write_json(sidecar, art / sidecar_rel)  # written last: a plan without its sidecar is never used
    rss = f", peak RSS {gib(built.peak)} (estimated {gib(memory.peak_bytes)})" if built.peak else ""
    say(f"{name}: built in {built.seconds:.1f} s, {built.nbytes / 1e6:.2f} MB{rss} -> {plan_rel}")
    return sidecar, True


def stage_sidecar(job: _Job, key: str, profiles: list[Profile], plan: tuple[str, str, int], seconds: float,
                  build_memory: dict, warnings: list[str]) -> dict:
    """A stage engine's sidecar: what it was built from and how; `plan` is (path, sha256, bytes)."""
    s, spec, entry = job.settings, job.artifact.layout.stage(job.stage), job.artifact.stage_entry(job.stage)
    graph = entry["graph"]
    return {
        "format": "csprt.engine", "format_version": BUILD_FORMAT, "stage": job.stage,
        "flavor": s.flavor, "trt_version": s.trt_version, "compute_capabilities": list(s.compute_capabilities),
        "graph": graph, "graph_sha256": entry["files"][graph], "graph_files": dict(entry["files"]),
        "quantization": stage_quantization(job.artifact.manifest, job.stage),  # "none" or e.g. "int8/qdq": check_engine
        "precision": s.precision, "profiles": profiles_to_json(profiles),
        "dims": dims_to_json(stage_dims(spec, job.dims)), "profiles_note": profiles_note(spec, job.decode),
        "profile_names": profile_names(spec, job.decode),
        "settings": s.to_json(), "build_key": key, "plan": plan[0], "plan_sha256": plan[1],
        "plan_bytes": plan[2], "build_seconds": round(seconds, 3), "build_memory": build_memory,
        "csprt_version": package_versions(("csprt",))["csprt"], "warnings": warnings,
    }


def weight_inputs_sidecar(moved: list[WeightInput]) -> dict:
    """A weight-free engine's sidecar fields: what the runtime reads, uploads and binds (`graphs.weight_inputs`)."""
    return {"weights": "inputs", "weight_inputs": [w.to_json() for w in moved],
            "weight_input_bytes": sum(w.length for w in moved)}


def _manifest_entry(sidecar: dict, sidecar_rel: str) -> dict:
    keys = ("plan", "build_key", "trt_version", "compute_capabilities", "precision", "dims", "profiles_note")
    weight_free = {"weights": "inputs"} if sidecar.get("weights") == "inputs" else {}  # a host binds them: say so
    return {"sidecar": sidecar_rel, **{k: sidecar[k] for k in keys}, **weight_free}


def _drop_stale_entry(artifact: Artifact, manifest: dict, stage: str, flavor: str) -> None:
    """Unlist `stage`'s engine when it was built from other graph files (a host must not load it)."""
    entry = next(e for e in manifest["stages"] if e["name"] == stage)
    listed = entry["engines"].get(flavor)
    if listed is None:
        return
    try:
        built_from = json.loads((artifact.dir / listed["sidecar"]).read_text(encoding="utf-8")).get("graph_files")
    except (OSError, ValueError, KeyError):
        built_from = None
    if built_from != entry["files"]:
        del entry["engines"][flavor]


def _plan_splits(artifact: Artifact, memory: dict[str, StageMemory], budget: int,
                 max_layers: int | None) -> dict[str, SplitPlan]:
    """Split plans of the block stages over `budget` (or over `max_layers` layers); their entries in `memory`
    become the largest piece's estimate, or, for a block over `budget` even one layer per engine, that layer's
    (`StageMemory.layer`): `check_build_memory` then refuses it with every other stage's true need."""
    splits = {}
    for name, m in list(memory.items()):
        spec = artifact.layout.stage(name)
        if not splittable(spec) or (m.peak_bytes <= budget and (max_layers is None
                                                                 or max_layers >= len(block_layers(spec)))):
            continue
        try:
            plan = plan_split(artifact, name, budget, max_layers, whole=m.peak_bytes)
        except LayerOverBudget as exc:
            memory[name] = exc.memory
            continue
        if plan is not None:
            splits[name] = plan
            memory[name] = StageMemory(name, m.inline_bytes, m.external_bytes, plan.peak_bytes)
    return splits


def _input_bytes(job: _Job) -> int:
    """External-data bytes of the weights `job`'s engine takes as inputs (0 unless `--weights-as-inputs`). Counted
    without rewriting the graph, and without loading it when it has no external data (nothing external moves)."""
    entry = job.artifact.stage_entry(job.stage)
    if job.settings.weights != "inputs" or set(entry["files"]) == {entry["graph"]}:
        return 0
    return moved_bytes(_moved_weights(job)[1])["external"]


def _stage_list(artifact: Artifact, stages) -> list[str]:
    if stages is None:
        return [s.name for s in artifact.layout.stages]
    names = [n.strip() for n in (stages.split(",") if isinstance(stages, str) else stages) if n.strip()]
    check_stage_names(artifact, names)
    return [s.name for s in artifact.layout.stages if s.name in names]


def _resolve(art_dir, precision, flavor, compute_capabilities, shapes, workspace_gb, stages, weights="engine"):
    """Check every setting (cheapest first, TensorRT last) -> (artifact, stage names, trt, settings, dims)."""
    artifact = load_artifact(art_dir)
    check_buildable(artifact.manifest, artifact.rebuild_command)  # MatMulNBits / MatMulInteger: ORT only
    precision = resolve_precision(precision, artifact)
    names = _stage_list(artifact, stages)
    dims = apply_overrides(artifact.layout.dims, parse_shapes(shapes, artifact.layout.dims))
    if workspace_gb is not None and not workspace_gb > 0:
        raise ToolchainError(f"--workspace {workspace_gb}: expected a positive size in GiB")
    trt, flavor, version = load_trt(flavor)
    targets = resolve_compute_capabilities(trt, flavor, compute_capabilities)
    return artifact, names, trt, BuildSettings(flavor, version, precision, targets, workspace_gb, weights), dims


def inspect_stage(art_dir, stage: str, precision: str | None = None, flavor: str = "auto",
                  compute_capabilities=None, shapes=None, workspace_gb: float | None = None) -> Prepared:
    """The parsed network and builder config `build_engines` would build `stage` from, unbuilt.

    Takes `build_engines`' settings; read the profile back with `read_profile(prepared.trt_profiles[0],
    prepared.network)`.
    """
    artifact, _, trt, settings, dims = _resolve(art_dir, precision, flavor, compute_capabilities, shapes,
                                                workspace_gb, [stage])
    return prepare_stage(trt, _Job(artifact, stage, settings, dims))


def build_engines(art_dir, precision: str | None = None, flavor: str = "auto", compute_capabilities=None,
                  shapes=None, timing_cache=None, workspace_gb: float | None = None, stages=None,
                  progress: Callable[[str], None] | None = None, max_build_memory_gb: float | None = None,
                  max_layers_per_engine: int | None = None, weights_as_inputs: bool = False) -> dict:
    """Build (or reuse) one engine per stage graph of an artifact and record them in its manifest.

    Stages build one at a time, each within the build memory budget: before building anything, the estimated
    peak of every stage to build (`estimate_stage_memory`) is checked against it. A block stage (`llm_<i>`) over
    it is built as the fewest engines of consecutive layers that each fit (`engines.split_build`); the
    manifest and graphs are unchanged, the stage's sidecar lists its pieces.

    The build holds the artifact's export lock (`graphs.artifact_dir.export_lock`) from loading the artifact to
    writing its manifest: engines go into the current generation, so an export (which would swap in a new one
    without them) or a second build waits its turn instead of racing it; either is refused at once, naming
    the one running.

    Args:
        art_dir (path): an exported artifact; engines go to `<art_dir>/engines/<flavor>/`.
        precision (str | None): "fp16", "bf16" or "fp32"; must equal the artifact's. Defaults to None (the
            artifact's).
        flavor (str): "auto", "tensorrt" or "tensorrt-rtx". Defaults to "auto" (tensorrt, then tensorrt-rtx).
        compute_capabilities (Iterable[str] | None): TensorRT-RTX targets, e.g. ["SM86", "SM89"]. Defaults to
            None (all it can target from SM80 on).
        shapes (Iterable[str] | None): "NAME=min:opt:max" named-dim overrides within the exported ranges.
            Defaults to None (the manifest's dims).
        timing_cache (path | None): a timing cache file to read and update (TensorRT; TensorRT-RTX has none and
            ignores it). Defaults to None.
        workspace_gb (float | None): builder workspace limit in GiB. Defaults to None (TensorRT's default).
        stages (str | Iterable[str] | None): "a,b" or names to build. Defaults to None (every stage).
        progress (callable | None): called with one line per stage event. Defaults to None (silent).
        max_build_memory_gb (float | None): build memory budget in GiB. Defaults to None (what the host has
            available now, `host_memory_budget`). A block stage over it is built as several engines of
            consecutive layers (`engines.split_build`).
        max_layers_per_engine (int | None): build each block stage as engines of at most this many decoder
            layers. Defaults to None (as many as the budget allows).
        weights_as_inputs (bool): weight-free engines: every stage's GEMM and embedding weights become engine
            inputs the runtime reads from the graphs' own files (`graphs.weight_inputs`), so the artifact holds
            them once and the build never packs them. Never split into pieces. Defaults to False.

    Returns:
        dict: {"artifact", "flavor", "trt_version", "compute_capabilities", "precision", "engines_dir",
        "budget_bytes", "stages": {name: {"status": "built" | "cached", "plan", "sidecar", "plan_bytes",
        "seconds", "estimated_peak_bytes", "engines"}}} (plan_bytes: all of a stage's engines).

    Raises:
        ToolchainError: bad settings, TensorRT missing, an unusable artifact, an export or build of it running, or
            a stage whose estimated peak is over the budget (before any build; the message names the budget that
            would fit).
        EngineBuildError: some stages failed; the others were built and recorded (`.report`).
    """
    # An artifact path that is not there takes no lock (and leaves no lock file): load_artifact says what is wrong.
    lock = (exclusive_lock(export_lock(art_dir), f"csprt build of {art_dir}",
                           fix="wait for it to finish, then run the build again")
            if Path(art_dir).is_dir() else contextlib.nullcontext())
    with lock:
        return _build_locked(art_dir, precision, flavor, compute_capabilities, shapes, timing_cache, workspace_gb,
                             stages, progress, max_build_memory_gb, max_layers_per_engine, weights_as_inputs)


def _build_locked(art_dir, precision, flavor, compute_capabilities, shapes, timing_cache, workspace_gb, stages,
                  progress, max_build_memory_gb, max_layers_per_engine=None, weights_as_inputs=False) -> dict:
    say = progress or (lambda _msg: None)
    if weights_as_inputs and max_layers_per_engine is not None:
        raise ToolchainError("--max-layers-per-engine cannot be combined with --weights-as-inputs: a weight-free "
                             "engine's build never holds its GEMM weights, so its blocks are built whole; drop one of "
                             "the two options")
    artifact, names, trt, settings, dims = _resolve(art_dir, precision, flavor, compute_capabilities, shapes,
                                                    workspace_gb, stages,
                                                    "inputs" if weights_as_inputs else "engine")
    flavor, version, targets = settings.flavor, settings.trt_version, settings.compute_capabilities
    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None and flavor == "tensorrt-rtx":
        say(f"--timing-cache ignored: TensorRT-RTX {version} has no timing cache (its timing-cache calls are no-ops)")
        cache_path = None
    if max_build_memory_gb is not None and not max_build_memory_gb > 0:
        raise ToolchainError(f"--max-build-memory {max_build_memory_gb}: expected a positive size in GiB")
    budget = int(max_build_memory_gb * GIB) if max_build_memory_gb is not None else host_memory_budget()
    if max_layers_per_engine is not None and not max_layers_per_engine >= 1:
        raise ToolchainError(f"--max-layers-per-engine {max_layers_per_engine}: expected a whole number of decoder "
                             "layers, 1 or more")
    jobs = {name: _Job(artifact, name, settings, dims) for name in names}
    states = {name: _cache_state(job) for name, job in jobs.items()}
    states = {name: (key, hit if hit is None or fits_layers(hit, max_layers_per_engine, len(block_layers(
        artifact.layout.stage(name)))) else None) for name, (key, hit) in states.items()}
    memory = {name: estimate_stage_memory(artifact, name, _input_bytes(jobs[name]))
              for name, (_, hit) in states.items() if hit is None}
    splits = {} if weights_as_inputs else _plan_splits(artifact, memory, budget, max_layers_per_engine)
    check_build_memory(artifact, names, memory, budget, max_build_memory_gb is None)
    if memory:
        worst = max(memory.values(), key=lambda m: m.peak_bytes)
        say(f"build memory: budget {gib(budget)} ({'this host has available' if max_build_memory_gb is None else '--max-build-memory'}); "
            f"largest estimated peak {gib(worst.peak_bytes)} ({worst.stage}); stages build one at a time")
        for name, m in memory.items():  # what each stage (and piece) will need, before anything builds
            how = (f"{len(splits[name].pieces)} engines: {splits[name].describe()}" if name in splits
                   else "one engine")
            given = f" ({gib(m.input_bytes)} of them engine inputs)" if m.input_bytes else ""
            say(f"build memory: {name}: weights {gib(m.inline_bytes + m.external_bytes)}{given}, estimated peak "
                f"{gib(m.peak_bytes)} ({how})")
    report = {"artifact": str(artifact.dir), "flavor": flavor, "trt_version": version,
              "compute_capabilities": list(targets), "precision": settings.precision,
              "engines_dir": str(artifact.dir / ENGINES_DIR / flavor), "budget_bytes": budget, "stages": {}}
    manifest = copy.deepcopy(artifact.manifest)
    failures: dict[str, str] = {}
    try:
        for i, name in enumerate(names, 1):
            t0 = time.perf_counter()
            try:
                sidecar, built = _build_stage(trt, jobs[name], cache_path,
                                              lambda msg, i=i: say(f"[{i}/{len(names)}] {msg}"), states[name],
                                              memory.get(name), splits.get(name))
            except ToolchainError as exc:
                failures[name] = str(exc)
                say(f"[{i}/{len(names)}] {name}: FAILED: {exc}")
                _drop_stale_entry(artifact, manifest, name, flavor)
                continue
            plan_rel, sidecar_rel = engine_paths(flavor, name)
            split = sidecar.get("split") or {}
            report["stages"][name] = {"status": "built" if built else "cached",
                                      "plan": str(artifact.dir / sidecar["plan"]),
                                      "sidecar": str(artifact.dir / sidecar_rel),
                                      "plan_bytes": split.get("plan_bytes_total", sidecar["plan_bytes"]),
                                      "engines": len(sidecar.get("pieces") or ()) or 1,
                                      "seconds": round(time.perf_counter() - t0, 3),
                                      "estimated_peak_bytes": (sidecar.get("build_memory") or {}).get(
                                          "estimated_peak_bytes"),
                                      "profiles": sidecar.get("profile_names") or ["all"],
                                      "weight_input_bytes": sidecar.get("weight_input_bytes", 0)}
            entry = next(e for e in manifest["stages"] if e["name"] == name)
            entry["engines"][flavor] = _manifest_entry(sidecar, sidecar_rel)
    finally:
        if manifest != artifact.manifest:
            write_manifest(artifact.dir, manifest)
    if failures:
        first = next(iter(failures.values()))
        raise EngineBuildError(f"{len(failures)} of {len(names)} stage engines failed to build "
                               f"({', '.join(failures)}); first: {first}", {**report, "failures": failures})
    return report


# --- loading checks -------------------------------------------------------------------------------
