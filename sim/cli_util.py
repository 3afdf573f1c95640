"""What every servesim command shares: one clear line on bad input, no traceback."""

from __future__ import annotations

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
        print(f"error: out of memory ({e}); ask for fewer requests or a shorter duration", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
