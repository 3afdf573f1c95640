"""`report <results folder | profile.json>`: rebuild the interactive HTML report of a folder
that `simulate`, `plan` or `validate` wrote, from the results saved there, or of a profile."""

from __future__ import annotations

import sys
from pathlib import Path

from sim.cli_util import parser, run_command
from sim.errors import InputError, first_words

EPILOG = """examples:
  report results/bursty                 a simulation's report, from requests.csv, timeseries.csv, ...
  report results/plan-capacity          a plan's, from plan.json
  report results/validate-steady        a validation's, from validation.json, requests.csv and steps.csv
  report calibration/profiles/cpu-gpt2-tiny.json    a profile's, written beside it (cpu-gpt2-tiny.html)

The report is drawn from the saved results alone: after an upgrade of servesim, or when
report.html was lost, nothing needs to run again."""


def rebuild(path: Path) -> Path:
    """Write a results folder's report.html from its saved results, as the command that made them
    did; for a profile, its report beside it, as `profile` did (a shipped profile's is not in git)."""
    from calibration.profile import load
    from reports.capacity_report import write_capacity_report
    from reports.profile_report import write_report
    from reports.run_report import read_csv, read_json, write_run_report
    from reports.validation_report import write_validation_report

    profile = path.is_file() and path.suffix == ".json"
    if not profile and not path.is_dir():
        raise InputError(f"{path}: not a results folder nor a profile (.json)" if path.exists()
                         else f"{path}: no such folder or profile")
    out = path.with_suffix(".html") if profile else path / "report.html"
    try:
        if profile:
            write_report(load(path), out)
        elif (path / "plan.json").exists():
            write_capacity_report(read_json(path, "plan.json"), out)
        elif (path / "validation.json").exists():
            write_validation_report(read_json(path, "validation.json"), read_csv(path, "requests.csv"),
                                    read_csv(path, "steps.csv"), out)
        else:
            write_run_report(path)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        # The files parse but do not hold what this version's report draws: edited, or older.
        raise InputError(f"{path}: {'the profile lacks' if profile else 'results lack'} what the report needs "
                         f"({type(e).__name__}: {first_words(e)}); written by another servesim version, or edited? "
                         "Run the command again") from None
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser("report", __doc__, EPILOG)
    p.add_argument("path", type=Path, help="a folder written by `simulate`, `plan` or `validate` (e.g. "
                                           "results/bursty), or a profile's .json")
    args = p.parse_args(argv)

    def run() -> int:
        print(f"wrote {rebuild(args.path)}")
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
