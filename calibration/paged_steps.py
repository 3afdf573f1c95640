"""Step times of a paged engine (transformers' continuous batching), fitted from its own steps.

Such an engine runs each step as one ragged forward pass over all its requests' tokens, and on
this stack (SDPA, no paged-attention kernel) attends with one masked product of every query
token against every KV token the step's requests hold, gathered from the paged cache first. So
a step of Q computed tokens, KV attended tokens and R requests costs

    t = step + token * Q + kv * KV + pair * Q * KV + row * R

(the fixed cost of a pass and of the engine loop, the linear layers, gathering the cache,
attention, and per-request work: scheduling, preparing inputs, sampling). The padded grid of a
profile cannot price it: the kernels differ. Non-negative least squares on relative error fits
the five coefficients to the engine's own steps, timed before the runs it predicts
(benchmarks/validate_hf_engine.py); the simulator then prices its scheduler's Steps by it, in
place of a profile's cost model.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import numpy as np

from calibration.nnls import nnls


def step_shape(step) -> tuple[int, int, int]:
    """Computed tokens, attended KV tokens (this step's own included) and requests of a
    scheduler Step, priced before its postprocess (prefill entries still hold what was done)."""
    q = step.decode_seqs + sum(chunk for _, chunk in step.prefill)
    kv = step.decode_context + step.decode_seqs + sum(r.prefilled + chunk for r, chunk in step.prefill)
    return q, kv, step.decode_seqs + len(step.prefill)


@dataclass(frozen=True)
class PagedStepModel:
    step_s: float
    token_s: float
    kv_s: float
    pair_s: float
    row_s: float

    @classmethod
    def fit(cls, q: np.ndarray, kv: np.ndarray, rows: np.ndarray, seconds: np.ndarray) -> PagedStepModel:
        a = np.stack([np.ones_like(q), q, kv, q * kv, rows], axis=1) / seconds[:, None]
        scale = a.max(axis=0)
        coef = nnls(a / scale, np.ones(len(seconds)))
        return cls(*(float(c) for c in coef / scale))

    def scaled(self, factor: float) -> PagedStepModel:
        return PagedStepModel(*(factor * c for c in astuple(self)))

    def time(self, q, kv, rows):
        return self.step_s + self.token_s * q + self.kv_s * kv + self.pair_s * q * kv + self.row_s * rows

    def __str__(self) -> str:
        return (f"{self.step_s * 1e3:.3f} ms/step + {self.token_s * 1e6:.1f} us/token + "
                f"{self.kv_s * 1e9:.0f} ns/KV token + {self.pair_s * 1e9:.2f} ns per query x KV token + "
                f"{self.row_s * 1e6:.1f} us/request")

    # --- what the simulator asks of a cost model -------------------------------------------

    def step_time(self, step) -> float:
        return float(self.time(*step_shape(step)))

    def decode_run(self, seqs: int, context_sum: float, repeat: int) -> float:
        """`repeat` decode steps of `seqs` requests: step k attends over context_sum + seqs * (k + 1)."""
        kv_sum = repeat * (context_sum + seqs) + seqs * repeat * (repeat - 1) / 2
        return repeat * (self.step_s + (self.token_s + self.row_s) * seqs) + (self.kv_s + self.pair_s * seqs) * kv_sum

    def wake_time(self, idle_s: float) -> float:
        return 0.0  # fitted from a flood's back-to-back steps: a slower first pass after idling is not priced

    after_prefill_steps = 0  # fitted from the engine's own steps, its decodes after prefills among them

    def after_prefill_time(self, tokens: float, since: int, seqs: int, context_sum: float, repeat: int) -> float:
        return 0.0

    def slowdown(self, workers: int) -> float:
        if workers != 1:
            raise ValueError("a paged step model is fitted to one engine on one device")
        return 1.0
