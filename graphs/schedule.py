"""Static visual-token pruning schedules: the single source of truth.

A `Schedule` splits the LLM's decoder layers into contiguous stages. Each stage sees a fixed number
of image tokens (its budget) and names the selection op applied on entry:

    op        entry of the stage                                   budget
    all       every image token                                    N
    cluster   pick N_c representatives (`cluster_method`)          N_c   (first stage only)
    kcenter   EVTP spatial k-center over projector features        k     (first stage only)
    scatter   all N tokens re-enter (`scatter_mode`)               N     (after a cluster stage)
    prune     top-k by attention of `prune_query` at the previous
              stage's last layer, original order kept              N_p   (<= previous budget)
    accm      ACCM's picks (CLS-attention outliers + CLIP text
              picks, filled to the budget) and a caption of the
              rest spliced into the prompt (`accm` knobs)          budget (first stage only)

Presets are fractions of the layer count L and image-token count N, resolved against a model shape,
so `csp` means the same thing on a 4-layer test model and on LISA-13B. Resolved schedules serialise
to JSON inside every artifact (`SCHEDULE_FORMAT` guards that format).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from graphs.accm import ACCM_GRID_TOKENS, BEAMS, CAPTION_BUDGET, MAX_CAPTION_TOKENS
from graphs.errors import ScheduleError

SCHEDULE_FORMAT = 1
OPS = ("all", "cluster", "kcenter", "scatter", "prune", "accm")
CLUSTER_METHODS = ("uniform", "cls_attention", "kmeans", "random", "seg_first")
SCATTER_MODES = ("delta", "copy", "embedding")
# seg: the [SEG]-predicting position (generate mode: the last prompt token); last: the last
# position; mean: mean over all query rows (FastV's convention).
PRUNE_QUERIES = ("seg", "last", "mean")
FIRST_STAGE_ONLY = ("cluster", "kcenter", "accm")


@dataclass(frozen=True)
class Stage:
    name: str    # reused verbatim: graph `llm_<i>.onnx`, engine, manifest key, test ids
    start: int   # first decoder layer, inclusive
    end: int     # last decoder layer, exclusive
    op: str      # entry op, one of OPS
    budget: int  # image tokens present in every layer of this stage

    @property
    def layers(self) -> range:
        return range(self.start, self.end)


@dataclass(frozen=True)
class AccmKnobs:
    """ACCM's caption compensation (graphs/accm.py, docs/accm.md), for a schedule whose first op is "accm"."""

    text_picks: int                # top-k of the CLIP text picks (ACCM's text_num, scaled to N like the budget)
    beams: int = BEAMS             # beam search width (3); every beam is a selector candidate
    max_caption_tokens: int = MAX_CAPTION_TOKENS  # GPT-2 tokens per caption (67, ACCM's entry_length), "." included
    # LLM tokens the splice ("additional information: " + caption, no BOS) may take: the static room an
    # exported prompt keeps for it, and what `csprt flops` counts. A longer splice is refused (InputError), never cut.
    caption_budget: int = CAPTION_BUDGET

    def check(self) -> None:
        for name in ("text_picks", "beams", "max_caption_tokens", "caption_budget"):
            if getattr(self, name) < 1:
                raise ScheduleError(f"accm {name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Schedule:
    name: str
    n_layers: int            # L of the model it was resolved against
    n_image_tokens: int      # N of the model it was resolved against
    stages: tuple[Stage, ...]
    cluster_method: str = "uniform"
    kmeans_iters: int = 5
    seed: int = 0            # for cluster_method="random"
    scatter_mode: str = "delta"
    prune_query: str = "seg"
    kcenter_lambda: float = 0.5  # weight of grid distance vs feature distance in EVTP k-center
    accm: AccmKnobs | None = None  # set exactly when the first op is "accm"; left out of the JSON when None

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise ScheduleError(
            f"schedule {self.name!r} has no stage {name!r}; its stages are: {', '.join(s.name for s in self.stages)}"
        )

    def stage_of_layer(self, layer: int) -> Stage:
        for s in self.stages:
            if s.start <= layer < s.end:
                return s
        raise ScheduleError(f"layer {layer} is outside schedule {self.name!r} (0..{self.n_layers - 1})")

    def tokens_per_layer(self) -> list[int]:
        """Image tokens the schedule prescribes at each decoder layer."""
        return [s.budget for s in self.stages for _ in s.layers]

    def avg_image_tokens(self) -> float:
        return sum(self.tokens_per_layer()) / self.n_layers

    def reduction_pct(self) -> float:
        return 100.0 * (1.0 - self.avg_image_tokens() / self.n_image_tokens)

    def check(self) -> "Schedule":
        """Validate; raise ScheduleError naming the stage and what is wrong. Returns self."""
        _check_choice("cluster_method", self.cluster_method, CLUSTER_METHODS)
        _check_choice("scatter_mode", self.scatter_mode, SCATTER_MODES)
        _check_choice("prune_query", self.prune_query, PRUNE_QUERIES)
        if self.kmeans_iters < 1:
            raise ScheduleError(f"kmeans_iters must be >= 1, got {self.kmeans_iters}")
        if not 0.0 <= self.kcenter_lambda <= 1.0:
            raise ScheduleError(f"kcenter_lambda must be in [0, 1], got {self.kcenter_lambda}")
        if not self.stages:
            raise ScheduleError(f"schedule {self.name!r} has no stages")
        if (self.stages[0].op == "accm") != (self.accm is not None):
            raise ScheduleError(f"schedule {self.name!r}: a first stage with op 'accm' and the 'accm' knobs go "
                                "together; use the accm-36 or accm-18 preset as a starting point")
        if self.accm is not None:
            self.accm.check()
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ScheduleError(f"schedule {self.name!r} has duplicate stage names: {names}")
        expected_start = 0
        for i, s in enumerate(self.stages):
            where = f"schedule {self.name!r} stage {s.name!r}"
            _check_choice(f"{where} op", s.op, OPS)
            if not (0 <= s.start < s.end <= self.n_layers):
                raise ScheduleError(
                    f"{where}: layer range [{s.start}, {s.end}) is outside the model's layers [0, {self.n_layers}) "
                    "or empty; stages need start < end <= number of decoder layers"
                )
            if s.start < expected_start:
                raise ScheduleError(f"{where}: layers [{s.start}, {s.end}) overlap the previous stage, which ends at {expected_start}")
            if s.start > expected_start:
                raise ScheduleError(f"{where}: starts at layer {s.start}, leaving layers [{expected_start}, {s.start}) in no stage")
            expected_start = s.end
            if not 1 <= s.budget <= self.n_image_tokens:
                raise ScheduleError(f"{where}: budget {s.budget} is outside 1..{self.n_image_tokens} (the model's image tokens N)")
            if s.op in ("all", "scatter") and s.budget != self.n_image_tokens:
                raise ScheduleError(f"{where}: op {s.op!r} keeps all N={self.n_image_tokens} tokens, but budget is {s.budget}")
            if s.op == "all" and i > 0 and self.stages[i - 1].budget != self.n_image_tokens:
                raise ScheduleError(f"{where}: op 'all' cannot follow a stage that dropped tokens (use 'scatter' after 'cluster')")
            if s.op in FIRST_STAGE_ONLY and i != 0:
                raise ScheduleError(f"{where}: op {s.op!r} selects from the LLM input and must be the first stage")
            if s.op == "scatter" and (i == 0 or self.stages[i - 1].op != "cluster"):
                raise ScheduleError(f"{where}: op 'scatter' needs the previous stage to be a 'cluster' stage")
            if s.op == "prune":
                if i == 0:
                    raise ScheduleError(f"{where}: op 'prune' ranks tokens by a previous layer's attention; it cannot be first")
                if s.budget > self.stages[i - 1].budget:
                    raise ScheduleError(
                        f"{where}: prune budget {s.budget} exceeds the previous stage's {self.stages[i - 1].budget} tokens"
                    )
        if expected_start != self.n_layers:
            raise ScheduleError(
                f"schedule {self.name!r}: stages end at layer {expected_start}, but the model has {self.n_layers} layers"
            )
        return self

    def check_against(self, n_layers: int, n_image_tokens: int) -> "Schedule":
        if (self.n_layers, self.n_image_tokens) != (n_layers, n_image_tokens):
            raise ScheduleError(
                f"schedule {self.name!r} was resolved for L={self.n_layers} layers and N={self.n_image_tokens} image "
                f"tokens, but the model has L={n_layers}, N={n_image_tokens}; use a preset name to resolve it anew"
            )
        return self.check()

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if data["accm"] is None:  # schedules without ACCM serialise exactly as before it existed
            del data["accm"]
        data["format"] = SCHEDULE_FORMAT
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "Schedule":
        data = dict(data)
        fmt = data.pop("format", None)
        if fmt != SCHEDULE_FORMAT:
            raise ScheduleError(
                f"schedule format {fmt!r} is not supported (expected {SCHEDULE_FORMAT}); re-create it with a preset name"
            )
        try:
            stages = tuple(Stage(**s) for s in data.pop("stages"))
            if data.get("accm") is not None:
                data["accm"] = AccmKnobs(**data["accm"])
            return cls(stages=stages, **data).check()
        except (TypeError, KeyError) as exc:
            raise ScheduleError(f"schedule JSON is malformed: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScheduleError(f"schedule JSON does not parse: {exc}") from None
        if not isinstance(data, dict):
            raise ScheduleError("schedule JSON must be an object")
        return cls.from_dict(data)


@dataclass(frozen=True)
class StagePreset:
    op: str
    end: float      # end layer as a fraction of L (the start is the previous stage's end)
    budget: float   # image tokens as a fraction of N


@dataclass(frozen=True)
class Preset:
    stages: tuple[StagePreset, ...]
    knobs: dict = field(default_factory=dict)
    budget_rounding: str = "round"  # EVTP specifies k = ceil(0.2 N)
    accm_text: float | None = None  # ACCM's text picks as a fraction of N (sets the `accm` knobs)


PRESETS: dict[str, Preset] = {
    "full": Preset((StagePreset("all", 1.0, 1.0),)),
    # LISA-7B: cluster [0,10) 64 . scatter [10,14) 256 . prune [14,32) 64 -> 88 tokens/layer, 65.6% saved.
    "csp": Preset((StagePreset("cluster", 10 / 32, 64 / 256), StagePreset("scatter", 14 / 32, 1.0),
                   StagePreset("prune", 1.0, 64 / 256))),
    # Final budget 44/256 gives 76.75 tokens/layer on LISA-7B: 70.0% saved.
    "csp-70": Preset((StagePreset("cluster", 10 / 32, 64 / 256), StagePreset("scatter", 14 / 32, 1.0),
                      StagePreset("prune", 1.0, 44 / 256))),
    "evtp": Preset((StagePreset("kcenter", 1.0, 0.2),), budget_rounding="ceil"),
    # FastV: K=2, R=50%, ranked by the attention all queries pay at layer K-1.
    "fastv": Preset((StagePreset("all", 2 / 32, 1.0), StagePreset("prune", 1.0, 0.5)), knobs={"prune_query": "mean"}),
}
# ACCM presets need ACCM's own models (exporter/accm) besides the checkpoint, so they stay out of PRESETS, which
# every LISA-only path (export, bench, the preset-wide tests) iterates; `resolve` and `load_schedule` take both.
ACCM_PRESETS: dict[str, Preset] = {
    # ACCM's (visual, text picks) budgets of 576 CLIP-336 tokens, (36, 20) and (18, 12), at the same fractions of N:
    # on LISA's 256 tokens accm-36 keeps 16 with 9 text picks, accm-18 keeps 8 with 5.
    "accm-36": Preset((StagePreset("accm", 1.0, 36 / ACCM_GRID_TOKENS),), accm_text=20 / ACCM_GRID_TOKENS),
    "accm-18": Preset((StagePreset("accm", 1.0, 18 / ACCM_GRID_TOKENS),), accm_text=12 / ACCM_GRID_TOKENS),
}


def preset_names() -> list[str]:
    """Every preset name `resolve` accepts."""
    return [*PRESETS, *ACCM_PRESETS]


def resolve(name: str, n_layers: int, n_image_tokens: int, **knobs) -> Schedule:
    """Resolve a preset against a model's L decoder layers and N image tokens.

    Stage boundaries round to the nearest layer but every stage keeps at least one layer, so
    the same preset works on a 4-layer test model. Keyword knobs override the preset's.
    """
    if name not in PRESETS and name not in ACCM_PRESETS:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of: {', '.join(preset_names())} "
                            "(or a schedule .json file)")
    preset = PRESETS.get(name) or ACCM_PRESETS[name]
    n_stages = len(preset.stages)
    if n_layers < n_stages:
        raise ScheduleError(f"schedule {name!r} needs at least {n_stages} decoder layers, the model has {n_layers}")
    stages, start = [], 0
    for i, sp in enumerate(preset.stages):
        remaining = n_stages - i - 1
        end = min(max(round(sp.end * n_layers), start + 1), n_layers - remaining)
        raw = sp.budget * n_image_tokens
        budget = math.ceil(raw - 1e-9) if preset.budget_rounding == "ceil" else round(raw)
        stages.append(Stage(name=f"llm_{i}", start=start, end=end, op=sp.op, budget=max(1, min(budget, n_image_tokens))))
        start = end
    if preset.accm_text is not None and "accm" not in knobs:
        knobs = {**knobs, "accm": AccmKnobs(text_picks=max(1, round(preset.accm_text * n_image_tokens)))}
    try:
        sched = Schedule(name=name, n_layers=n_layers, n_image_tokens=n_image_tokens, stages=tuple(stages),
                         **{**preset.knobs, **knobs})
    except TypeError as exc:
        raise ScheduleError(f"unknown schedule knob: {exc}") from None
    return sched.check()


def load_schedule(spec: str, n_layers: int, n_image_tokens: int, **knobs) -> Schedule:
    """A preset name, or the path of a schedule JSON file (as written into artifacts)."""
    if spec in PRESETS or spec in ACCM_PRESETS:
        return resolve(spec, n_layers, n_image_tokens, **knobs)
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        if not path.is_file():
            raise ScheduleError(f"schedule file {spec} does not exist")
        sched = Schedule.from_json(path.read_text())
        if knobs:
            sched = dataclasses.replace(sched, **knobs)
        return sched.check_against(n_layers, n_image_tokens)
    return resolve(spec, n_layers, n_image_tokens, **knobs)  # raises "unknown schedule" with the choices


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ScheduleError(f"{what} {value!r} is unknown; choose one of: {', '.join(choices)}")
