"""How the device runs after it sat idle, beyond the first pass (the profile's wake penalty).

Each round, for each idle gap in shuffled order: keep the device busy for a second (so every gap
starts from the same warm state), sit idle for the gap, then run back-to-back decode passes of
one shape for a second, timing each. A gap of 0 is the control: the same passes with no idle
before them. Printed per gap: the first pass's time, and the median of the later passes in
windows of time since the idle ended, each over the control's same window.

    python benchmarks/idle_slowdown.py [--rounds 8]

On this project's 2-vCPU VM, after 100-300 ms of idle the passes of the next 0.1 s ran about 20%
slower and those of the next 0.1-0.3 s 3-13% slower, recovering by 0.6 s: not only the first pass,
which is all the profile's wake penalty prices (see README, Validation).
"""

from __future__ import annotations

import random
import statistics
import sys
import time

import torch

from decode_rig import decode_rig
from sim.cli_util import run_command

GAPS_S = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3)
WINDOWS_S = ((0.0, 0.1), (0.1, 0.3), (0.3, 0.6), (0.6, 1.0))


def main() -> None:
    args, model, _, cache, ids = decode_rig(__doc__.split("\n\n")[0], 2, 128, 8)

    def passes(seconds: float) -> list[tuple[float, float]]:
        """(seconds since the first pass began, pass seconds) of back-to-back passes."""
        out, begin = [], time.perf_counter()
        while (start := time.perf_counter()) - begin < seconds:
            model(input_ids=ids, cache=cache, use_cache=True)
            out.append((start - begin, time.perf_counter() - start))
            cache.crop(-1)  # keep the context constant
        return out

    first: dict[float, list[float]] = {g: [] for g in GAPS_S}
    windows: dict[float, list[list[float]]] = {g: [[] for _ in WINDOWS_S] for g in GAPS_S}
    order, rng = list(GAPS_S), random.Random(0)
    with torch.inference_mode():
        for r in range(args.rounds):
            rng.shuffle(order)
            for gap in order:
                passes(1.0)
                time.sleep(gap)
                timed = passes(1.0)
                first[gap].append(timed[0][1])
                for i, (lo, hi) in enumerate(WINDOWS_S):
                    windows[gap][i] += [t for at, t in timed[1:] if lo <= at < hi]
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    control = [statistics.median(w) for w in windows[0.0]]
    print(f"{args.model}, decode {args.batch} x {args.context}, {args.rounds} rounds; "
          f"control (no idle): first pass {statistics.median(first[0.0]) * 1e3:.2f} ms, "
          f"later passes {control[0] * 1e3:.2f} ms")
    print(f"{'idle gap':>9}{'first pass':>12}" + "".join(f"{f'{lo:g}-{hi:g} s':>11}" for lo, hi in WINDOWS_S))
    for gap in GAPS_S[1:]:
        ratios = [statistics.median(w) / c for w, c in zip(windows[gap], control)]
        print(f"{gap * 1e3:>6g} ms{statistics.median(first[gap]) * 1e3:>9.2f} ms"
              + "".join(f"{r - 1:>+11.1%}" for r in ratios))


if __name__ == "__main__":
    sys.exit(run_command(main))
