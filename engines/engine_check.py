"""Is a built engine still good to run? The runtime's one question about engines, without the builder.

`check_engine(art, stage)` returns the plan and its sidecar, or refuses (ArtifactError naming `csprt build ART`)
an engine that is missing, was built for a float graph and the artifact is now quantized or the other way round
(the sidecar's "quantization"), was built from another graph, by another TensorRT flavor or version, or whose plan
changed since. `engines.build` writes what this reads; the runtime (`TrtRunner`, the session, the Triton
repository) imports only this.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from engines.trt import PRETTY, load_trt
from graphs.errors import ArtifactError
from graphs.manifest import file_sha256, inside, load_artifact
from graphs.quantize import describe, stage_quantization

ENGINES_DIR = "engines"


def engine_paths(flavor: str, stage: str) -> tuple[str, str]:
    """(plan, sidecar) paths relative to the artifact, e.g. ("engines/tensorrt-rtx/llm_0.plan", "....json")."""
    base = f"{ENGINES_DIR}/{flavor}/{stage}"
    return f"{base}.plan", f"{base}.json"


def check_engine(art_dir, stage: str, flavor: str | None = None, version: str | None = None) -> tuple[Path, dict]:
    """The plan and sidecar of `stage`'s engine, refused unless it still matches graph and TensorRT.

    Args:
        art_dir (path): the artifact.
        stage (str): a stage name.
        flavor (str | None): the TensorRT flavor that will run it. Defaults to None (the installed one).
        version (str | None): that flavor's version. Defaults to None (the installed one).

    Returns:
        tuple[Path, dict]: (plan path, sidecar).

    Raises:
        ArtifactError: no engine, another graph, another TensorRT flavor or version, or a changed plan;
            each message names `csprt build ART`.
    """
    artifact = load_artifact(art_dir, verify=False)
    if flavor is None or version is None:
        _, found, found_version = load_trt(flavor or "auto")
        flavor, version = flavor or found, version or found_version
    entry = artifact.stage_entry(stage)
    fix = f"csprt build {shlex.quote(str(artifact.path))}"
    _, sidecar_rel = engine_paths(flavor, stage)
    listed = entry["engines"].get(flavor)
    sidecar_path = artifact.dir / (listed["sidecar"] if listed else sidecar_rel)
    if listed is None or not sidecar_path.is_file():
        others = [f"{PRETTY.get(f, f)} {e.get('trt_version')}" for f, e in entry["engines"].items() if f != flavor]
        also = f" (it has {', '.join(others)} engines, which never load into another flavor)" if others else ""
        raise ArtifactError(f"stage {stage!r} has no {PRETTY.get(flavor, flavor)} engine in {artifact.path}{also}; "
                            f"build it with: {fix}")
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"engine sidecar {sidecar_path} is unreadable ({exc}); rebuild with: {fix}") from None
    if not isinstance(sidecar, dict) or not inside(artifact.dir, sidecar.get("plan")):
        raise ArtifactError(f"engine sidecar {sidecar_path} names no plan inside the artifact; rebuild with: {fix}")
    plan = artifact.dir / sidecar["plan"]
    built_for, now = sidecar.get("quantization", "none"), stage_quantization(artifact.manifest, stage)
    if built_for != now:  # before the graph hashes: say which graph the engine was built for
        raise ArtifactError(f"engine {sidecar['plan']} was built for {describe(built_for)} of stage {stage!r}, but "
                            f"this artifact now holds {describe(now)}; an engine never runs another graph; "
                            f"rebuild with: {fix}")
    built_from = sidecar.get("graph_files") or {}
    changed = sorted(rel for rel in set(entry["files"]) | set(built_from) if built_from.get(rel) != entry["files"].get(rel))
    if changed:
        raise ArtifactError(f"engine {sidecar['plan']} was built from another {changed[0]} (the graph changed since "
                            f"the build, sha256 {str(built_from.get(changed[0]))[:12]} then, "
                            f"{str(entry['files'].get(changed[0]))[:12]} now); an engine never runs another graph; "
                            f"rebuild with: {fix}")
    if sidecar.get("flavor") != flavor or sidecar.get("trt_version") != version:
        built = f"{PRETTY.get(sidecar.get('flavor'), sidecar.get('flavor'))} {sidecar.get('trt_version')}"
        raise ArtifactError(f"engine {sidecar['plan']} was built with {built}, but this host runs "
                            f"{PRETTY.get(flavor, flavor)} {version}; an engine is never loaded into another "
                            f"TensorRT version or flavor; rebuild with: {fix}")
    if not plan.is_file() or file_sha256(plan) != sidecar.get("plan_sha256"):
        what = "is missing" if not plan.is_file() else "changed since it was built (hash mismatch)"
        raise ArtifactError(f"engine {sidecar['plan']} {what}; rebuild with: {fix}")
    check_pieces(artifact.dir, sidecar, fix)
    return plan, sidecar


def check_pieces(art_dir, sidecar: dict, fix: str, verify: bool = True) -> list[tuple[Path, dict]]:
    """The (plan, piece sidecar) of every engine of a stage built in pieces (`csprt build --max-build-memory`,
    `engines.split_build`), in order; [] for a stage built as one engine.

    `verify=False` reads the sidecars without hashing the plans (after `check_engine` did).

    Raises:
        ArtifactError: a piece's sidecar or plan is missing, unreadable or changed; names `fix`.
    """
    art = Path(art_dir)
    out = []
    for k, rel in enumerate(sidecar.get("pieces") or ()):
        path = art / rel
        try:
            piece = json.loads(path.read_text(encoding="utf-8")) if inside(art, rel) else None
        except (OSError, ValueError):
            piece = None
        if not isinstance(piece, dict) or piece.get("piece") != k or not inside(art, piece.get("plan")):
            raise ArtifactError(f"engine piece sidecar {rel} of stage {sidecar.get('stage')!r} is missing or "
                                f"unreadable; rebuild with: {fix}")
        plan = art / piece["plan"]
        checked = (piece["plan"], piece.get("plan_sha256")) == (sidecar.get("plan"), sidecar.get("plan_sha256"))
        if not plan.is_file() or verify and not checked and file_sha256(plan) != piece.get("plan_sha256"):
            what = "is missing" if not plan.is_file() else "changed since it was built (hash mismatch)"
            raise ArtifactError(f"engine {piece['plan']} (piece {k + 1} of {len(sidecar['pieces'])} of stage "
                                f"{sidecar.get('stage')!r}) {what}; rebuild with: {fix}")
        out.append((plan, piece))
    return out
