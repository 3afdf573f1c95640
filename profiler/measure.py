"""Timing forward passes on a device: the measurements behind a profile.

Every figure here is measured: median and spread over repetitions after warm-ups, with the
device synchronised around each call (so the time includes Python and kernel-launch overhead,
as a serving engine pays it). Prefill computes logits for the last position only, as serving
engines do. Decode steps run against a KV cache of the stated context, filled with random
tensors of the model's own cache shape (the cost does not depend on their values). A pass of two
or more rows attends through a padding mask, as the live engine runs it (see `padding_mask`), and
a prefill point times the prompt lengths around its own, as live traffic has them (`Bench.prefill`).
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from calibration.profile import Flood
from profiler.regime import allocations_fail_past_memory, compile_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LENGTH_SPREAD = 16  # a prefill point of length L times L-8 .. L+7 in turn (Bench.prefill)
AFTER_PREFILL_DECODES = 10  # decodes timed after each prefill (Bench.after_prefill): within 5% by the 4th-6th here
# The longest prefill Bench.after_prefill times: past it the excess grew little (4,096 tokens' over
# 2,048's, summed over ten decodes: 0.85-1.26x, the 12 row counts of three CPU profiles), and on the CPU grid
# that one prefill was 63% of the prefills' time. The cost model holds the largest measured figure.
AFTER_PREFILL_MAX_TOKENS = 2048


@dataclass(frozen=True)
class GridSpec:
    prefill_batch: tuple[int, ...]
    prefill_length: tuple[int, ...]
    decode_batch: tuple[int, ...]
    decode_context: tuple[int, ...]
    warmup: int = 2
    repeats: int = 7  # timed passes of a point per sweep, one per visit of the grid (GridSamples.sweep)
    max_point_s: float = 1.5  # a point that took this long in a sweep is not revisited in it (timed once at least)
    passes: int = 3  # sweeps over the whole grid: a burst of device noise hits one pass, not every sample
    # The longest prefill pass timed (batch x length); longer points are left null, priced by the
    # cost model from the column's largest timed batch. Long prompts cost a CPU seconds a pass, and
    # a scheduler under a token budget never forms the batches past it anyway.
    max_prefill_tokens: int | None = None
    concurrency_workers: tuple[int, ...] = (1, 2, 4, 8)
    wake_gaps_s: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1)  # idle gaps before a pass (wake_penalty)
    wake_rounds: int = 20
    # Rounds of after_prefill: each prefills every grid prompt length to 2,048 tokens once (0.4 s on
    # the CPU grid) and times ten decodes after each, for each of its row counts (after_prefill_rows).
    after_prefill_rounds: int = 10


def decode_batches(limit: int) -> tuple[int, ...]:
    """Every batch size to 16, then the multiples of 8 (the sizes vLLM captures CUDA graphs for)
    up to `limit`, and `limit` itself.

    A decode step's matmuls have one row per sequence, and their kernels run some row counts
    (multiples of their register block) much faster than the neighbours: measured on this CPU,
    a decode of 5 rows takes 12% longer than the line through 4 and 8 rows says. A grid of powers
    of two measures only the fast sizes, so interpolating between them is optimistic. Prefill
    passes have b x length rows, enough that the steps vanish, so their batch axis stays sparse.
    """
    sizes = list(range(1, min(limit, 16) + 1)) + list(range(24, limit + 1, 8))
    return tuple(sizes) if sizes[-1] == limit else (*sizes, limit)


def after_prefill_rows(limit: int) -> tuple[int, ...]:
    """The decode row counts Bench.after_prefill times: the powers of 4 below `limit`, and `limit`.
    The excess moves with the rows far more than along a line (see CostModel.after_table), and
    each row count costs a round of prefills, so a few spread over the decode grid."""
    rows = [1]
    while rows[-1] * 4 < limit:
        rows.append(rows[-1] * 4)
    return tuple(rows) if rows[-1] == limit else (*rows, limit)


GRIDS = {
    # after_prefill_rounds=5: four row counts at 10 rounds, to 4,096 tokens, took 61 s of a 150 s profile
    "cpu": GridSpec((1, 2, 4, 8), (16, 64, 256, 1024, 2048, 4096), decode_batches(32), (64, 256, 1024, 4096),
                    repeats=3, max_point_s=0.5, max_prefill_tokens=8192, after_prefill_rounds=5),
    "cpu-quick": GridSpec((1, 4), (16, 128), (1, 4), (64, 256), warmup=1, repeats=3, max_point_s=0.3,
                          passes=1, concurrency_workers=(1, 2), wake_rounds=5, after_prefill_rounds=3),
    "cuda": GridSpec((1, 2, 4, 8, 16, 32), (128, 256, 512, 1024, 2048, 4096),
                     decode_batches(256), (128, 512, 1024, 2048, 4096, 8192), repeats=5, passes=2),
    "cuda-quick": GridSpec((1, 8), (128, 1024), (1, 16, 64), (128, 2048), warmup=2, repeats=5, passes=1,
                           concurrency_workers=(1, 2), wake_rounds=5, after_prefill_rounds=3),
}


@dataclass(frozen=True)
class ModeSpec:
    """An optimisation mode: `<dtype>[-nocache][-compiled]`, e.g. fp32-nocache, bf16-compiled."""

    name: str
    dtype: str
    kv_cache: bool
    compiled: bool

    @classmethod
    def parse(cls, name: str) -> ModeSpec:
        parts = name.split("-")
        flags = set(parts[1:])
        if parts[0] not in DTYPES or not flags <= {"nocache", "compiled"} or len(flags) != len(parts) - 1:
            raise ValueError(f"bad mode {name!r}: expected <fp32|fp16|bf16>[-nocache][-compiled]")
        return cls(name, parts[0], "nocache" not in flags, "compiled" in flags)


def is_oom(error: BaseException) -> bool:
    # A CPU allocation past the address space (regime.allocations_fail_past_memory) says "can't
    # allocate memory".
    message = str(error).lower()
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in message or "allocate memory" in message


class Bench:
    """Times passes of one model in one mode on one device."""

    def __init__(self, model, device: torch.device, mode: ModeSpec, spec: GridSpec):
        self.model, self.device, self.mode, self.spec = model, device, mode, spec
        self.dtype = DTYPES[mode.dtype]
        self.vocab = model.config.vocab_size
        self.forward = compile_model(model) if mode.compiled else model
        with torch.inference_mode():  # learn the cache layout from a one-token pass
            cache = model(input_ids=self._ids(1, 1), use_cache=True).cache
            warm = self._ids(1, min(128, max(spec.prefill_length)))  # within the grid, and so the window
            for _ in range(3):  # first passes pay one-time costs (allocator, kernel selection)
                self.forward(input_ids=warm, use_cache=mode.kv_cache, logits_to_keep=1)
        self.cache_shapes = [(layer.keys.shape[1], layer.keys.shape[3]) for layer in cache.layers]
        self.prefill_calls: dict[tuple[int, int], int] = {}  # per prefill point, across sweeps

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # Every input is made an inference tensor, as the passes' outputs and the live engine's
    # inputs are: dynamo guards on a tensor's dispatch keys, so a -compiled mode compiled a graph
    # for each kind (9 of the 21 a quick CPU grid compiled).
    @torch.inference_mode()
    def _ids(self, b: int, n: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (b, n), device=self.device)

    def kv_bytes_per_token(self) -> int:
        if not self.mode.kv_cache:
            return 0
        itemsize = torch.finfo(self.dtype).bits // 8
        return sum(2 * heads * dim * itemsize for heads, dim in self.cache_shapes)

    @torch.inference_mode()
    def synthetic_cache(self, b: int, context: int):
        """A KV cache of `context` random tokens per row. All layers start from one random tensor
        per head shape, shared: the values do not change a pass's cost, the first pass gives each
        layer its own (a decode step concatenates a new cache tensor), and drawing and copying
        fresh ones for every layer took more of a CPU profile's time than the passes."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        noise: dict[tuple[int, int], torch.Tensor] = {}
        for i, (heads, dim) in enumerate(self.cache_shapes):
            if (heads, dim) not in noise:
                noise[heads, dim] = torch.randn(b, heads, context, dim, device=self.device, dtype=self.dtype)
            empty = noise[heads, dim][:, :, :0]
            cache.update(empty, empty, i)  # sets the layer up for this dtype and device
            cache.layers[i].keys = cache.layers[i].values = noise[heads, dim]
        return cache

    def time(self, call: Callable[[], object], warmup: int) -> tuple[float, int | None]:
        """Seconds of one pass of `call` after `warmup` passes, and peak device memory on CUDA."""
        with torch.inference_mode():
            for _ in range(warmup):
                start = time.perf_counter()
                call()
                self.sync()
                if time.perf_counter() - start > self.spec.max_point_s:
                    break  # a pass this slow has paid its one-time costs in its first call
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            start = time.perf_counter()
            call()
            self.sync()
            seconds = time.perf_counter() - start
        return seconds, torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def prefill(self, b: int, length: int, warmup: int) -> tuple[float, int | None]:
        """A prefill pass of `b` prompts of about `length` tokens.

        Live prompts take every length, and matmul kernels run some lengths (multiples of their
        tile, powers of two above all) faster than their neighbours: measured here (1 thread, 12
        interleaved rounds), 1-row prefills of 64 and 256 tokens ran 8% under the line through
        the lengths 8 either side, and the live runs' 1-row prefills, priced by a grid of powers
        of two, ran 4-11% over their price relative to the rest of their run. So each call times
        the next of the LENGTH_SPREAD lengths around `length`, in a scattered order that goes on
        across sweeps; the point's median is then the cost of a prompt of about that length."""
        half = LENGTH_SPREAD // 2
        ids = self._ids(b, length + half)
        mask = padding_mask(b, length + half, self.device)
        use_cache = self.mode.kv_cache

        def step():
            k = self.prefill_calls.get((b, length), 0)
            self.prefill_calls[b, length] = k + 1
            n = max(length + (k * 7) % LENGTH_SPREAD - half, 1)  # 7 is prime to 16: every offset in 16 calls
            return self.forward(input_ids=ids[:, :n], attention_mask=None if mask is None else mask[:, :n],
                                use_cache=use_cache, logits_to_keep=1)

        return self.time(step, warmup)

    def decode(self, b: int, context: int, warmup: int) -> tuple[float, int | None]:
        """One decode step over `context` cached tokens (KV-cache modes only: without a cache a
        decode step is a prefill, see GridSamples)."""
        cache = self.synthetic_cache(b, context)
        ids = self._ids(b, 1)
        # Each pass appends one token to the cache: over the warm-up and the timed pass the
        # context drifts by a few tokens, which is what a real decode run does too. The mask
        # covers the cache and the new token, so it widens with every pass.
        mask = padding_mask(b, context + 2 + warmup, self.device)

        def step():
            width = cache.get_seq_length() + 1
            return self.forward(input_ids=ids, attention_mask=None if mask is None else mask[:, :width],
                                cache=cache, use_cache=True)

        return self.time(step, warmup)

    def wake_penalty(self) -> dict:
        """Extra seconds a pass takes when the device sat idle for a while before it.

        A server at low load idles between requests, and its first pass after a gap runs slower:
        on a CPU the model's weights have left the caches (a small model's weights are about
        the size of the last-level cache), on a GPU the clocks have dropped. Back-to-back grid
        sweeps never see this. Measured on a one-prompt prefill (what usually ends an idle gap)
        of the grid's middle length (the shorter of two middles), with the gaps shuffled within
        each round so drift cancels.
        """
        spec = self.spec
        ids = self._ids(1, spec.prefill_length[(len(spec.prefill_length) - 1) // 2])

        def one_pass() -> None:
            self.forward(input_ids=ids, use_cache=self.mode.kv_cache, logits_to_keep=1)
            self.sync()

        times: dict[float, list[float]] = {gap: [] for gap in (0.0, *spec.wake_gaps_s)}
        order = list(times)
        rng = random.Random(0)
        with torch.inference_mode():
            for _ in range(spec.warmup):
                one_pass()
            for _ in range(spec.wake_rounds):
                rng.shuffle(order)
                for gap in order:  # each timed pass follows the previous one, then the gap
                    time.sleep(gap)
                    start = time.perf_counter()
                    one_pass()
                    times[gap].append(time.perf_counter() - start)
        busy = statistics.median(times[0.0])
        extra = [max(statistics.median(times[gap]) - busy, 0.0) for gap in spec.wake_gaps_s]
        return {"gap_s": list(spec.wake_gaps_s), "extra_s": non_decreasing(extra)}

    def after_prefill(self, rows: tuple[int, ...] | None = None) -> dict:
        """How much slower the decodes just after a prefill run than the same decodes with none
        before them, by the decode's rows (default: after_prefill_rows over the decode grid), the
        prefill's tokens (the grid's prompt lengths to AFTER_PREFILL_MAX_TOKENS, one row each) and
        the decode's place after it (KV-cache modes only), as the profile's after_prefill section
        stores it.

        Back-to-back grid passes of one shape never see it, and a serving loop pays it after
        every prefill: on this project's CPU hosts the first decode after a 1,024-token prefill
        ran 1.4-2x, the fourth within 5% (benchmarks/after_prefill.py; the cause was not found).
        Timed over the grid's middle context, one row count after another (one cache at a time:
        a GPU's largest decode batch fills much of its memory). Each round takes the prefill sizes
        and the control (no prefill) in shuffled order; the control first lets the previous
        prefill's excess pass in untimed decodes (a prefill resets it). Row counts whose cache
        and prefill do not fit in device memory beside each other are left out (the cost model
        holds the largest measured one's figures beyond it)."""
        spec = self.spec
        context = spec.decode_context[(len(spec.decode_context) - 1) // 2]
        tokens = [n for n in spec.prefill_length if n <= AFTER_PREFILL_MAX_TOKENS] or [spec.prefill_length[0]]
        rows = rows or after_prefill_rows(max(spec.decode_batch))
        excess = []
        for r in rows:
            try:
                with allocations_fail_past_memory(self.device):
                    excess.append(self._after_prefill_excess(r, context, tokens))
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                if not is_oom(e) or not excess:  # not even one row fits: nothing to price with
                    raise
                if self.cuda:
                    torch.cuda.empty_cache()
                break  # more rows fit no better
        return {"rows": list(rows[:len(excess)]), "tokens": tokens, "excess": excess, "decode_context": context}

    def _after_prefill_excess(self, rows: int, context: int, tokens: list[int]) -> list[list[float]]:
        """Bench.after_prefill's table for decodes of `rows` rows: by prefill tokens, by decode."""
        spec = self.spec
        prompt = self._ids(1, tokens[-1])
        cache, ids = self.synthetic_cache(rows, context), self._ids(rows, 1)
        mask = padding_mask(rows, context + 1, self.device)  # as the grid's decodes attend

        def decode() -> float:
            start = time.perf_counter()
            self.forward(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
            self.sync()
            seconds = time.perf_counter() - start
            cache.crop(-1)  # the context stays the same
            return seconds

        times = {n: [[] for _ in range(AFTER_PREFILL_DECODES)] for n in (0, *tokens)}
        order = list(times)
        rng = random.Random(0)
        with torch.inference_mode():
            for _ in range(spec.after_prefill_rounds):
                rng.shuffle(order)
                for n in order:
                    if n:  # synchronised, or on a GPU its kernels would still run in the first decode's time
                        self.forward(input_ids=prompt[:, :n], use_cache=True, logits_to_keep=1)
                        self.sync()
                    else:  # the control waits out the excess of the prefill before it
                        for _ in range(AFTER_PREFILL_DECODES):
                            decode()
                    for k in range(AFTER_PREFILL_DECODES):
                        times[n][k].append(decode())
        control = statistics.median(t for decodes in times[0] for t in decodes)
        # The device recovers as the decodes go on, so a rise from one to the next is noise: pooled.
        return [non_decreasing([max(statistics.median(t) / control - 1.0, 0.0) for t in times[n]][::-1])[::-1]
                for n in tokens]

    def concurrency(self, workers: int, context: int = 256, steps: int = 20) -> float:
        """Mean decode-step seconds per worker when `workers` threads share the device, each
        decoding its own batch-1 request (seed 000's oversubscription experiment)."""
        from profiler.models import max_positions

        context = min(context, max_positions(self.model) - steps - 2)  # the warm-up and timed steps fit
        results: list[float] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(workers)

        def worker() -> None:
            try:
                stream = torch.cuda.Stream(self.device) if self.cuda else None
                with torch.inference_mode(), (torch.cuda.stream(stream) if stream else nullcontext()):
                    cache = self.synthetic_cache(1, context)
                    ids = self._ids(1, 1)
                    self.forward(input_ids=ids, cache=cache, use_cache=True)
                    if stream:  # the warm-up pass must not run on into the timed ones
                        stream.synchronize()
                    barrier.wait()
                    start = time.perf_counter()
                    for _ in range(steps):
                        self.forward(input_ids=ids, cache=cache, use_cache=True)
                    if stream:
                        stream.synchronize()
                    results.append((time.perf_counter() - start) / steps)
            except BaseException as e:  # a thread's error would otherwise be printed and lost
                errors.append(e)
                barrier.abort()  # the others must not wait for it

        threads = [threading.Thread(target=worker) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return statistics.mean(results)


@torch.inference_mode()  # an inference tensor, as Bench._ids says why
def padding_mask(b: int, length: int, device: torch.device) -> torch.Tensor | None:
    """The attention mask a padded batch of `b` rows passes, or None for one row (never padded).

    The live engine keeps a left-padded cache, so its passes of two or more rows (whose prompts
    differ in length) attend through a mask, and attention takes another path with one: on
    this project's CPU 2- to 4-row decode steps ran 4-20% slower with a mask, 8 and 16 rows
    -17% to +13% with no steady sign. Any padding takes that path and costs the same, so row 0
    has one padded column. Timing the grid unmasked had priced the live runs' 2-row steps 21%
    low."""
    if b < 2:
        return None
    mask = torch.ones(b, length, dtype=torch.long, device=device)
    mask[0, 0] = 0
    return mask


def non_decreasing(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators): a longer
    idle gap cannot leave the device warmer, so a dip between gaps is noise and is averaged out."""
    blocks: list[list[float]] = []  # [sum, count] of pooled neighbours
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


def device_peaks(device: torch.device, dtypes: list[str]) -> dict:
    """Measured ceilings: copy bandwidth (bytes read + written per second) and matmul FLOP/s."""
    cuda = device.type == "cuda"

    def timed(fn, reps: int) -> float:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        return best

    def copy_rate(n_bytes: int) -> float:  # its buffers are freed before the matmuls
        src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        return 2 * n_bytes / timed(lambda: dst.copy_(src), 5)

    bandwidth = copy_rate((1 << 30) if cuda else (1 << 28))
    flops = {}
    for name in dtypes:
        if not cuda and name != "fp32":
            continue  # CPUs run half precision far below their fp32 rate: no useful ceiling
        n = 8192 if cuda else 1024
        a = torch.randn(n, n, device=device, dtype=DTYPES[name])
        b = torch.randn(n, n, device=device, dtype=DTYPES[name])
        flops[name] = 2 * n**3 / timed(lambda: a @ b, 5)
    return {"copy_bytes_per_s": bandwidth, "matmul_flops": flops}


class GridSamples:
    """Timings of one mode's grid points, pooled over sweeps of the whole grid.

    A point's samples are spread over several sweeps of the grid and through each sweep (`sweep`),
    rather than taken back to back, so a burst of device noise hits one of them instead of all;
    and sweeps can be interleaved with other work (validate's live runs) to sample the device
    over that time.
    A point that runs out of memory is null, and so are larger batches at the same length; so are
    prefill points over the spec's token cap.
    Without a KV cache a decode step recomputes the whole sequence: a decode step over c tokens
    is the prefill pass of c + 1, so that mode's decode grid is its prefill grid, not measured twice.
    In a KV-cache mode each column of the grid is followed by a small calibration flood through
    the live engine, whose steps (shape, seconds inside the model and outside it) the profile
    keeps beside the grids: a serving loop runs the model slower than back-to-back grid passes,
    and spends time of its own around it, and the cost model prices both from them. Small floods
    spread through the sweeps, rather than one big flood at their end, sample the device's drift
    as the grid does: on this project's VM single floods of about a second ran 0.75-1.48x the
    grid's price, the 30 floods of one validation case together 1.00-1.12x.
    """

    def __init__(self, bench: Bench, spec: GridSpec):
        self.bench = bench
        self.grids = [("prefill", spec.prefill_batch, spec.prefill_length, bench.prefill)]
        if bench.mode.kv_cache:
            self.grids.append(("decode", spec.decode_batch, spec.decode_context, bench.decode))
        self.samples: dict[tuple, list[float]] = {}
        self.peaks: dict[tuple, int | None] = {}
        # (kind, column) -> the first batch index not timed: over the token cap, or out of memory
        self.limit: dict[tuple, int] = {}
        if spec.max_prefill_tokens is not None:
            for j, x in enumerate(spec.prefill_length):
                over = [i for i, b in enumerate(spec.prefill_batch) if b * x > spec.max_prefill_tokens]
                if over:
                    self.limit["prefill", j] = over[0]
        self.sweep_starts: list[dict[tuple, int]] = []  # each point's sample count as each sweep began
        # The calibration floods' steps, a list per column of the profile's `flood` section.
        self.flood: dict[str, list] = {key: [] for key in Flood.__dataclass_fields__} if bench.mode.kv_cache else {}

    def points(self) -> int:
        return sum(len(batches) * len(xs) for _, batches, xs, _ in self.grids)

    def counts(self) -> dict[tuple, int]:
        """Each point's number of samples so far."""
        return {key: len(times) for key, times in self.samples.items()}

    def sweep(self, bar=None) -> None:
        """One sweep: the grid visited `repeats` times, each point timed once a visit.

        A point's samples are spread through the sweep rather than taken back to back, so a
        slow moment of the device lands on one of them, not all. On this project's VM, six
        profiles of three sweeps each way, interleaved, of a validation grid: with each
        profile's own level taken out, a decode point's median varied by 4.9% (SD) from profile
        to profile spread against 7.3% back to back, and was over 10% off in 7% of the profiles
        against 20%, in the same time; prefill points 6.4% against 6.3%. Only a point's first
        visit ever warms it up: a pass straight after another point's ran as fast as
        back-to-back passes there (1.01x for prefill, 1.00x for decode, medians over 100 and
        320 pairs), so the warm-up pass a revisit used to pay bought nothing. (On a later VM a
        decode after passes of its own shape, as a serving loop runs its decodes, ran about 4%
        faster; the fresh pass stays, its price nearer the live runs' sums of decode time, which
        carry their stalls: calibration/validation/NOTES.md, the 1-row prefill lead.) A point
        whose passes took max_point_s in this sweep is not revisited in it."""
        spec = self.bench.spec
        self.sweep_starts.append(self.counts())
        for visit in range(spec.repeats):
            for kind, batches, xs, fn in self.grids:
                for j, x in enumerate(xs):
                    for i, b in enumerate(batches):
                        if bar is not None:
                            bar.set_postfix_str(f"{self.bench.mode.name} {kind} b={b} "
                                                f"{'ctx' if kind == 'decode' else 'len'}={x}")
                        key = (kind, i, j)
                        if i < self.limit.get((kind, j), len(batches)) and self.spent(key) < spec.max_point_s:
                            self.time_point(key, fn, b, x)
                        if bar is not None:
                            bar.update(1)
                    if self.flood and visit == spec.repeats - 1:
                        if bar is not None:
                            bar.set_postfix_str(f"{self.bench.mode.name} calibration flood through the live engine")
                        self.run_flood()
                        if bar is not None:
                            bar.update(1)

    def spent(self, key: tuple) -> float:
        """Seconds a point's timed passes have taken in the sweep under way."""
        return sum(self.samples.get(key, [])[self.sweep_starts[-1].get(key, 0):])

    def time_point(self, key: tuple, fn, b: int, x: int) -> None:
        """One timed pass of a grid point, kept with its samples; a point that runs out of memory
        ends its column (the larger batches would too)."""
        kind, i, j = key
        try:
            with allocations_fail_past_memory(self.bench.device):
                seconds, peak = fn(b, x, 0 if key in self.samples else self.bench.spec.warmup)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not is_oom(e):
                raise
            self.limit[kind, j] = i
            if self.bench.cuda:
                torch.cuda.empty_cache()
            return
        self.samples.setdefault(key, []).append(seconds)
        if peak is not None:
            self.peaks[key] = max(peak, self.peaks.get(key) or 0)

    def sweep_levels(self) -> list[float]:
        """How fast the device ran each sweep against the pool: the median over grid points of the
        sweep's median time over the pooled median (1.1: that sweep ran 10% slower). Their spread
        is the device's drift across the sweeps, which the pooled profile averages over."""
        ends = self.sweep_starts[1:] + [self.counts()]
        levels = []
        for start, end in zip(self.sweep_starts, ends):
            levels.append(statistics.median(
                statistics.median(times[start.get(key, 0):end[key]]) / statistics.median(times)
                for key, times in self.samples.items() if end.get(key, 0) > start.get(key, 0)))
        return levels

    def run_flood(self) -> None:
        from profiler.live_engine import LiveEngine, calibration_flood

        run = calibration_flood(LiveEngine(self.bench.forward, self.bench.device))
        measured = {"forward_s": run.forward_s.tolist(), "overhead_s": (run.loop_s - run.forward_s).tolist()}
        for key, values in self.flood.items():  # the other columns are Step's own fields
            values.extend(measured[key] if key in measured else [getattr(step, key) for step in run.steps])

    def summary(self) -> dict:
        """Both grids as the profile file stores them: median and spread of the pooled samples."""
        out = {}
        for kind, batches, xs, _ in self.grids:
            keys = ("median_s", "p10_s", "p90_s", "peak_memory_bytes", "repeats")
            cells = {k: [[None] * len(xs) for _ in batches] for k in keys}
            for i in range(len(batches)):
                for j in range(len(xs)):
                    times = sorted(self.samples.get((kind, i, j), []))
                    if i >= self.limit.get((kind, j), len(batches)) or not times:
                        continue
                    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
                    values = (statistics.median(times), q[0], q[-1], self.peaks.get((kind, i, j)), len(times))
                    for key, value in zip(keys, values):
                        cells[key][i][j] = value
            out[kind] = {"batch": list(batches), "length" if kind == "prefill" else "context": list(xs), **cells}
        if self.flood:
            out["flood"] = self.flood
        else:
            out["decode"] = recomputing_decode(out["prefill"])
        return out


def recomputing_decode(prefill: dict) -> dict:
    """A no-cache mode's decode grid: a step over c tokens is the prefill pass of c + 1."""
    decode = dict(prefill)
    decode["context"] = [n - 1 for n in decode.pop("length")]
    return decode


def mode_record(bench: Bench, grids: dict, peak_flops: float | None, **extra) -> dict:
    """One mode's entry in a profile file."""
    mode = bench.mode
    return {"dtype": mode.dtype, "kv_cache": mode.kv_cache, "compiled": mode.compiled,
            "weights_bytes": sum(p.numel() * p.element_size() for p in bench.model.parameters()),
            "kv_bytes_per_token": bench.kv_bytes_per_token(), "peak_flops": peak_flops, **extra, **grids}


def max_batch(bench, context: int, start: int) -> dict | None:
    """Largest decode batch (doubling from `start`) whose KV cache of `context` tokens fits."""
    if not bench.cuda or not bench.mode.kv_cache:
        return None
    fits, b = None, start
    while b <= 65536:
        try:
            with torch.inference_mode():
                cache = bench.synthetic_cache(b, context)
                ids = bench._ids(b, 1)
                for _ in range(2):  # the second step holds each layer's own cache and its next, as serving does
                    bench.forward(input_ids=ids, cache=cache, use_cache=True)
            del cache
            fits = b
            b *= 2
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not is_oom(e):
                raise
            break
        finally:
            torch.cuda.empty_cache()
    return {"context": context, "batch": fits}


def cached_twin(mode: ModeSpec, modes: list[ModeSpec]) -> ModeSpec | None:
    """The KV-cache mode among `modes` whose passes a no-cache `mode` shares: same dtype, same
    compilation. Its prefill is the twin's pass with K and V dropped, its decode step a prefill
    (GridSamples), its wake and concurrency passes the same calls; so `measure_modes` times them
    once. Timing both was half the CPU profile's time, spent measuring the same passes twice."""
    if mode.kv_cache:
        return None
    return next((m for m in modes if m.kv_cache and (m.dtype, m.compiled) == (mode.dtype, mode.compiled)), None)


def measure_modes(model, device: torch.device, modes: list[ModeSpec], spec: GridSpec, bar) -> dict:
    """Every mode's grids, memory and concurrency figures, as the profile file stores them."""
    peaks = device_peaks(device, sorted({m.dtype for m in modes}))
    out = {}
    for mode in sorted(modes, key=lambda m: not m.kv_cache):  # cached twins first
        twin = cached_twin(mode, modes)
        if twin is not None:
            shared = ("dtype", "compiled", "weights_bytes", "peak_flops", "compile_s", "wake", "concurrency", "prefill")
            out[mode.name] = {**{key: out[twin.name][key] for key in shared}, "kv_cache": False,
                              "kv_bytes_per_token": 0, "max_batch": None, "passes_of": twin.name,
                              "decode": recomputing_decode(out[twin.name]["prefill"])}
            continue
        model = model.to(dtype=DTYPES[mode.dtype])
        compile_start = time.perf_counter()
        bench = Bench(model, device, mode, spec)
        samples = GridSamples(bench, spec)
        for _ in range(spec.passes):
            samples.sweep(bar)
        bar.set_postfix_str(f"{mode.name} first pass after the device sat idle")
        wake = bench.wake_penalty()
        bar.update(1)
        after_prefill = None  # a decode without a KV cache is a prefill
        if mode.kv_cache:
            bar.set_postfix_str(f"{mode.name} decodes just after a prefill")
            after_prefill = bench.after_prefill()
            bar.update(1)
        conc = []
        for k in spec.concurrency_workers:
            bar.set_postfix_str(f"{mode.name} {k} workers sharing the device")
            conc.append(bench.concurrency(k))
            bar.update(1)
        out[mode.name] = mode_record(
            bench, samples.summary(), peaks["matmul_flops"].get(mode.dtype),
            compile_s=time.perf_counter() - compile_start if mode.compiled else None,
            max_batch=max_batch(bench, spec.decode_context[-1], spec.decode_batch[-1]), wake=wake,
            after_prefill=after_prefill,
            concurrency={"workers": list(spec.concurrency_workers), "step_s": conc, "context": 256, "batch": 1})
    return {"modes": {m.name: out[m.name] for m in modes}, "copy_bytes_per_s": peaks["copy_bytes_per_s"]}


def sweep_updates(spec: GridSpec, kv_cache: bool) -> int:
    """How far one GridSamples.sweep moves its progress bar: each prefill point on each visit,
    and in a KV-cache mode each decode point too and the flood after each grid column."""
    prefill = len(spec.prefill_batch) * len(spec.prefill_length)
    if not kv_cache:
        return spec.repeats * prefill
    decode = len(spec.decode_batch) * len(spec.decode_context)
    return spec.repeats * (prefill + decode) + len(spec.prefill_length) + len(spec.decode_context)


def grid_points(spec: GridSpec, modes: list[ModeSpec]) -> int:
    """How many measurements `measure_modes` makes (for the progress bar)."""
    return sum(spec.passes * sweep_updates(spec, m.kv_cache)
               + len(spec.concurrency_workers)
               + 1 + m.kv_cache  # wake_penalty, and after_prefill in a KV-cache mode
               for m in modes if cached_twin(m, modes) is None)
