"""What the device-timing benchmarks (idle_slowdown.py, after_prefill.py) share: their arguments,
and a model on one CPU thread in the profiler's serving regime with a decode cache of one shape."""

from __future__ import annotations

import argparse

import torch

from profiler.measure import GRIDS, Bench, ModeSpec
from profiler.regime import serving_regime
from profiler.models import build, lookup
from sim.cli_util import count


def decode_rig(description: str, batch: int, context: int, rounds: int):
    """Parse --model/--batch/--context/--rounds (defaults given); returns the arguments, the model,
    its Bench, a synthetic cache of batch x context tokens and one token's ids per row."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="gpt2-tiny")
    p.add_argument("--batch", type=count, default=batch)
    p.add_argument("--context", type=count, default=context)
    p.add_argument("--rounds", type=count, default=rounds)
    args = p.parse_args()
    device = torch.device("cpu")
    serving_regime(device, threads=1)
    model = build(lookup(args.model), torch.float32, device)
    bench = Bench(model, device, ModeSpec.parse("fp32"), GRIDS["cpu"])
    return args, model, bench, bench.synthetic_cache(args.batch, args.context), bench._ids(args.batch, 1)
