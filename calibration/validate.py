"""`validate scenario.yaml`: run a scenario live on the real model and simulated, and compare.

The live run releases the scenario's requests on the wall clock through the same scheduler
objects the simulator uses, on the model and device the profile was measured on. The
simulation replays the identical request list. Live runs are repeated to show the run-to-run
noise beside the simulator's error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from calibration.compare import MEANINGS, compare, percentiles, table
from profiler.cli import add_threads_argument, device_info, pick_device, profile_record, within_window
from sim.cli_util import count, parser, run_command
from sim.errors import InputError

if TYPE_CHECKING:  # for the reader: at run time torch loads only after the input is checked
    from calibration.profile import Profile
    from profiler.live_engine import LiveEngine
    from profiler.measure import Bench, GridSamples
    from sim.scenario import Scenario
    from sim.workload import Trace

EPILOG = """
examples:
  validate scenarios/validation/steady.yaml --device cpu --loads 0.3,0.6,0.9
  validate scenarios/validation/bursty.yaml --gpu 0 --runs 2

--loads sets the offered load as fractions of the saturation throughput, which the simulator
finds by flooding the deployment with the same request mix, priced by the sweep just before
that load's live runs and, from the second load on, by the sweeps around the load before it (the
geometric mean of the two); without it the scenario's own rate is used. Each load also reports the
load the runs really met, priced by all the sweeps around them. Writes validation.json,
report.html (CDF overlays, per-request scatter, the device's speed and each request's TTFT
through the runs), requests.csv (every request of each live run and each simulation) and
steps.csv (every live step beside the profile's price for it). The summary counts the TTFT and E2E
p50/p90 figures each simulation puts within 10% of the live runs' mean, and, for scale, as many
as the live runs' own noise would leave a perfect simulation (two runs or more).
"""


def check_one_engine(scenario) -> None:
    """What one live engine can be compared with: one worker on one device, no autoscaler or caches."""
    dep = scenario.deployment
    problems = [
        (dep.replicas != 1, "deployment.replicas", "validate runs one replica on one device: set it to 1"),
        (dep.workers_per_gpu != 1, "deployment.workers_per_gpu", "validate runs one worker: set it to 1"),
        (scenario.autoscaler is not None, "autoscaler",
         "validate runs a fixed deployment: remove it, or --set 'autoscaler={policy: off}'"),
        (scenario.response_cache is not None, "response_cache", "a live engine has no response cache"),
    ]
    for bad, key, why in problems:
        if bad:
            raise InputError(f"{scenario.path}: {key}: {why}")


def check_scenario(scenario, profile, device_type: str):
    """What servesim's live engine can run: one engine (check_one_engine), a KV-cache mode, no
    chunked prefill or prefix cache, and a workload it serves."""
    check_one_engine(scenario)
    where = scenario.path
    dep = scenario.deployment
    problems = [
        (dep.batching.chunked_prefill, "deployment.batching.chunked_prefill", "the live engine has no chunked prefill"),
        (dep.batching.prefix_caching, "deployment.batching.prefix_caching", "the live engine has no prefix cache"),
        (profile.device_type != device_type, "deployment.profile",
         f"profile {profile.name!r} was measured on {profile.device_type}, but this validation runs on {device_type}"),
    ]
    for bad, key, why in problems:
        if bad:
            raise InputError(f"{where}: {key}: {why}")
    mode = profile.mode(dep.mode, f"{where}: deployment.mode")
    if not mode.kv_cache:
        raise InputError(f"{where}: deployment.mode: the live engine needs a KV-cache mode, not {mode.name!r}")
    # The live engine keeps a padded cache: simulate the engine that is really running.
    batching = replace(dep.batching, kv_layout="padded")
    checked = replace(scenario, deployment=replace(dep, batching=batching))
    check_serves_some(checked, profile)
    return checked


def check_serves_some(scenario, profile) -> None:
    """A deployment that rejects every request of its workload has a saturation of 0: no load
    to run. Which requests it rejects is the scheduler's call, whatever prices the steps."""
    from sim import workload
    from sim.simulator import simulate

    served = simulate(scenario, profile, workload.generate(scenario.workload, scenario.seed)).outcome.finished_at
    if not np.isfinite(served).any():
        raise InputError(f"{scenario.path}: deployment: it rejects every request of the workload "
                         "(`simulate` says why), so there is no load to run")


def steps_frame(runs, cost) -> pd.DataFrame:
    """One row per live step, run by run: its shape, when it started, how long the engine waited
    for work before it (0 when it went straight on from the step before), and its seconds inside
    the model and around it, each beside the profile's price for it (the forward pass after the
    same idle gap and as long after a prefill; the engine overhead)."""
    from calibration.cost_model import after_prefill_states

    frames = []
    for k, run in enumerate(runs, 1):  # named as requests.csv names the live runs
        steps = run.steps
        tokens, since = after_prefill_states([s.prefill_seqs * s.prefill_len for s in steps])
        after = [0.0 if s.prefill_seqs else cost.after_prefill_time(t, n - 1, s.decode_seqs, s.decode_context, 1)
                 for s, t, n in zip(steps, tokens, since)]
        frames.append(pd.DataFrame({
            "run": f"live {k}",
            "step": np.arange(len(steps)),
            "started_s": run.started_s,
            "prefill_seqs": [s.prefill_seqs for s in steps],
            "prefill_len": [s.prefill_len for s in steps],
            "decode_seqs": [s.decode_seqs for s in steps],
            "decode_context": [s.decode_context for s in steps],
            "reshuffle_tokens": [s.reshuffle_tokens for s in steps],
            "idle_s": run.idle_s,
            "forward_s": run.forward_s,
            "priced_forward_s": [cost.forward_time(s) + cost.wake_time(idle) + extra
                                 for s, idle, extra in zip(steps, run.idle_s, after)],
            "overhead_s": run.loop_s - run.forward_s,
            "priced_overhead_s": [cost.overhead_time(s) for s in steps],
        }))
    return pd.concat(frames, ignore_index=True)


def device_speed(steps: pd.DataFrame) -> float:
    """Time the live runs spent inside the model over what the profile predicts for the same
    steps after the same idle gaps (a steps_frame): 1.1 means the device ran 10% slower during
    the runs than while the profile was swept."""
    return float(steps.forward_s.sum() / steps.priced_forward_s.sum())


def device_speed_by_pass(steps: pd.DataFrame) -> list[dict]:
    """`device_speed` split by the kind of pass and its rows (1, 2, 3-4, 5-8, ...). The device's
    drift moves every kind of pass alike; a grid that times some shape unlike the live engine
    runs it moves that shape's figure alone."""
    rows = np.where(steps.prefill_seqs > 0, steps.prefill_seqs, steps.decode_seqs).astype(int)
    top = [1 << (r - 1).bit_length() for r in rows.tolist()]  # the power of two at or above: 1, 2, 3-4, ...
    kind = np.where(steps.prefill_seqs > 0, "prefill", "decode")
    groups = sorted(steps.groupby([kind, top]), key=lambda item: (item[0][0] != "prefill", item[0][1]))
    return [{"pass": k, "rows": str(t) if t <= 2 else f"{t // 2 + 1}-{t}", "steps": len(group),
             "live_ms": 1e3 * float(group.forward_s.mean()), "priced_ms": 1e3 * float(group.priced_forward_s.mean()),
             "speed": device_speed(group)} for (k, t), group in groups]


def device_speed_by_kind(steps: pd.DataFrame) -> dict[str, float]:
    """`device_speed` for prefill passes and for decode passes apart. A prefill is compute-bound
    and a decode reads the weights and the cache from memory, so a neighbour on a shared machine
    can slow one more than the other: over 72 cases of six CPU matrices the two differed by more
    than 8% in 16 (correlation 0.58). A kind the runs never ran takes the runs' overall speed."""
    prefill = steps.prefill_seqs > 0
    overall = device_speed(steps)
    return {kind: device_speed(steps[rows]) if rows.any() else overall
            for kind, rows in (("prefill", prefill), ("decode", ~prefill))}


def scaled(raw: dict, mode: str, speed: dict[str, float]) -> dict:
    """A profile file whose prefill and decode grid times in `mode` are `speed[kind]` times the
    measured ones. The engine's time outside the model is not the device's speed, and stays."""
    out = json.loads(json.dumps(raw))
    for kind in ("prefill", "decode"):
        grid = out["modes"][mode][kind]
        grid["median_s"] = [[None if v is None else v * speed[kind] for v in row] for row in grid["median_s"]]
    out["command"] += (f"; prefill times x {speed['prefill']:.3f} and decode times x {speed['decode']:.3f}, "
                       "the device's speed during the live runs")
    return out


def scenario_grid(scenario, trace):
    """A profile grid covering exactly the shapes this scenario's batches can take."""
    from profiler.measure import GridSpec, decode_batches

    def powers(low: int, high: int) -> tuple[int, ...]:
        out = [low]
        while out[-1] < high:
            out.append(out[-1] * 2)
        return tuple(out)

    b = scenario.deployment.batching
    # A batch holds no more rows than there are requests: vLLM's default of 256 sequences had a
    # validation of 8 requests time 256-row passes, minutes of them on a CPU.
    rows = min(b.max_num_seqs if b.policy == "continuous" else b.max_batch_size, len(trace))
    longest = int(trace.prompt_tokens.max())
    context = int((trace.prompt_tokens + trace.output_tokens).max())
    return GridSpec(powers(1, rows), powers(16, longest), decode_batches(rows), powers(32, context),
                    warmup=2, repeats=3, max_point_s=0.3, concurrency_workers=(1,))


def parse_args(argv):
    p = parser("validate", __doc__, EPILOG)
    p.add_argument("scenario", type=Path, help="scenario YAML file (see scenarios/validation/)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpu", type=int, metavar="N", help="run live on this CUDA device")
    where.add_argument("--device", choices=("cpu",), default="cpu", help="run live on the CPU (default)")
    p.add_argument("--loads", help="comma-separated fractions of saturation, e.g. 0.3,0.6,0.9")
    p.add_argument("--runs", type=count, default=2, help="live runs per load (default 2: shows the noise)")
    p.add_argument("--requests", type=count, help="override workload.num_requests")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario value, e.g. --set deployment.replicas=4 "
                        "--set 'deployment.batching={policy: dynamic, max_batch_size: 16}'")
    add_threads_argument(p)
    p.add_argument("--out", type=Path, help="output folder (default: results/validate-<scenario>)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p.parse_args(argv)


@dataclass
class Rig:
    """What every load of one validation shares: the scenario and its requests at its own rate,
    the live engine, the bench that sweeps the scenario's profile grid around the runs, and what
    a profile file records beside the sweeps' times."""
    scenario: Scenario
    profile: Profile  # the one the scenario names, as measured: the third simulation's price
    base: Trace  # each load offers these requests, their arrivals scaled
    engine: LiveEngine
    bench: Bench
    penalties: dict  # the profile's wake and after_prefill sections, measured once
    peaks: dict
    info: dict
    model_load_s: float
    quiet: bool  # no progress lines or bars

    def log(self, *parts) -> None:
        say(self.quiet, *parts)


def say(quiet: bool, *parts) -> None:
    """A progress line on stderr, unless quiet."""
    if not quiet:
        print(*parts, file=sys.stderr, flush=True)


@dataclass
class LoadRecord:
    """One load's outcome: its case in validation.json, its rows of requests.csv and steps.csv,
    and the profile its sweeps pooled."""
    case: dict
    requests: pd.DataFrame
    steps: pd.DataFrame
    profile: dict


def build_rig(scenario: Scenario, profile: Profile, device, threads: int, runs: int, quiet: bool) -> Rig:
    """The model in the profile's serving regime, warmed up, and a bench for the scenario's grid."""
    from profiler.live_engine import LiveEngine, build_for_profile
    from profiler.measure import Bench, ModeSpec, device_peaks
    from profiler.regime import freeze_heap, serving_regime
    from sim import workload
    from sim.results import counted

    serving_regime(device, threads)  # the regime `profile` measured in
    say(quiet, f"building {profile.model_name} ({scenario.deployment.mode}) on {device} ...")
    start = time.perf_counter()
    model = build_for_profile(profile, scenario.deployment.mode, device, quiet)
    model_load_s = time.perf_counter() - start
    engine = LiveEngine(model, device)
    engine.warm_up()
    freeze_heap()
    base = workload.generate(scenario.workload, scenario.seed)
    mode = ModeSpec.parse(scenario.deployment.mode)
    bench = Bench(model, device, mode, within_window(replace(scenario_grid(scenario, base), passes=runs + 1), model))
    say(quiet, f"timing the first pass after idle and the first decodes after a prefill (up to "
               f"{max(bench.spec.decode_batch)} rows) ...")
    penalties = {"wake": bench.wake_penalty(), "after_prefill": bench.after_prefill()}
    wake, after = penalties["wake"], penalties["after_prefill"]
    say(quiet, f"first pass after {wake['gap_s'][-1] * 1e3:g} ms idle: {wake['extra_s'][-1] * 1e3:.2f} ms slower; "
               f"first decode after a {after['tokens'][-1]}-token prefill: "
               + ", ".join(f"{table[-1][0]:.0%} slower at {counted(r, 'row')}"
                           for r, table in zip(after["rows"], after["excess"])))
    peaks = device_peaks(device, [mode.dtype])
    info = device_info(device) | {"copy_bytes_per_s": peaks["copy_bytes_per_s"]}
    return Rig(scenario, profile, base, engine, bench, penalties, peaks, info, model_load_s, quiet)


def sweep(rig: Rig, samples: GridSamples) -> None:
    from tqdm import tqdm

    from profiler.measure import sweep_updates

    rig.log(f"  sweeping the profile grid ({samples.points()} points, a calibration flood after each column) ...")
    # Only on a terminal: a log file would fill with the bar's redraws.
    with tqdm(total=sweep_updates(rig.bench.spec, rig.bench.mode.kv_cache), unit="pt", leave=False,
              file=sys.stderr, disable=rig.quiet or not sys.stderr.isatty()) as bar:
        samples.sweep(bar)


def profile_file(rig: Rig, samples: GridSamples) -> dict:
    """The profile file of the sweeps so far, as `profile` would write it."""
    from profiler.measure import mode_record

    bench = rig.bench
    modes = {bench.mode.name: mode_record(bench, samples.summary(), rig.peaks["matmul_flops"].get(bench.mode.dtype),
                                          **rig.penalties)}
    return profile_record(bench.model, rig.profile.model_name, rig.model_load_s, rig.info, modes, bench.spec,
                          f"{rig.profile.name}-validate", "validate: swept before, between and after the live runs")


def run_load(rig: Rig, load: float | None, runs: int, around: float | None) -> tuple[LoadRecord, float]:
    """Live runs of the scenario's requests at `load` of saturation (None: the scenario's own
    rate), a sweep of the profile grid before each and after the last, and three simulations
    of the same requests. `around` is the saturation the sweeps around the previous load priced;
    returns this load's, for the next."""
    from calibration.cost_model import CostModel
    from calibration.profile import parse as parse_profile
    from profiler.live_engine import run_live
    from profiler.measure import GridSamples
    from sim import workload
    from sim.results import requests_frame
    from sim.simulator import kv_capacity_per_worker, make_scheduler, saturation_rps, simulate

    scenario, mode = rig.scenario, rig.bench.mode.name
    # The device's speed drifts (on a shared VM by tens of percent over a minute), so the
    # simulation is priced by a profile of the scenario's shapes swept before, between and after
    # the live runs: the profile and the live runs see the same device.
    samples = GridSamples(rig.bench, rig.bench.spec)
    sweep(rig, samples)
    before = parse_profile(profile_file(rig, samples), "in-process profile")
    kv_capacity = kv_capacity_per_worker(scenario, before)
    # A load is a fraction of the saturation as the device runs now: found from the sweep just
    # before the live runs (found once for all loads from a sweep minutes earlier, "90%" ran at
    # 85-110% of what the runs' own sweeps priced, matrix to matrix). One sweep prices it only to
    # a few percent (five in a row: 1.33-1.46 req/s), so after the first load it is the geometric
    # mean of that sweep's and the previous load's pooled sweeps': over 154 stored loads, 5.7%
    # from what the sweeps around the runs priced (SD), against 6.7% from the one sweep (NOTES,
    # "Each load's saturation").
    capacity = None if load is None else saturation_rps(scenario, before, rig.base)
    if capacity is not None and around is not None:
        capacity = math.sqrt(capacity * around)
    factor = 1.0 if load is None else load * capacity / workload.offered_rate(rig.base)
    trace = workload.generate(workload.scale_rate(scenario.workload, factor), scenario.seed)
    label = "as given" if load is None else f"{load:.0%}"
    live_stats, live_frames, live_runs = [], [], []
    for i in range(runs):
        rig.log(f"load {label}: live run {i + 1}/{runs} of {len(trace)} requests "
                f"({workload.offered_rate(trace):.2f} req/s, arriving over {trace.arrived_at[-1]:.0f} s) ...")
        start = time.perf_counter()
        live_runs.append(run_live(rig.engine, make_scheduler(scenario, before, kv_capacity), trace))
        live_frames.append(requests_frame(trace, live_runs[-1].outcome))
        live_stats.append(percentiles(live_frames[-1]))
        rig.log(f"  took {time.perf_counter() - start:.1f} s")
        sweep(rig, samples)
    raw = profile_file(rig, samples)
    fresh = parse_profile(raw, "in-process profile")
    steps = steps_frame(live_runs, CostModel.of(fresh, fresh.modes[mode]))
    by_run = [run for _, run in steps.groupby("run", sort=False)]
    by_kind = device_speed_by_kind(steps)
    at_speed = parse_profile(scaled(raw, mode, by_kind), "in-process profile")
    sim_frames = {key: requests_frame(trace, simulate(scenario, p, trace).outcome)
                  for key, p in (("sim", fresh), ("sim_at_run_speed", at_speed), ("sim_shipped", rig.profile))}
    sims = {key: percentiles(frame) for key, frame in sim_frames.items()}
    # The load the runs really met: the offered rate over the saturation priced by the sweeps
    # around them, the profile that prices the simulation.
    around = saturation_rps(scenario, fresh, rig.base)
    # Turned away on arrival (too long for the cache or the window), by the same scheduler live and
    # simulated, whatever the timing: every figure is of the rest.
    rejected = live_frames[0]["rejected"]
    case = {"load": label, "offered_rps": workload.offered_rate(trace), "requests": len(trace),
            "rejected": {str(k): int(v) for k, v in rejected[rejected != ""].value_counts().sort_index().items()},
            "saturation_rps": capacity, "realized_load": workload.offered_rate(trace) / around,
            "device_speed": device_speed(steps), "device_speed_per_run": [device_speed(run) for run in by_run],
            "device_speed_by_kind": by_kind,
            "sweep_levels": samples.sweep_levels(),
            "device_speed_by_pass": device_speed_by_pass(steps),
            "engine_overhead_s": {"profile": float(steps.priced_overhead_s.mean()),
                                  "live": [float(run.overhead_s.mean()) for run in by_run]},
            "live": live_stats, **sims}
    for key in sims:
        case[key.replace("sim", "comparison")] = compare(live_stats, case[key])
    sources = [(f"live {k}", frame) for k, frame in enumerate(live_frames, 1)]
    sources += [(name, sim_frames[key]) for key, (name, _) in zip(sim_frames, MEANINGS)]
    requests = pd.concat([frame.assign(load=label, run=name)[["load", "run", *frame.columns]]
                          for name, frame in sources])
    steps = steps.assign(load=label)[["load", *steps.columns]]  # steps_frame puts `run` first
    return LoadRecord(case, requests, steps, raw), around


def write(out: Path, result: dict, records: list[LoadRecord]) -> None:
    """The folder as of the loads done so far, replaced whole after each load: a run cut short
    (a GPU lease's call limit, a lost terminal) keeps its finished loads."""
    from reports.validation_report import write_validation_report
    from sim.files import atomic_folder

    with atomic_folder(out) as tmp:
        (tmp / "validation.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        requests = pd.concat([record.requests for record in records], ignore_index=True)
        steps = pd.concat([record.steps for record in records], ignore_index=True)
        requests.to_csv(tmp / "requests.csv", index=False)
        steps.to_csv(tmp / "steps.csv", index=False)
        for record in records:
            label = record.case["load"]
            name = "profile.json" if label == "as given" else f"profile-{label.rstrip('%')}.json"
            (tmp / name).write_text(json.dumps(record.profile, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        write_validation_report(result, requests, steps, tmp / "report.html")


def parse_loads(text: str | None) -> list[float | None]:
    if text is None:
        return [None]
    try:
        loads = [float(x) for x in text.split(",")]
    except ValueError:
        raise InputError(f"--loads: expected numbers like 0.3,0.6,0.9, got {text!r}") from None
    # Under 1% a load is labelled 0%, and its runs wait out arrivals hours apart (1e-9: for ever).
    if not all(0.01 <= x <= 2 for x in loads):
        raise InputError("--loads: each load must be a fraction of saturation from 0.01 to 2")
    # A load's rows, report lines and profile-<load>.json are labelled by its whole percent.
    labels = [f"{x:.0%}" for x in loads]
    twice = next((label for label in labels if labels.count(label) > 1), None)
    if twice:
        raise InputError(f"--loads: {twice} is given twice (loads are told apart by whole percent; "
                         "--runs repeats a load)")
    return loads


def main(argv=None) -> int:
    args = parse_args(argv)

    def run() -> int:
        from calibration.profile import load as load_profile
        from sim import scenario as scenario_mod
        from sim.files import check_replaceable

        loads = parse_loads(args.loads)
        # --requests is `--set workload.num_requests=N`, so the scenario's own checks judge it
        requests = [] if args.requests is None else [f"workload.num_requests={args.requests}"]
        scenario = scenario_mod.load(args.scenario, args.set + requests)
        out = args.out or Path("results") / f"validate-{scenario.name}"
        check_replaceable(out)  # before minutes of live runs, not after the first load
        profile = load_profile(scenario.deployment.profile)
        device = pick_device(argparse.Namespace(gpu=args.gpu, device=args.device))
        scenario = check_scenario(scenario, profile, device.type)
        rig = build_rig(scenario, profile, device, args.threads, args.runs, args.quiet)
        done: list[LoadRecord] = []
        result = {
            "scenario": scenario.name, "policy": scenario.deployment.batching.policy,
            "profile": profile.name, "mode": scenario.deployment.mode, "device": str(device),
            "torch": rig.info["torch"], "runs": args.runs,
            "command": "validate " + " ".join(sys.argv[1:] if argv is None else argv), "cases": [],
        }
        around = None  # the saturation the sweeps around the last load's runs priced, once one ran
        for load in loads:
            finished, around = run_load(rig, load, args.runs, around)
            done.append(finished)
            result["cases"].append(finished.case)
            write(out, result, done)
            rig.log(f"  wrote {out} ({len(done)} of {len(loads)} loads)")
        print(table(result))
        print(f"\nwrote {out}/validation.json and {out}/report.html")
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
