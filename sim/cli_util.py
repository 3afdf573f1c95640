"""What every servesim command shares: its parser, and one clear line on bad input, no traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from sim.errors import InputError


def run_command(main: Callable[[], int | None]) -> int:
    try:
        return main() or 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:  # numpy's too: a workload (or grid) this machine cannot hold
        detail = f" ({e})" if str(e) else ""  # Python's own MemoryError says nothing
        print(f"error: out of memory{detail}; ask for fewer requests or a shorter duration", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def count(text: str) -> int:
    """An argparse type for a count of things: a whole number, at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number, at least 1, got {text!r}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line, as for every other bad input: the usage is a --help away.
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser(prog: str, doc: str, epilog: str) -> argparse.ArgumentParser:
    """A command's argument parser, described by its module's docstring (`prog ...: what it does`)."""
    return _Parser(prog=prog, description=doc.split(":", 1)[1].strip(), epilog=epilog,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
