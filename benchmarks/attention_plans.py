"""Whether attention costs more the first time it meets a shape (cuDNN's plan per shape).

Times torch's scaled_dot_product_attention as a serving loop calls it in half precision
through a padding mask: decode steps (one query a row over a key length that grows a token a
call) and prefills (a prompt length new each call). Each set runs twice over the same lengths,
first meeting them, then meeting them again, with torch's backends as they come and then with
cuDNN taken out, as `profile` and `validate` run (profiler.regime.keep_attention_steady).
Printed per setting: the backend torch picks for the decode shape, and the median time of a
call on a new shape and on a shape seen before. A backend that builds a plan per shape shows
a first meeting far slower than the second.

    python benchmarks/attention_plans.py [--dtype bf16] [--calls 32]    (on a CUDA machine)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from profiler.measure import DTYPES
from profiler.regime import keep_attention_steady
from sim.cli_util import count, run_command
from sim.errors import InputError

HEADS, HEAD_DIM = 12, 64  # gpt2's attention
DECODE_ROWS, DECODE_KEYS = 4, 256
PREFILL_ROWS, PREFILL_LENGTH = 2, 128


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="bf16")
    p.add_argument("--calls", type=count, default=32, help="lengths per set, each met twice (default 32)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise InputError("no CUDA device: cuDNN attention runs on NVIDIA GPUs only")
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]

    def tensors(rows: int, queries: int, keys: int):
        q = torch.randn(rows, HEADS, queries, HEAD_DIM, device=device, dtype=dtype)
        k, v = (torch.randn(rows, HEADS, keys, HEAD_DIM, device=device, dtype=dtype) for _ in range(2))
        mask = torch.ones(rows, 1, queries, keys, device=device, dtype=torch.bool).tril(keys - queries)
        mask[0, :, -1, 0] = False  # row 0 left-padded by a token, as the live engine's batches are
        return q, k, v, mask

    def timed(shapes: list[tuple[int, int, int]]) -> list[float]:
        out = []
        for shape in shapes:
            q, k, v, mask = tensors(*shape)
            torch.cuda.synchronize()
            start = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            torch.cuda.synchronize()
            out.append(time.perf_counter() - start)
        return out

    def backend() -> str:
        q, k, v, mask = tensors(DECODE_ROWS, 1, DECODE_KEYS)
        return torch.nn.attention.SDPBackend(torch._fused_sdp_choice(q, k, v, attn_mask=mask)).name

    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}, "
          f"{args.dtype}, {args.calls} lengths a set, each met twice")
    print(f"{'backends':<20}{'picks':<22}{'':<9}{'new shape':>11}{'seen before':>13}")
    offset = 0  # each setting meets lengths no earlier setting ran
    for setting in ("torch's default", "without cuDNN"):
        if setting == "without cuDNN":
            keep_attention_steady()
        picks = backend()
        for kind, rows, base in (("decode", DECODE_ROWS, DECODE_KEYS), ("prefill", PREFILL_ROWS, PREFILL_LENGTH)):
            lengths = range(base + offset, base + offset + args.calls)
            shapes = [(rows, 1, n) if kind == "decode" else (rows, n, n) for n in lengths]
            new, seen = timed(shapes), timed(shapes)
            print(f"{setting:<20}{picks:<22}{kind:<9}{statistics.median(new) * 1e3:>8.2f} ms"
                  f"{statistics.median(seen) * 1e3:>10.2f} ms")
        offset += args.calls


if __name__ == "__main__":
    sys.exit(run_command(main))
