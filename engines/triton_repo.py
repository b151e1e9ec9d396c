"""`csprt triton-repo`: a native Triton model repository for an artifact, one model per stage plus a BLS orchestrator.

    REPO/
      csprt_repo.json                 # written last: what made the repo (artifact, backend, models); marks it as ours
      <name>/                         # BLS orchestrator, Python backend (engines/triton_bls/model.py)
        config.pbtxt                  #   image + query [+ mode ...] -> mask_png, masks_packed, answer, timings ...
        1/model.py
        1/stages.json                 #   stage -> Triton model and the inputs it takes
        1/artifact/manifest.json      #   the artifact's manifest and tokenizer: HostIO + Pipeline need nothing else
        1/artifact/tokenizer/...       #   (+ accm/...: the files an ACCM artifact's host steps read)
      <name>_<stage>/                 # one per stage: onnxruntime_onnx (model.onnx [+ external data])
        config.pbtxt                  #   or tensorrt_plan (model.plan from `csprt build`)
        1/model.onnx | 1/model.plan
      <name>_<stage>_p<k>/            # --backend tensorrt, a block built in pieces: one tensorrt_plan model per
        config.pbtxt                  #   piece (engines/<flavor>/<stage>.p<k>.plan), I/O from its sidecar; the
        1/model.plan                  #   BLS model runs the stage as its pieces in order (stages.json)

The repository is built in a temp directory beside REPO and renamed into place, so Triton never
sees half of one. An existing REPO is replaced only when it is empty or a repository csprt wrote.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from engines.batching import DEFAULT_MAX_QUEUE_DELAY_US, served_max_batch
from engines.trt import PRETTY
from graphs.errors import ArtifactError, ToolchainError
from graphs.manifest import MANIFEST_NAME, Artifact, file_sha256, load_artifact, package_versions
from graphs.stages import DimRange, StageSpec, TensorSpec
from graphs.triton_config import KINDS, bls_config, model_config_pb2, stage_config

REPO_FORMAT = "csprt.triton_repo"
REPO_FORMAT_VERSION = 1
REPO_MARKER = "csprt_repo.json"
STAGES_FILE = "stages.json"          # in the BLS version directory
ARTIFACT_DIR = "artifact"            # in the BLS version directory
VERSION = "1"
CACHE_PARAMETER = "csprt_image_cache_mb"  # the BLS config parameter engines/triton_bls/model.py reads
DEFAULT_IMAGE_CACHE_MB = 512                # as csprt serve
BACKENDS = ("onnxruntime", "tensorrt")
TRT_FLAVORS = ("tensorrt", "tensorrt-rtx")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def bls_template() -> Path:
    """engines/triton_bls/model.py, the BLS model copied into every repository (package data)."""
    return Path(str(importlib.resources.files("engines").joinpath("triton_bls", "model.py")))


def _check_options(backend: str, name: str, instances: int, max_batch_size: int | None, flavor: str | None,
                   device: str, image_cache_mb: int = 0, max_queue_delay_us: int = 0) -> None:
    if image_cache_mb < 0:
        raise ToolchainError(f"--image-cache-mb {image_cache_mb}: expected 0 (off) or more")
    if backend not in BACKENDS:
        raise ToolchainError(f"--backend {backend}: choose one of: {', '.join(BACKENDS)}")
    if not _NAME.match(name):
        raise ToolchainError(f"--name {name!r}: a Triton model name here is letters, digits, '_', '.' and '-', "
                             "starting with a letter or digit (it is also the directory name)")
    if instances < 1:
        raise ToolchainError(f"--instances {instances}: expected at least 1")
    if max_batch_size is not None and max_batch_size < 0:
        raise ToolchainError(f"--max-batch-size {max_batch_size}: expected 0 (no batch axis) or more")
    if max_queue_delay_us < 0:
        raise ToolchainError(f"--max-queue-delay-us {max_queue_delay_us}: expected 0 or more")
    if device not in KINDS:
        raise ToolchainError(f"--device {device}: choose one of: {', '.join(KINDS)}")
    if flavor is not None and backend != "tensorrt":
        raise ToolchainError(f"--flavor {flavor} applies to --backend tensorrt only (this is --backend {backend})")
    if flavor is not None and flavor not in TRT_FLAVORS:
        raise ToolchainError(f"--flavor {flavor}: choose one of: {', '.join(TRT_FLAVORS)}")
    if backend == "tensorrt" and device != "gpu":
        raise ToolchainError("--device cpu: TensorRT engines run on a GPU only; use --backend onnxruntime for CPU "
                             "instances")
    model_config_pb2()  # Triton's config protobuf (tritonclient) is there, before any work


def _check_out(out: Path, art: Path) -> None:
    """Refuse a --out that is a file, holds the artifact, or is a non-empty directory csprt did not write."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ToolchainError(f"--out {out} exists and is not a directory (or is a symlink); pass a new or empty "
                             "directory")
    if out.resolve() == art.resolve() or out.resolve() in art.resolve().parents:
        raise ToolchainError(f"--out {out} contains the artifact {art}; writing the repository there would replace "
                             "it; pass a directory outside the artifact")
    if out.is_dir() and any(out.iterdir()) and not _is_repo(out):
        raise ToolchainError(f"--out {out} exists and is not a Triton repository csprt wrote (no {REPO_MARKER}); "
                             "csprt replaces only its own repositories: pass a new or empty directory, or remove it")


def _is_repo(path: Path) -> bool:
    try:
        marker = json.loads((path / REPO_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == REPO_FORMAT


# --- what each stage model holds ------------------------------------------------------------------

@dataclass(frozen=True)
class _StageModel:
    """One stage's Triton model: what goes in its version directory, the inputs it has, its dims."""

    stage: StageSpec
    model: str                   # Triton model name, <name>_<stage>
    files: dict[Path, str]       # source file -> path in the version directory
    inputs: list[str]            # the graph's or engine's inputs (a graph may drop spec inputs it never reads)
    dims: dict[str, DimRange]    # named-dim ranges: the manifest's, or the engine's
    backend: str                 # graphs.triton_config.STAGE_BACKENDS key
    note: str = ""               # an extra config header line
    profiles: int = 1            # the plan's optimization profiles (a decoded block's: prefill and decode)
    piece: int | None = None     # a block built in pieces: this model's piece (its `stage` has the piece's I/O)


def _onnx_models(artifact: Artifact, name: str) -> list[_StageModel]:
    import onnx

    models = []
    for stage in artifact.layout.stages:
        entry = artifact.stage_entry(stage.name)
        graph = Path(entry["graph"])
        # model.onnx; external data keeps its path relative to the graph (the graph references it by that path)
        files = {artifact.dir / rel: ("model.onnx" if Path(rel) == graph else Path(rel).relative_to(graph.parent).as_posix())
                 for rel in entry["files"]}
        have = {i.name for i in onnx.load(str(artifact.dir / graph), load_external_data=False).graph.input}
        inputs = [t.name for t in stage.inputs if t.name in have]  # exporters drop inputs a graph never reads
        models.append(_StageModel(stage, f"{name}_{stage.name}", files, inputs, artifact.layout.dims, "onnxruntime"))
    return models


def _engine_models(artifact: Artifact, name: str, flavor: str | None) -> tuple[list[_StageModel], str, str]:
    """Stage models from `csprt build` engines -> (models, flavor, TensorRT version)."""
    from engines.engine_check import check_engine, check_pieces

    fix = f"csprt build {shlex.quote(str(artifact.path))}"
    chosen = flavor or "tensorrt"
    stages = artifact.layout.stages
    missing = [s.name for s in stages if chosen not in artifact.stage_entry(s.name)["engines"]]
    if missing:
        rtx_only = flavor is None and all("tensorrt-rtx" in artifact.stage_entry(s.name)["engines"] for s in stages)
        if rtx_only:
            raise ArtifactError(
                f"{artifact.path} has TensorRT-RTX engines only; stock Triton's tensorrt backend links data-center "
                f"TensorRT and cannot load them: build TensorRT engines on the GPU host ({fix} --flavor tensorrt), "
                "or pass --flavor tensorrt-rtx for a Triton build with a TensorRT-RTX backend (backends/tensorrt_rtx)")
        raise ArtifactError(f"{len(missing)} of {len(stages)} stages of {artifact.path} have no {PRETTY[chosen]} engine "
                            f"({', '.join(missing)}); build them with: {fix} --flavor {chosen}")
    versions = {artifact.stage_entry(s.name)["engines"][chosen]["trt_version"] for s in stages}
    if len(versions) != 1:
        raise ArtifactError(f"the {PRETTY[chosen]} engines of {artifact.path} come from several versions "
                            f"({', '.join(sorted(versions))}); one Triton loads one version: rebuild with: {fix}")
    version = versions.pop()
    models = []
    for stage in stages:
        plan, sidecar = check_engine(artifact.dir, stage.name, chosen, version)  # refuses stale or changed plans
        if sidecar.get("weights", "engine") != "engine":  # Triton binds only request tensors to engine inputs
            raise ArtifactError(f"stage {stage.name!r}: its engine takes its weights as inputs (built with "
                                f"--weights-as-inputs), which Triton's TensorRT backend cannot serve (every weight "
                                f"would be a request tensor); rebuild that stage with its weights inside: "
                                f"{fix} --stages {stage.name}")
        dims = {**artifact.layout.dims, **{k: DimRange(**v) for k, v in sidecar.get("dims", {}).items()}}
        note = (f"{PRETTY[chosen]} {version} engine for {', '.join(sidecar['compute_capabilities'])}; Triton's "
                f"{'TensorRT-RTX' if chosen == 'tensorrt-rtx' else 'TensorRT'} must be exactly this version")
        pieces = check_pieces(artifact.dir, sidecar, fix, verify=False)  # check_engine hashed them
        if pieces:  # one Triton TensorRT model runs one plan: one model per piece
            models += _piece_models(stage, sidecar, pieces, f"{name}_{stage.name}", dims, chosen, note, fix)
            continue
        inputs = list(sidecar["profiles"][0])  # the engine's inputs: those it has a profile for
        models.append(_StageModel(stage, f"{name}_{stage.name}", {plan: "model.plan"}, inputs, dims, chosen, note,
                                  len(sidecar["profiles"])))
    return models, chosen, version


def _piece_models(stage: StageSpec, sidecar: dict, pieces: list[tuple[Path, dict]], base: str,
                  dims: dict[str, DimRange], backend: str, note: str, fix: str) -> list[_StageModel]:
    """One model per piece of a block built in pieces, `<base>_p<k>`: the stage inputs and outputs it has, plus the
    interface tensors between pieces (dtype from the writer's sidecar, dims from the readers' profiles)."""
    from engines.split_runtime import piece_bindings

    piece_bindings([p for _, p in pieces], ())  # refuses pieces that do not chain (an interface input nobody writes)
    iface = _interface_tensors(stage, sidecar, [p for _, p in pieces], dims)
    models = []
    for plan, piece in pieces:
        ins = [t for t in stage.inputs if t.name in piece["inputs"]] + [iface[n] for n in piece["interface_inputs"]]
        outs = [t for t in stage.outputs if t.name in piece["outputs"]] + [iface[n] for n in piece["interface_outputs"]]
        if {t.name for t in ins} != set(piece["inputs"]) or {t.name for t in outs} != set(piece["outputs"]):
            raise ArtifactError(f"engine piece {piece['plan']} of stage {stage.name!r} lists tensors the stage and "
                                f"its pieces do not have; rebuild with: {fix}")
        spec = replace(stage, inputs=tuple(ins), outputs=tuple(outs))
        a, b = piece["layers"]
        what = (f"Piece {piece['piece'] + 1} of {len(pieces)} of stage {stage.name!r} (layers {a}-{b - 1}), run in "
                f"order by the BLS model")
        models.append(_StageModel(spec, f"{base}_p{piece['piece']}", {plan: "model.plan"}, [t.name for t in ins], dims,
                                  backend, f"{what}\n{note}", len(piece["profiles"]), piece["piece"]))
    return models


def _interface_tensors(stage: StageSpec, sidecar: dict, pieces: list[dict],
                       dims: dict[str, DimRange]) -> dict[str, TensorSpec]:
    """The tensors passed between a block's pieces as TensorSpecs. A dim that varies over the profiles is named
    after the stage input dim with the same min/opt/max in every profile (`batch`, `rows_<block>` ...: Triton's
    batch axis and the config's ranges follow), else left unnamed (-1)."""
    count = len(sidecar["profiles"])
    ranges: dict[str, list] = {}  # named dim -> its (min, opt, max) in each stage profile
    for k, prof in enumerate(sidecar["profiles"]):
        for t in stage.inputs:
            for i, d in enumerate(t.shape):
                if isinstance(d, str) and d in dims and t.name in prof:
                    seen = ranges.setdefault(d, [None] * count)
                    seen[k] = seen[k] or tuple(prof[t.name][w][i] for w in ("min", "opt", "max"))
    dtypes = {n: spec["dtype"] for p in pieces for n, spec in (p.get("interface_outputs") or {}).items()}
    out = {}
    for p in pieces:
        for name in p.get("interface_inputs") or ():
            if name in out:
                continue
            shapes = [prof[name] for prof in p["profiles"]]
            shape = []
            for i in range(len(shapes[0]["min"])):
                seen = [tuple(s[w][i] for w in ("min", "opt", "max")) for s in shapes]
                if all(lo == hi == seen[0][0] for lo, _, hi in seen):
                    shape.append(seen[0][0])
                else:
                    shape.append(next((d for d, r in ranges.items() if r == seen), f"{name}_d{i}"))  # unnamed: -1
            out[name] = TensorSpec(name, dtypes[name], tuple(shape))
    return out


# --- writing --------------------------------------------------------------------------------------

def _place(src: Path, dest: Path, link: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dest)
            return
        except OSError:  # another filesystem, or links not allowed: copy
            pass
    shutil.copyfile(src, dest)


def _write_json(obj: dict, path: Path) -> None:
    """Plain write: the whole temp tree is renamed into place at once, and, unlike graphs.atomic's temp files
    (mode 0600), the file gets the umask's mode, so a Triton running as another user can read it."""
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _header(artifact: Artifact, what: str, command: str) -> str:
    sched = artifact.schedule.name
    return (f"{what} of the csprt artifact {artifact.dir.resolve()} (schedule {sched}, {artifact.precision}, "
            f"modes {', '.join(artifact.modes)}).\nGenerated by csprt triton-repo; regenerate rather than edit: {command}")


def _write_bls(tmp: Path, artifact: Artifact, name: str, models: list[_StageModel], instances: int,
               max_batch_size: int, command: str, image_cache_mb: int = DEFAULT_IMAGE_CACHE_MB,
               max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US) -> None:
    version_dir = tmp / name / VERSION
    version_dir.mkdir(parents=True)
    shutil.copyfile(bls_template(), version_dir / "model.py")
    art_copy = version_dir / ARTIFACT_DIR
    art_copy.mkdir()
    shutil.copyfile(artifact.dir / MANIFEST_NAME, art_copy / MANIFEST_NAME)
    tok = artifact.manifest["tokenizer"]["dir"]
    shutil.copytree(artifact.dir / tok, art_copy / tok, copy_function=shutil.copyfile)
    for rel in sorted({rel for step in artifact.manifest.get("host_steps") or () for rel in step["files"]}):
        (art_copy / rel).parent.mkdir(parents=True, exist_ok=True)  # ACCM's tokenizers: its host steps read them
        shutil.copyfile(artifact.dir / rel, art_copy / rel)
    _write_json({"format": "csprt.triton_bls", "format_version": REPO_FORMAT_VERSION,
                 "stage_models": _stage_entries(models)},
                version_dir / STAGES_FILE)
    params = {"csprt_version": package_versions(("csprt",))["csprt"], "csprt_modes": ",".join(artifact.modes),
              CACHE_PARAMETER: str(image_cache_mb)}  # read by model.py: its image cache, per instance process
    header = (_header(artifact, "BLS orchestrator", command) + "\nNeeds csprt installed in the Python backend's "
              "environment (pip install csprt): model.py runs csprt's HostIO and Pipeline, each stage a BLS request.")
    text = bls_config(artifact.layout, name=name, instances=instances, max_batch_size=max_batch_size,
                      max_queue_delay_us=max_queue_delay_us, parameters=params, header=header)
    (tmp / name / "config.pbtxt").write_text(text, encoding="utf-8")


def _stage_entries(models: list[_StageModel]) -> dict:
    """stages.json's "stage_models": stage -> {"model", "inputs"}, or for a block built in pieces {"pieces": [{"model",
    "inputs", "outputs"}, ...]} in run order (engines/triton_bls/model.py requests each in turn)."""
    out: dict = {}
    for m in models:
        if m.piece is None:
            out[m.stage.name] = {"model": m.model, "inputs": m.inputs}
        else:
            out.setdefault(m.stage.name, {"pieces": []})["pieces"].append(
                {"model": m.model, "inputs": m.inputs, "outputs": [t.name for t in m.stage.outputs]})
    return out


def _write_stage(tmp: Path, artifact: Artifact, m: _StageModel, instances: int, device: str, link: bool,
                 command: str) -> None:
    for src, rel in m.files.items():
        _place(src, tmp / m.model / VERSION / rel, link)
    header = _header(artifact, f"Stage {m.stage.name!r} ({m.stage.kind})", command)
    header += f"\n{m.note}" if m.note else ""
    text = stage_config(m.stage, m.dims, name=m.model, backend=m.backend, instances=instances, kind=device,
                        inputs=m.inputs, header=header, profiles=m.profiles)
    (tmp / m.model / "config.pbtxt").write_text(text, encoding="utf-8")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, replacing an existing `out` (moved aside first, deleted after)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, aside / "repo")
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(aside / "repo", out)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


_DEFAULTS = {"backend": "onnxruntime", "name": "csprt", "instances": 1, "max_batch_size": None,
             "max_queue_delay_us": DEFAULT_MAX_QUEUE_DELAY_US, "flavor": None, "image_cache_mb": DEFAULT_IMAGE_CACHE_MB,
             "device": "gpu", "link": False}


def _command(art: Path, out: Path, options: dict) -> str:
    """The `csprt triton-repo` line that rewrites this repository (options left at their defaults omitted)."""
    words = ["csprt", "triton-repo", str(art), "--out", str(out)]
    for key, value in options.items():
        if value is None or value is False or value == _DEFAULTS[key]:
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


def write_triton_repo(art_dir, out, backend: str = "onnxruntime", name: str = "csprt", instances: int = 1,
                      max_batch_size: int | None = None, flavor: str | None = None, device: str = "gpu",
                      link: bool = False, progress: Callable[[str], None] | None = None,
                      image_cache_mb: int = DEFAULT_IMAGE_CACHE_MB,
                      max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US) -> dict:
    """Write a Triton model repository for an artifact: one model per stage and a BLS orchestrator.

    Args:
        art_dir (path): an exported artifact (with `csprt build` engines for backend "tensorrt").
        out (path): the repository directory: new, empty, or one this function wrote (it is replaced).
        backend (str): "onnxruntime" (stage graphs as model.onnx) or "tensorrt" (engines as model.plan).
            Defaults to "onnxruntime".
        name (str): the BLS model's name; stage models are `<name>_<stage>`. Defaults to "csprt".
        instances (int): instances of every model. Each stage instance holds its own weights (GPU memory);
            each BLS instance is one request in flight. Defaults to 1.
        max_batch_size (int | None): the BLS model's: how many one-image requests Triton's dynamic batcher hands
            one execute() call, run as one batched pipeline call; at most the artifact's exported batch
            (`csprt export --max-batch`); or 0 for no batch axis (clients then send [1], not [1, 1]). Stage
            models get the batch axis from the manifest (graphs.triton_config). Defaults to None (8, or the
            exported maximum if lower, as `csprt serve`).
        flavor (str | None): backend "tensorrt": "tensorrt" (stock Triton) or "tensorrt-rtx" (a Triton whose
            backends/tensorrt_rtx links TensorRT-RTX). Defaults to None ("tensorrt").
        device (str): "gpu" or "cpu" stage instances (cpu: onnxruntime only). Defaults to "gpu".
        link (bool): hard-link model files from the artifact where the filesystem allows, else copy.
            Defaults to False (copy).
        progress (callable | None): called with one line per step. Defaults to None (silent).
        image_cache_mb (int): the BLS model's image cache (encodings kept per image for further questions),
            per instance: Triton runs each Python-backend instance in its own process. 0 turns it off.
            Defaults to 512, as `csprt serve`.
        max_queue_delay_us (int): the BLS model's dynamic batcher: how long it may hold a request to fill a
            batch. Defaults to 2000, as `csprt serve`.

    Returns:
        dict: the repository's csprt_repo.json contents ("repo", "bls_model", "stage_models": stage -> its model,
            or the list of its piece models for a block built in pieces, ...).

    Raises:
        ToolchainError: bad options or --out; ArtifactError for an unusable artifact or missing/stale engines.
    """
    say = progress or (lambda _msg: None)
    art, out = Path(art_dir), Path(out)
    _check_options(backend, name, instances, max_batch_size, flavor, device, image_cache_mb, max_queue_delay_us)
    _check_out(out, art)
    artifact = load_artifact(art)  # verifies every graph file's sha256 before anything is copied
    command = _command(art, out, {"backend": backend, "name": name, "instances": instances,
                                  "max_batch_size": max_batch_size, "max_queue_delay_us": max_queue_delay_us,
                                  "flavor": flavor, "device": device, "link": link, "image_cache_mb": image_cache_mb})
    if max_batch_size != 0:  # 0: no batch axis on the BLS model
        max_batch_size = served_max_batch(max_batch_size, artifact)
    trt_version = None
    if backend == "onnxruntime":
        models = _onnx_models(artifact, name)
    else:
        models, flavor, trt_version = _engine_models(artifact, name, flavor)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        for i, m in enumerate(models, 1):
            say(f"[{i}/{len(models)}] {m.model}: {m.backend} ({', '.join(sorted(m.files.values()))})")
            _write_stage(tmp, artifact, m, instances, device, link, command)
        say(f"{name}: BLS orchestrator (python backend) with the manifest and tokenizer")
        _write_bls(tmp, artifact, name, models, instances, max_batch_size, command, image_cache_mb, max_queue_delay_us)
        marker = {
            "format": REPO_FORMAT, "format_version": REPO_FORMAT_VERSION,
            "csprt_version": package_versions(("csprt",))["csprt"], "command": command,
            "artifact": str(artifact.dir.resolve()), "manifest_sha256": file_sha256(artifact.dir / MANIFEST_NAME),
            "backend": backend, "flavor": flavor, "trt_version": trt_version, "device": device,
            "instances": instances, "max_batch_size": max_batch_size, "max_queue_delay_us": max_queue_delay_us,
            "image_cache_mb": image_cache_mb,
            "bls_model": name,
            "stage_models": {stage: entry.get("model") or [p["model"] for p in entry["pieces"]]
                             for stage, entry in _stage_entries(models).items()},  # pieces: a list, in run order
        }
        _write_json(marker, tmp / REPO_MARKER)  # last: a directory without it is never taken for a repository
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; Triton may run as another user
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {out}")
    return {**marker, "repo": str(out)}
