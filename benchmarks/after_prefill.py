"""How decode passes run just after a prefill, against the same passes with no prefill before them:
the profile's after-prefill excess (Bench.after_prefill), for any decode shape.

Each round, for each prefill size and none (the control) in shuffled order: one prefill of that
many tokens (one row, on its own cache), or for the control untimed decodes that let the previous
prefill's excess pass, then ten timed decodes of one shape. Printed per prefill size: each decode's median over
the control's, as `profile` stores it (never rising from one decode to the next).

    python benchmarks/after_prefill.py [--batch 1] [--context 256] [--rounds 20]

Why: on the host of the sixteenth gpt2-tiny matrix (calibration/validation/NOTES.md) the live
runs' first decodes after a prefill of 513-2,048 tokens ran 1.60x the grid's price, recovering
within about eight decodes, and the calibration floods (one prefill of about 1,000 tokens, then
their decodes) priced every decode 12% high. The profile times it at a few row counts (1, 4, 16,
32 on the CPU grid); this times any one decode shape.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from decode_rig import decode_rig
from sim.cli_util import run_command

PREFILL_TOKENS = (128, 512, 1024, 2048)  # one row of this many tokens (to AFTER_PREFILL_MAX_TOKENS)


def main() -> None:
    args, _, bench, _, _ = decode_rig(__doc__.split("\n\n")[0], 1, 256, 20)
    bench.spec = replace(bench.spec, prefill_length=PREFILL_TOKENS, decode_context=(args.context,),
                         after_prefill_rounds=args.rounds)
    after = bench.after_prefill(rows=(args.batch,))
    excess = after["excess"][0]
    print(f"{args.model}, decode {args.batch} x {args.context}, {args.rounds} rounds: "
          "each decode after a prefill over the same decode with none before it")
    print(f"{'prefill':>9}" + "".join(f"{f'#{k + 1}':>7}" for k in range(len(excess[0]))))
    for tokens, row in zip(after["tokens"], excess):
        print(f"{tokens:>9}" + "".join(f"{1 + e:>7.2f}" for e in row))


if __name__ == "__main__":
    sys.exit(run_command(main))
