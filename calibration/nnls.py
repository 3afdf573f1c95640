"""Non-negative least squares over a handful of features, without importing scipy.

The cost model fits three to five coefficients every time `simulate` starts, and
`scipy.optimize` takes 0.4 s to import, a third of that start-up. With so few features the
exact answer is cheap by enumeration: the optimum is the plain least-squares solution on its own
support (the features it gives a positive weight), so among the supports whose least-squares
solution is non-negative, the one with the smallest residual holds it. Where features are
collinear (a grid of a few points) many weightings fit equally well: the fewest features win.
"""

from __future__ import annotations

import itertools

import numpy as np


def nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin over x >= 0 of ||a @ x - y||, for an `a` of at most a few columns."""
    n = a.shape[1]
    best, best_residual = np.zeros(n), float(y @ y)
    tie = 1e-12 * best_residual  # smaller supports come first: a larger one must fit better than rounding
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            cols = list(support)
            x, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
            if (x < 0).any():
                continue
            r = a[:, cols] @ x - y
            residual = float(r @ r)
            if residual < best_residual - tie:
                best, best_residual = np.zeros(n), residual
                best[cols] = x
    return best
