"""How decode passes run just after a prefill, against the same passes with no prefill before them.

Each round, for each prefill size in shuffled order: keep the device busy with decode passes for
0.3 s (so every prefill starts from the same warm state), run one prefill of that many tokens (on
its own cache), then time the next decode passes of one shape one by one. A prefill of 0 tokens
is the control. Printed per prefill size: each of the first decodes' median over the control's.

    python benchmarks/after_prefill.py [--rounds 20]

Why: on the host of the sixteenth gpt2-tiny matrix (calibration/validation/NOTES.md) the live
runs' first decodes after a prefill of 513-2,048 tokens ran 1.60x the grid's price, recovering
within about eight decodes, and the calibration floods (one prefill of about 1,000 tokens, then
their decodes) priced every decode 12% high. This times that effect outside the serving loop.
"""

from __future__ import annotations

import random
import statistics
import sys
import time

import torch

from decode_rig import decode_rig
from sim.cli_util import run_command

PREFILL_TOKENS = (0, 128, 512, 1024, 4096)  # one row of this many tokens; 0: the control
DECODES = 10


def main() -> None:
    args, model, bench, cache, ids = decode_rig(__doc__.split("\n\n")[0], 1, 256, 20)
    prompt = bench._ids(1, max(PREFILL_TOKENS))

    def decode() -> float:
        start = time.perf_counter()
        model(input_ids=ids, cache=cache, use_cache=True)
        cache.crop(-1)  # keep the context constant
        return time.perf_counter() - start

    after: dict[int, list[list[float]]] = {n: [[] for _ in range(DECODES)] for n in PREFILL_TOKENS}
    order, rng = list(PREFILL_TOKENS), random.Random(0)
    with torch.inference_mode():
        for r in range(args.rounds):
            rng.shuffle(order)
            for n in order:
                begin = time.perf_counter()
                while time.perf_counter() - begin < 0.3:
                    decode()
                if n:
                    model(input_ids=prompt[:, :n], use_cache=True, logits_to_keep=1)
                for k in range(DECODES):
                    after[n][k].append(decode())
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    control = [statistics.median(times) for times in after[0]]
    print(f"{args.model}, decode {args.batch} x {args.context}, {args.rounds} rounds; "
          f"control (no prefill): {statistics.median(control) * 1e3:.2f} ms a decode")
    print(f"{'prefill':>9}" + "".join(f"{f'#{k + 1}':>7}" for k in range(DECODES)))
    for n in PREFILL_TOKENS[1:]:
        print(f"{n:>9}" + "".join(f"{statistics.median(t) / c:>7.2f}" for t, c in zip(after[n], control)))


if __name__ == "__main__":
    sys.exit(run_command(main))
