"""`report <results folder>`: rebuild the interactive HTML report of a folder that `simulate`,
`plan` or `validate` wrote, from the results saved there."""

from __future__ import annotations

import sys
from pathlib import Path

from sim.cli_util import parser, run_command
from sim.errors import InputError, first_words

EPILOG = """examples:
  report results/bursty                 a simulation's report, from requests.csv, timeseries.csv, ...
  report results/plan-capacity          a plan's, from plan.json
  report results/validate-steady        a validation's, from validation.json, requests.csv and steps.csv

The report is drawn from the saved results alone: after an upgrade of servesim, or when
report.html was lost, nothing needs to run again."""


def rebuild(folder: Path) -> Path:
    """Write folder/report.html from the folder's saved results, as the command that made them did."""
    from reports.capacity_report import write_capacity_report
    from reports.run_report import read_csv, read_json, write_run_report
    from reports.validation_report import write_validation_report

    out = folder / "report.html"
    try:
        if (folder / "plan.json").exists():
            write_capacity_report(read_json(folder, "plan.json"), out)
        elif (folder / "validation.json").exists():
            write_validation_report(read_json(folder, "validation.json"), read_csv(folder, "requests.csv"),
                                    read_csv(folder, "steps.csv"), out)
        else:
            write_run_report(folder)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        # The files parse but do not hold what this version's report draws: edited, or older.
        raise InputError(f"{folder}: results lack what the report needs ({type(e).__name__}: {first_words(e)}); "
                         "were they written by another servesim version? Run the command again") from None
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser("report", __doc__, EPILOG)
    p.add_argument("folder", type=Path, help="a folder written by `simulate`, `plan` or `validate` (e.g. results/bursty)")
    args = p.parse_args(argv)

    def run() -> int:
        print(f"wrote {rebuild(args.folder)}")
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
