"""Request streams: what arrival processes and prompt popularity draw, against what they promise."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import base_scenario
from sim import scenario as scenario_mod, workload
from sim.errors import InputError
from sim.scenario import Arrivals


def test_a_bursty_flood_state_draws_only_the_arrivals_still_needed_at_its_rate():
    """A state expecting more arrivals than numpy draws at once (rate x length above 9e18) stopped
    on "lam value too large"; above a million, sorting them all took seconds and gigabytes."""
    spec = Arrivals("bursty", {"rates": [1e6, 1e12], "mean_durations_s": [1e-3, 1e9]})
    times = workload.arrival_times(spec, np.random.default_rng(0), 200_000, None)
    assert len(times) == 200_000 and (np.diff(times) >= 0).all()
    flood = np.diff(times)[np.diff(times) < 1e-9]  # the second state's gaps (the first's are ~1 us)
    assert len(flood) > 150_000 and abs(flood.mean() / 1e-12 - 1) < 0.02
    # Bounded by a duration instead, the flood stops there: about rate x duration arrivals.
    spec = Arrivals("bursty", {"rates": [1e7], "mean_durations_s": [1e9]})
    times = workload.arrival_times(spec, np.random.default_rng(0), None, 0.05)
    assert abs(len(times) - 500_000) < 5 * np.sqrt(500_000) and times[-1] < 0.05


def test_an_integer_zipf_exponent_past_int64_makes_one_prompt_all_the_traffic(write_profile, write_scenario):
    """Zipf weights 1 / k^s in integers wrapped int64 at s = 10^9, to NaN probabilities."""
    s = base_scenario(write_profile())
    s["workload"]["prompt_keys"] = {"distinct": 50, "zipf": 10**9}
    scenario = scenario_mod.load(write_scenario(s))
    trace = workload.generate(scenario.workload, scenario.seed)
    assert (trace.prompt_key == 0).all()


@pytest.mark.parametrize("distinct,s", [(1, 1.0), (7, 2.0), (1000, 0.0), (10**5, 1.2), (50, 1e9)])
def test_zipf_keys_are_what_numpys_weighted_choice_draws(distinct, s):
    # Drawn in one array rather than through rng.choice (three arrays, 2.3 GB at 10^8 prompts),
    # the keys, and so every scenario's response-cache hits, are the same as before.
    with np.errstate(over="ignore"):
        weights = 1.0 / np.arange(1, distinct + 1, dtype=float) ** s
    expected = np.random.default_rng(3).choice(distinct, 2000, p=weights / weights.sum())
    assert np.array_equal(workload._zipf_keys(np.random.default_rng(3), distinct, s, 2000), expected)


def test_a_step_schedule_holds_its_final_rate_however_far_below_the_peak():
    """The final rate holds after the schedule. Thinned at the peak, a final rate 1e-9 of it took a
    billion candidates per arrival and never finished; it is drawn from its own gaps."""
    spec = Arrivals("step", {"rates": [100.0, 2.0], "durations_s": [5.0, 5.0]})
    times = workload.arrival_times(spec, np.random.default_rng(0), 2000, None)
    assert len(times) == 2000 and (np.diff(times) >= 0).all()
    first, second, held = (times < 5).sum(), ((times >= 5) & (times < 10)).sum(), times[times >= 10]
    assert abs(first - 500) < 5 * np.sqrt(500) and second < 30
    assert abs((len(held) - 1) / (held[-1] - held[0]) / 2.0 - 1) < 0.1
    spec = Arrivals("ramp", {"start_rate": 100.0, "end_rate": 1e-9, "duration_s": 5.0})
    times = workload.arrival_times(spec, np.random.default_rng(0), 300, None)
    assert len(times) == 300 and times[-1] > 1e6  # past the ramp, the held rate is one a billion seconds


def test_a_step_far_below_the_peak_is_drawn_at_its_own_rate():
    """Thinned at the peak, a billion seconds at 1e-9 req/s between steps at 100 and 5 took a
    hundred billion candidates; each step is now its own Poisson process."""
    spec = Arrivals("step", {"rates": [100.0, 1e-9, 5.0], "durations_s": [1.0, 1e9, 1.0]})
    times = workload.arrival_times(spec, np.random.default_rng(0), 300, None)
    assert len(times) == 300 and (np.diff(times) >= 0).all()
    first, held = (times < 1).sum(), times[times >= 1e9 + 1]
    assert abs(first - 100) < 5 * np.sqrt(100) and len(held) >= 300 - first - 2  # 1e-9 x 1e9 s: about one between
    assert abs((len(held) - 1) / (held[-1] - held[0]) / 5.0 - 1) < 0.2


def test_a_ramp_draws_the_arrivals_its_rate_integrates_to_however_low_it_starts():
    """Thinned at the peak, a ramp from 1e-9 to 1e9 req/s drew a billion candidates before its first
    arrival; it is a unit-rate process mapped through the ramp's expected count."""
    spec = Arrivals("ramp", {"start_rate": 1e-9, "end_rate": 1e9, "duration_s": 1e9})
    assert workload.arrival_times(spec, np.random.default_rng(0), 1, None)[0] < 20  # rate ~t: about sqrt(2 Exp(1))
    # 0 to 100 req/s over 10 s, then 100 req/s held: 125, 375 and 1,000 expected in [0, 5), [5, 10), [10, 20).
    spec = Arrivals("ramp", {"start_rate": 0.0, "end_rate": 100.0, "duration_s": 10.0})
    counts = np.zeros(3)
    for seed in range(50):
        times = workload.arrival_times(spec, np.random.default_rng(seed), None, 20.0)
        assert (np.diff(times) >= 0).all() and times[-1] < 20
        counts += np.histogram(times, [0, 5, 10, 20])[0]
    assert np.allclose(counts / 50, [125, 375, 1000], rtol=5 / np.sqrt(50 * np.array([125, 375, 1000])))


def test_a_trace_replays_from_its_first_arrival_whatever_its_clocks_origin(tmp_path, write_profile,
                                                                           write_scenario):
    # In Unix-epoch seconds, the replicas were billed from t = 0: 472,222 GPU-hours for 3 requests.
    from helpers import run_scenario

    summaries = []
    for origin in (0.0, 1.7e9):
        trace = tmp_path / f"trace-{origin:g}.csv"
        trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                         + "".join(f"{origin + t!r},16,4\n" for t in (0.0, 0.25, 1.0)))
        s = base_scenario(write_profile())
        s["workload"] = {"arrivals": {"kind": "trace", "trace": str(trace)}, "duration_s": 0.5}
        _, frame, summary = run_scenario(write_scenario(s))
        assert frame["arrived_at"].tolist() == [0.0, 0.25]  # duration_s counts from the first arrival too
        summaries.append(summary)
    assert summaries[0] == summaries[1] and summaries[0]["gpu_hours"] < 1


def test_a_trace_reads_each_time_as_its_nearest_double_whatever_pandas_parses(tmp_path):
    # The shipped trace holds arrival times such as 5.8926549999999995, which pandas before 3 read
    # an ulp off (as 5.892655): the same scenario then gave other bytes under another pandas.
    path = tmp_path / "trace.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                    "5.8926549999999995,10,5\n 1e1 ,+7,.5e1\n", encoding="utf-8")
    trace = workload.read_trace(path)
    assert trace.arrived_at.tolist() == [5.8926549999999995, 10.0]
    assert trace.prompt_tokens.tolist() == [10, 7] and trace.output_tokens.tolist() == [5, 5]
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,1_000,5\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 2: column num_prefill_tokens: .* got '1_000'"):
        workload.read_trace(path)
