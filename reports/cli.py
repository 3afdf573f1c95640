"""`report <results folder>`: rebuild a simulation's interactive HTML report from saved results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sim.cli_util import run_command


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="report", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("folder", type=Path, help="a folder written by `simulate` (e.g. results/bursty)")
    args = p.parse_args(argv)

    def run() -> int:
        from reports.run_report import write_run_report

        print(f"wrote {write_run_report(args.folder)}")
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
