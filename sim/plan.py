"""`plan plan.yaml`: which deployment serves this traffic within the SLO, and at what cost.

A plan names a base scenario (its workload shape is kept), the knobs to search and the SLO.
Every combination of the `search` values, crossed with every `hardware` entry (a profile, a
mode and its price per GPU-hour), is one configuration. For each, the planner either finds the
highest request rate that meets the SLO (bisection over load) or, given `target_rps`, the
fewest replicas that meet it. Configurations run in parallel: a local process pool, or a Dask
cluster (`--scheduler tcp://host:8786`).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import sys
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from sim.cli_util import count, parser, run_command
from sim.errors import InputError
from sim.fields import Fields, read_yaml, show

EPILOG = """
examples:
  plan scenarios/experiments/capacity.yaml                 find each configuration's max rate
  plan my-plan.yaml --workers 2 --out results/my-plan
  plan my-plan.yaml --scheduler tcp://10.0.0.5:8786        run on a Dask cluster

a plan file:
  base: ../steady.yaml                  # scenario whose workload shape is kept
  target_rps: 12                        # omit to find each configuration's maximum
  max_replicas: 16                      # target mode: the largest deployment to try
  num_requests: 20000                   # each simulation's length (default: the base's); an SLO's
                                        # edge wants a long run: a short one starts empty
  slo: {ttft: {max_s: 1.0, percentile: 95}}        # default: the base scenario's
  search:                               # every combination is a configuration
    deployment.batching:
      - {policy: continuous, max_num_seqs: 32}
      - {policy: dynamic, max_batch_size: 8, max_wait_ms: 50}
    deployment.replicas: [1, 2]
  hardware:                             # each crossed with the search grid
    - {name: cpu-fp32, profile: cpu-gpt2-tiny, mode: fp32, usd_per_gpu_hour: 2.5}
"""

BISECTION_STEPS = 7
# Each configuration is a dozen simulations or so, seconds each: ten thousand is a night on a
# workstation, and a search past it is a typo (a long list crossed with another) more than a plan.
MAX_CONFIGS = 10_000
# Arrival parameters that only scale the offered rate, which the planner sets itself.
RATE_KEYS = ("workload.arrivals.rate", "workload.arrivals.mean_rate", "workload.arrivals.time_scale")


@dataclass(frozen=True)
class Config:
    name: str
    scenario: Any  # sim.scenario.Scenario
    profile: Any  # calibration.profile.Profile
    usd_per_gpu_hour: float


@dataclass(frozen=True)
class Plan:
    name: str
    path: str
    configs: list[Config]
    target_rps: float | None
    max_replicas: int


def _word(value: Any) -> str:
    """A search value in a label: as YAML spells it (a bare string, true, null), a long one by its
    start (a label names its configuration in every message about it)."""
    if isinstance(value, str):
        return value if len(value) <= 60 else value[:60] + "..."
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return show(value)


def _label(key: str, value: Any) -> str:
    if isinstance(value, dict):  # e.g. a batching policy: its values, tersely
        words = [_word(v) if k == "policy" else f"{_word(k)}={_word(v)}" for k, v in list(value.items())[:12]]
        return " ".join(words + ["..."] * (len(value) > 12))
    return f"{key.split('.')[-1]}={_word(value)}"


def load_plan(path: Path, overrides: list[str] = ()) -> Plan:
    from calibration.profile import load as load_profile, resolve
    from sim import scenario as scenario_mod

    file = str(path)
    data = read_yaml(path, "plan")
    if overrides:
        data = scenario_mod.apply_overrides(data if isinstance(data, dict) else {}, list(overrides), file)
    top = Fields(data, file)
    if not top.has("base") and top.has("workload"):
        top.fail("this is a scenario: run `simulate " + file + "`, or name it as a plan's base", "base")
    base_path = path.parent / top.str("base")
    try:
        base = read_yaml(base_path, "the base scenario")
    except InputError as e:
        top.fail(str(e), "base")
    target = top.num("target_rps", None, positive=True)
    max_replicas = top.num("max_replicas", 16, integer=True, low=1, high=scenario_mod.MAX_REPLICAS)
    num_requests = top.num("num_requests", None, integer=True, low=1)
    slo = top.raw("slo", None)
    search = top.section("search")
    axes: list[tuple[str, list]] = []
    if search is not None:
        for key in search.data:
            if not isinstance(key, str):
                search.fail("expected a key path such as deployment.replicas", key)
            values = search.raw(key)
            if not isinstance(values, list) or not values:
                search.fail("must be a non-empty list of values to try", key)
            if target is not None and key == "deployment.replicas":
                search.fail("with target_rps the planner searches replicas itself: remove this key", key)
            if key in RATE_KEYS:  # every configuration's arrivals are scaled to the rate under test
                search.fail("the planner sets the offered rate itself: remove this key (target_rps asks "
                            "for the fewest replicas at one rate)", key)
            axes.append((key, values))
    hardware = top.raw("hardware", None)
    if hardware is not None and (not isinstance(hardware, list) or not hardware):
        top.fail("must be a non-empty list of {profile, mode, usd_per_gpu_hour}", "hardware")
    name = top.name("name", path.stem)
    top.done()
    if num_requests is not None:
        scenario_mod.set_value(base, "workload.num_requests", num_requests, f"{file}: num_requests")

    entries = []
    for i, item in enumerate(hardware or [None]):
        if item is None:
            entries.append(("", {}, None))
            continue
        h = Fields(item, file, f"hardware[{i}]")
        profile_name, mode = h.str("profile"), h.str("mode")
        price = h.num("usd_per_gpu_hour", low=0)
        label = h.str("name", f"{profile_name}/{mode}")
        h.done()
        try:
            resolve(profile_name, path.parent)
        except InputError as e:
            h.fail(str(e), "profile")
        entries.append((label, {"deployment.profile": str(resolve(profile_name, path.parent)),
                                "deployment.mode": mode}, price))

    count = math.prod(len(v) for _, v in axes) * len(entries)
    if count > MAX_CONFIGS:
        raise InputError(f"{file}: search: {' x '.join(str(len(v)) for _, v in axes)} values"
                         + f" x {len(entries)} hardware entries" * bool(hardware)
                         + f" cross into {count:,} configurations, more than a plan runs ({MAX_CONFIGS:,}): narrow it")
    configs = []
    profiles: dict[str, Any] = {}
    for (hw_label, hw_set, price), combo in itertools.product(entries, itertools.product(*[v for _, v in axes])):
        raw = copy.deepcopy(base)
        overrides = dict(zip((k for k, _ in axes), combo)) | hw_set
        for key, value in overrides.items():
            scenario_mod.set_value(raw, key, copy.deepcopy(value), f"{file}: {key}")
        if slo is not None:
            raw["slo"] = slo
        label = " ".join([hw_label] * bool(hw_label) + [_label(k, v) for k, v in zip((k for k, _ in axes), combo)])
        label = label or "base"
        if any(c.name == label for c in configs):
            raise InputError(f"{file}: two configurations are named {label!r}: give each hardware entry its "
                             "own name and each search value once")
        scenario = scenario_mod.parse(raw, f"{file} [{label}]", base_path.parent)  # errors name the configuration
        if not scenario.slo:
            raise InputError(f"{file}: slo: the plan needs an SLO (here or in the base scenario)")
        if scenario.autoscaler is not None:
            # The planner prices replicas x $/GPU-hour, and with target_rps tries replica counts: an
            # autoscaler resized them as it ran (on bursty.yaml's, 8, 12, 14, 15 and 16 replicas all gave
            # p95 TTFT 8.62 s: it kept at most 6), and requests per dollar counted those it began with.
            raise InputError(f"{scenario.path}: autoscaler: a plan sizes fixed deployments, which an autoscaler "
                             "resizes as it runs: turn it off in the base (policy: off), or compare autoscalers "
                             "with simulate")
        key = str(scenario.deployment.profile)
        profiles.setdefault(key, load_profile(key))
        configs.append(Config(label, scenario, profiles[key],
                              price if price is not None else scenario.usd_per_gpu_hour))
    if not configs:
        raise InputError(f"{file}: search: the search space is empty")
    return Plan(name, file, configs, target, max_replicas)


# --- evaluation (runs in worker processes: everything it needs travels in its arguments) -------


def _measure(config: Config, factor: float, replicas: int | None = None) -> dict:
    """Simulate the configuration with its workload offered `factor` times as fast."""
    from sim import results, workload
    from sim.simulator import simulate

    scenario = config.scenario
    deployment = scenario.deployment if replicas is None else replace(scenario.deployment, replicas=replicas)
    scenario = replace(scenario, deployment=deployment, workload=workload.scale_rate(scenario.workload, factor),
                       usd_per_gpu_hour=config.usd_per_gpu_hour)
    trace = workload.generate(scenario.workload, scenario.seed)
    run = simulate(scenario, config.profile, trace)
    frame = results.requests_frame(trace, run.outcome)
    s = results.summarise(run, scenario, frame)
    return {"requests": len(trace), "rejected": s["rejected"], "offered_rps": workload.offered_rate(trace),
            "replicas": deployment.replicas,
            "throughput_rps": s["throughput_rps"], "slo_met": s["slo_met"], "slo": s["slo"],
            "usd_per_million_output_tokens": s["usd_per_million_output_tokens"],
            "ttft_p95_s": s["ttft_s"]["p95"], "e2e_p95_s": s["e2e_s"]["p95"], "tpot_p95_s": s["tpot_s"]["p95"]}


def _base_trace(config: Config):
    """The configuration's requests at the base scenario's rate, which the search scales."""
    from sim import workload

    trace = workload.generate(config.scenario.workload, config.scenario.seed)
    if not math.isfinite(workload.offered_rate(trace)):  # a scaled rate of 0 stopped on ZeroDivisionError
        raise InputError(f"{config.scenario.path}: workload: its {len(trace):,} request(s) arrive at one "
                         "instant, so they have no rate to scale: a plan needs two or more arriving apart")
    return trace


def _worst(point: dict) -> tuple[str, float]:
    """The SLO metric furthest above its bound, and how far (negative: within it, -1 where no
    request has the metric; inf: its percentile falls among rejected requests)."""
    def miss(t: dict) -> float:
        if t["value_s"] is not None:
            return t["value_s"] / t["max_s"] - 1
        return -1.0 if t["met"] else math.inf

    return max(((metric, miss(t)) for metric, t in point["slo"].items()), key=lambda item: item[1])


def _miss(point: dict) -> float:
    return _worst(point)[1]


def _infeasible(result: dict, curve: list[dict]) -> dict:
    closest = min(curve, key=_miss)
    return result | {"feasible": False, "miss": _miss(closest), "closest": closest}


def shortfall(r: dict) -> str:
    """What keeps an infeasible configuration off the SLO, in words: its worst metric where it came
    closest (the light probe, or the most replicas tried), so a miss of thousands of percent reads
    as, say, a static batcher waiting for a full batch at 5% of its saturation."""
    from sim.results import counted, fmt_seconds

    p = r["closest"]
    if math.isinf(r["miss"]) and p["rejected"]:  # the percentile falls among the requests it turns away
        reasons = ", ".join(f"{k} {v:,}" for k, v in p["rejected"].items())
        return f"rejects {sum(p['rejected'].values()):,} of {p['requests']:,} requests ({reasons})"
    metric, _ = _worst(p)
    t = p["slo"][metric]
    return (f"misses the SLO by {r['miss']:.0%} ({metric} p{t['percentile']:g} {fmt_seconds(t['value_s'])} "
            f"against {fmt_seconds(t['max_s'])}, at {p['offered_rps']:.2f} req/s on "
            f"{counted(p['replicas'], 'replica')})")


def find_max_rate(config: Config) -> dict:
    """The highest offered rate meeting the SLO, by bisection below the saturation throughput.

    Why not above it: a padded batcher (static, dynamic) with long-tailed lengths runs every row
    until its longest member is done, so while its batches stay small it can hold a rate above
    its flood throughput. But a burst that fills its batches drops it to that throughput, below
    the offered rate, and its queue does not drain: the state is metastable. Dynamic batching on
    8 replicas of the shipped profile (saturation 7.81 req/s) held Poisson 10 req/s for 20,000
    requests at 61% busy; with bursts at a mean of 8.4 req/s it fell to 7.7 req/s served, 96%
    busy, with a median TTFT of 175 s.
    """
    from sim.simulator import saturation_rps
    from sim.workload import offered_rate

    trace = _base_trace(config)
    base = offered_rate(trace)
    saturation = saturation_rps(config.scenario, config.profile, trace)
    replicas, curve = config.scenario.deployment.replicas, []
    result = {"config": config.name, "saturation_rps": saturation, "curve": curve,
              "usd_per_gpu_hour": config.usd_per_gpu_hour, "replicas": replicas}
    if not saturation:  # it rejects every request (e.g. prompts over max_batched_tokens): say why
        curve.append(_measure(config, 1.0))
        return _infeasible(result | {"max_rps": 0.0}, curve)
    probe = _measure(config, 0.05 * saturation / base)  # a light load
    curve.append(probe)
    if not probe["slo_met"]:
        return _infeasible(result | {"max_rps": 0.0}, curve)
    lo, hi, best = 0.05 * saturation, saturation, probe
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        point = _measure(config, mid / base)
        curve.append(point)
        if point["slo_met"]:
            lo, best = mid, point
        else:
            hi = mid
    curve.sort(key=lambda p: p["offered_rps"])
    dollars_per_hour = replicas * config.usd_per_gpu_hour
    return result | {"feasible": True, "max_rps": best["offered_rps"], "at_max": best,
                     "requests_per_dollar": best["offered_rps"] * 3600 / dollars_per_hour
                     if dollars_per_hour else math.inf}


def min_replicas(config: Config, target_rps: float, max_replicas: int) -> dict:
    """The fewest replicas that meet the SLO at the target rate (binary search)."""
    from sim.workload import generate, offered_rate, scale_rate

    scenario = config.scenario
    factor = target_rps / offered_rate(_base_trace(config))
    requests = len(generate(scale_rate(scenario.workload, factor), scenario.seed))
    # With a replica for every request, round-robin gives each its own in turn and least-outstanding
    # the first idle one, which is among the first that many: more replicas leave every latency as it
    # was. Searched up to 100,000 replicas, 2,000 requests that missed the SLO took 6 minutes.
    if scenario.deployment.router != "random":
        max_replicas = min(max_replicas, requests)
    curve, lo, hi, best = [], 1, max_replicas, None
    while lo <= hi:
        mid = (lo + hi) // 2
        point = _measure(config, factor, mid)
        curve.append(point)
        if point["slo_met"]:
            best, hi = point, mid - 1
        else:
            lo = mid + 1
    curve.sort(key=lambda p: p["replicas"])
    result = {"config": config.name, "curve": curve, "usd_per_gpu_hour": config.usd_per_gpu_hour,
              "target_rps": target_rps}
    if best is None:
        return _infeasible(result, curve)
    return result | {"feasible": True, "replicas": best["replicas"], "at_target": best,
                     "usd_per_hour": best["replicas"] * config.usd_per_gpu_hour}


def evaluate(config: Config, target_rps: float | None, max_replicas: int) -> dict:
    return find_max_rate(config) if target_rps is None else min_replicas(config, target_rps, max_replicas)


# --- decisions ----------------------------------------------------------------------------------


def operating_point(r: dict) -> dict | None:
    return r.get("at_max") or r.get("at_target")


def pareto(results: list[dict]) -> list[str]:
    """Configurations no other beats on both cost per 1M output tokens and p95 E2E latency."""
    points = [(r["config"], p["usd_per_million_output_tokens"] or 0.0, p["e2e_p95_s"])
              for r in results if (p := operating_point(r)) is not None]
    return [name for name, c, l in points
            if not any((c2 <= c and l2 <= l) and (c2 < c or l2 < l) for _, c2, l2 in points)]


def recommend(results: list[dict], target_rps: float | None) -> dict | None:
    from sim.results import counted

    feasible = [r for r in results if r["feasible"]]
    if not feasible:
        return None
    if target_rps is None:  # most requests per dollar at the highest load that meets the SLO
        best = max(feasible, key=lambda r: (r["requests_per_dollar"], r["max_rps"]))
        why = (f"serves up to {best['max_rps']:.2f} req/s within the SLO, "
               f"{best['requests_per_dollar']:,.0f} requests per dollar")
    else:  # the cheapest deployment that meets the target
        best = min(feasible, key=lambda r: (r["usd_per_hour"], -(r["at_target"]["throughput_rps"])))
        why = (f"meets {target_rps:g} req/s on {counted(best['replicas'], 'replica')} "
               f"at ${best['usd_per_hour']:.2f}/hour")
    slack = -_miss(operating_point(best))
    return {"config": best["config"], "why": why, "slo_margin": slack}


def _stop_with(parent: int) -> None:
    """A pool worker's initializer: the worker stops when the plan's process dies. Killed by a
    timeout or a job scheduler, a plan left its workers bisecting on for minutes, orphaned."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the kernel signals it
    if os.getppid() != parent:  # the plan died before the signal was asked for
        os._exit(1)


def run_plan(plan: Plan, executor: Executor, done: Callable[[], None] = lambda: None) -> list[dict]:
    """Every configuration evaluated on `executor`, in the plan's order; `done()` as each finishes."""
    futures = [executor.submit(evaluate, c, plan.target_rps, plan.max_replicas) for c in plan.configs]
    for _ in as_completed(futures):
        done()
    return [f.result() for f in futures]


def table(plan: Plan, results: list[dict], rec: dict | None, front: list[str]) -> str:
    width = max(len("configuration"), *(len(r["config"]) for r in results)) + 2
    lines = [f"plan: {plan.name} ({len(plan.configs)} configurations, "
             + ("finding each one's maximum rate)" if plan.target_rps is None else f"target {plan.target_rps:g} req/s)"),
             ""]
    if plan.target_rps is None:
        lines.append(f"{'configuration':<{width}}{'saturation':>11}{'max req/s':>10}{'$/1M tok':>10}{'req/$':>10}"
                     f"{'p95 E2E s':>12}")
    else:
        lines.append(f"{'configuration':<{width}}{'replicas':>10}{'$/hour':>10}{'$/1M tok':>10}{'p95 E2E s':>12}")
    for r in results:
        p = operating_point(r)
        name = ("* " if r["config"] in front else "  ") + r["config"]
        saturation = f"{r['saturation_rps']:>11.2f}" if plan.target_rps is None else ""
        if p is None:
            lines.append(f"{name:<{width}}{saturation}{'none':>10}   {shortfall(r)}")
        elif plan.target_rps is None:
            per_dollar = f"{r['requests_per_dollar']:,.0f}" if r["requests_per_dollar"] != math.inf else "-"
            lines.append(f"{name:<{width}}{saturation}{r['max_rps']:>10.2f}"
                         f"{p['usd_per_million_output_tokens'] or 0:>10.3f}{per_dollar:>10}{p['e2e_p95_s']:>12.2f}")
        else:
            lines.append(f"{name:<{width}}{r['replicas']:>10}{r['usd_per_hour']:>10.2f}"
                         f"{p['usd_per_million_output_tokens'] or 0:>10.3f}{p['e2e_p95_s']:>12.2f}")
    lines.append("\n* on the Pareto front of cost per 1M output tokens vs p95 E2E latency"
                 + ("; saturation: served req/s when every request queues at once" if plan.target_rps is None else ""))
    if rec:
        lines.append(f"recommended: {rec['config']} — {rec['why']}; worst SLO metric {rec['slo_margin']:.0%} under its bound")
    return "\n".join(lines)


def parse_args(argv):
    p = parser("plan", __doc__, EPILOG)
    p.add_argument("plan", type=Path, help="plan YAML file")
    p.add_argument("--workers", type=count, default=os.cpu_count() or 1, help="local processes (default: all cores)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="a Dask scheduler address: run the configurations there")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a plan value, e.g. --set target_rps=11, --set 'search.deployment.replicas=[1, 2]', "
                        "--set hardware.0.usd_per_gpu_hour=2.5")
    p.add_argument("--out", type=Path, help="results folder (default: results/plan-<name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def run() -> int:
        from tqdm import tqdm

        from reports.capacity_report import write_capacity_report
        from sim.files import atomic_folder, check_replaceable

        plan = load_plan(args.plan, args.set)
        out = args.out or Path("results") / f"plan-{plan.name}"
        check_replaceable(out)
        with tqdm(total=len(plan.configs), unit="config", disable=args.quiet or not sys.stderr.isatty(),
                  leave=False) as bar:
            if args.scheduler:
                from distributed import Client

                try:
                    client = Client(args.scheduler, timeout=10)
                except (OSError, ValueError) as e:  # ValueError: an address distributed cannot parse
                    raise InputError(f"--scheduler {args.scheduler}: cannot reach the Dask scheduler ({e})") from None
                with client:
                    results = run_plan(plan, client.get_executor(), bar.update)
            else:
                with ProcessPoolExecutor(max_workers=max(1, min(args.workers, len(plan.configs))),
                                         initializer=_stop_with, initargs=(os.getpid(),)) as pool:
                    results = run_plan(plan, pool, bar.update)
        front, rec = pareto(results), recommend(results, plan.target_rps)
        summary = {"plan": plan.name, "target_rps": plan.target_rps, "results": results,
                   "pareto": front, "recommendation": rec}
        with atomic_folder(out) as tmp:
            (tmp / "plan.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
            write_capacity_report(summary, tmp / "report.html")
        print(table(plan, results, rec, front))
        print(f"\nresults in {out}/ (plan.json, report.html)")
        if rec is None:
            closest = min(results, key=lambda r: r["miss"])
            print(f"error: no configuration meets the SLO; the closest, {closest['config']}, {shortfall(closest)}",
                  file=sys.stderr)
            return 1
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
