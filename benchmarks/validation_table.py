"""Print the validation matrix (results/validation/*/validation.json) as a Markdown table.

    python benchmarks/validation_table.py [results/validation]

Each error cell is `prediction · at run speed`: the simulation priced by the profile swept around
the live runs, then the same with its prefill and decode times each scaled by how fast the device
ran that kind of pass in the live runs.
A load is the fraction of saturation asked for, its rate, and the load the runs met: that rate
over the saturation priced by the sweeps around them. Sweeps / profile: how fast the device ran
each sweep the profile pools (before, between and after the live runs), over the pool. The last
line: how far the live runs' speed strayed from their price, run by run, over the whole matrix.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from calibration.compare import LABELS, summary
from sim.cli_util import run_command
from sim.errors import InputError

KEYS = list(LABELS.items())


def table_rows(path: Path) -> tuple[list[dict], list[str]]:
    """One validate output's cases and its table rows; a file that is not one: one clear line."""
    try:
        result = json.loads(path.read_text())
        rows = []
        for case in result["cases"]:
            cmp, fixed = case["comparison"], case["comparison_at_run_speed"]
            noise = max(cmp[k]["noise"] for k, _ in KEYS if cmp[k]["noise"] is not None)
            cells = [f"{cmp[k]['error']:+.0%} · {fixed[k]['error']:+.0%}" for k, _ in KEYS]
            name = f"{result['scenario'].removeprefix('validate-')} · {result['policy']}"
            overhead = case["engine_overhead_s"]
            live = " / ".join(f"{v * 1000:.2f}" for v in overhead["live"])
            runs = " / ".join(f"{v:.2f}" for v in case["device_speed_per_run"])
            sweeps = " / ".join(f"{v:.2f}" for v in case["sweep_levels"])
            load = f"{case['load']} ({case['offered_rps']:.1f} req/s; met {case['realized_load']:.0%})"
            rows.append(f"| {name} | {load} | " + " | ".join(cells)
                        + f" | {noise:.0%} | {case['device_speed']:.2f} ({runs}) | {sweeps}"
                        + f" | {overhead['profile'] * 1000:.2f} · {live} |")
        summary(result["cases"])  # the fields only the summary reads, checked where the file can be named
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read it as validate's output: {e}") from None
    except (KeyError, TypeError) as e:
        raise InputError(f"{path}: not validate's output of this version (missing or bad field {e})") from None
    return result["cases"], rows


def runs_line(cases: list[dict]) -> str:
    """The live runs' time inside the model over the price of their steps, run by run: the spread
    that decides how close any prediction can come (the README's ledger of CPU matrices)."""
    speeds = [speed for case in cases for speed in case["device_speed_per_run"]]
    return (f"live runs over their price: {min(speeds):.2f}–{max(speeds):.2f}, mean {statistics.mean(speeds):.3f}, "
            f"SD {statistics.pstdev(speeds):.3f} ({len(speeds)} runs)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, nargs="?", default=Path("results/validation"),
                   help="a folder of validate outputs, one per case (default: results/validation)")
    folder = p.parse_args().folder
    paths = sorted(folder.glob("*/validation.json"))
    if not paths:
        raise InputError(f"{folder}: no */validation.json in it")
    read = [table_rows(path) for path in paths]  # every file read before anything is printed
    print("| arrivals · batching | load | " + " | ".join(label for _, label in KEYS)
          + " | live run-to-run (max) | device speed, live / profile (each run) | sweeps / profile"
          + " | engine overhead, ms/step: priced · live |")
    print("|---|---|" + "---|" * len(KEYS) + "---|---|---|---|")
    for _, rows in read:
        print("\n".join(rows))
    print()
    cases = [case for cases, _ in read for case in cases]
    print("\n".join(summary(cases)))
    print(runs_line(cases))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
