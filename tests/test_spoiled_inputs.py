"""Shipped scenarios with one value spoiled: each runs, or is refused with one clear line.

Mutating them by hand and by a fuzzer found a traceback or a full memory behind eight kinds of
bad value (1e308 rates and token counts, 10^12 replicas or distinct prompts, ...); this keeps a
sample of that search in the suite."""

from __future__ import annotations

import copy
import datetime
import math

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from calibration.profile import load as load_profile
from conftest import ROOT
from sim import results, scenario as scenario_mod, workload
from sim.errors import InputError
from sim.fields import read_yaml
from sim.plan import evaluate, load_plan
from sim.simulator import simulate

PLANS = ["capacity.yaml", "cost.yaml", "batch-sweep.yaml", "azure-replicas.yaml"]
SCENARIOS = ["steady.yaml", "bursty.yaml", "experiments/single-request.yaml", "experiments/response-cache.yaml",
             "experiments/autoscaling.yaml", "validation/steady.yaml", "validation/bursty.yaml"]
SPOILED = [None, -1, 0, 1, 0.5, 1e-12, 1e12, 1e308, math.inf, math.nan, "", "abc", [], [1, "a"], {}, True,
           2**63, 10**9, 10**3000, datetime.date(2023, 1, 1), {1: 2, None: 3}]


def leaves(node, path=()):
    """Every key path in a scenario, sections included."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield path + (key,)
        yield from leaves(value, path + (key,))


def spoil(data, raw: dict) -> None:
    """Delete one key of `raw`, or give it a spoiled value."""
    *parents, key = data.draw(st.sampled_from(list(leaves(raw))))
    node = raw
    for k in parents:
        node = node[k]
    if data.draw(st.booleans()) and isinstance(node, dict):
        del node[key]
    else:
        node[key] = copy.deepcopy(data.draw(st.sampled_from(SPOILED)))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_spoiled_scenario_runs_or_is_one_clear_line(data):
    name = data.draw(st.sampled_from(SCENARIOS))
    raw = read_yaml(ROOT / "scenarios" / name, "scenario")
    raw["workload"]["num_requests"] = 60  # small runs, unless the spoiled value is this one
    spoil(data, raw)
    try:
        scenario = scenario_mod.parse(raw, name, (ROOT / "scenarios" / name).parent)
        trace = workload.generate(scenario.workload, scenario.seed)
        run = simulate(scenario, load_profile(scenario.deployment.profile), trace)
        frame = results.requests_frame(run.trace, run.outcome)
        results.table(results.summarise(run, scenario, frame))
    except InputError as e:
        assert "\n" not in str(e) and str(e).startswith(name), str(e)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_spoiled_plan_runs_or_is_one_clear_line(data, tmp_path):
    """Found so: a search over dates, keys YAML reads as numbers, one request to scale."""
    name = data.draw(st.sampled_from(PLANS))
    path = ROOT / "scenarios/experiments" / name
    raw = read_yaml(path, "plan")
    raw["base"] = str((path.parent / raw["base"]).resolve())
    raw["num_requests"] = 40  # small runs, unless the spoiled value is this one
    spoil(data, raw)
    spoiled = tmp_path / name
    spoiled.write_text(yaml.safe_dump(raw))
    try:
        plan = load_plan(spoiled)
        evaluate(plan.configs[0], plan.target_rps, min(plan.max_replicas, 4))
    except InputError as e:
        assert "\n" not in str(e), str(e)
