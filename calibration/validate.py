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
import statistics
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from profiler.cli import add_threads_argument, device_info, pick_device, profile_record
from sim.cli_util import run_command
from sim.errors import InputError

METRICS = ("ttft_s", "tpot_s", "e2e_s")
QUANTILES = (50, 90, 99)
TARGETED = ("ttft_s.p50", "ttft_s.p90", "e2e_s.p50", "e2e_s.p90")  # the figures the 10% target covers
# The figures a validation table shows, and their column labels.
LABELS = {"ttft_s.p50": "TTFT p50", "ttft_s.p90": "TTFT p90", "e2e_s.p50": "E2E p50", "e2e_s.p90": "E2E p90",
          "tpot_s.p50": "TPOT p50", "throughput_rps": "throughput"}
# What each simulation of a case is, for the printed table and the HTML report.
MEANINGS = (
    ("simulated", "priced by the profile swept before, between and after the live runs (the prediction)."),
    ("at run speed", "the same, with prefill and decode times scaled by how fast the device ran the live runs' "
                     "prefill and decode passes, which takes the device's drift out and leaves the simulator's "
                     "own error."),
    ("scenario's profile", "the same simulation priced by the profile the scenario names, as it was measured, "
                           "not swept around the runs: how well a profile taken earlier predicts today's device."),
)
# The summary's last line: how far the live runs' own noise alone leaves a perfect simulation.
NOISE_LABEL = "a perfect simulation, against the runs' noise"
NOISE_MEANING = ("how many figures a simulation predicting exactly what a run gives on average would put within "
                 "10% of the mean of these live runs, drawn from their own spread (with two runs, as half "
                 "their difference): as many as these runs' noise allows, before the device's drift between "
                 "the sweeps and the runs.")
# What every line of a validation's text and report means, in the order they are printed.
LEGEND = (*MEANINGS, (NOISE_LABEL, NOISE_MEANING))

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
        (scenario.autoscaler is not None, "autoscaler", "validate runs a fixed deployment: remove it"),
        (scenario.response_cache is not None, "response_cache", "a live engine has no response cache"),
    ]
    for bad, key, why in problems:
        if bad:
            raise InputError(f"{scenario.path}: {key}: {why}")


def check_scenario(scenario, profile, device_type: str):
    """What servesim's live engine can run: one engine (check_one_engine), a KV-cache mode, no
    chunked prefill or prefix cache."""
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
    return replace(scenario, deployment=replace(dep, batching=batching))


def percentiles(frame) -> dict:
    out = {}
    for m in METRICS:
        v = frame[m].dropna().to_numpy()
        out[m] = {f"p{q}": float(np.percentile(v, q)) if len(v) else None for q in QUANTILES}
    done = frame["finished_at"].dropna()
    out["throughput_rps"] = len(done) / float(done.max() - frame["arrived_at"].min())
    return out


def rel(a, b):
    return None if a is None or b is None or b == 0 else (a - b) / b


def compare(live: list[dict], sim: dict) -> dict:
    """Simulated vs the mean of the live runs, with the live runs' spread as the noise floor."""
    rows = {}
    keys = [(m, f"p{q}") for m in METRICS for q in QUANTILES] + [("throughput_rps", None)]
    for metric, q in keys:
        pick = (lambda d: d[metric][q]) if q else (lambda d: d[metric])
        lives = [pick(d) for d in live]
        mean = float(np.mean(lives)) if None not in lives else None
        noise = (max(lives) - min(lives)) / mean if mean and len(lives) > 1 else None
        rows[f"{metric}.{q}" if q else metric] = {"live": lives, "live_mean": mean, "sim": pick(sim),
                                                  "error": rel(pick(sim), mean), "noise": noise}
    return rows


def steps_frame(runs, cost) -> pd.DataFrame:
    """One row per live step, run by run: its shape, when it started, how long the device sat
    idle before it, and its seconds inside the model and around it, each beside the profile's
    price for it (the forward pass after the same idle gap; the engine overhead)."""
    frames = []
    for k, run in enumerate(runs, 1):  # named as requests.csv names the live runs
        steps = run.steps
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
            "priced_forward_s": [cost.forward_time(s) + cost.wake_time(idle) for s, idle in zip(steps, run.idle_s)],
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
    """A profile file whose prefill and decode times in `mode` are `speed[kind]` times the
    measured ones: the grids' and each calibration flood step's by its kind, so each flood step
    keeps its ratio to its grid, and the serving factor, their pooled ratio, all but stays."""
    out = json.loads(json.dumps(raw))
    for kind in ("prefill", "decode"):
        grid = out["modes"][mode][kind]
        grid["median_s"] = [[None if v is None else v * speed[kind] for v in row] for row in grid["median_s"]]
    flood = out["modes"][mode]["flood"]
    flood["forward_s"] = [v * speed["prefill" if rows else "decode"]
                          for v, rows in zip(flood["forward_s"], flood["prefill_seqs"])]
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
    rows = b.max_num_seqs if b.policy == "continuous" else b.max_batch_size
    longest = int(trace.prompt_tokens.max())
    context = int((trace.prompt_tokens + trace.output_tokens).max())
    return GridSpec(powers(1, rows), powers(16, longest), decode_batches(rows), powers(32, context),
                    warmup=2, repeats=3, max_point_s=0.3, concurrency_workers=(1,))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="validate", description=__doc__.split(":", 1)[1].strip(), epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", type=Path)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpu", type=int, metavar="N", help="run live on this CUDA device")
    where.add_argument("--device", choices=("cpu",), default="cpu", help="run live on the CPU (default)")
    p.add_argument("--loads", help="comma-separated fractions of saturation, e.g. 0.3,0.6,0.9")
    p.add_argument("--runs", type=int, default=2, help="live runs per load (default 2: shows the noise)")
    p.add_argument("--requests", type=int, help="override workload.num_requests")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario value, e.g. --set deployment.replicas=4 "
                        "--set 'deployment.batching={policy: dynamic, max_batch_size: 16}'")
    add_threads_argument(p)
    p.add_argument("--out", type=Path, help="output folder (default: results/validate-<scenario>)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def run() -> int:
        from calibration.cost_model import CostModel
        from calibration.profile import load as load_profile
        from sim import scenario as scenario_mod, workload
        from sim.files import atomic_folder, check_replaceable
        from sim.results import requests_frame
        from sim.simulator import kv_capacity_per_worker, make_scheduler, saturation_rps, simulate

        if args.runs < 1:
            raise InputError("--runs: must be at least 1")
        try:
            loads = [float(x) for x in args.loads.split(",")] if args.loads else [None]
        except ValueError:
            raise InputError(f"--loads: expected numbers like 0.3,0.6,0.9, got {args.loads!r}") from None
        if any(x is not None and not 0 < x <= 2 for x in loads):
            raise InputError("--loads: each load must be a fraction of saturation in (0, 2]")
        if args.requests is not None and args.requests < 1:
            raise InputError("--requests: must be at least 1")
        scenario = scenario_mod.load(args.scenario, args.set)
        if args.requests is not None:
            scenario = replace(scenario, workload=replace(scenario.workload, num_requests=args.requests))
        out = args.out or Path("results") / f"validate-{scenario.name}"
        check_replaceable(out)  # before minutes of live runs, not after the first load
        profile = load_profile(scenario.deployment.profile)
        device = pick_device(argparse.Namespace(gpu=args.gpu, device=args.device))
        scenario = check_scenario(scenario, profile, device.type)
        import torch

        from profiler.measure import freeze_heap, serving_regime

        serving_regime(device, args.threads)  # the regime `profile` measured in

        from profiler.live_engine import LiveEngine, build_for_profile, run_live

        log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
        log(f"building {profile.model_name} ({scenario.deployment.mode}) on {device} ...")
        load_start = time.perf_counter()
        model = build_for_profile(profile, scenario.deployment.mode, device)
        model_load_s = time.perf_counter() - load_start
        engine = LiveEngine(model, device)
        engine.warm_up()
        freeze_heap()
        base = workload.generate(scenario.workload, scenario.seed)
        # The device's speed drifts (on a shared VM by tens of percent over a minute), so each
        # load's simulation is priced by a profile of the scenario's shapes swept before, between
        # and after its live runs: the profile and the live runs see the same device. The shipped
        # profile's prediction is kept beside it in validation.json.
        from calibration.profile import parse as parse_profile
        from profiler.measure import Bench, GridSamples, ModeSpec, device_peaks, mode_record

        mode_spec = ModeSpec.parse(scenario.deployment.mode)
        grid = replace(scenario_grid(scenario, base), passes=args.runs + 1)
        bench = Bench(model, device, mode_spec, grid)
        wake = bench.wake_penalty()
        log(f"first pass after {wake['gap_s'][-1] * 1e3:g} ms idle: {wake['extra_s'][-1] * 1e3:.2f} ms slower")
        peaks = device_peaks(device, [mode_spec.dtype])
        info = device_info(device) | {"copy_bytes_per_s": peaks["copy_bytes_per_s"]}

        def profile_of(samples: GridSamples) -> tuple[dict, object]:
            modes = {mode_spec.name: mode_record(bench, samples.summary(), peaks["matmul_flops"].get(mode_spec.dtype),
                                                 wake=wake)}
            raw = profile_record(model, profile.model_name, model_load_s, info, modes, grid,
                                 f"{profile.name}-validate", "validate: swept before, between and after the live runs")
            return raw, parse_profile(raw, "in-process profile")

        def swept(samples: GridSamples) -> GridSamples:
            log(f"  sweeping the profile grid ({samples.points()} points, a calibration flood after each column) ...")
            samples.sweep()
            return samples

        cases, profiles = [], {}
        requests, live_steps = [], []  # per load: every request of every run, every live step
        result = {
            "scenario": scenario.name, "policy": scenario.deployment.batching.policy,
            "profile": profile.name, "mode": scenario.deployment.mode, "device": str(device),
            "torch": torch.__version__, "runs": args.runs,
            "command": "validate " + " ".join(sys.argv[1:] if argv is None else argv), "cases": cases,
        }
        from reports.validation_report import write_validation_report

        def save() -> None:
            """The folder as of the loads done so far, replaced whole after each load: a run cut
            short (a GPU lease's call limit, a lost terminal) keeps its finished loads."""
            with atomic_folder(out) as tmp:
                (tmp / "validation.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
                tidy = {name: pd.concat(parts, ignore_index=True)
                        for name, parts in (("requests.csv", requests), ("steps.csv", live_steps))}
                for name, frame in tidy.items():
                    frame.to_csv(tmp / name, index=False)
                for label, raw in profiles.items():
                    name = "profile.json" if label == "as given" else f"profile-{label.rstrip('%')}.json"
                    (tmp / name).write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n", encoding="utf-8")
                write_validation_report(result, tidy["requests.csv"], tidy["steps.csv"], tmp / "report.html")

        around = None  # the saturation the sweeps around the last load's runs priced, once one ran
        for load in loads:
            # A load is a fraction of the saturation as the device runs now: found from the sweep
            # just before this load's live runs (found once for all loads from a sweep minutes
            # earlier, "90%" ran at 85-110% of what the runs' own sweeps priced, matrix to matrix).
            # One sweep prices it only to a few percent (five in a row: 1.33-1.46 req/s), so after
            # the first load it is the geometric mean of that sweep's and the previous load's
            # pooled sweeps': over 154 stored loads, 5.7% from what the sweeps around the runs
            # priced (SD), against 6.7% from the one sweep (NOTES, "Each load's saturation").
            samples = swept(GridSamples(bench, grid))
            _, before = profile_of(samples)
            kv_capacity = kv_capacity_per_worker(scenario, before)
            capacity = None if load is None else saturation_rps(scenario, before, base)
            if capacity is not None and around is not None:
                capacity = math.sqrt(capacity * around)
            factor = 1.0 if load is None else load * capacity / workload.offered_rate(base)
            trace = workload.generate(workload.scale_rate(scenario.workload, factor), scenario.seed)
            label = "as given" if load is None else f"{load:.0%}"
            live_stats, live_frames, live_runs = [], [], []
            for i in range(args.runs):
                log(f"load {label}: live run {i + 1}/{args.runs} of {len(trace)} requests "
                    f"({workload.offered_rate(trace):.2f} req/s) ...")
                t0 = time.perf_counter()
                live_runs.append(run_live(engine, make_scheduler(scenario, kv_capacity), trace))
                live_frames.append(requests_frame(trace, live_runs[-1].outcome))
                live_stats.append(percentiles(live_frames[-1]))
                log(f"  took {time.perf_counter() - t0:.1f} s")
                swept(samples)
            profiles[label], fresh = profile_of(samples)
            cost = CostModel.of(fresh, fresh.modes[mode_spec.name])
            steps = steps_frame(live_runs, cost)
            speed = device_speed(steps)
            by_run = [run for _, run in steps.groupby("run", sort=False)]
            by_kind = device_speed_by_kind(steps)
            at_speed = parse_profile(scaled(profiles[label], mode_spec.name, by_kind), "in-process profile")
            sim_frames = {key: requests_frame(trace, simulate(scenario, p, trace).outcome)
                          for key, p in (("sim", fresh), ("sim_at_run_speed", at_speed), ("sim_shipped", profile))}
            sims = {key: percentiles(frame) for key, frame in sim_frames.items()}
            # The load the runs really met: the offered rate over the saturation priced by the
            # sweeps around them, the profile that prices the simulation.
            around = saturation_rps(scenario, fresh, base)
            realized = workload.offered_rate(trace) / around
            case = {"load": label, "offered_rps": workload.offered_rate(trace), "requests": len(trace),
                    "saturation_rps": capacity, "realized_load": realized,
                    "device_speed": speed, "device_speed_per_run": [device_speed(run) for run in by_run],
                    "device_speed_by_kind": by_kind,
                    "sweep_levels": samples.sweep_levels(),
                    "device_speed_by_pass": device_speed_by_pass(steps),
                    "engine_overhead_s": {"profile": float(steps.priced_overhead_s.mean()),
                                          "live": [float(run.overhead_s.mean()) for run in by_run]},
                    "live": live_stats, **sims}
            for key in sims:
                case[key.replace("sim", "comparison")] = compare(live_stats, case[key])
            cases.append(case)
            sources = [(f"live {k}", frame) for k, frame in enumerate(live_frames, 1)]
            sources += [(name, sim_frames[key]) for key, (name, _) in zip(sim_frames, MEANINGS)]
            requests.append(pd.concat([frame.assign(load=label, run=name)[["load", "run", *frame.columns]]
                                       for name, frame in sources]))
            live_steps.append(steps.assign(load=label)[["load", *steps.columns]])  # steps_frame puts `run` first
            save()
            log(f"  wrote {out} ({len(cases)} of {len(loads)} loads)")
        print(table(result))
        print(f"\nwrote {out}/validation.json and {out}/report.html")
        return 0

    return run_command(run)


def noise_error(lives: list[float]) -> float:
    """An error drawn as a perfect simulation's would be, from the live runs' own spread.

    A perfect simulation predicts the figure a run gives on average; its error against the mean
    of n runs, each off by its own noise, is that mean's noise: spread sigma / sqrt(n). The
    contrast k * (run 1 - the mean of the others), k = sqrt(n - 1) / n, has that same spread and
    no average (1/2 * (run 1 - run 2) for two runs), so it is one draw of that error: counted
    over a matrix, how many figures the runs' noise alone leaves within 10%. It knows nothing of
    the device's level drifting between the sweeps and the runs, which the prediction also pays."""
    n = len(lives)
    contrast = math.sqrt(n - 1) / n * (lives[0] - sum(lives[1:]) / (n - 1))
    return contrast / (sum(lives) / n)


def summary(cases: list[dict]) -> list[str]:
    """How many targeted figures the prediction, the same at run speed, and the scenario's own
    profile put within 10%, and as many as the live runs' own noise would leave a perfect one."""
    lines = []

    def line(label: str, errors: list[float]) -> None:
        lines.append(f"{label}: TTFT/E2E p50/p90 within 10%: {sum(e <= 0.10 for e in errors)} of {len(errors)}; "
                     f"median |error| {statistics.median(errors):.0%}, max {max(errors):.0%}")

    for label, which in (("prediction", "comparison"), ("at run speed", "comparison_at_run_speed"),
                         ("scenario's profile", "comparison_shipped")):
        if any(which not in case for case in cases):  # transformers' engine has no profile of its own
            continue
        line(label, [abs(case[which][key]["error"]) for case in cases for key in TARGETED])
    figures = [case["comparison"][key]["live"] for case in cases for key in TARGETED]
    if all(len(lives) > 1 for lives in figures):
        line(NOISE_LABEL, [abs(noise_error(lives)) for lives in figures])
    return lines


def table(result: dict) -> str:
    lines = [f"validation: {result['scenario']} ({result['policy']} batching, {result['profile']} / "
             f"{result['mode']}, {result['device']})", "",
             f"{'load':<9}{'metric':<16}{'live':>11}{'sim':>11}{'error':>9}{'live noise':>12}"
             f"{'sim at run speed':>18}{'error':>9}"]
    for case in result["cases"]:
        for key, row in case["comparison"].items():
            if key.endswith("p99"):
                continue
            at_speed = case["comparison_at_run_speed"][key]
            unit = 1 if key == "throughput_rps" else 1000
            fmt = (lambda v: "-" if v is None else f"{v * unit:,.1f}")
            pct = (lambda v: "-" if v is None else f"{v:+.1%}")
            label = key.replace("_s.", " ").replace("_rps", " req/s") + ("" if key == "throughput_rps" else " ms")
            lines.append(f"{case['load']:<9}{label:<16}{fmt(row['live_mean']):>11}{fmt(row['sim']):>11}"
                         f"{pct(row['error']):>9}{pct(row['noise']):>12}{fmt(at_speed['sim']):>18}"
                         f"{pct(at_speed['error']):>9}")
        lines.append(f"{case['load']:<9}offered {case['offered_rps']:.2f} req/s: {case['realized_load']:.0%} of the "
                     "saturation priced by the sweeps around the runs")
        overhead = case["engine_overhead_s"]
        runs = ", ".join(f"{v:.3f}" for v in case["device_speed_per_run"])
        sweeps = ", ".join(f"{v:.3f}" for v in case["sweep_levels"])
        kinds = case["device_speed_by_kind"]
        lines.append(f"{case['load']:<9}device ran {case['device_speed']:.3f}x the profile's forward times "
                     f"(prefill {kinds['prefill']:.3f}x, decode {kinds['decode']:.3f}x; runs: {runs}; "
                     f"the sweeps it pools ran {sweeps}x)")
        lines.append(f"{case['load']:<9}engine overhead {overhead['profile'] * 1000:.2f} ms/step priced, "
                     + ", ".join(f"{v * 1000:.2f}" for v in overhead["live"]) + " ms live")
        lines.append(f"{case['load']:<9}by pass, live / priced (steps): " + ", ".join(
            f"{g['pass']} {g['rows']} {g['speed']:.2f} ({g['steps']})" for g in case["device_speed_by_pass"]))
    lines += ["", *summary(result["cases"]), "",
              *(textwrap.fill(f"{name}: {meaning}", 100) for name, meaning in LEGEND)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
