"""A block stage too big for the build budget, built as several engines of consecutive decoder layers.

    plan_split(artifact, stage, budget, max_layers) -> SplitPlan | None     which layers go in which engine
    piece_profiles(plan, piece, profiles)                                   its profiles, interface inputs added
    piece_paths(flavor, stage, k)                                           engines/<flavor>/<stage>.p<k>.{plan,json}

    llm_2 (layers 14..31), budget 10 GiB, one engine would need 12.4 GiB:
        graphs/llm_2.onnx --graphs.onnx_split (no weights loaded)--> piece 0: layers 14..22, piece 1: layers 23..31
        each piece: its ModelProto + the block's .data mapped by address (engines.build.NetworkFromOnnx)
            --> engines/<flavor>/llm_2.p<k>.plan + llm_2.p<k>.json (order, layers, inputs, outputs, interface)
        engines/<flavor>/llm_2.json (the stage's sidecar) lists the pieces; the manifest is unchanged.

The split is the smallest number of pieces whose every estimated peak (`engines.build_memory` ratios over each
piece's weight bytes) fits the budget and, with `--max-layers-per-engine N`, holds at most N layers; among those,
the one with the lowest largest peak. The artifact's graphs and manifest stay as exported: how a stage was built
is a build-time fact, in its sidecars; the runtime (`engines.trt_runner`) chains the pieces as one stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from engines import build_memory
from engines.build_memory import GIB, StageMemory, gib
from engines.engine_check import ENGINES_DIR
from engines.profiles import InputShapes, Profile
from graphs.errors import ToolchainError
from graphs.manifest import Artifact
from graphs.onnx_split import Piece, block_cuts, plan_pieces, segments, interface_shapes, tensor_types

_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 9: "bool", 6: "int32", 16: "bfloat16"}


def block_layers(spec) -> tuple[int, ...]:
    """The decoder layers of a block stage, from its cache outputs `key_<l>` (empty for other stages)."""
    return tuple(int(out.rsplit("_", 1)[1]) for _, out in spec.cache if out.startswith("key_"))


def splittable(spec) -> bool:
    """A block (`llm_<i>`, with a static cache) of two or more layers."""
    return spec.kind == "llm" and len(block_layers(spec)) > 1


def piece_paths(flavor: str, stage: str, index: int) -> tuple[str, str]:
    """(plan, sidecar) of piece `index` of `stage`, relative to the artifact."""
    base = f"{ENGINES_DIR}/{flavor}/{stage}.p{index}"
    return f"{base}.plan", f"{base}.json"


class LayerOverBudget(ToolchainError):
    """A block over the budget even one decoder layer per engine; `.memory` is that layer's engine's estimate."""

    def __init__(self, message: str, memory: StageMemory):
        super().__init__(message)
        self.memory = memory


@dataclass
class SplitPlan:
    """How one block stage is built: its pieces and each piece's estimated build memory."""

    stage: str
    model: object                 # the block's ModelProto, weights not loaded
    layers: tuple[int, ...]
    pieces: list[Piece]
    memory: list[StageMemory]     # per piece (stage = "llm_2.p0", ...)
    reason: str                   # why it is split, for the sidecar and the progress line

    @property
    def peak_bytes(self) -> int:
        return max(m.peak_bytes for m in self.memory)

    def describe(self) -> str:
        return ", ".join(f"layers {p.layers[0]}-{p.layers[1] - 1} ({gib(m.peak_bytes)})"
                         for p, m in zip(self.pieces, self.memory))


def split_intact(art, sidecar: dict) -> bool:
    """Every piece a split stage's sidecar lists is there and unchanged (True for a one-engine stage)."""
    from engines.engine_check import check_pieces
    from graphs.errors import ArtifactError

    try:
        check_pieces(art, sidecar, "csprt build")
    except ArtifactError:
        return False
    return True


def fits_layers(sidecar: dict, max_layers: int | None, layers: int) -> bool:
    """Whether a built stage (sidecar) holds at most `max_layers` layers per engine (`--max-layers-per-engine`)."""
    if max_layers is None:
        return True
    groups = (sidecar.get("split") or {}).get("layers") or [[0, layers]]
    return all(b - a <= max_layers for a, b in groups)


def _estimate(inline: int, external: int) -> int:
    m = build_memory  # read at call time: the ratios are the one estimate of engines.build_memory
    return int(m.BUILD_BASE + m.RATIO_INLINE * inline + m.RATIO_MAPPED * external)


def _segment_weights(model, cuts, graph_bytes: int) -> list[tuple[int, int]]:
    """(inline bytes, external bytes) of each layer segment: the initializers it reads, plus its share (by node
    count) of the rest of the .onnx file (`graph_bytes`), so the segments add up to the stage's estimate."""
    from graphs.onnx_passes import tensor_bytes
    from graphs.onnx_split import _is_external

    info = {t.name: (tensor_bytes(t), _is_external(t)) for t in model.graph.initializer}
    rest = max(0, graph_bytes - sum(b for b, ext in info.values() if not ext))
    nodes = max(1, len(model.graph.node))
    out = []
    for seg in segments(model, cuts):
        names = {i for p in seg for i in model.graph.node[p].input if i in info}
        inline = sum(info[n][0] for n in names if not info[n][1]) + rest * len(seg) // nodes
        out.append((inline, sum(info[n][0] for n in names if info[n][1])))
    return out


def choose_groups(weights: list[tuple[int, int]], budget: int, max_layers: int | None,
                  at_least: int = 1) -> list[tuple[int, int]] | None:
    """The fewest (and at least `at_least`) contiguous groups of segments whose estimates fit `budget` (and hold
    at most `max_layers` segments each); among those, the lowest largest estimate. None when none fits."""
    n = len(weights)
    cap = max_layers or n

    def cost(a, b):
        return _estimate(sum(w[0] for w in weights[a:b]), sum(w[1] for w in weights[a:b]))

    for k in range(max(at_least, math.ceil(n / cap)), n + 1):
        best = _minmax(n, k, cap, cost)
        if best is not None and best[0] <= budget:
            return best[1]
    return None


def _minmax(n, k, cap, cost):
    """(largest cost, groups) of the split of n segments into k groups of at most `cap` minimising it."""
    @lru_cache(maxsize=None)
    def go(start, parts):
        if parts == 1:
            return (cost(start, n), ((start, n),)) if n - start <= cap else None
        best = None
        for end in range(start + 1, min(n - parts + 1, start + cap) + 1):
            rest = go(end, parts - 1)
            if rest is None:
                continue
            worst = max(cost(start, end), rest[0])
            if best is None or worst < best[0]:
                best = (worst, ((start, end),) + rest[1])
        return best

    out = go(0, k)
    return None if out is None else (out[0], list(out[1]))


def plan_split(artifact: Artifact, stage: str, budget: int, max_layers: int | None = None,
               whole: int | None = None) -> SplitPlan | None:
    """How to build block `stage` within `budget`: None when one engine fits (and `max_layers` allows it).

    Args:
        artifact (Artifact): the artifact.
        stage (str): a block stage (`splittable`).
        budget (int): bytes each piece's estimated build peak must fit.
        max_layers (int | None): at most this many layers per engine. Defaults to None (no limit).
        whole (int | None): the one-engine estimate (`estimate_stage_memory`). Defaults to None (from the
            initializers' bytes).

    Raises:
        LayerOverBudget: even one layer per engine is over the budget; names the budget that would fit.
    """
    import onnx

    spec = artifact.layout.stage(stage)
    layers = block_layers(spec)
    model = onnx.load(str(artifact.graph_path(stage)), load_external_data=False)
    cuts = block_cuts(model, layers)
    weights = _segment_weights(model, cuts, artifact.graph_path(stage).stat().st_size)
    whole = whole if whole is not None else _estimate(sum(w[0] for w in weights), sum(w[1] for w in weights))
    if whole <= budget and (max_layers is None or max_layers >= len(layers)):
        return None
    groups = choose_groups(weights, budget, max_layers, at_least=2 if whole > budget else 1)
    if groups is None:
        worst = max(range(len(weights)), key=lambda i: _estimate(*weights[i]))
        need = _estimate(*weights[worst])
        fit = math.ceil(need / GIB * 10) / 10
        raise LayerOverBudget(
            f"stage {stage!r} cannot be built within --max-build-memory {gib(budget)} even one decoder layer per engine: "
            f"layer {layers[worst]} alone needs about {gib(need)} ({gib(sum(weights[worst]))} of weights); build with "
            f"--max-build-memory {fit} or more on a host with that much free",
            StageMemory(stage, *weights[worst], need, layer=layers[worst]))
    pieces = plan_pieces(model, layers, groups, cuts)
    memory = [StageMemory(f"{stage}.p{p.index}", sum(weights[i][0] for i in range(a, b)),
                          sum(weights[i][1] for i in range(a, b)),
                          _estimate(sum(weights[i][0] for i in range(a, b)), sum(weights[i][1] for i in range(a, b))))
              for p, (a, b) in zip(pieces, groups)]
    reason = (f"one engine would need about {gib(whole)}, over {gib(budget)}" if whole > budget
              else f"--max-layers-per-engine {max_layers}")
    return SplitPlan(stage, model, layers, pieces, memory, reason)


def piece_profiles(plan: SplitPlan, piece: Piece, profiles: list[Profile]) -> list[Profile]:
    """`piece`'s optimization profiles: the stage profiles' shapes of the stage inputs it reads, plus its
    interface inputs' shapes at each profile's min, opt and max (`graphs.onnx_split.interface_shapes`)."""
    out = []
    for prof in profiles:
        points = {}
        for which in ("min", "opt", "max"):
            shapes = {n: getattr(s, which) for n, s in prof.items()}
            points[which] = interface_shapes(plan.model, shapes, piece.interface_in) if piece.interface_in else {}
        own = {n: prof[n] for n in piece.inputs if n in prof}
        own.update({n: InputShapes(points["min"][n], points["opt"][n], points["max"][n]) for n in piece.interface_in})
        out.append(own)
    return out


def interface_specs(plan: SplitPlan, piece: Piece, profiles: list[Profile]) -> dict[str, dict]:
    """The interface tensors `piece` writes: {name: {"dtype", "max_shape"}} (the largest over the stage's
    profiles), what the runtime allocates for them."""
    if not piece.interface_out:
        return {}
    types = tensor_types(plan.model)
    out = {}
    for prof in profiles:
        shapes = interface_shapes(plan.model, {n: s.max for n, s in prof.items()}, piece.interface_out)
        for name, shape in shapes.items():
            prev = out.get(name, {}).get("max_shape")
            if prev is None or math.prod(shape) > math.prod(prev):
                out[name] = {"dtype": _ONNX_DTYPES.get(types[name][0], str(types[name][0])), "max_shape": list(shape)}
    return out


def build_split_stage(trt, job, plan: SplitPlan, key: str, say, timing_cache=None) -> dict:
    """Build every piece of `plan` (one at a time, each from its ModelProto and the block's mapped weights), write
    each piece's plan and sidecar, then the stage's sidecar listing them. Returns the stage's sidecar.

    Args:
        trt (module): from `load_trt`.
        job (engines.build._Job): the stage, artifact, settings and dims.
        plan (SplitPlan): from `plan_split`.
        key (str): the stage's build key (`engines.build.build_key`).
        say (callable): progress lines.
        timing_cache (Path | None): TensorRT's timing cache file. Defaults to None.
    """
    from engines.build import BUILD_FORMAT, build_plan, engine_paths, prepare_stage, stage_sidecar
    from engines.profiles import profiles_to_json, stage_profiles
    from graphs.atomic import write_json
    from graphs.onnx_split import piece_model

    art, name, s = job.artifact.dir, job.stage, job.settings
    spec = job.artifact.layout.stage(name)
    profiles = stage_profiles(spec, job.dims, decode=job.decode)
    n = len(plan.pieces)
    say(f"{name}: split into {n} engines ({plan.reason}): {plan.describe()}")
    rels, total, seconds, peak = [], 0, 0.0, 0
    for piece, memory in zip(plan.pieces, plan.memory):
        plan_rel, sidecar_rel = piece_paths(s.flavor, name, piece.index)
        what = f"{job.what} piece {piece.index + 1}/{n} (layers {piece.layers[0]}-{piece.layers[1] - 1})"
        say(f"{name}: piece {piece.index + 1}/{n} (layers {piece.layers[0]}-{piece.layers[1] - 1}): building "
            f"(weights {gib(memory.inline_bytes + memory.external_bytes)}, estimated peak {gib(memory.peak_bytes)}) ...")
        own = piece_profiles(plan, piece, profiles)
        built = build_plan(trt, lambda logger, cache, piece=piece, own=own, what=what: prepare_stage(
            trt, job, logger, cache, model=piece_model(plan.model, piece), profiles=own, what=what),
            what, art / plan_rel, timing_cache)
        sidecar = {
            "format": "csprt.engine_piece", "format_version": BUILD_FORMAT, "stage": name, "piece": piece.index,
            "pieces": n, "layers": list(piece.layers), "plan": plan_rel, "plan_sha256": built.sha256,
            "plan_bytes": built.nbytes, "inputs": list(piece.inputs), "outputs": list(piece.outputs),
            "interface_inputs": list(piece.interface_in),
            "interface_outputs": interface_specs(plan, piece, profiles),
            "profiles": profiles_to_json(built.profiles), "build_seconds": round(built.seconds, 3),
            "build_memory": built.build_memory(memory), "warnings": built.warnings,
        }
        write_json(sidecar, art / sidecar_rel)
        rels.append(sidecar_rel)
        if piece.index == 0:
            first_plan = (plan_rel, built.sha256, built.nbytes)
        total, seconds, peak = total + built.nbytes, seconds + built.seconds, max(peak, built.peak or 0)
        say(f"{name}: piece {piece.index + 1}/{n} built in {built.seconds:.1f} s, {built.nbytes / 1e6:.2f} MB, peak "
            f"RSS {gib(built.peak or 0)} (estimated {gib(memory.peak_bytes)}) -> {plan_rel}")
    # The stage's sidecar names piece 0's plan as its "plan" (hosts that read one plan find the first piece, and
    # `check_engine` checks it as always); "pieces" lists every piece's sidecar, in order.
    whole = StageMemory(name, sum(m.inline_bytes for m in plan.memory), sum(m.external_bytes for m in plan.memory),
                        plan.peak_bytes)  # all the pieces' weights; the largest piece's estimated peak
    stage_side = stage_sidecar(job, key, profiles, first_plan, seconds,
                               {**whole.to_json(), "measured_peak_bytes": peak}, [])
    stage_side["pieces"] = rels
    stage_side["split"] = {"reason": plan.reason, "layers": [list(p.layers) for p in plan.pieces],
                           "plan_bytes_total": total}
    write_json(stage_side, art / engine_paths(s.flavor, name)[1])  # written last: the pieces are all there
    return stage_side
