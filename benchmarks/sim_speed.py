"""Simulator speed: simulated requests per second of wall time, and peak memory.

The issue's target: 1,000,000 requests with Azure-conversation lengths, continuous batching,
8 replicas, in under 60 s and 2 GB on one core. The arrival rate is a fixed fraction of what
the 8 replicas can serve (found by flooding them with 20,000 requests of the same mix), so the
benchmark keeps the same load whichever profile prices it. Usage:

    taskset -c 0 python benchmarks/sim_speed.py [--requests 1000000] [--load 0.7]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCENARIO = """
name: speed
seed: 1
workload:
  num_requests: {n}
  arrivals: {{kind: poisson, rate: {rate}}}
  prompt_tokens: {{kind: empirical, trace: {trace}}}
  output_tokens: {{kind: empirical, trace: {trace}}}
deployment:
  profile: {profile}
  mode: fp32
  replicas: 8
  batching: {{policy: continuous, max_num_seqs: 64, max_batched_tokens: 16384, chunked_prefill: true}}
"""


def main() -> None:
    from sim.cli_util import count

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=count, default=1_000_000)
    p.add_argument("--load", type=float, default=0.7, help="arrival rate as a fraction of saturation (default 0.7)")
    p.add_argument("--profile", default="cpu-gpt2-tiny")
    args = p.parse_args()
    from calibration.profile import load as load_profile
    from sim import results, scenario as scenario_mod, workload
    from sim.errors import InputError
    from sim.simulator import saturation_rps, simulate

    if args.load <= 0:
        raise InputError("--load: must be above 0")

    def scenario_at(tmp: str, requests: int, rate: float):
        path = Path(tmp) / "speed.yaml"
        path.write_text(SCENARIO.format(n=requests, rate=rate, profile=args.profile,
                                        trace=ROOT / "scenarios/traces/azure-conv-2023.csv"))
        return scenario_mod.load(path)

    with tempfile.TemporaryDirectory() as tmp:
        sample = scenario_at(tmp, 20_000, 1.0)
        profile = load_profile(sample.deployment.profile)
        rate = args.load * saturation_rps(sample, profile, workload.generate(sample.workload, sample.seed))
        print(f"{args.load:.0%} of saturation: {rate:.2f} requests/s")
        t0 = time.perf_counter()
        scenario = scenario_at(tmp, args.requests, rate)
        trace = workload.generate(scenario.workload, scenario.seed)
        t1 = time.perf_counter()
        run = simulate(scenario, profile, trace)  # timed
        t2 = time.perf_counter()
        frame = results.requests_frame(trace, run.outcome)
        summary = results.summarise(run, scenario, frame)
        t3 = time.perf_counter()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = len(trace)
    print(f"{n:,} requests: workload {t1 - t0:.1f} s, simulation {t2 - t1:.1f} s, summary {t3 - t2:.1f} s")
    print(f"total {t3 - t0:.1f} s wall = {n / (t3 - t0):,.0f} simulated requests/s; peak memory {peak_mb:,.0f} MB")
    print(f"(simulated {summary['simulated_s'] / 3600:.1f} h of traffic, mean batch {summary['mean_batch_size']:.1f}, "
          f"GPU utilisation {summary['gpu_utilization']:.0%}, p95 TTFT {summary['ttft_s']['p95']:.3f} s)")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from sim.cli_util import run_command

    sys.exit(run_command(main))
