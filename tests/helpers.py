"""Run a scenario in-process and return the per-request frame and the summary."""

from __future__ import annotations

from pathlib import Path

from calibration.profile import load as load_profile
from sim import results, scenario as scenario_mod, workload
from sim.simulator import simulate


def run_scenario(path: Path, jump: bool = True):
    scenario = scenario_mod.load(path)
    trace = workload.generate(scenario.workload, scenario.seed)
    run = simulate(scenario, load_profile(scenario.deployment.profile), trace, jump=jump)
    frame = results.requests_frame(trace, run.outcome)
    return run, frame, results.summarise(run, scenario, frame)
