"""The cost model: the time of any forward pass a scheduler can form, fitted from a profile.

Inside the measured grid a pass costs exactly what interpolation between measured points says
(linear in batch, then in length). Outside it, a physically shaped regression, fitted by
non-negative least squares on relative error, carries the nearest measured value along:

    prefill (b prompts of p tokens):  c0 + c1*b + c2*b*p + c3*b*p^2   (linear layers, attention)
    decode  (b rows, c cached tokens): c0 + c1*b + c2*b*c              (weights, KV reads)

A no-KV-cache mode recomputes the whole sequence each step, so its decode has prefill's shape.
A mixed pass (continuous batching with chunked prefill) costs its decode part plus the prefill
part less the fixed per-pass overhead, which it pays once.

Every step also pays the serving engine's own time outside the model (scheduling, preparing
inputs, and in a padded cache copying it to add or drop rows): on a small model several percent
of a step, and a simulator that leaves it out is optimistic. It is fitted from the calibration
floods' steps (EngineOverhead). And the first pass after the device sat idle pays the wake
penalty the profile measured for that gap (cold caches, lowered clocks): at low load that is
most requests' first pass. The first decodes after a prefill run slower too, by the fraction the
profile measured for that prefill's tokens, that decode's rows and its place after the prefill
(`after_prefill_time`): on this project's CPU hosts the first ran 1.2-2x, the fourth within a few
percent, and sixteen rows paid less of it than four, thirty-two far less.

The model's own passes are priced at the grid's speed: no factor for "a serving loop runs the
model slower". Such a factor, taken from the calibration floods' passes over the grid's price,
was priced until the penalties above were measured one by one; on this project's CPU it then
mostly carried the floods' own shape (one padded prefill of 8 rows, then a tail of slow decodes),
and priced both ways the live runs of ten matrices on two hosts put 415 of their 480 figures
within 10% without it, against 388 with it (calibration/validation/NOTES.md, "The serving
factor, dropped"). `validate` reports how fast the live runs' passes ran against this price,
kind by kind, so a device whose serving loop does run the model slower shows it there.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import Callable

import numpy as np

from calibration.nnls import nnls
from calibration.profile import Grid, Mode, Profile


def features(b, x, quadratic: bool) -> np.ndarray:
    """Regression features [1, b, b*x, b*x^2] (the last is zero for the linear shape)."""
    b, x = np.broadcast_arrays(np.asarray(b, float), np.asarray(x, float))
    return np.stack([np.ones_like(b), b, b * x, b * x * x if quadratic else np.zeros_like(b)], axis=-1)


class Surface:
    """Seconds of one kind of pass over (batch, x): interpolated inside the grid, shaped outside.

    The simulator calls this once per forward pass, so the scalar path is plain Python.
    """

    def __init__(self, grid: Grid, quadratic: bool):
        self.batch, self.x, self.quadratic = grid.batch, grid.x, quadratic
        bb, xx = np.meshgrid(grid.batch, grid.x, indexing="ij")
        measured = ~np.isnan(grid.seconds)
        t = grid.seconds[measured]
        a = features(bb[measured], xx[measured], quadratic) / t[:, None]  # rows scaled: relative error
        scale = a.max(axis=0)
        scale[scale == 0] = 1.0
        coef = nnls(a / scale, np.ones(len(t)))
        coef = coef / scale
        if not (coef > 0).any():
            coef = np.array([float(np.median(t)), 0.0, 0.0, 0.0])
        self.coef = coef
        self.c0, self.c1, self.c2, self.c3 = (float(c) for c in coef)
        # A point not measured (over the profile's token cap, or out of memory: a column's largest
        # batches) carries its column's largest measured batch along the regression, as a batch
        # past the grid does; a column with nothing measured takes the regression's value.
        table = self.regression(bb, xx)
        for j in range(len(grid.x)):
            rows = np.flatnonzero(measured[:, j])
            if len(rows):
                k = rows[-1]
                table[:, j] = np.where(measured[:, j], grid.seconds[:, j],
                                       grid.seconds[k, j] * table[:, j] / table[k, j])
        self.table = table
        self.knots = [float(v) for v in grid.x]
        self._rows: dict[int, list[float]] = {}
        self._pieces: dict[int, list[tuple[float, float, float, float, float]]] = {}

    @property
    def overhead(self) -> float:
        """The fixed cost of a pass (the regression's constant)."""
        return self.c0

    def regression(self, b, x):
        """The fitted shape; works on numbers and on arrays."""
        return np.maximum(self.c0 + b * (self.c1 + x * (self.c2 + self.c3 * x)), 1e-12)

    def _reg(self, b: float, x: float) -> float:
        return max(self.c0 + b * (self.c1 + x * (self.c2 + self.c3 * x)), 1e-12)

    def row(self, b: int) -> list[float]:
        """Seconds at each x knot for batch size b."""
        row = self._rows.get(b)
        if row is None:
            bs = self.batch
            if bs[0] <= b <= bs[-1]:
                values = [np.interp(b, bs, col) for col in self.table.T]
            else:
                edge = 0 if b < bs[0] else -1
                values = self.table[edge] * self.regression(b, self.x) / self.regression(bs[edge], self.x)
            row = self._rows[b] = [float(v) for v in values]
        return row

    def at(self, b: int, x: float) -> float:
        """Seconds for batch b at x."""
        return self.on_row(self.row(b), b, x)

    def on_row(self, row: list[float], b: int, x: float) -> float:
        """`at(b, x)` with b's row in hand: a loop over x fetches it once."""
        knots = self.knots
        if x >= knots[-1]:
            return row[-1] * self._reg(b, x) / self._reg(b, knots[-1])
        if x <= knots[0]:
            return row[0] * self._reg(b, x) / self._reg(b, knots[0])
        i = bisect_right(knots, x)
        x0, x1 = knots[i - 1], knots[i]
        return row[i - 1] + (row[i] - row[i - 1]) * (x - x0) / (x1 - x0)

    def pieces(self, b: int) -> list[tuple[float, float, float, float, float]]:
        """The surface at batch b as polynomials a + c*x + d*x^2 over [lo, hi), covering all x."""
        cached = self._pieces.get(b)
        if cached is not None:
            return cached
        row, knots = self.row(b), self.knots

        def scaled_regression(lo, hi, edge):  # value at the edge knot, carried by the shape
            k = row[edge] / self._reg(b, knots[edge])
            return (lo, hi, k * (self.c0 + b * self.c1), k * b * self.c2, k * b * self.c3)

        out = [scaled_regression(-math.inf, knots[0], 0)]
        for i in range(len(knots) - 1):
            slope = (row[i + 1] - row[i]) / (knots[i + 1] - knots[i])
            out.append((knots[i], knots[i + 1], row[i] - slope * knots[i], slope, 0.0))
        out.append(scaled_regression(knots[-1], math.inf, -1))
        self._pieces[b] = out
        return out

    def run_sum(self, b: int, start: float, n: int) -> float:
        """Sum of the surface at x = start, start + 1, ..., start + n - 1, in closed form."""
        pieces, end = self.pieces(b), start + n
        total = 0.0
        for lo, hi, a, c, d in pieces[bisect_right(self.knots, start):]:  # from the piece holding start
            if lo >= end:
                break
            j0 = 0 if lo <= start else min(math.ceil(lo - start), n)
            j1 = n if hi >= end else min(max(math.ceil(hi - start), 0), n)
            if j1 <= j0:
                continue
            count = j1 - j0
            sum_j = (j1 * (j1 - 1) - j0 * (j0 - 1)) / 2
            sum_j2 = ((j1 - 1) * j1 * (2 * j1 - 1) - (j0 - 1) * j0 * (2 * j0 - 1)) / 6
            total += (a + c * start + d * start * start) * count + (c + 2 * d * start) * sum_j + d * sum_j2
        return max(total, 1e-12 * n)


@dataclass(frozen=True)
class HeldOut:
    """Relative error of predicting measured points with their grid line left out."""

    median: float
    max: float
    points: int

    def __str__(self) -> str:
        if not self.points:
            return "n/a (grid too small)"
        return f"median {self.median:.1%} max {self.max:.1%} ({self.points} points)"

    def cell(self) -> str:
        """The profile report's table cell: median / max."""
        return f"{self.median:.1%} / {self.max:.1%}" if self.points else str(self)


@dataclass(frozen=True)
class EngineOverhead:
    """Seconds a serving step spends outside the model: a fixed part, a part per row of the batch
    (Python bookkeeping per request), and the KV-cache bytes a padded cache copies to add or drop
    rows."""

    step_s: float = 0.0
    row_s: float = 0.0
    copy_s_per_byte: float = 0.0

    @classmethod
    def fit(cls, profile: Profile) -> EngineOverhead:
        """Least squares (non-negative) over the steps of every mode's calibration floods.

        The engine's loop is the same whatever the mode, so the modes pool their steps, with
        copies in bytes. The mean, not a robust fit: a run pays its slow steps too. On this
        project's CPU the floods priced a copied byte 1.5-1.6x what the device's memcpy rate
        does: the padded concatenation copies twice, and small copies pay per call."""
        floods = [(m.flood, m.kv_bytes_per_token) for m in profile.modes.values() if m.flood is not None]
        if not floods:
            return cls()
        a = np.concatenate([np.stack([np.ones_like(f.forward_s), f.prefill_seqs + f.decode_seqs,
                                      f.reshuffle_tokens * kv_bytes], axis=1) for f, kv_bytes in floods])
        y = np.concatenate([f.overhead_s for f, _ in floods])
        scale = a.max(axis=0)
        scale[scale == 0] = 1.0
        coef = nnls(a / scale, y)
        return cls(*(float(c) for c in coef / scale))

    def __str__(self) -> str:
        if self == EngineOverhead():
            return "none priced (no calibration floods: they need a KV-cache mode)"
        return (f"{self.step_s * 1e3:.3f} ms/step + {self.row_s * 1e6:.1f} us/row + "
                f"copies at {1e-9 / self.copy_s_per_byte if self.copy_s_per_byte else math.inf:.1f} GB/s")


class CostModel:
    """Prices scheduler steps for one mode of a profile."""

    def __init__(self, mode: Mode, overhead: EngineOverhead = EngineOverhead()):
        self.mode = mode
        self.overhead = overhead
        self._copy_s_per_token = overhead.copy_s_per_byte * mode.kv_bytes_per_token
        self.prefill = Surface(mode.prefill, quadratic=True)
        self.decode = Surface(mode.decode, quadratic=not mode.kv_cache)
        after = mode.after_prefill
        self._after_tokens = [0.0, *after.tokens] if after else [0.0]
        self._after_rows = np.array(after.rows if after else (1,), float)
        # excess[r][i][k], with none after a prefill of no tokens: (rows, 1 + tokens, decodes)
        excess = np.array(after.excess if after else [[[]]], float)
        self._after_excess = np.concatenate([np.zeros_like(excess[:, :1]), excess], axis=1)
        self._after_tables: dict[int, list[list[float]]] = {}  # by decode rows (after_table)
        self.after_prefill_steps = self._after_excess.shape[2]  # decodes after a prefill that pay an excess
        self._wake_gaps = [0.0, *mode.wake.gap_s]
        self._wake_extra = [0.0, *mode.wake.extra_s]
        conc = mode.concurrency
        self._workers = np.array(sorted(conc), float)
        self._slowdown = np.array([conc[int(w)] for w in self._workers]) / conc[1] if 1 in conc else None

    @classmethod
    def of(cls, profile: Profile, mode: Mode) -> CostModel:
        """How the simulator prices `mode` of `profile`: with the engine overhead its floods fit.
        `validate` prices the live runs' steps through this too, so the two cannot diverge."""
        return cls(mode, EngineOverhead.fit(profile))

    def slowdown(self, workers: int) -> float:
        """How much slower each worker's passes run when `workers` share one device."""
        if workers == 1 or self._slowdown is None:
            return 1.0
        ws, sd = self._workers, self._slowdown
        if workers > ws[-1]:  # beyond the measured range: time-slicing, proportional
            return float(sd[-1] * workers / ws[-1])
        return float(np.interp(workers, ws, sd))

    def wake_time(self, idle_s: float) -> float:
        """Extra seconds of a pass after the device sat idle for `idle_s`: interpolated between
        the measured gaps, none after no gap, the longest gap's figure after any longer one."""
        if idle_s <= 0.0:
            return 0.0
        gaps, extra = self._wake_gaps, self._wake_extra
        if idle_s >= gaps[-1]:
            return extra[-1]
        i = bisect_right(gaps, idle_s)
        return extra[i - 1] + (extra[i] - extra[i - 1]) * (idle_s - gaps[i - 1]) / (gaps[i] - gaps[i - 1])

    def after_prefill_time(self, tokens: float, since: int, seqs: int, context_sum: float, repeat: int) -> float:
        """Extra seconds of `repeat` consecutive decode steps of `seqs` rows over `context_sum`
        cached tokens, the first of them the (since + 1)-th decode after a prefill of `tokens`
        tokens: each step's price times the fraction the profile measured for its place,
        interpolated over the prefill's tokens (none after none) and the decode's rows, held at
        the largest measured prefill's and the nearest measured row count's figure beyond them."""
        sums = self.after_prefill_sums(tokens, since, seqs, context_sum, repeat)
        return sums[-1] if sums else 0.0

    def after_prefill_sums(self, tokens: float, since: int, seqs: int, context_sum: float, repeat: int) -> list[float]:
        """after_prefill_time of the first 1, 2, ... of the `repeat` steps, up to the last that pays
        an excess (empty: none does), so that a run cut short finds its excess without pricing
        its steps again."""
        steps = self.after_prefill_steps
        if not tokens or since >= steps:
            return []
        knots, table = self._after_tokens, self.after_table(seqs)
        i = min(bisect_right(knots, tokens), len(knots) - 1)
        w = min((tokens - knots[i - 1]) / (knots[i] - knots[i - 1]), 1.0)
        decode, row, context = self.decode, self.decode.row(seqs), context_sum / seqs
        total, sums = 0.0, []
        for j in range(min(repeat, steps - since)):
            k = since + j
            excess = table[i - 1][k] + (table[i][k] - table[i - 1][k]) * w
            total += excess * decode.on_row(row, seqs, context + j)
            sums.append(total)
        return sums

    def after_table(self, seqs: int) -> list[list[float]]:
        """The after-prefill excess of decodes of `seqs` rows, by prefill tokens (0 first) and
        decode place: linear between the measured row counts, theirs beyond them.

        Measured by row count because it is not one fraction: after a 1,024-token prefill the
        first ten decodes of gpt2-tiny summed 1.29 decode prices of excess at one row, 2.03 at
        four, 1.81 at sixteen and 0.42 at thirty-two (benchmarks/after_prefill.py, one hour)."""
        table = self._after_tables.get(seqs)
        if table is None:
            rows = self._after_rows
            weights = [np.interp(seqs, rows, unit) for unit in np.eye(len(rows))]
            table = np.tensordot(weights, self._after_excess, axes=1).tolist()
            self._after_tables[seqs] = table
        return table

    def decode_run(self, seqs: int, context_sum: float, repeat: int) -> float:
        """Seconds of `repeat` consecutive decode steps, each adding one token per row."""
        return (self.decode.run_sum(seqs, context_sum / seqs, repeat)
                + repeat * (self.overhead.step_s + seqs * self.overhead.row_s))  # a run copies nothing

    def forward_time(self, step) -> float:
        """Seconds inside the model for one scheduler Step (see sim.scheduler)."""
        if not step.prefill_seqs:
            return self.decode.at(step.decode_seqs, step.decode_context / step.decode_seqs)
        t = self.prefill.at(step.prefill_seqs, step.prefill_len)
        if step.decode_seqs:  # a mixed pass pays the fixed per-pass overhead once
            decode = self.decode.at(step.decode_seqs, step.decode_context / step.decode_seqs)
            t = decode + max(t - self.prefill.overhead, 0.0)
        return t

    def overhead_time(self, step) -> float:
        """Seconds of one Step outside the model."""
        o = self.overhead
        return (o.step_s + (step.prefill_seqs + step.decode_seqs) * o.row_s
                + step.reshuffle_tokens * self._copy_s_per_token)

    def step_time(self, step) -> float:
        """Seconds of one Step: the forward pass and the engine's time around it."""
        return self.forward_time(step) + self.overhead_time(step)


def after_prefill_states(prefill_tokens: list[float]) -> tuple[list[float], list[int]]:
    """For steps in the order they ran, each given by its prefill tokens (0: a decode-only step):
    the tokens of the last prefill before each step, and which decode after it the step is
    (1: the first; 0: a step that prefills, which after_prefill_time does not price)."""
    last, since, tokens_out, since_out = 0.0, 0, [], []
    for tokens in prefill_tokens:
        if tokens:
            last, since = tokens, 0
        else:
            since += 1
        tokens_out.append(last)
        since_out.append(since)
    return tokens_out, since_out


def cut_run(run: Callable[[int], float], repeat: int, run_s: float, elapsed: float) -> tuple[int, float]:
    """A run of `repeat` decode steps taking `run_s` seconds (`run(n)`: the seconds of its first
    n), cut short `elapsed` seconds after it began, still finishes the step in progress: how many
    steps it runs, and their seconds.

    Step times change slowly along a run, so an estimate from the mean step time is off by a
    step or two; closed-form sums then settle it exactly, usually in two."""
    n = min(int(elapsed / (run_s / repeat)) + 1, repeat)  # the first step to end after `elapsed`
    t = run(n)
    while n > 1 and (shorter := run(n - 1)) > elapsed:
        n, t = n - 1, shorter
    while n < repeat and t <= elapsed:
        n += 1
        t = run(n)
    return n, t


def held_out_error(grid: Grid, quadratic: bool) -> HeldOut:
    """Leave each batch row and each x column out in turn; predict its points from the rest.

    Interior lines test interpolation, edge lines test the regression's extrapolation.
    """
    errors = []
    nb, nx = grid.seconds.shape
    for axis, n in ((0, nb), (1, nx)):
        if n < 3:
            continue
        for k in range(n):
            keep = np.arange(n) != k
            reduced = Grid(
                grid.batch[keep] if axis == 0 else grid.batch,
                grid.x[keep] if axis == 1 else grid.x,
                grid.seconds[keep] if axis == 0 else grid.seconds[:, keep],
            )
            surface = Surface(reduced, quadratic)
            for i in range(nb) if axis == 1 else [k]:
                for j in [k] if axis == 1 else range(nx):
                    truth = grid.seconds[i, j]
                    if not np.isnan(truth):
                        guess = surface.at(int(grid.batch[i]), float(grid.x[j]))
                        errors.append(abs(guess - truth) / truth)
    if not errors:
        return HeldOut(float("nan"), float("nan"), 0)
    return HeldOut(float(np.median(errors)), float(np.max(errors)), len(errors))


def held_out_errors(mode: Mode) -> dict[str, HeldOut]:
    return {
        "prefill": held_out_error(mode.prefill, quadratic=True),
        "decode": held_out_error(mode.decode, quadratic=not mode.kv_cache),
    }
