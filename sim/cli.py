"""`simulate scenario.yaml`: replay a scenario's traffic through a simulated deployment."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sim.cli_util import parser, run_command

EPILOG = """
examples:
  simulate scenarios/bursty.yaml                   run, print the summary, write results/bursty/
  simulate scenarios/steady.yaml --seed 3 --json   another random draw, summary as JSON
  simulate scenarios/azure-conv.yaml --out /tmp/az

The results folder holds report.html (interactive, offline), requests.csv (one row per
request), timeseries.csv (queue, batch, replicas, KV use over time), autoscaler.csv,
batch_sizes.csv, summary.json and a copy of the scenario. `report <folder>` rebuilds the HTML.
The same scenario and seed always give byte-identical files.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("simulate", __doc__, EPILOG)
    p.add_argument("scenario", help="scenario YAML file (see scenarios/)")
    p.add_argument("--out", type=Path, help="results folder (default: results/<scenario name>)")
    p.add_argument("--seed", type=int, help="override the scenario's seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario value, e.g. --set deployment.replicas=4 "
                        "--set 'deployment.batching={policy: dynamic, max_batch_size: 16}'")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.add_argument("--no-report", action="store_true", help="skip the interactive HTML report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        from tqdm import tqdm

        from calibration.profile import load as load_profile
        from sim import results, scenario as scenario_mod, workload
        from sim.files import check_replaceable
        from sim.simulator import simulate

        started = time.perf_counter()
        # --seed is `--set seed=N`, so the scenario's own checks judge it
        scenario = scenario_mod.load(args.scenario, args.set + ([] if args.seed is None else [f"seed={args.seed}"]))
        profile = load_profile(scenario.deployment.profile)
        out = args.out or Path("results") / scenario.name
        check_replaceable(out)
        trace = workload.generate(scenario.workload, scenario.seed)
        bar = tqdm(total=len(trace), unit="req", disable=args.quiet or not sys.stderr.isatty(), leave=False)
        run_ = simulate(scenario, profile, trace, progress=lambda done: bar.update(done - bar.n))
        bar.close()
        frame = results.requests_frame(run_.trace, run_.outcome)
        summary = results.summarise(run_, scenario, frame)
        results.write(out, run_, scenario, frame, summary, report=not args.no_report)
        wall = time.perf_counter() - started
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(results.table(summary))
            print(f"\n{results.counted(len(trace), 'request')} simulated in {wall:.2f} s wall "
                  f"({len(trace) / wall:,.0f} req/s); results in {out}/")
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
