"""Schedules: presets resolve as DESIGN.md section 3 says, round-trip through JSON, and bad ones fail clearly."""

import dataclasses

import pytest

from graphs.errors import ScheduleError
from graphs.schedule import PRESETS, Schedule, Stage, load_schedule, resolve


def _layout(s):
    return [(st.start, st.end, st.op, st.budget) for st in s.stages]


def test_lisa_7b_presets():
    assert _layout(resolve("full", 32, 256)) == [(0, 32, "all", 256)]
    csp = resolve("csp", 32, 256)
    assert _layout(csp) == [(0, 10, "cluster", 64), (10, 14, "scatter", 256), (14, 32, "prune", 64)]
    assert csp.avg_image_tokens() == 88 and round(csp.reduction_pct(), 1) == 65.6
    assert 69.5 <= resolve("csp-70", 32, 256).reduction_pct() <= 70.5
    assert _layout(resolve("evtp", 32, 256)) == [(0, 32, "kcenter", 52)]  # k = ceil(0.2 * 256)
    fastv = resolve("fastv", 32, 256)
    assert _layout(fastv) == [(0, 2, "all", 256), (2, 32, "prune", 128)] and fastv.prune_query == "mean"


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("layers,tokens", [(4, 64), (3, 16), (40, 256), (32, 576)])
def test_presets_scale_to_any_model(name, layers, tokens):
    s = resolve(name, layers, tokens)
    assert len(s.tokens_per_layer()) == layers
    assert all(st.end > st.start for st in s.stages)


@pytest.mark.parametrize("name", list(PRESETS))
def test_json_round_trip(name, tmp_path):
    s = resolve(name, 32, 256, cluster_method="kmeans", kcenter_lambda=0.25)
    assert Schedule.from_json(s.to_json()) == s
    path = tmp_path / "s.json"
    path.write_text(s.to_json())
    assert load_schedule(str(path), 32, 256) == s


def _bad(**changes):
    s = resolve("csp", 32, 256)
    return dataclasses.replace(s, **changes)


@pytest.mark.parametrize("make,message", [
    (lambda: _bad(stages=(Stage("llm_0", 0, 40, "all", 256),)), "outside the model's layers"),
    (lambda: _bad(stages=(Stage("llm_0", 0, 32, "all", 300),)), "budget 300 is outside"),
    (lambda: _bad(stages=(Stage("llm_0", 0, 10, "all", 256), Stage("llm_1", 8, 32, "prune", 64))), "overlap"),
    (lambda: _bad(stages=(Stage("llm_0", 0, 10, "all", 256), Stage("llm_1", 12, 32, "prune", 64))), "in no stage"),
    (lambda: _bad(stages=(Stage("llm_0", 0, 32, "shuffle", 256),)), "op 'shuffle' is unknown"),
    (lambda: _bad(cluster_method="spectral"), "cluster_method 'spectral' is unknown"),
    (lambda: _bad(scatter_mode="blend"), "scatter_mode"),
    (lambda: _bad(stages=(Stage("llm_0", 0, 16, "all", 256), Stage("llm_1", 16, 32, "scatter", 256))), "previous stage to be a 'cluster'"),
    (lambda: _bad(stages=(Stage("llm_0", 0, 16, "prune", 64), Stage("llm_1", 16, 32, "all", 256))), "cannot be first"),
    (lambda: _bad(stages=(Stage("llm_0", 0, 16, "all", 256), Stage("llm_1", 16, 32, "kcenter", 52))), "must be the first stage"),
    (lambda: _bad(stages=(Stage("llm_0", 0, 16, "all", 256),)), "stages end at layer 16"),
])
def test_invalid_schedules_name_the_problem(make, message):
    with pytest.raises(ScheduleError, match=message):
        make().check()


def test_unknown_preset_lists_choices():
    with pytest.raises(ScheduleError, match="choose one of: full, csp, csp-70, evtp, fastv"):
        resolve("fastest", 32, 256)
    with pytest.raises(ScheduleError, match="does not exist"):
        load_schedule("nope.json", 32, 256)


def test_schedule_for_other_model_and_format_are_refused(tmp_path):
    s = resolve("csp", 32, 256)
    with pytest.raises(ScheduleError, match="resolved for L=32"):
        s.check_against(4, 64)
    data = s.to_dict()
    data["format"] = 0
    with pytest.raises(ScheduleError, match="format 0 is not supported"):
        Schedule.from_dict(data)
    with pytest.raises(ScheduleError, match="does not parse"):
        Schedule.from_json("{not json")


def test_too_few_layers_for_preset():
    with pytest.raises(ScheduleError, match="at least 3 decoder layers"):
        resolve("csp", 2, 64)
