"""Request streams: arrival processes, length distributions and trace files.

Everything is generated up front as numpy arrays (one entry per request), so a million requests
cost 48 MB, and the simulator creates Request objects only as they arrive.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sim.errors import InputError
from sim.fields import LARGEST, show

# The most requests one run may ask for: a million take ~60 s to simulate, and generating far more
# would fill memory (or, for a bursty state, exceed what numpy can draw) before anything ran.
MAX_REQUESTS = 100_000_000
# The most state changes a bursty workload may expect before its last arrival: each costs ~3 us to
# draw, so this is a few seconds; bursts of microseconds asked for hours, or for ever. Bursts of
# 15 s among lulls of 40 s change state 400,000 times in a run's most requests.
MAX_STATE_CHANGES = 1_000_000

# The latest arrival a run may hold: at 1e12 s a double resolves 0.1 ms, a tenth of a short forward
# pass. At 1e-30 req/s the passes vanished into the clock's rounding and every latency read 0.0.
MAX_TIME_S = 1e12

# Trace layouts we read: servesim's own (also Vidur's) and the Azure LLM inference trace's.
TRACE_LAYOUTS = {
    ("arrived_at", "num_prefill_tokens", "num_decode_tokens"): "seconds",
    ("TIMESTAMP", "ContextTokens", "GeneratedTokens"): "timestamp",
}


@dataclass(frozen=True)
class Trace:
    """One row per request, in arrival order."""

    arrived_at: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    prompt_key: np.ndarray = field(default=None)  # -1: unique prompt
    prefix_id: np.ndarray = field(default=None)  # -1: no shared prefix
    prefix_tokens: np.ndarray = field(default=None)

    def __post_init__(self):
        n = len(self.arrived_at)
        for name in ("prompt_key", "prefix_id"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.full(n, -1, dtype=np.int64))
        if self.prefix_tokens is None:
            object.__setattr__(self, "prefix_tokens", np.zeros(n, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.arrived_at)

    def rows(self, chunk: int = 4096) -> Iterator[tuple]:
        """Each request's (index, arrived_at, prompt_tokens, output_tokens, prompt_key, prefix_id,
        prefix_tokens) as Python numbers, in Request's field order. Converted a chunk at a time:
        the whole columns as lists held 94 MB more at a million requests, through the whole run."""
        columns = (self.arrived_at, self.prompt_tokens, self.output_tokens, self.prompt_key, self.prefix_id,
                   self.prefix_tokens)
        for start in range(0, len(self), chunk):
            yield from zip(itertools.count(start), *(c[start:start + chunk].tolist() for c in columns))


def _floats(texts: list[str]) -> np.ndarray:
    """Each text as the nearest double, NaN where it is not a decimal number. Not pd.to_numeric:
    before pandas 3 it misses the nearest double by an ulp on long decimals (the shipped trace's
    "5.8926549999999995" read as 5.892655), and a trace's results would then depend on pandas."""
    out = np.full(len(texts), np.nan)
    for i, text in enumerate(texts):
        try:
            out[i] = float(text) if "_" not in text else math.nan  # float() takes "1_000"; a CSV does not
        except ValueError:
            pass
    return out


def read_trace(path: str | Path) -> Trace:
    """Read a request trace CSV, naming the line and column of the first bad value."""
    path = str(path)
    try:
        # index_col=False: else pandas takes a first row with one field too many for an index
        # column and shifts every value of the trace one column left. It warns instead.
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.ParserWarning:
        raise InputError(f"{path}: line 2: more fields than the header names") from None
    except FileNotFoundError:
        raise InputError(f"{path}: trace file not found") from None
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read trace: {str(e).splitlines()[0]}") from None
    columns = next((cols for cols in TRACE_LAYOUTS if set(cols) <= set(frame.columns)), None)
    if columns is None:
        layouts = "; ".join(",".join(c) for c in TRACE_LAYOUTS)
        raise InputError(f"{path}: unknown trace columns {show(list(frame.columns))} (expected: {layouts})")
    if len(frame) == 0:
        raise InputError(f"{path}: trace has no rows")
    time_col, prompt_col, output_col = columns

    def numbers(col: str, minimum: float) -> np.ndarray:
        values = _floats(frame[col].tolist())
        bad = ~np.isfinite(values) | (values < minimum) | (values > LARGEST)  # past it, int64 wraps
        if col != time_col:
            bad |= values != np.round(values)
        if bad.any():
            i = int(np.argmax(bad))
            kind = "a time in seconds from 0" if col == time_col else f"a whole number from {minimum:g}"
            kind += f" to {LARGEST:g}"
            raise InputError(f"{path}: line {i + 2}: column {col}: expected {kind}, got {show(frame[col].iloc[i])}")
        return values

    if TRACE_LAYOUTS[columns] == "timestamp":
        # ISO 8601, as Azure writes it ("2023-11-16 18:15:46.6805900", "...+00:00"): guessing a
        # format warns, and dateutil reads "10" as a date. utc=True: offsets may differ by row.
        stamps = pd.to_datetime(frame[time_col].str.strip(), errors="coerce", format="ISO8601", utc=True)
        if stamps.isna().any():
            i = int(np.argmax(stamps.isna().to_numpy()))
            raise InputError(f"{path}: line {i + 2}: column {time_col}: "
                             f"not an ISO 8601 timestamp: {show(frame[time_col].iloc[i])}")
        arrived = (stamps - stamps.min()).dt.total_seconds().to_numpy(float)
    else:
        arrived = numbers(time_col, 0)
    prompt = numbers(prompt_col, 1).astype(np.int64)
    output = numbers(output_col, 1).astype(np.int64)
    order = np.argsort(arrived, kind="stable")
    return Trace(arrived[order], prompt[order], output[order])


# --- arrival processes -------------------------------------------------------------------------
# Each returns sorted arrival times: `n` of them, or all of them before `duration`.


def _take(times: np.ndarray, n: int | None, duration: float | None) -> np.ndarray:
    if n is not None:
        times = times[:n]
    if duration is not None:
        times = times[times < duration]
    return times


def _from_gaps(draw, n: int | None, duration: float | None) -> np.ndarray:
    """Arrivals from i.i.d. gaps: `draw(k)` returns k gaps."""
    if n is not None:
        return _take(np.cumsum(draw(n)), n, duration)
    chunks, t = [], 0.0
    while t < duration:
        times = t + np.cumsum(draw(4096))
        chunks.append(times)
        t = times[-1]
    return _take(np.concatenate(chunks) if chunks else np.empty(0), None, duration)  # a ramp's may be 0


def _poisson(rng, rate: float, n: int | None, duration: float | None) -> np.ndarray:
    """A homogeneous Poisson process at `rate`, from its exponential gaps."""
    return _from_gaps(lambda k: rng.exponential(1.0 / rate, k), n, duration)


def _thinned(rng, rate_at, peak: float, n: int | None, duration: float | None) -> np.ndarray:
    """A non-homogeneous Poisson process by thinning a homogeneous one at the peak rate (diurnal:
    its rate never falls far below the peak for long)."""
    chunks, count, t = [], 0, 0.0
    while (n is None or count < n) and (duration is None or t < duration):
        candidates = t + np.cumsum(rng.exponential(1.0 / peak, 4096))
        t = candidates[-1]
        kept = candidates[rng.random(4096) * peak < rate_at(candidates)]
        chunks.append(kept)
        count += len(kept)
    return _take(np.concatenate(chunks), n, duration)


def _ramp(rng, r0: float, r1: float, span: float, n: int | None, duration: float | None) -> np.ndarray:
    """A rate going linearly from r0 to r1 over `span` seconds, r1 holding after it: a unit-rate
    Poisson process mapped through the inverse of the expected count by time t. Thinned at the peak
    instead, a ramp from 1e-9 drew a billion candidates before its first arrival."""
    slope, on_ramp = (r1 - r0) / span, (r0 + r1) / 2 * span  # arrivals expected over the ramp

    def expected(t: float) -> float:
        return r0 * t + slope * t * t / 2 if t <= span else on_ramp + r1 * (t - span)

    u = _poisson(rng, 1.0, n, None if duration is None else expected(duration))
    # The root of r0 t + slope t^2 / 2 = u, in the form that stays accurate as the slope goes to 0.
    root = np.sqrt(np.maximum(r0 * r0 + 2 * slope * np.minimum(u, on_ramp), 0.0))
    with np.errstate(all="ignore"):  # each branch computed for all: past the ramp, or at u = 0 = r0
        t = np.where(u <= on_ramp, np.nan_to_num(2 * u / (r0 + root)), span + (u - on_ramp) / r1)
    return _take(t, n, duration)


def _constant(rng, rate: float, start: float, length: float, need: int | None,
              duration: float | None) -> np.ndarray:
    """Poisson arrivals at `rate` over [start, start + length), as few as `need` (None: all)
    once more than a million are expected there."""
    if rate * length <= 1e6:
        return start + np.sort(rng.random(rng.poisson(rate * length))) * length
    # A flood: only the arrivals still needed, from their gaps; sorting them all would take
    # seconds, or more memory than there is, or a count larger than numpy draws.
    end = length if duration is None else min(length, duration - start)
    return start + _poisson(rng, rate, need, end)


def _piecewise_constant(rng, pieces: Iterable[tuple[float, float]], n: int | None,
                        duration: float | None) -> np.ndarray:
    """Arrivals at each piece's (rate, length) in turn, until `n` of them or `duration`."""
    chunks, count, t = [], 0, 0.0
    for rate, length in pieces:
        if (n is not None and count >= n) or (duration is not None and t >= duration):
            break
        if rate > 0:
            times = _constant(rng, rate, t, length, None if n is None else n - count, duration)
            if len(times):  # an empty array per piece filled memory when bursty states switched often
                chunks.append(times)
                count += len(times)
        t += length
    return _take(np.concatenate(chunks) if chunks else np.empty(0), n, duration)


def _mmpp(rng, rates, durations) -> Iterator[tuple[float, float]]:
    """Markov-modulated Poisson: cycle through the states, each lasting an exponential time (drawn
    when it starts, after the arrivals of the one before: the stream's order)."""
    for state in itertools.cycle(range(len(rates))):
        yield rates[state], rng.exponential(durations[state])


def peak_rate(spec) -> float:
    """The highest rate (requests/s) a generated arrival process reaches (not a trace's)."""
    p, kind = spec.params, spec.kind
    if kind in ("poisson", "gamma"):
        return p["rate"]
    if kind in ("bursty", "step"):
        return max(p["rates"])
    if kind == "diurnal":
        return p["mean_rate"] * (1 + p["amplitude"])
    if kind == "ramp":
        return max(p["start_rate"], p["end_rate"])
    raise AssertionError(kind)


def state_changes(spec, n: int | None, duration: float | None) -> float:
    """How many states a bursty workload expects to pass through before `n` arrivals or `duration`."""
    rates, durations = spec.params["rates"], spec.params["mean_durations_s"]
    per_cycle = math.fsum(r * d for r, d in zip(rates, durations))  # arrivals expected per cycle
    cycles = min(math.inf if n is None or per_cycle <= 0 else n / per_cycle,
                 math.inf if duration is None else duration / math.fsum(durations))
    return len(rates) * cycles


def arrival_times(spec, rng, n: int | None, duration: float | None) -> np.ndarray:
    p, kind = spec.params, spec.kind
    if kind == "poisson":
        return _poisson(rng, p["rate"], n, duration)
    if kind == "gamma":
        shape = 1.0 / p["cv"] ** 2
        return _from_gaps(lambda k: rng.gamma(shape, 1.0 / (p["rate"] * shape), k), n, duration)
    if kind == "bursty":
        return _piecewise_constant(rng, _mmpp(rng, p["rates"], p["mean_durations_s"]), n, duration)
    if kind == "diurnal":
        mean, amp, period, phase = p["mean_rate"], p["amplitude"], p["period_s"], p["phase_s"]
        rate = lambda t: mean * (1 + amp * np.sin(2 * math.pi * (t + phase) / period))  # noqa: E731
        return _thinned(rng, rate, peak_rate(spec), n, duration)
    if kind == "step":
        # Each step drawn at its own rate, the last holding for ever: thinned at the peak, a long
        # step far below it took a hundred billion candidates.
        return _piecewise_constant(rng, zip(p["rates"], [*p["durations_s"][:-1], math.inf]), n, duration)
    if kind == "ramp":
        return _ramp(rng, p["start_rate"], p["end_rate"], p["duration_s"], n, duration)
    raise AssertionError(kind)


def lengths(spec, rng, n: int) -> np.ndarray:
    if spec.kind == "fixed":
        return np.full(n, spec.value, dtype=np.int64)
    if spec.kind == "uniform":
        return rng.integers(spec.low, spec.high + 1, n)
    if spec.kind == "lognormal":
        values = np.round(rng.lognormal(math.log(spec.median), spec.sigma, n))
        return np.clip(values, spec.min, spec.max).astype(np.int64)
    if spec.kind == "empirical":
        return rng.choice(spec.samples, n)
    raise AssertionError(spec.kind)


def _zipf_keys(rng, distinct: int, s: float, n: int) -> np.ndarray:
    """n prompt keys of Zipf popularity (weight 1 / k^s) over `distinct` prompts: exactly what
    rng.choice(distinct, n, p=weights) draws, in one array where choice held three (2.3 GB and 6 s
    for 10^8 prompts, against 0.8 GB and 0.9 s)."""
    # In floats: an integer exponent of 1e9 wrapped int64 to 0. A power past the floats' range is
    # infinite, and its prompt's weight 0, as it should be.
    cdf = np.arange(1, distinct + 1, dtype=float)
    with np.errstate(over="ignore"):
        np.power(cdf, s, out=cdf)
    np.divide(1.0, cdf, out=cdf)
    cdf /= cdf.sum()  # choice's steps, in its order, so its draws are kept bit for bit
    np.cumsum(cdf, out=cdf)
    cdf /= cdf[-1]
    return cdf.searchsorted(rng.random(n), side="right")


def generate(workload, seed: int) -> Trace:
    """The request stream of a scenario's workload. Same seed, same stream."""
    rng_arrivals, rng_prompt, rng_output, rng_keys = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    arrivals = workload.arrivals
    if arrivals.kind == "trace":
        trace = arrivals.trace
        # Replayed from its first arrival, as ISO times always were: a trace in Unix-epoch seconds
        # billed 472,222 GPU-hours of replicas idle since 1970 for its 3 requests.
        times = (trace.arrived_at - trace.arrived_at[0]) / arrivals.params["time_scale"]
        keep = _take(np.arange(len(times)), workload.num_requests, None)
        if workload.duration_s is not None:
            keep = keep[times[keep] < workload.duration_s]
        times, prompt, output = times[keep], trace.prompt_tokens[keep], trace.output_tokens[keep]
    else:
        times = arrival_times(arrivals, rng_arrivals, workload.num_requests, workload.duration_s)
        prompt = lengths(workload.prompt_tokens, rng_prompt, len(times))
        output = lengths(workload.output_tokens, rng_output, len(times))
    n = len(times)
    if n == 0:
        raise InputError(f"{workload.where}: generates no request (raise the rate, duration or count)")
    if not times[-1] <= MAX_TIME_S:
        raise InputError(f"{workload.where}: arrivals run past {MAX_TIME_S:g} s, where the clock cannot "
                         "time a forward pass: raise the rate (or time_scale)")
    prompt_key = prefix_id = prefix_tokens = None
    if workload.prompt_keys is not None:
        prompt_key = _zipf_keys(rng_keys, *workload.prompt_keys, n)
    if workload.shared_prefix is not None:
        groups, tokens, fraction = workload.shared_prefix
        has = rng_keys.random(n) < fraction
        prefix_id = np.where(has, rng_keys.integers(0, groups, n), -1)
        prefix_tokens = np.where(has, np.minimum(tokens, prompt - 1), 0)
    return Trace(times, prompt.astype(np.int64), output.astype(np.int64), prompt_key, prefix_id, prefix_tokens)


RATE_KEYS = {"poisson": ("rate",), "gamma": ("rate",), "bursty": ("rates",), "diurnal": ("mean_rate",),
             "step": ("rates",), "ramp": ("start_rate", "end_rate"), "trace": ("time_scale",)}


def scale_rate(workload, factor: float):
    """The same workload offered `factor` times as fast, its shape kept (bursts, cycles, ramps
    and trace gaps all shrink together). Lengths and counts are unchanged."""
    from dataclasses import replace

    arrivals = workload.arrivals
    params = dict(arrivals.params)
    for key in RATE_KEYS[arrivals.kind]:
        value = params[key]
        params[key] = [v * factor for v in value] if isinstance(value, list) else value * factor
    if arrivals.kind in ("step", "ramp", "bursty", "diurnal"):
        for key in ("durations_s", "mean_durations_s", "duration_s", "period_s", "phase_s"):
            if key in params:  # time structure shrinks with the gaps, so the shape is the same
                value = params[key]
                params[key] = [v / factor for v in value] if isinstance(value, list) else value / factor
    duration = workload.duration_s / factor if workload.duration_s is not None else None
    return replace(workload, arrivals=replace(arrivals, params=params), duration_s=duration)


def offered_rate(trace: Trace) -> float:
    """Mean arrival rate of a generated stream (requests per second)."""
    span = float(trace.arrived_at[-1] - trace.arrived_at[0])
    return (len(trace) - 1) / span if span > 0 else float("inf")
