"""Predict the latencies of transformers' own continuous-batching engine, then run it and compare.

    python benchmarks/validate_hf_engine.py [scenarios/validation/steady.yaml] [--out folder]
        [--set deployment.profile=cpu-llama-tiny]     (the profile names the model; default gpt2-tiny)

An engine nobody here wrote (profiler/hf_engine.py). The simulator is told its batching limits
(FIFO, decodes first, a token budget filled with prompt chunks, a request limit: servesim's
continuous scheduler with chunked prefill and a paged cache) and prices its steps by a
PagedStepModel fitted to the engine's steps just before each load's live runs: floods of 1, 4, 16
and 48 requests of the scenario's length mix, then 48 arriving at the scenario's own rate (other
draws than the runs'). Then each load (30, 60, 90% of the saturation that model predicts) runs
live twice and is simulated on the identical requests. "At run speed" scales the step model
by the live steps' seconds over its price of those same steps: one number, the device's level.

Writes <out>/validation.json (default results/validate-hf-engine) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from calibration.compare import LABELS, compare, percentiles, summary
from calibration.paged_steps import PagedStepModel
from calibration.profile import load as load_profile
from calibration.validate import check_one_engine, check_serves_some
from profiler.hf_engine import EngineConfig, EngineSteps, HFEngine
from sim import scenario as scenario_mod, workload
from sim.cli_util import count, run_command
from sim.files import atomic_folder, check_replaceable
from sim.results import requests_frame
from sim.simulator import saturation_rps, simulate
from sim.workload import Trace

LOADS = (0.3, 0.6, 0.9)
FLOODS = (1, 4, 16, 48)  # requests per calibration flood: steps of every batch size the runs take


def engine_scenario(scenario, config):
    """The scenario's deployment described as the engine batches."""
    dep = scenario.deployment
    batching = replace(dep.batching, policy="continuous", chunked_prefill=True, kv_layout="paged",
                       max_batched_tokens=config.max_batch_tokens, max_num_seqs=config.max_requests)
    return replace(scenario, deployment=replace(dep, batching=batching,
                                                kv_cache_tokens=config.num_blocks * config.page_size))


def calibrate(engine, traces: list[Trace]) -> EngineSteps:
    """The steps of each calibration trace through the engine, one after another."""
    runs = [engine.run(trace).steps for trace in traces]
    return EngineSteps(*(np.concatenate([getattr(s, k) for s in runs]) for k in vars(runs[0])))


def price(model: PagedStepModel, steps: EngineSteps) -> np.ndarray:
    return model.time(steps.q_tokens, steps.kv_tokens, steps.rows)


def step_error(model: PagedStepModel, steps: EngineSteps) -> float:
    """Median relative error of the model's price of each step."""
    return float(np.median(np.abs(price(model, steps) / steps.step_s - 1)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", type=Path, nargs="?", default=Path("scenarios/validation/steady.yaml"))
    p.add_argument("--requests", type=count, default=120)
    p.add_argument("--out", type=Path, default=Path("results/validate-hf-engine"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scenario value")
    args = p.parse_args()
    return run_command(lambda: validate(args))


def validate(args) -> int:
    import torch

    from profiler.live_engine import build_for_profile
    from profiler.regime import freeze_heap, serving_regime

    check_replaceable(args.out)
    serving_regime(torch.device("cpu"), threads=1)
    config = EngineConfig()
    scenario = scenario_mod.load(args.scenario, args.set)
    check_one_engine(scenario)
    scenario = engine_scenario(replace(scenario, workload=replace(scenario.workload, num_requests=args.requests)),
                               config)
    profile = load_profile(scenario.deployment.profile)  # names the model; its grid prices nothing here
    check_serves_some(scenario, profile)
    engine = HFEngine(build_for_profile(profile, scenario.deployment.mode, torch.device("cpu")), config)
    freeze_heap()
    base = workload.generate(scenario.workload, scenario.seed)
    # The floods: the scenario's laws of lengths, other draws, all arriving at once; then the
    # same laws arriving at the scenario's own rate, so the engine also idles and wakes as it serves.
    traces = []
    for i, n in enumerate(FLOODS):
        mix = workload.generate(replace(scenario.workload, num_requests=n), scenario.seed + 1 + i)
        traces.append(Trace(np.zeros(n), mix.prompt_tokens, mix.output_tokens))
    arriving = replace(scenario.workload, num_requests=FLOODS[-1])
    traces.append(workload.generate(arriving, scenario.seed + len(traces) + 1))
    engine.run(traces[len(FLOODS) - 1])  # warm-up: the first steps of a fresh engine pay one-time costs
    cases = []
    for load in LOADS:
        calibration = calibrate(engine, traces)
        model = PagedStepModel.fit(calibration.q_tokens, calibration.kv_tokens, calibration.rows, calibration.step_s)
        capacity = saturation_rps(scenario, profile, base, model)
        trace = workload.generate(workload.scale_rate(scenario.workload, load * capacity / workload.offered_rate(base)),
                                  scenario.seed)
        runs = []
        for i in range(2):
            print(f"{load:.0%}: live run {i + 1}/2, {len(trace)} requests at {workload.offered_rate(trace):.2f} req/s",
                  file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            runs.append(engine.run(trace))
            print(f"  {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        steps = [run.steps for run in runs]
        speed = float(sum(s.step_s.sum() for s in steps) / sum(price(model, s).sum() for s in steps))
        at_speed = model.scaled(speed)
        live = [percentiles(requests_frame(trace, run.outcome)) for run in runs]
        sims = {key: percentiles(requests_frame(trace, simulate(scenario, profile, trace, cost=m).outcome))
                for key, m in (("sim", model), ("sim_at_run_speed", at_speed))}
        case = {"load": f"{load:.0%}", "offered_rps": workload.offered_rate(trace), "saturation_rps": capacity,
                "step_model": str(model), "calibration_steps": len(calibration.step_s),
                "flood_step_error": step_error(model, calibrate(engine, traces)),  # a fresh calibration set
                "live_step_error": [step_error(model, s) for s in steps], "device_speed": speed,
                "live_steps": [len(s.step_s) for s in steps], "live": live, **sims,
                "comparison": compare(live, sims["sim"]),
                "comparison_at_run_speed": compare(live, sims["sim_at_run_speed"])}
        cases.append(case)
    engine.stop()
    result = {"scenario": scenario.name, "engine": "transformers continuous batching", "config": vars(config),
              "profile": profile.name, "torch": torch.__version__, "command": " ".join(sys.argv), "cases": cases}
    with atomic_folder(args.out) as tmp:
        (tmp / "validation.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(table(result))
    return 0


def table(result: dict) -> str:
    keys = list(LABELS)
    lines = ["| load | " + " | ".join(LABELS.values())
             + " | live run-to-run (max) | device speed, live / step model | step error: calibration · live runs |",
             "|---|" + "---|" * (len(keys) + 3)]
    for case in result["cases"]:
        cmp, fixed = case["comparison"], case["comparison_at_run_speed"]
        noise = max(cmp[k]["noise"] for k in keys)
        live_err = " / ".join(f"{e:.0%}" for e in case["live_step_error"])
        lines.append(f"| {case['load']} ({case['offered_rps']:.1f} req/s) | "
                     + " | ".join(f"{cmp[k]['error']:+.0%} · {fixed[k]['error']:+.0%}" for k in keys)
                     + f" | {noise:.0%} | {case['device_speed']:.2f} | {case['flood_step_error']:.0%} · {live_err} |")
    return "\n".join([*lines, "", *summary(result["cases"])])


if __name__ == "__main__":
    sys.exit(main())
