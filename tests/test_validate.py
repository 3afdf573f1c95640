"""Live validation on the CPU: the simulator's prediction against the real model, honestly bounded."""

from __future__ import annotations

import json

import pytest

from sim.simulator import REJECT_REASONS

# The CPU of a shared 2-core VM: two identical live runs differ by up to ~25% at times, and the
# README's full matrix shows errors of that order. The bounds are set to what was measured, not to
# a hope. At run speed (the device's speed during the runs taken out) the simulator's own error is
# left: 35%. The raw prediction also carries how far the device drifted between the grid sweeps
# and the runs (the matrix's device-speed factor: 0.91-1.29), and one CI run of this test missed
# 35% with E2E p50 38% off while its two live runs were 20% apart: 50%. A cost model or engine
# that is broken misses both by far.
BOUNDS = {"comparison": 0.5, "comparison_at_run_speed": 0.35}
# A validation of a few requests over a small grid to sweep: how loads follow each other, in seconds.
SMALL = ["--set", "workload.prompt_tokens={kind: uniform, low: 8, high: 16}",
         "--set", "deployment.batching={policy: continuous, max_num_seqs: 2, max_batched_tokens: 64}"]


def test_small_cpu_validation_is_within_an_honest_bound(validation_run):
    result = json.loads((validation_run / "validation.json").read_text())
    (case,) = result["cases"]
    assert case["requests"] == 40 and len(case["live"]) == 2 and case["rejected"] == {}
    for which, bound in BOUNDS.items():
        for key in ("ttft_s.p50", "e2e_s.p50", "throughput_rps"):
            assert abs(case[which][key]["error"]) <= bound, (which, key, case[which][key])
    # The load asked for is of the saturation priced just before the runs; the load they met, of
    # the saturation the sweeps around them price, differs by the device's drift in between.
    assert case["offered_rps"] == pytest.approx(0.5 * case["saturation_rps"], rel=0.02)
    assert 0.3 < case["realized_load"] < 0.8
    assert 0.5 < case["device_speed"] < 2  # the live runs' forward passes, over the profile's price for them
    (low, high) = sorted(case["device_speed_per_run"])  # the same, run by run: the pooled figure lies between
    assert low <= case["device_speed"] <= high
    # Each sweep the profile pools (before, between and after the runs), against the pool.
    assert len(case["sweep_levels"]) == 3 and all(0.5 < v < 2 for v in case["sweep_levels"])
    # And kind of pass by kind of pass: every step in one group, the groups adding up to the whole.
    groups = case["device_speed_by_pass"]
    assert {g["pass"] for g in groups} == {"prefill", "decode"}
    assert len({(g["pass"], g["rows"]) for g in groups}) == len(groups)
    live, priced = (sum(g["steps"] * g[k] for g in groups) for k in ("live_ms", "priced_ms"))
    assert live / priced == pytest.approx(case["device_speed"])
    # At run speed prices prefill and decode passes each at the runs' own speed for that kind: the
    # two figures bracket the overall one, and the simulation at run speed was priced by them.
    kinds = case["device_speed_by_kind"]
    assert min(kinds.values()) <= case["device_speed"] <= max(kinds.values())
    for kind in ("prefill", "decode"):
        of_kind = [g for g in groups if g["pass"] == kind]
        live, priced = (sum(g["steps"] * g[k] for g in of_kind) for k in ("live_ms", "priced_ms"))
        assert live / priced == pytest.approx(kinds[kind])
    # The engine overhead priced (fitted from the sweeps' floods) for the runs' steps is what they paid.
    overhead = case["engine_overhead_s"]
    assert 0.5 < overhead["profile"] / min(overhead["live"]) and overhead["profile"] / max(overhead["live"]) < 2
    profile = json.loads((validation_run / "profile-50.json").read_text())
    assert profile["modes"]["fp32"]["decode"]["repeats"][0][0] >= 6  # swept before, between, after


def test_validation_keeps_every_request_and_every_live_step(validation_run):
    """requests.csv: one row per request of each live run and each simulation; steps.csv: one row
    per live step beside its price, adding up to the figures validation.json reports."""
    import pandas as pd

    (case,) = json.loads((validation_run / "validation.json").read_text())["cases"]
    requests = pd.read_csv(validation_run / "requests.csv")
    runs = ["live 1", "live 2", "simulated", "at run speed", "scenario's profile"]
    assert list(requests.run.unique()) == runs and (requests.load == "50%").all()
    assert (requests.groupby("run").size() == 40).all()
    for k, stats in enumerate(case["live"], 1):  # the same requests the live figures were read from
        live = requests[requests.run == f"live {k}"]
        assert live.ttft_s.median() == pytest.approx(stats["ttft_s"]["p50"])
    steps = pd.read_csv(validation_run / "steps.csv")
    assert list(steps.run.unique()) == ["live 1", "live 2"]
    for _, run in steps.groupby("run"):
        assert run.started_s.is_monotonic_increasing and (run.step.diff().dropna() == 1).all()
        assert ((run.prefill_seqs > 0) != (run.decode_seqs > 0)).all()  # no chunked prefill: one kind a step
    assert (steps.priced_forward_s > 0).all() and (steps.overhead_s > 0).all()
    assert steps.forward_s.sum() / steps.priced_forward_s.sum() == pytest.approx(case["device_speed"])
    assert steps.priced_overhead_s.mean() == pytest.approx(case["engine_overhead_s"]["profile"])


def test_at_run_speed_prices_prefill_and_decode_each_at_its_own_speed():
    from calibration.cost_model import CostModel
    from calibration.profile import parse
    from calibration.validate import scaled
    from conftest import ROOT

    raw = json.loads((ROOT / "calibration/profiles/cpu-gpt2-tiny.json").read_text())
    base, runs = parse(raw, "shipped"), parse(scaled(raw, "fp32", {"prefill": 1.5, "decode": 0.8}), "at run speed")
    before, after = (CostModel.of(p, p.modes["fp32"]) for p in (base, runs))
    for b, x in ((1, 100), (4, 300), (16, 1000)):
        assert after.prefill.at(b, x) == pytest.approx(1.5 * before.prefill.at(b, x))
        assert after.decode.at(b, x) == pytest.approx(0.8 * before.decode.at(b, x))
    # The engine's time outside the model is not the device's speed, and stays.
    assert after.overhead == before.overhead


@pytest.mark.parametrize("args,message", [
    (["scenarios/bursty.yaml"], "autoscaler: validate runs a fixed deployment"),
    # the fix that message suggests passes that check, and meets the next
    (["scenarios/bursty.yaml", "--set", "autoscaler={policy: off}", "--set", "deployment.batching.max_batched_tokens=8",
      "--set", "deployment.batching.max_num_seqs=8"],
     "deployment: it rejects every request of the workload"),
    # prompts of 32 tokens or more over a token budget of 8: no request can run
    (["scenarios/validation/steady.yaml", "--set", "deployment.batching.max_batched_tokens=8",
      "--set", "deployment.batching.max_num_seqs=8"],
     "deployment: it rejects every request of the workload"),
])
def test_validate_refuses_what_the_live_engine_cannot_run(tmp_path, args, message):
    import subprocess
    import sys

    from conftest import ROOT

    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, "-m", "calibration.validate", *args, "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "o").exists()


def test_the_swept_grid_holds_no_more_rows_than_there_are_requests():
    """vLLM's default of 256 sequences had a validation of 8 requests time 256-row passes."""
    from calibration.validate import scenario_grid
    from conftest import ROOT
    from sim import scenario as scenario_mod, workload

    scenario = scenario_mod.load(ROOT / "scenarios/validation/steady.yaml",
                                 ["deployment.batching={policy: continuous}", "workload.num_requests=8"])
    assert scenario.deployment.batching.max_num_seqs == 256
    grid = scenario_grid(scenario, workload.generate(scenario.workload, scenario.seed))
    assert max(grid.prefill_batch) == max(grid.decode_batch) == 8


def test_loads_that_share_a_label_or_round_to_none_are_refused():
    """Two loads of one whole percent would share their rows, report lines and profile-30.json."""
    from calibration.validate import parse_loads
    from sim.errors import InputError

    assert parse_loads("0.3,0.6") == [0.3, 0.6]
    with pytest.raises(InputError, match="30% is given twice"):
        parse_loads("0.3,0.301")
    with pytest.raises(InputError, match="from 0.01 to 2"):  # labelled 0%, its runs waited for ever
        parse_loads("1e-9")


@pytest.fixture(scope="module")
def engine():
    """A live engine on gpt2-tiny; every run_live starts it from an empty batch."""
    torch = pytest.importorskip("torch")
    from profiler.live_engine import LiveEngine
    from profiler.measure import DTYPES
    from profiler.models import MODELS, build

    return LiveEngine(build(MODELS["gpt2-tiny"], DTYPES["fp32"], torch.device("cpu")), torch.device("cpu"))


def test_live_engine_runs_every_policy_and_forces_output_lengths(engine):
    import numpy as np

    from profiler.live_engine import run_live
    from sim.scheduler import ContinuousScheduler, PaddedBatchScheduler
    from sim.workload import Trace

    trace = Trace(np.linspace(0, 0.05, 6), np.array([5, 9, 3, 12, 7, 4]), np.array([3, 1, 6, 2, 5, 4]))
    for scheduler in (ContinuousScheduler(4, 64, 10_000, padded=True), PaddedBatchScheduler(3, 10_000, 0.01),
                      PaddedBatchScheduler(3, 10_000, None)):
        out = run_live(engine, scheduler, trace).outcome
        assert np.isfinite(out.finished_at).all()
        assert (out.first_token_at >= out.scheduled_at).all() and (out.finished_at >= out.first_token_at).all()
        assert engine.batch is None  # every row left the cache


def test_a_live_run_whose_last_arrival_is_turned_away_ends(engine):
    # It stopped on "scheduler idle with requests outstanding" when the last request was rejected.
    import numpy as np

    from profiler.live_engine import run_live
    from sim.scheduler import ContinuousScheduler
    from sim.workload import Trace

    out = run_live(engine, ContinuousScheduler(4, 64, 100, padded=True),  # 100 tokens of KV cache
                   Trace(np.array([0.0, 0.05]), np.array([8, 200]), np.array([3, 3]))).outcome
    assert np.isfinite(out.finished_at[0]) and out.rejected.tolist() == [0, REJECT_REASONS.index("kv_cache_too_small")]


def test_the_live_engine_warms_up_and_floods_within_a_short_context_window():
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, GPT2Config

    from profiler.live_engine import LiveEngine, calibration_flood
    from profiler.models import MIN_WINDOW

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                                        n_positions=MIN_WINDOW)).eval()
    engine = LiveEngine(model, torch.device("cpu"))
    engine.warm_up()  # it prefilled 128 tokens: "index out of range"
    run = calibration_flood(engine)  # its prompts ran to 127 tokens: the same
    assert not run.outcome.rejected.any() and all(t < float("inf") for t in run.outcome.finished_at)


def test_a_live_step_is_idle_only_after_the_engine_waited_for_work(engine):
    """The wake penalty prices a device that sat idle; the host's own work between steps run
    straight on is the engine overhead, as the simulator prices it, so those steps have no gap."""
    import numpy as np

    from profiler.live_engine import run_live
    from sim.scheduler import ContinuousScheduler
    from sim.workload import Trace

    # Two requests of a prefill and two decodes each; the second arrives long after the first ends.
    run = run_live(engine, ContinuousScheduler(4, 64, 10_000, padded=True),
                   Trace(np.array([0.0, 0.5]), np.array([8, 8]), np.array([3, 3])))
    assert [s.prefill_seqs for s in run.steps] == [1, 0, 0, 1, 0, 0]
    assert run.idle_s[0] == np.inf and run.idle_s[3] > 0  # the engine waited before each prefill
    assert (run.idle_s[[1, 2, 4, 5]] == 0).all()


def test_the_table_says_how_many_requests_were_turned_away():
    from calibration.compare import table
    from conftest import ROOT

    result = json.loads((ROOT / "calibration/validation/cpu-gpt2-tiny/steady-continuous/validation.json").read_text())
    assert "turned away" not in table(result)  # a validation with none (or written before they were counted)
    result["cases"][0]["rejected"] = {"exceeds_context_window": 3, "kv_cache_too_small": 1}
    assert (f"{result['cases'][0]['load']:<9}turned away 4 of 120 requests, live and simulated "
            "(exceeds_context_window 3, kv_cache_too_small 1): the figures are of the rest") in table(result)


def test_summary_counts_the_targeted_figures_within_ten_percent():
    from calibration.compare import NOISE_LABEL, TARGETED, summary

    def case(errors, runs=(1.0, 1.0)):  # one error for every targeted figure, the rest ignored
        figures = {key: {"error": e, "live": list(runs)} for key, e in zip(TARGETED, errors)}
        figures["tpot_s.p50"] = {"error": 0.9, "live": [1.0, 2.0]}
        return {"comparison": figures, "comparison_at_run_speed": {k: {"error": 0.0} for k in figures}}

    prediction, at_speed, noise = summary([case([0.05, -0.10, 0.101, -0.3]), case([0.0, 0.02, -0.04, 0.5])])
    assert prediction == "prediction: TTFT/E2E p50/p90 within 10%: 5 of 8; median |error| 8%, max 50%"
    assert at_speed == "at run speed: TTFT/E2E p50/p90 within 10%: 8 of 8; median |error| 0%, max 0%"
    assert noise == f"{NOISE_LABEL}: TTFT/E2E p50/p90 within 10%: 8 of 8; median |error| 0%, max 0%"
    # Runs 1.0 and 1.25 apart: a perfect simulation's error is drawn as half their difference, 11%.
    assert summary([case([0.0] * 4, runs=(1.0, 1.25))])[2].endswith("0 of 4; median |error| 11%, max 11%")
    # validate's own cases also price the scenario's profile as measured; transformers' engine has none.
    shipped = {key: {"error": 0.2} for key in TARGETED}
    lines = summary([case([0.0] * 4) | {"comparison_shipped": shipped}])
    assert lines[2] == "scenario's profile: TTFT/E2E p50/p90 within 10%: 0 of 4; median |error| 20%, max 20%"
    # One live run has no spread to draw from.
    assert len(summary([case([0.0] * 4, runs=(1.0,))])) == 2


@pytest.mark.parametrize("runs", [2, 3, 5])
def test_the_noise_error_is_drawn_as_a_perfect_simulations_error_against_the_mean_of_the_runs(runs):
    """Runs scattered around the figure a perfect simulation predicts: its error against their
    mean and the noise error drawn from the runs alone land within 10% equally often."""
    import numpy as np

    from calibration.compare import noise_error

    rng = np.random.default_rng(7)
    lives = 1.0 + 0.12 * rng.standard_normal((20_000, runs))
    perfect = np.abs(1.0 / lives.mean(axis=1) - 1.0) <= 0.10
    drawn = np.abs([noise_error(list(row)) for row in lives]) <= 0.10
    assert abs(perfect.mean() - drawn.mean()) < 0.015
    assert 0.6 < drawn.mean() < 0.99  # a spread that makes the count informative


def test_a_validation_cut_short_keeps_the_loads_it_finished(tmp_path, monkeypatch):
    """A lent GPU's call limit ended two validations in their last load and kept nothing: each
    finished load is written as it ends."""
    pytest.importorskip("torch")
    import profiler.live_engine
    from calibration.validate import main
    from conftest import ROOT

    real, runs = profiler.live_engine.run_live, []

    def run_live(engine, scheduler, trace):
        if len(trace) == 6:  # a load's run (the sweeps' calibration floods run 8 requests)
            runs.append(trace)
            if len(runs) > 1:  # the second load's: the terminal closes
                raise KeyboardInterrupt
        return real(engine, scheduler, trace)

    monkeypatch.setattr(profiler.live_engine, "run_live", run_live)
    out = tmp_path / "out"
    code = main([str(ROOT / "scenarios/validation/steady.yaml"), "--requests", "6", "--loads", "0.5,0.9", "--runs", "1",
                 *SMALL, "--out", str(out), "--quiet"])
    assert code == 130
    result = json.loads((out / "validation.json").read_text())
    assert [case["load"] for case in result["cases"]] == ["50%"]
    assert (out / "profile-50.json").exists() and (out / "report.html").exists()


def test_a_later_load_is_asked_of_its_own_sweep_and_the_sweeps_around_the_load_before(tmp_path, monkeypatch):
    """One sweep prices the saturation to a few percent; from the second load on, the rate asked
    is of the geometric mean of the sweep just before the load's runs and the sweeps pooled
    around the previous load's runs (the saturation that load reports having met)."""
    pytest.importorskip("torch")
    import sim.simulator
    from calibration.validate import main
    from conftest import ROOT

    priced = iter([10.0, 20.0, 40.0, 50.0])  # load 1: before, around its runs; load 2: the same
    monkeypatch.setattr(sim.simulator, "saturation_rps", lambda *args, **kwargs: next(priced))
    out = tmp_path / "out"
    assert main([str(ROOT / "scenarios/validation/steady.yaml"), "--requests", "6", "--loads", "0.5,0.9",
                 "--runs", "1", *SMALL, "--out", str(out), "--quiet"]) == 0
    first, second = json.loads((out / "validation.json").read_text())["cases"]
    assert first["saturation_rps"] == 10.0 and first["offered_rps"] == pytest.approx(5.0)
    assert first["realized_load"] == pytest.approx(5.0 / 20.0)
    assert second["saturation_rps"] == pytest.approx((40.0 * 20.0) ** 0.5)
    assert second["offered_rps"] == pytest.approx(0.9 * (40.0 * 20.0) ** 0.5)
    assert second["realized_load"] == pytest.approx(second["offered_rps"] / 50.0)
