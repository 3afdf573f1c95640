"""The cost model: the time of any forward pass a scheduler can form, fitted from a profile.

Inside the measured grid a pass costs exactly what interpolation between measured points says
(linear in batch, then in length). Outside it, a physically shaped regression, fitted by
non-negative least squares on relative error, carries the nearest measured value along:

    prefill (b prompts of p tokens):  c0 + c1*b + c2*b*p + c3*b*p^2   (linear layers, attention)
    decode  (b rows, c cached tokens): c0 + c1*b + c2*b*c              (weights, KV reads)

A no-KV-cache mode recomputes the whole sequence each step, so its decode has prefill's shape.
A mixed pass (continuous batching with chunked prefill) costs its decode part plus the prefill
part less the fixed per-pass overhead, which it pays once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.optimize import nnls

from calibration.profile import Grid, Mode

Features = Callable[[np.ndarray, np.ndarray], np.ndarray]


def linear_features(b: np.ndarray, x: np.ndarray) -> np.ndarray:
    b, x = np.broadcast_arrays(np.asarray(b, float), np.asarray(x, float))
    return np.stack([np.ones_like(b), b, b * x], axis=-1)


def quadratic_features(b: np.ndarray, x: np.ndarray) -> np.ndarray:
    b, x = np.broadcast_arrays(np.asarray(b, float), np.asarray(x, float))
    return np.stack([np.ones_like(b), b, b * x, b * x * x], axis=-1)


class Surface:
    """Seconds of one kind of pass over (batch, x): interpolated inside the grid, shaped outside."""

    def __init__(self, grid: Grid, features: Features):
        self.batch, self.x = grid.batch, grid.x
        self.features = features
        bb, xx = np.meshgrid(grid.batch, grid.x, indexing="ij")
        measured = ~np.isnan(grid.seconds)
        t = grid.seconds[measured]
        a = features(bb[measured], xx[measured]) / t[:, None]  # rows scaled: relative error
        scale = a.max(axis=0)
        scale[scale == 0] = 1.0
        coef, _ = nnls(a / scale, np.ones(len(t)))
        self.coef = coef / scale
        if not (self.coef > 0).any():
            self.coef = np.array([float(np.median(t))] + [0.0] * (len(scale) - 1))
        # Points that could not be measured (out of memory) take the regression's value.
        self.table = np.where(measured, grid.seconds, self.regression(bb, xx))
        self._rows: dict[int, np.ndarray] = {}

    @property
    def overhead(self) -> float:
        """The fixed cost of a pass (the regression's constant)."""
        return float(self.coef[0])

    def regression(self, b, x) -> np.ndarray:
        return np.maximum(self.features(b, x) @ self.coef, 1e-12)

    def row(self, b: int) -> np.ndarray:
        """Seconds at each x knot for batch size b."""
        row = self._rows.get(b)
        if row is None:
            bs = self.batch
            if bs[0] <= b <= bs[-1]:
                row = np.array([np.interp(b, bs, col) for col in self.table.T])
            else:
                edge = 0 if b < bs[0] else -1
                row = self.table[edge] * self.regression(b, self.x) / self.regression(bs[edge], self.x)
            self._rows[b] = row
        return row

    def __call__(self, b: int, x):
        """Seconds for batch b at x (a number or an array of them)."""
        row, knots = self.row(b), self.x
        value = np.interp(x, knots, row)
        if np.any(x > knots[-1]) or np.any(x < knots[0]):
            x_arr = np.asarray(x, float)
            above = row[-1] * self.regression(b, x_arr) / self.regression(b, knots[-1])
            below = row[0] * self.regression(b, x_arr) / self.regression(b, knots[0])
            value = np.where(x_arr > knots[-1], above, np.where(x_arr < knots[0], below, value))
        return value


@dataclass(frozen=True)
class HeldOut:
    """Relative error of predicting measured points with their grid line left out."""

    median: float
    max: float
    points: int


class CostModel:
    """Prices scheduler steps for one mode of a profile."""

    def __init__(self, mode: Mode):
        self.mode = mode
        self.prefill = Surface(mode.prefill, quadratic_features)
        self.decode = Surface(mode.decode, linear_features if mode.kv_cache else quadratic_features)
        conc = mode.concurrency
        self._workers = np.array(sorted(conc), float)
        self._slowdown = np.array([conc[int(w)] for w in self._workers]) / conc[1] if 1 in conc else None

    def slowdown(self, workers: int) -> float:
        """How much slower each worker's passes run when `workers` share one device."""
        if workers == 1 or self._slowdown is None:
            return 1.0
        ws, sd = self._workers, self._slowdown
        if workers > ws[-1]:  # beyond the measured range: time-slicing, proportional
            return float(sd[-1] * workers / ws[-1])
        return float(np.interp(workers, ws, sd))

    def prefill_time(self, seqs: int, length: float) -> float:
        return float(self.prefill(seqs, length))

    def decode_time(self, seqs: int, context_sum: float) -> float:
        return float(self.decode(seqs, context_sum / seqs))

    def decode_run(self, seqs: int, context_sum: float, repeat: int) -> np.ndarray:
        """Seconds of each of `repeat` consecutive decode steps; every step adds one token per row."""
        return np.asarray(self.decode(seqs, context_sum / seqs + np.arange(repeat)), float)

    def step_time(self, step) -> float:
        """Seconds of one scheduler Step (see sim.scheduler)."""
        if not step.prefill_seqs:
            return self.decode_time(step.decode_seqs, step.decode_context)
        t = self.prefill_time(step.prefill_seqs, step.prefill_len)
        if step.decode_seqs:
            t = self.decode_time(step.decode_seqs, step.decode_context) + max(t - self.prefill.overhead, 0.0)
        return t


def held_out_error(grid: Grid, features: Features) -> HeldOut:
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
            surface = Surface(reduced, features)
            for i in range(nb) if axis == 1 else [k]:
                for j in [k] if axis == 1 else range(nx):
                    truth = grid.seconds[i, j]
                    if not np.isnan(truth):
                        guess = float(surface(int(grid.batch[i]), grid.x[j]))
                        errors.append(abs(guess - truth) / truth)
    if not errors:
        return HeldOut(float("nan"), float("nan"), 0)
    return HeldOut(float(np.median(errors)), float(np.max(errors)), len(errors))


def held_out_errors(mode: Mode) -> dict[str, HeldOut]:
    decode_features = linear_features if mode.kv_cache else quadratic_features
    return {
        "prefill": held_out_error(mode.prefill, quadratic_features),
        "decode": held_out_error(mode.decode, decode_features),
    }
