"""The artifact manifest: what a C++, Triton or Python host reads to chain the stage graphs.

    out/
      manifest.json            # this module; validated by manifest.schema.json (docs/artifact.md)
      graphs/<stage>.onnx      # + graphs/<stage>.onnx.data when a graph is over 2 GB
      tokenizer/               # the checkpoint's tokenizer files
      engines/                 # TensorRT plans (csprt build)

The stage I/O, wiring, named dims and decode loop are `graphs.stages.Layout`, serialised verbatim;
the manifest adds per-stage files with their sha256, export keys and tolerances, plus the model,
schedule, tokenizer and pre/postprocessing metadata. `manifest.json` is written last and removed
first (`invalidate`), so a directory that is being rewritten never loads.

The manifest is sealed: `seal` is the sha256 of its own canonical JSON (`manifest_seal`), written by
`write_manifest` and checked first at load, so a hand edit (of preprocessing, a dim bound, a tolerance) is
refused instead of changing results silently. The graphs and tokenizer files are covered by their sha256 in it.
The seal is a checksum against edits and corruption, not a signature: whoever can run csprt can reseal.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from graphs.atomic import write_json
from graphs.dims import DimError, dim_names
from graphs.errors import ArtifactError, ToolchainError, internal_error
from graphs.schedule import Schedule
from graphs.shapes import ModelShape
from graphs.stages import (CACHE_SOURCE, HOST_STEP_FEED, PRECISIONS, DimRange, HostStep, Layout, Loop, StageSpec,
                           TensorSpec)

SCHEMA_VERSION = 3  # 2: weights once (embed / entry_<i> / llm_<i> blocks), static KV cache, loop steps;
#                     3: a `batch` dim on every graph (--max-batch), right-padded suffixes, flat [SEG] rows
FORMAT = "csprt.artifact"
MANIFEST_NAME = "manifest.json"
GRAPHS_DIR = "graphs"
TOKENIZER_DIR = "tokenizer"
GENERIC_REBUILD = "csprt export CHECKPOINT --schedule NAME --out {dir}"
SEAL_KEY = "seal"
ALWAYS_FP32 = ("row_scores",)  # float outputs kept float32 whatever the precision (softmax attention per row)


# --- Layout <-> JSON ------------------------------------------------------------------------------

def _tensor_to_dict(t: TensorSpec) -> dict:
    d = {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
    if t.source:
        d["from"] = dict(t.source) if isinstance(t.source, dict) else t.source
    return d


def _tensor_from_dict(d: dict) -> TensorSpec:
    src = d.get("from", "")
    return TensorSpec(d["name"], d["dtype"], tuple(d["shape"]), dict(src) if isinstance(src, dict) else src)


def _stage_to_dict(s: StageSpec) -> dict:
    d = {"name": s.name, "kind": s.kind, "inputs": [_tensor_to_dict(t) for t in s.inputs],
         "outputs": [_tensor_to_dict(t) for t in s.outputs], "layers": list(s.layers), "loop": s.loop,
         "modes": list(s.modes), "skip_if_empty": s.skip_if_empty, "cache": [list(p) for p in s.cache]}
    if s.graph:
        d["runs"] = s.graph  # a decode step: the stage whose graph it runs ("graph" is the manifest's file path)
    return d


def _stage_from_dict(d: dict) -> StageSpec:
    return StageSpec(name=d["name"], kind=d["kind"], inputs=tuple(_tensor_from_dict(t) for t in d["inputs"]),
                     outputs=tuple(_tensor_from_dict(t) for t in d["outputs"]), layers=tuple(d["layers"]),
                     loop=d["loop"], modes=tuple(d["modes"]), skip_if_empty=d["skip_if_empty"],
                     cache=tuple(tuple(p) for p in d.get("cache", ())), graph=d.get("runs", ""))


def _host_step_to_dict(h: HostStep) -> dict:
    return {"name": h.name, "kind": h.kind, "before": h.before, "inputs": [_tensor_to_dict(t) for t in h.inputs],
            "outputs": [_tensor_to_dict(t) for t in h.outputs], "runs": list(h.runs), "params": dict(h.params)}


def _host_step_from_dict(d: dict) -> HostStep:
    return HostStep(name=d["name"], kind=d["kind"], before=d["before"],
                    inputs=tuple(_tensor_from_dict(t) for t in d["inputs"]),
                    outputs=tuple(_tensor_from_dict(t) for t in d["outputs"]), runs=tuple(d["runs"]),
                    params=dict(d["params"]))


def layout_to_dict(layout: Layout) -> dict:
    """The manifest's layout keys: host_inputs, stages (StageSpec fields only), dims, modes, outputs, loop.

    Args:
        layout (Layout): from `graphs.stages.build_layout`.
    """
    loop = None
    if layout.loop is not None:
        lp = layout.loop
        loop = {"steps": [_stage_to_dict(s) for s in lp.steps], "after": lp.after, "token": lp.token,
                "hidden": lp.hidden, "position": lp.position, "token_output": lp.token_output,
                "hidden_output": lp.hidden_output, "max_new_tokens": lp.max_new_tokens,
                "stop_token_ids": list(lp.stop_token_ids), "seg_token_id": lp.seg_token_id,
                "max_positions": lp.max_positions, "max_seg": lp.max_seg, "outputs": list(lp.outputs),
                "feeds": list(lp.feeds)}
    out = {
        "host_inputs": [_tensor_to_dict(t) for t in layout.host_inputs],
        "stages": [_stage_to_dict(s) for s in layout.stages],
        "dims": {k: {"min": r.min, "opt": r.opt, "max": r.max} for k, r in layout.dims.items()},
        "modes": list(layout.modes),
        "outputs": {k: dict(v) if isinstance(v, dict) else v for k, v in layout.outputs.items()},
        "loop": loop,
    }
    if layout.host_steps:  # only layouts with host steps (ACCM) have the key: other manifests are as before
        out["host_steps"] = [_host_step_to_dict(h) for h in layout.host_steps]
    return out


def layout_from_dict(d: dict) -> Layout:
    """Inverse of `layout_to_dict` (tuples restored). Also reads a whole manifest: extra keys are ignored.

    Args:
        d (dict): a dict with the keys `layout_to_dict` writes.
    """
    lp = d.get("loop")
    loop = None if lp is None else Loop(
        steps=tuple(_stage_from_dict(s) for s in lp["steps"]), after=lp["after"], token=lp["token"],
        hidden=lp["hidden"], position=lp["position"], token_output=lp["token_output"],
        hidden_output=lp["hidden_output"], max_new_tokens=lp["max_new_tokens"],
        stop_token_ids=tuple(lp["stop_token_ids"]), seg_token_id=lp["seg_token_id"],
        max_positions=lp["max_positions"], max_seg=lp["max_seg"], outputs=tuple(lp["outputs"]),
        feeds=tuple(lp["feeds"]))
    return Layout(
        host_inputs=tuple(_tensor_from_dict(t) for t in d["host_inputs"]),
        stages=tuple(_stage_from_dict(s) for s in d["stages"]),
        dims={k: DimRange(r["min"], r["opt"], r["max"]) for k, r in d["dims"].items()},
        modes=tuple(d["modes"]),
        outputs={k: dict(v) if isinstance(v, dict) else v for k, v in d["outputs"].items()},
        loop=loop,
        host_steps=tuple(_host_step_from_dict(h) for h in d.get("host_steps") or ()),
    )


def dim_problems(layout: Layout, shape: ModelShape) -> list[str]:
    """Named dims whose range is disordered or beyond what the model could ever feed: no dim of a graph (text,
    rows, cache, [SEG] count, instances) exceeds the model's positions, so a larger max is a corrupt or
    tampered manifest, and would reach TensorRT profiles and Triton configs. The decode loop's token limit and
    position limit are held to the model's positions too."""
    limit = shape.llm.max_positions
    out = []
    for name, r in layout.dims.items():
        if not 1 <= r.min <= r.opt <= r.max:
            out.append(f"dim {name!r} has range min {r.min}, opt {r.opt}, max {r.max}: expected 1 <= min <= opt <= max")
        elif r.max > limit:
            out.append(f"dim {name!r} has max {r.max}, beyond the model's {limit} positions")
    lp = layout.loop
    if lp is not None and not 1 <= lp.max_new_tokens <= limit:
        out.append(f"loop max_new_tokens is {lp.max_new_tokens}: expected 1 to the model's {limit} positions")
    if lp is not None and lp.max_positions not in (0, limit):
        out.append(f"loop max_positions is {lp.max_positions}, not the model's {limit}")
    return out


def precision_problems(layout: Layout, precision: str) -> list[str]:
    """Float tensors of the layout whose dtype is not the declared `precision`'s (`ALWAYS_FP32` excepted)."""
    want = PRECISIONS[precision]
    tensors = [("host input", t) for t in layout.host_inputs]
    tensors += [(f"stage {s.name!r} tensor", t) for s in layout.stages for t in (*s.inputs, *s.outputs)]
    return [f"{what} {t.name!r} is {t.dtype}, but the manifest declares precision {precision!r} ({want})"
            for what, t in tensors if t.dtype.startswith("float") and t.dtype != want and t.name not in ALWAYS_FP32]


def layout_problems(layout: Layout) -> list[str]:
    """Wiring and dim names that do not resolve: every input source names an existing host input, stage
    output or loop output, and every name in a shape is a key of `dims`. Empty when consistent."""
    known = {f"host.{t.name}" for t in layout.host_inputs} | {CACHE_SOURCE}
    known |= {f"{h.name}.{HOST_STEP_FEED}" for h in layout.host_steps}
    known |= {f"{s.name}.{t.name}" for s in layout.stages for t in s.outputs}
    known |= {f"{h.name}.{t.name}" for h in layout.host_steps for t in h.outputs}
    steps = layout.loop.steps if layout.loop is not None else ()
    if layout.loop is not None:
        known |= {f"loop.{o}" for o in layout.loop.outputs}
    problems = []
    graphs = {s.name: s for s in layout.stages}
    for s in (*layout.stages, *steps):
        if s.loop:  # a decode step: its graph's I/O exactly, and its own feeds
            g = graphs.get(s.graph)
            if g is None or [(t.name, t.shape) for t in g.inputs] != [(t.name, t.shape) for t in s.inputs]:
                problems.append(f"decode step {s.name!r} runs {s.graph!r}, which is no stage with its inputs")
            known |= {f"loop.{f}" for f in layout.loop.feeds}
        for t in s.inputs:
            srcs = t.source.values() if isinstance(t.source, dict) else [t.source]
            problems += [f"stage {s.name!r} input {t.name!r} comes from {src!r}, which no stage, host input or "
                         "loop provides" for src in srcs if src not in known]
        if s.loop:
            known |= {f"{s.name}.{t.name}" for t in s.outputs}
    names = {s.name for s in layout.stages}
    for h in layout.host_steps:
        if h.before not in names:
            problems.append(f"host step {h.name!r} runs before {h.before!r}, which is no stage")
        problems += [f"host step {h.name!r} runs {r!r}, which is no stage" for r in h.runs if r not in names]
        for t in h.inputs:
            srcs = t.source.values() if isinstance(t.source, dict) else [t.source]
            problems += [f"host step {h.name!r} input {t.name!r} comes from {src!r}, which no stage, host input or "
                         "host step provides" for src in srcs if src not in known]
    owned = {(r, h.name) for h in layout.host_steps for r in h.runs}
    for s in layout.stages:  # a stage a host step runs takes its inputs from that step
        runner = next((h for r, h in owned if r == s.name), None)
        if runner is not None:
            problems += [f"stage {s.name!r} input {t.name!r} comes from {t.source!r}, not from {runner!r}, the "
                         "host step that runs it" for t in s.inputs if t.source != f"{runner}.{HOST_STEP_FEED}"]
    tensors = [("host input", t) for t in layout.host_inputs]
    tensors += [(f"stage {s.name!r} tensor", t) for s in layout.stages for t in (*s.inputs, *s.outputs)]
    tensors += [(f"host step {h.name!r} tensor", t) for h in layout.host_steps for t in (*h.inputs, *h.outputs)]
    for what, t in tensors:
        for dim in t.shape:
            try:
                problems += [f"{what} {t.name!r} uses dim {name!r}, which is not in dims"
                             for name in dim_names(dim) if name not in layout.dims]
            except DimError as exc:
                problems.append(f"{what} {t.name!r}: {exc}")
    return problems


# --- writing --------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _schema_text() -> str:
    return importlib.resources.files("graphs").joinpath("manifest.schema.json").read_text(encoding="utf-8")


def manifest_schema() -> dict:
    """The JSON Schema (draft 2020-12) of manifest.json, shipped as graphs/manifest.schema.json."""
    return json.loads(_schema_text())


def schema_errors(manifest: dict) -> list[str]:
    """Schema violations of `manifest`, most relevant first, each as "<json path>: <message>"."""
    import jsonschema

    errors = list(jsonschema.Draft202012Validator(manifest_schema()).iter_errors(manifest))
    if not errors:
        return []
    best = jsonschema.exceptions.best_match(errors)  # descends into oneOf/anyOf to the likely culprit
    return [f"{_json_path(e.absolute_path)}: {e.message}" for e in [best, *(e for e in errors if e is not best)]]


def _json_path(parts) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def package_versions(names: tuple[str, ...] = ("csprt", "torch", "transformers", "onnx", "onnxscript")) -> dict:
    """Installed versions of `names` (for export.versions), read from package metadata without importing them.

    Args:
        names (tuple[str, ...]): distribution names. Defaults to csprt, torch, transformers, onnx, onnxscript.
    """
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def new_manifest(*, layout: Layout, shape: ModelShape, schedule: Schedule, precision: str, opset: int,
                 export: dict, tokenizer: dict, preprocessing: dict, postprocessing: dict, tolerances: dict,
                 stage_files: dict[str, dict[str, str]], stage_keys: dict[str, str],
                 stage_tolerances: dict[str, dict], host_step_files: dict[str, dict[str, str]] | None = None) -> dict:
    """The manifest dict of an exported artifact (validate and write it with `write_manifest`).

    Args:
        layout (Layout): stage I/O, wiring and dims.
        shape (ModelShape): the model's dimensions.
        schedule (Schedule): the resolved schedule.
        precision (str): "fp32" or "fp16".
        opset (int): the graphs' ONNX opset.
        export (dict): {"command": the `csprt export ...` line that regenerates the artifact, "checkpoint",
            "vision_tower" (str or None), "mode", "options" (LayoutOptions fields), "versions" (name -> version)}.
        tokenizer (dict): {"dir": "tokenizer", "seg_token_id", "eos_token_id", "prompt": {...}, and the provenance:
            "fast" (the tokenizer.json the runtime loads), "converted_from", "source_files" and "files" (name ->
            sha256 in the checkpoint and in `dir`), "corpus_check" (prompts, tokens, mismatches)}.
        preprocessing (dict): {"clip": {...}, "sam": {...}}.
        postprocessing (dict): free-form.
        tolerances (dict): end-to-end tolerances, e.g. {"end_to_end": {"mask_logits_atol": 1e-3}}.
        stage_files (dict[str, dict[str, str]]): per stage, {relpath: sha256} (`graph_files`).
        stage_keys (dict[str, str]): per stage, the content key its graph was exported under.
        stage_tolerances (dict[str, dict]): per stage, {"atol": {"": x, ...}, "rtol": {"": y, ...}}.
        host_step_files (dict[str, dict[str, str]] | None): per host step, {relpath: sha256} of the files it reads
            (ACCM's tokenizers). Defaults to None (none).
    """
    stages = []
    for spec in layout.stages:
        for what, table in (("files", stage_files), ("export key", stage_keys), ("tolerance", stage_tolerances)):
            if spec.name not in table:
                raise internal_error(f"new_manifest: no {what} for stage {spec.name!r}")
        graph = f"{GRAPHS_DIR}/{spec.name}.onnx"
        if graph not in stage_files[spec.name]:
            raise internal_error(f"new_manifest: files of stage {spec.name!r} lack its graph {graph}")
        stages.append({**_stage_to_dict(spec), "graph": graph, "files": dict(stage_files[spec.name]),
                       "export_key": stage_keys[spec.name], "tolerance": stage_tolerances[spec.name],
                       "engines": {}})
    lay = layout_to_dict(layout)
    manifest = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "csprt_version": package_versions(("csprt",))["csprt"],
        "export": export, "model": shape.to_dict(), "schedule": schedule.to_dict(), "precision": precision,
        "opset": opset, "modes": lay["modes"], "tokenizer": tokenizer, "preprocessing": preprocessing,
        "postprocessing": postprocessing, "dims": lay["dims"], "host_inputs": lay["host_inputs"],
        "stages": stages, "loop": lay["loop"], "outputs": lay["outputs"], "tolerances": tolerances,
    }
    if "host_steps" in lay:
        manifest["host_steps"] = [{**h, "files": dict((host_step_files or {}).get(h["name"], {}))}
                                  for h in lay["host_steps"]]
    return json.loads(json.dumps(manifest))  # plain JSON types (to_dict() keeps tuples): what is written is what is read


# Digests computed in this process, by file version (path, size, mtime, ctime, inode): loading an artifact verifies
# its graphs, then `check_backend` and each TrtRunner check the same plans; each file is read once, not per check
# (at LISA-7B that was ~40 GB read before the first request).
_DIGESTS: dict[tuple, str] = {}
# A file changed less than this long before it was hashed is not remembered: a same-size rewrite within the file
# system's clock tick keeps its mtime (git's "racily clean" rule).
_RACY_NS = 2_000_000_000


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed by `hashlib.file_digest` (graphs can be many GB); each file version once per
    process. The one file hash of csprt: every other module calls it (tools/gpu_unpack, standard library only on a
    bare machine, calls `hashlib.file_digest` itself)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key in _DIGESTS:
        return _DIGESTS[key]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
        _DIGESTS[key] = digest
    return digest


def graph_files(art_dir: str | os.PathLike, graph_relpath: str) -> dict[str, str]:
    """{relpath: sha256} of a graph and every external-data file it references, relative to `art_dir`.

    Args:
        art_dir (str or PathLike): the artifact directory.
        graph_relpath (str): e.g. "graphs/llm_0.onnx".
    """
    import onnx

    from graphs.onnx_passes import external_data_locations

    art = Path(art_dir)
    graph = art / graph_relpath
    model = onnx.load(str(graph), load_external_data=False)
    rels = [graph_relpath] + [Path(graph_relpath).parent.joinpath(loc).as_posix()
                              for loc in external_data_locations(model)]
    return {rel: file_sha256(art / rel) for rel in rels}


def manifest_seal(manifest: dict) -> str:
    """Hex sha256 of `manifest` without its `seal` key, as canonical JSON (sorted keys, no spaces, ASCII)."""
    body = {k: v for k, v in manifest.items() if k != SEAL_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def sealed(manifest: dict) -> dict:
    """`manifest` in its JSON form (tuples become lists) with its `seal` (re)computed."""
    body = {k: v for k, v in json.loads(json.dumps(manifest)).items() if k != SEAL_KEY}
    return {**body, SEAL_KEY: manifest_seal(body)}


def write_manifest(art_dir: str | os.PathLike, manifest: dict) -> Path:
    """Seal `manifest`, validate it against the schema, then write `<art_dir>/manifest.json` atomically.

    An invalid manifest is a csprt bug, so it raises an internal error, not a user-facing one.
    """
    manifest = sealed(manifest)
    problems = schema_errors(manifest)
    if problems:
        raise internal_error(f"manifest does not match manifest.schema.json at {problems[0]}")
    return write_json(manifest, Path(art_dir) / MANIFEST_NAME)


def invalidate(art_dir: str | os.PathLike) -> None:
    """Remove `<art_dir>/manifest.json` if present, so a directory being rewritten never loads."""
    Path(art_dir, MANIFEST_NAME).unlink(missing_ok=True)


def is_artifact_dir(path: str | os.PathLike) -> bool:
    """A directory meant as an artifact: it has a manifest, or graphs/ and no checkpoint config.json
    (an interrupted export, which `load_artifact` then reports as such)."""
    from graphs.artifact_dir import interrupted

    p = Path(path)
    if interrupted(p):  # a first export to p was killed: only its partial generation exists
        return True
    return p.is_dir() and ((p / MANIFEST_NAME).is_file() or ((p / GRAPHS_DIR).is_dir() and not (p / "config.json").exists()))


def read_manifest(art_dir: str | os.PathLike) -> dict | None:
    """The previous manifest for incremental re-export: the dict when it parses and matches this
    schema version, else None. Unverified; check files with `reusable_files`."""
    try:
        manifest = json.loads(Path(art_dir, MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(manifest, dict) and manifest.get("schema_version") == SCHEMA_VERSION
    return manifest if ok and not schema_errors(manifest) else None


def reusable_files(previous: dict | None, art_dir: str | os.PathLike, stage: str, export_key: str) -> dict | None:
    """The files of `stage` from a previous manifest when its export key equals `export_key` and every
    file is still on disk with its recorded sha256; else None (re-export the stage)."""
    entry = next((s for s in (previous or {}).get("stages", []) if s["name"] == stage), None)
    if entry is None or entry["export_key"] != export_key:
        return None
    art = Path(art_dir)
    for rel, digest in entry["files"].items():
        if not (art / rel).is_file() or file_sha256(art / rel) != digest:
            return None
    return dict(entry["files"])


# --- loading --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Artifact:
    dir: Path  # where its files are read: one generation (graphs/artifact_dir.py), the link resolved
    manifest: dict
    layout: Layout
    shape: ModelShape
    schedule: Schedule
    named: Path | None = None  # the path it was loaded by, for messages and commands; None: `dir`

    @property
    def path(self) -> Path:
        """The artifact path as the user named it (`csprt build PATH` etc.)."""
        return self.named or self.dir

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def modes(self) -> tuple[str, ...]:
        return self.layout.modes

    @property
    def rebuild_command(self) -> str:
        return self.manifest["export"]["command"]

    def stage_entry(self, stage: str) -> dict:
        """The manifest entry of `stage`; ArtifactError naming the valid stages when there is none."""
        check_stage_names(self, [stage])
        return next(e for e in self.manifest["stages"] if e["name"] == stage)

    def graph_path(self, stage: str) -> Path:
        return self.dir / self.stage_entry(stage)["graph"]


def check_stage_names(artifact: Artifact, names) -> None:
    """Raise ArtifactError for the first name in `names` that is not a stage of `artifact`."""
    have = [s.name for s in artifact.layout.stages]
    for name in names:
        if name not in have:
            raise ArtifactError(f"unknown stage {name!r}; this artifact has: {', '.join(have)}")


def load_artifact(art_dir: str | os.PathLike, verify: bool = True) -> Artifact:
    """Read and check an artifact directory.

    Args:
        art_dir (str or PathLike): the directory `csprt export` wrote.
        verify (bool): also check that every listed file exists with its recorded sha256. Defaults to True.

    Raises:
        ArtifactError: one sentence saying what is wrong and the command that regenerates the artifact.
    """
    from graphs.artifact_dir import interrupted

    art = Path(art_dir)
    fix = GENERIC_REBUILD.format(dir=art)
    if not art.is_dir():
        if interrupted(art):
            raise ArtifactError(f"{art} has no {MANIFEST_NAME}: an export was interrupted before it finished; "
                                f"re-run the export: {fix}")
        what = "is not a directory" if art.exists() else "does not exist"
        raise ArtifactError(f"artifact directory {art} {what}; create it with: {fix}")
    named = art
    if art.is_symlink():  # one generation (graphs/artifact_dir.py) for everything this Artifact reads
        art = art.resolve()
    path = art / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{art} has no {MANIFEST_NAME}: it is not a csprt artifact, or an export was "
                            f"interrupted before it finished; re-run the export: {fix}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-export with: {fix}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{path} is not a csprt manifest (format {got!r}, expected {FORMAT!r}); "
                            f"re-export with: {fix}")
    command = manifest.get("export", {}).get("command") if isinstance(manifest.get("export"), dict) else None
    fix = command if isinstance(command, str) and command else fix
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ArtifactError(f"{path} has schema version {version!r}, newer than this csprt reads "
                            f"({SCHEMA_VERSION}); upgrade csprt, or re-export with: {fix}")
    if version < SCHEMA_VERSION:
        raise ArtifactError(f"{path} was written by an older csprt (schema {version}, this csprt reads "
                            f"{SCHEMA_VERSION}); re-export with: {fix}")
    _check_seal(manifest, path, fix)
    problems = schema_errors(manifest)
    if problems:
        raise ArtifactError(f"{path} does not match the manifest schema at {problems[0]}; re-export with: {fix}")
    try:
        layout = layout_from_dict(manifest)
        shape = ModelShape.from_dict(manifest["model"])
        schedule = Schedule.from_dict(manifest["schedule"])
    except ToolchainError as exc:
        raise ArtifactError(f"{path}: {exc}; re-export with: {fix}") from None
    problems = layout_problems(layout)
    problems += [f"stage {e['name']!r} graph {e['graph']} is not in its files" for e in manifest["stages"]
                 if e["graph"] not in e["files"]]
    problems += outside_paths(art, manifest)
    problems += dim_problems(layout, shape)
    problems += precision_problems(layout, manifest["precision"])
    if problems:
        raise ArtifactError(f"{path}: {problems[0]}; re-export with: {fix}")
    artifact = Artifact(dir=art, manifest=manifest, layout=layout, shape=shape, schedule=schedule, named=named)
    _check_host_step_files(artifact, fix)
    if verify:
        _verify_files(artifact, fix)
        _check_graph_io(artifact, fix)
    return artifact


def _check_host_step_files(artifact: Artifact, fix: str) -> None:
    """The files host steps read (ACCM's tokenizers) are present, checked on every load (their hashes: `verify`)."""
    for step in artifact.manifest.get("host_steps") or ():
        missing = [rel for rel in step["files"] if not (artifact.dir / rel).is_file()]
        if missing:
            raise ArtifactError(f"{artifact.path} lacks {', '.join(missing)}, which host step {step['name']!r} "
                                f"({step['kind']}) reads; re-export with: {fix}")


def _check_seal(manifest: dict, path: Path, fix: str) -> None:
    seal = manifest.get(SEAL_KEY)
    if not isinstance(seal, str):
        raise ArtifactError(f"{path} has no seal (the sha256 of its own contents that csprt writes): it was written "
                            f"by an older csprt or edited by hand; re-export with: {fix}")
    if seal != manifest_seal(manifest):
        raise ArtifactError(f"{path} was edited after csprt wrote it (its contents no longer match its seal); a "
                            "manifest is not edited by hand (bounds, preprocessing and tolerances are export "
                            f"options): restore the original file, or re-export with: {fix}")


def _check_graph_io(artifact: Artifact, fix: str) -> None:
    """Each stage graph's inputs and outputs (names, dtypes, ranks, static and named dims) as the manifest
    declares them, read without the graph's weights (`graph_io`)."""
    from graphs.onnx_checks import GraphCheckError, check_io, graph_io

    for spec in artifact.layout.stages:
        try:
            check_io(graph_io(artifact.graph_path(spec.name)), spec)
        except GraphCheckError as exc:
            raise ArtifactError(f"{exc} (the manifest does not describe its graphs); re-export with: {fix}") from None


def inside(art: Path, rel) -> bool:
    """Whether the manifest path `rel` names something inside the artifact directory `art`: relative, no `..`
    out of it, and no link leading out of it (resolved), so a manifest can never make csprt read elsewhere."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or "\\" in rel:
        return False
    root = art.resolve()
    try:
        return (root / rel).resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a link loop
        return False


def outside_paths(art: Path, manifest: dict) -> list[str]:
    """Every path of the manifest (graphs and their files, the tokenizer directory and files, engine sidecars)
    that leads outside the artifact directory, as problems."""
    tok = manifest["tokenizer"]
    named = [("tokenizer.dir", tok["dir"])]
    named += [(f"tokenizer file {n!r}", f"{tok['dir']}/{n}") for n in tok.get("files", {})]
    for e in manifest["stages"]:
        named += [(f"stage {e['name']!r} graph", e["graph"])]
        named += [(f"stage {e['name']!r} file", rel) for rel in e["files"]]
        named += [(f"stage {e['name']!r} {flavor} engine {key}", eng.get(key))
                  for flavor, eng in (e.get("engines") or {}).items() if isinstance(eng, dict)
                  for key in ("sidecar", "plan") if key in eng]
    named += [(f"host step {h['name']!r} file", rel) for h in manifest.get("host_steps") or () for rel in h["files"]]
    return [f"{what} {rel!r} leads outside the artifact directory" for what, rel in named if not inside(art, rel)]


def _verify_files(artifact: Artifact, fix: str) -> None:
    tok = artifact.dir / artifact.manifest["tokenizer"]["dir"]
    if not tok.is_dir():
        raise ArtifactError(f"tokenizer directory {tok} is missing; re-export with: {fix}")
    for name, digest in artifact.manifest["tokenizer"].get("files", {}).items():  # recorded since tokenizer provenance
        if not (tok / name).is_file() or file_sha256(tok / name) != digest:
            raise ArtifactError(f"tokenizer file {tok / name} is missing or changed since export; re-export with: {fix}")
    for step in artifact.manifest.get("host_steps") or ():
        for rel, digest in step["files"].items():
            if file_sha256(artifact.dir / rel) != digest:
                raise ArtifactError(f"{rel} (host step {step['name']!r}) changed since export (hash mismatch); "
                                    f"re-export with: {fix}")
    for entry in artifact.manifest["stages"]:
        for rel, digest in entry["files"].items():
            path = artifact.dir / rel
            if not path.is_file():
                raise ArtifactError(f"{rel} (stage {entry['name']!r}) is missing from {artifact.path}; "
                                    f"re-export with: {fix}")
            if file_sha256(path) != digest:
                raise ArtifactError(f"{rel} changed since export (hash mismatch); re-export with: {fix}")
