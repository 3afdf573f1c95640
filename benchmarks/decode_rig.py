"""What the device-timing benchmarks (idle_slowdown.py, after_prefill.py) share: their arguments,
and a model on one CPU thread in the profiler's serving regime with a decode cache of one shape."""

from __future__ import annotations

import argparse

import torch

from profiler.measure import GRIDS, Bench, ModeSpec
from profiler.regime import serving_regime
from profiler.models import build, lookup
from sim.errors import InputError


def decode_rig(description: str, batch: int, context: int, rounds: int):
    """Parse --model/--batch/--context/--rounds (defaults given); returns the arguments, the model,
    its Bench, a synthetic cache of batch x context tokens and one token's ids per row."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="gpt2-tiny")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--context", type=int, default=context)
    p.add_argument("--rounds", type=int, default=rounds)
    args = p.parse_args()
    for name in ("batch", "context", "rounds"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name}: must be at least 1")
    device = torch.device("cpu")
    serving_regime(device, threads=1)
    model = build(lookup(args.model), torch.float32, device)
    bench = Bench(model, device, ModeSpec.parse("fp32"), GRIDS["cpu"])
    return args, model, bench, bench.synthetic_cache(args.batch, args.context), bench._ids(args.batch, 1)
