"""The cost model: exact on the measured grid, linear between points, shaped outside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calibration.cost_model import CostModel, EngineOverhead, cut_run, held_out_error
from calibration.profile import Grid, load, parse
from conftest import ROOT, flood_section, synthetic_profile
from sim.scheduler import Step


def shipped_modes():
    return list(load(ROOT / "calibration/profiles/cpu-gpt2-tiny.json").modes.values())


def committed_profiles() -> list[Path]:
    """Every profile in the repository: the shipped ones and those kept beside a validation."""
    return sorted(p for p in (ROOT / "calibration").rglob("*.json") if '"schema_version"' in p.read_text())


@pytest.mark.parametrize("path", committed_profiles(), ids=lambda p: p.name)
def test_every_committed_profile_reads_in_this_schema(path):
    # A schema change must re-measure or relabel them: a scenario names them by path.
    assert load(path).modes


@pytest.mark.parametrize("mode", shipped_modes(), ids=lambda m: m.name)
def test_exact_at_measured_points_and_linear_between(mode):
    cm = CostModel(mode)
    g = mode.decode
    for i, b in enumerate(g.batch):
        for j, x in enumerate(g.x):
            if not np.isnan(g.seconds[i, j]):  # null points (over the token cap) are priced from their column
                assert cm.decode.at(int(b), float(x)) == pytest.approx(g.seconds[i, j], rel=1e-12)
    mid = (g.x[0] + g.x[1]) / 2
    assert cm.decode.at(int(g.batch[0]), mid) == pytest.approx((g.seconds[0, 0] + g.seconds[0, 1]) / 2)


@pytest.mark.parametrize("mode", shipped_modes(), ids=lambda m: m.name)
def test_closed_form_run_equals_step_by_step_sum(mode):
    cm = CostModel(mode, EngineOverhead(3e-4, 2e-5, 1e-10))
    for b in (1, 3, 40, 200):  # inside and beyond the measured batches
        for start in (5.0, 100.5, 1000.0, 4090.0, 20000.0):  # below, inside, above the grid
            for n in (1, 7, 300, 5000):
                steps = [cm.step_time(Step(decode_seqs=b, decode_context=b * (start + j))) for j in range(n)]
                assert cm.decode_run(b, b * start, n) == pytest.approx(sum(steps), rel=1e-9)
                # Cut short at any moment, the run finishes the step in progress and no more.
                ends = np.cumsum(steps)
                for t in (0.0, ends[0] * 0.5, ends[n // 2] * 1.0000001, ends[-1] * 0.999999):
                    k = min(int(np.searchsorted(ends, t, side="right")) + 1, n)
                    done, seconds = cut_run(lambda m: cm.decode_run(b, start * b, m), n, ends[-1], t)
                    assert done == k and seconds == pytest.approx(ends[k - 1], rel=1e-9)


def test_every_step_pays_the_engine_overhead_once_per_step_per_row_and_per_copied_byte():
    mode = parse(synthetic_profile(kv_bytes_per_token=1000), "synthetic").modes["fp16"]
    bare, loaded = CostModel(mode), CostModel(mode, EngineOverhead(0.002, 1e-4, 1e-9))
    for step, rows in ((Step(decode_seqs=4, decode_context=400), 4), (Step(prefill_seqs=2, prefill_len=100), 2),
                       (Step(prefill_seqs=1, prefill_len=100, decode_seqs=4, decode_context=400), 5),
                       (Step(decode_seqs=3, decode_context=300, reshuffle_tokens=500), 3)):
        extra = 0.002 + rows * 1e-4 + step.reshuffle_tokens * 1000 * 1e-9
        assert loaded.step_time(step) == pytest.approx(bare.step_time(step) + extra)
    assert loaded.decode_run(4, 400, 10) == pytest.approx(bare.decode_run(4, 400, 10) + 10 * (0.002 + 4 * 1e-4))


def test_engine_overhead_is_fitted_from_every_modes_flood_steps():
    raw = synthetic_profile(kv_bytes_per_token=1000)
    assert EngineOverhead.fit(parse(raw, "synthetic")) == EngineOverhead()  # no flood: nothing measured
    truth = EngineOverhead(3e-4, 2e-5, 1e-9)
    steps = [Step(prefill_seqs=8, prefill_len=100), Step(decode_seqs=8, decode_context=800),
             Step(decode_seqs=5, decode_context=600, reshuffle_tokens=600), Step(decode_seqs=1, decode_context=90),
             Step(decode_seqs=3, decode_context=300, reshuffle_tokens=300)]
    # Two modes whose caches differ in bytes per token: the fit pools them, copies in bytes.
    raw["modes"]["fp32"] = dict(raw["modes"]["fp16"], dtype="fp32", kv_bytes_per_token=2000)
    for name, mode in raw["modes"].items():
        kv, run = mode["kv_bytes_per_token"], steps[:4] if name == "fp16" else steps[1:]
        overhead = [truth.step_s + (s.prefill_seqs + s.decode_seqs) * truth.row_s
                    + s.reshuffle_tokens * kv * truth.copy_s_per_byte for s in run]
        mode["flood"] = flood_section(run, [0.01] * 4, overhead)
    fit = EngineOverhead.fit(parse(raw, "synthetic"))
    for got, want in zip((fit.step_s, fit.row_s, fit.copy_s_per_byte), (truth.step_s, truth.row_s, truth.copy_s_per_byte)):
        assert got == pytest.approx(want, rel=1e-6)


def test_wake_penalty_interpolates_between_measured_gaps():
    mode = parse(synthetic_profile(wake=((0.001, 0.01, 0.1), (0.0005, 0.002, 0.003))), "synthetic").modes["fp16"]
    cm = CostModel(mode)
    assert cm.wake_time(0.0) == 0.0  # a pass straight after another
    assert cm.wake_time(0.0005) == pytest.approx(0.00025)  # from nothing at no gap to the first measured
    assert cm.wake_time(0.0055) == pytest.approx(0.00125)
    assert cm.wake_time(0.1) == cm.wake_time(60.0) == cm.wake_time(float("inf")) == 0.003


def test_extrapolation_follows_the_physical_shape_and_stays_positive():
    # A surface that is exactly of the regression's shape is recovered beyond the grid.
    prefill = lambda b, p: 0.002 + 1e-4 * b + 2e-6 * b * p + 1e-10 * b * p * p  # noqa: E731
    decode = lambda b, c: 0.004 + 3e-5 * b + 1e-8 * b * c  # noqa: E731
    mode = parse(synthetic_profile(prefill=prefill, decode=decode), "synthetic").modes["fp16"]
    cm = CostModel(mode)
    for b, p in ((128, 8192), (1, 3), (500, 256)):  # x on a knot: no interpolation error
        assert cm.forward_time(Step(prefill_seqs=b, prefill_len=p)) == pytest.approx(prefill(b, p), rel=1e-3)
    for b, c in ((512, 32768), (300, 10)):
        assert cm.forward_time(Step(decode_seqs=b, decode_context=b * c)) == pytest.approx(decode(b, c), rel=1e-3)
    assert held_out_error(mode.decode, quadratic=False).max < 1e-3


def test_missing_points_carry_their_columns_largest_measured_batch_along_the_regression():
    # The longest column runs 2x what the shape says (a kernel's cliff, say): a point that was not
    # measured there (over the token cap, or out of memory) keeps that, where the fitted shape alone,
    # pulled towards the other columns, would not.
    from calibration.cost_model import Surface

    shape = lambda b, x: 0.1 + 0.01 * b + 0.001 * b * x  # noqa: E731
    batch, x = np.array([1.0, 2.0, 4.0]), np.array([10.0, 20.0, 40.0])
    seconds = np.array([[shape(b, v) * (2.0 if v == 40 else 1.0) for v in x] for b in batch])
    seconds[2, 2] = np.nan
    s = Surface(Grid(batch, x, seconds), quadratic=False)
    assert np.isfinite(s.table).all()
    assert s.at(4, 40.0) / s.at(2, 40.0) == pytest.approx(s.regression(4, 40.0) / s.regression(2, 40.0))
    assert s.at(4, 40.0) == pytest.approx(2.0 * shape(4, 40.0), rel=0.1)
    assert s.regression(4, 40.0) < 1.6 * shape(4, 40.0)


def test_mixed_step_pays_the_fixed_overhead_once():
    mode = parse(synthetic_profile(prefill=lambda b, p: 0.01 + 1e-5 * b * p, decode=lambda b, c: 0.005),
                 "synthetic").modes["fp16"]
    cm = CostModel(mode)
    decode = cm.forward_time(Step(decode_seqs=4, decode_context=400))
    mixed = cm.forward_time(Step(prefill_seqs=1, prefill_len=100, decode_seqs=4, decode_context=400))
    assert decode < mixed < decode + cm.forward_time(Step(prefill_seqs=1, prefill_len=100))


def test_slowdown_interpolates_measured_concurrency():
    mode = parse(synthetic_profile(concurrency={1: 0.01, 2: 0.03, 4: 0.08}), "synthetic").modes["fp16"]
    cm = CostModel(mode)
    assert cm.slowdown(1) == 1.0
    assert cm.slowdown(2) == pytest.approx(3.0)
    assert cm.slowdown(3) == pytest.approx(5.5)
    assert cm.slowdown(8) == pytest.approx(16.0)  # beyond the grid: proportional time-slicing


def test_forward_passes_are_priced_at_the_grids_speed_and_the_floods_set_the_engine_overhead():
    """However slowly the floods' passes ran, the model's passes cost what the grid says: a serving
    factor from the floods carried their own shape on this CPU (calibration/validation/NOTES.md,
    "The serving factor, dropped"). What the floods' steps spent outside the model is the overhead."""
    from sim.errors import InputError

    raw = synthetic_profile(prefill=lambda b, p: 0.01 + 1e-5 * b * p, decode=lambda b, c: 0.002 + 1e-6 * b * c)
    steps = [Step(prefill_seqs=1, prefill_len=100), Step(decode_seqs=4, decode_context=400),
             Step(prefill_seqs=3, prefill_len=64), Step(decode_seqs=8, decode_context=2000)]
    bare = CostModel(parse(raw, "synthetic").modes["fp16"])
    raw["modes"]["fp16"]["flood"] = flood_section(steps, [bare.forward_time(s) * 1.2 for s in steps], [3e-4] * 4)
    profile = parse(raw, "synthetic")
    cm = CostModel.of(profile, profile.modes["fp16"])
    for s in steps + [Step(prefill_seqs=2, prefill_len=50, decode_seqs=3, decode_context=300)]:
        assert cm.forward_time(s) == pytest.approx(bare.forward_time(s))
        assert cm.overhead_time(s) == pytest.approx(3e-4)
    assert bare.overhead_time(steps[0]) == 0.0  # no flood measured: no overhead priced

    raw["modes"]["fp16"]["flood"]["decode_seqs"].pop()
    with pytest.raises(InputError, match=r"modes\.fp16\.flood\.decode_seqs: expected 4 values"):
        parse(raw, "synthetic")


def test_decodes_after_a_prefill_pay_the_excess_measured_for_its_tokens_rows_and_place():
    raw = synthetic_profile(decode=lambda b, c: 0.002 + 1e-6 * b * c,
                            after_prefill=((4, 16), (100, 1000), (((0.5, 0.2, 0.1), (1.0, 0.4, 0.2)),
                                                                  ((0.1, 0.0, 0.0), (0.2, 0.1, 0.0)))))
    cm = CostModel(parse(raw, "synthetic").modes["fp16"])
    bare = CostModel(parse(synthetic_profile(decode=lambda b, c: 0.002 + 1e-6 * b * c), "synthetic").modes["fp16"])
    assert bare.after_prefill_time(1000, 0, 4, 1000, 5) == 0.0  # a profile measured before the excess
    d = [cm.decode.at(4, 250 + j) for j in range(5)]  # 4 rows over 1,000 cached tokens, one more each step
    assert cm.after_prefill_time(100, 0, 4, 1000, 1) == pytest.approx(0.5 * d[0])
    assert cm.after_prefill_time(550, 0, 4, 1000, 1) == pytest.approx(0.75 * d[0])  # between the sizes
    assert cm.after_prefill_time(50, 0, 4, 1000, 1) == pytest.approx(0.25 * d[0])  # none after no prefill
    assert cm.after_prefill_time(8000, 0, 4, 1000, 1) == pytest.approx(1.0 * d[0])  # the largest's figure
    assert cm.after_prefill_time(0, 0, 4, 1000, 1) == 0.0
    # A run of 5 decodes starting at the second after a prefill: the 2nd and 3rd pay, the rest run bare.
    assert cm.after_prefill_time(1000, 1, 4, 1000, 5) == pytest.approx(0.4 * d[0] + 0.2 * d[1])
    assert cm.after_prefill_time(1000, 3, 4, 1000, 5) == 0.0
    # By rows: linear between the measured counts, the nearest one's figure beyond them.
    for seqs, fraction in ((10, 0.6), (16, 0.2), (32, 0.2), (1, 1.0)):
        assert cm.after_prefill_time(1000, 0, seqs, 250 * seqs, 1) == pytest.approx(fraction * cm.decode.at(seqs, 250))


@pytest.mark.parametrize("rows,tokens,excess,message", [
    ((4,), (100, 1000), (((0.5, 0.2), (0.4,)),), r"after_prefill\.excess: table 0 row 1 must be fractions >= 0"),
    ((4,), (100,), (((0.5, -0.2),),), r"after_prefill\.excess: table 0 row 0 must be fractions >= 0"),
    ((4,), (100, 1000), (((0.5, 0.2),),), r"after_prefill\.excess: table 0 must have 2 rows"),
    ((4, 16), (100,), (((0.5,),),), r"after_prefill\.excess: expected 2 tables \(one per row count\)"),
    ((4,), (1000, 100), (((0.5,), (0.4,)),), r"after_prefill\.tokens: must be strictly ascending"),
    ((16, 4), (100,), (((0.5,),), ((0.4,),)), r"after_prefill\.rows: must be strictly ascending"),
    ((2.5,), (100,), (((0.5,),),), r"after_prefill\.rows\[0\]: expected a whole number, got 2\.5"),
])
def test_a_malformed_after_prefill_section_is_named(rows, tokens, excess, message):
    from sim.errors import InputError

    with pytest.raises(InputError, match=r"synthetic: modes\.fp16\." + message):
        parse(synthetic_profile(after_prefill=(rows, tokens, excess)), "synthetic")


def test_nnls_meets_the_optimality_conditions_and_prefers_fewer_features():
    """The KKT conditions are the oracle: at the optimum the residual's gradient is zero on every
    feature given weight and non-negative on every feature held at zero."""
    from calibration.nnls import nnls

    rng = np.random.default_rng(1)
    clamped = 0
    for _ in range(300):
        n = int(rng.integers(2, 6))
        a = rng.random((int(rng.integers(n, 40)), n))
        y = a @ rng.normal(size=n) + 0.1 * rng.normal(size=len(a))
        x = nnls(a, y)
        gradient = a.T @ (a @ x - y)
        tol = 1e-9 * np.abs(a).sum() * np.abs(y).sum()
        assert (x >= 0).all()
        assert np.all(np.abs(gradient[x > 0]) <= tol) and np.all(gradient[x == 0] >= -tol)
        clamped += (x == 0).any()
    assert clamped > 50  # the constraint was active in many of them
    # Two identical features fit as well singly as together: the first alone takes the weight.
    a = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    assert nnls(a, a[:, 0] * 2).tolist() == pytest.approx([2.0, 0.0])
