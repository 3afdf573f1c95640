"""Configurations that reduce to textbook queues must match the closed-form answers."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.profile import load as load_profile
from conftest import base_scenario
from helpers import run_scenario
from sim import scenario as scenario_mod, workload
from sim.simulator import saturation_rps


def one_at_a_time(profile, rate, n, output_tokens):
    s = base_scenario(profile, batching={"policy": "dynamic", "max_batch_size": 1, "max_wait_ms": 0})
    s["workload"] = {"num_requests": n, "arrivals": {"kind": "poisson", "rate": rate},
                     "prompt_tokens": {"kind": "fixed", "value": 64}, "output_tokens": output_tokens}
    return s


def test_md1_mean_wait_matches_pollaczek_khinchine(write_profile, write_scenario):
    # Batch size 1, one output token: every request is one prefill pass of S seconds -> M/D/1.
    service, rate = 0.1, 5.0  # utilisation 0.5
    profile = write_profile(prefill=lambda b, p: service)
    _, frame, _ = run_scenario(write_scenario(one_at_a_time(profile, rate, 40_000, {"kind": "fixed", "value": 1})))
    rho = rate * service
    expected_wait = rate * service**2 / (2 * (1 - rho))  # P-K with E[S^2] = S^2
    assert frame["queue_s"].mean() == pytest.approx(expected_wait, rel=0.05)
    assert frame["e2e_s"].mean() == pytest.approx(expected_wait + service, rel=0.03)


def test_mg1_mean_wait_with_variable_output_lengths(write_profile, write_scenario):
    # Service = prefill + (D - 1) decode steps with D uniform on 1..40: M/G/1, still closed form.
    prefill, step, rate = 0.02, 0.004, 6.0
    profile = write_profile(prefill=lambda b, p: prefill, decode=lambda b, c: step)
    scenario = one_at_a_time(profile, rate, 40_000, {"kind": "uniform", "low": 1, "high": 40})
    _, frame, _ = run_scenario(write_scenario(scenario))
    d = np.arange(1, 41)
    s = prefill + (d - 1) * step
    es, es2 = s.mean(), (s**2).mean()
    expected_wait = rate * es2 / (2 * (1 - rate * es))
    assert frame["queue_s"].mean() == pytest.approx(expected_wait, rel=0.06)


def test_littles_law_holds_for_continuous_batching(write_profile, write_scenario):
    profile = write_profile(prefill=lambda b, p: 0.002 + 1e-5 * b * p, decode=lambda b, c: 0.005 + 1e-4 * b)
    s = base_scenario(profile)
    s["workload"]["num_requests"] = 6000
    s["workload"]["arrivals"] = {"kind": "poisson", "rate": 20.0}
    s["output"] = {"sample_interval_s": 0.05}
    run, frame, summary = run_scenario(write_scenario(s))
    # L = lambda * W: time-average number in the system vs arrival rate times mean time in it.
    samples = run.samples
    in_system = np.array(samples["queued"]) + np.array(samples["running"])
    t = np.array(samples["time_s"])
    horizon = t < frame["arrived_at"].max()
    lam = len(frame) / frame["arrived_at"].max()
    assert in_system[horizon].mean() == pytest.approx(lam * frame["e2e_s"].mean(), rel=0.05)


def test_saturation_is_the_sum_of_the_replicas_rates_however_the_flood_is_shared(write_profile, write_scenario):
    # Each request is one 0.1 s pass, so each of 2 replicas serves 10 req/s: 20 in all. Round-robin
    # gives 3 flooded requests out 2 and 1; all three over the last finish (0.2 s) would say 15.
    profile = write_profile(prefill=lambda b, p: 0.1)
    s = one_at_a_time(profile, 1.0, 3, {"kind": "fixed", "value": 1})
    s["deployment"] |= {"replicas": 2, "router": "round-robin"}
    scenario = scenario_mod.load(write_scenario(s))
    trace = workload.generate(scenario.workload, scenario.seed)
    assert saturation_rps(scenario, load_profile(profile), trace) == pytest.approx(20)


@pytest.mark.parametrize("jump", [True, False])
def test_the_first_decodes_after_a_prefill_pay_the_profiles_excess(write_profile, write_scenario, jump):
    # Requests far apart, one at a time, prompts of 64 tokens, 5 output tokens: a prefill, then 4
    # decodes, of which the first three ran 50%, 25% and 10% slower after a 64-token prefill at
    # one row (eight rows paid less).
    prefill, step = 0.02, 0.004
    profile = write_profile(prefill=lambda b, p: prefill, decode=lambda b, c: step,
                            after_prefill=((1, 8), (64, 256), (((0.5, 0.25, 0.1), (0.9, 0.5, 0.2)),
                                                               ((0.1, 0.0, 0.0), (0.2, 0.1, 0.0)))))
    s = one_at_a_time(profile, 0.01, 20, {"kind": "fixed", "value": 5})
    _, frame, _ = run_scenario(write_scenario(s), jump=jump)
    assert frame["e2e_s"].to_numpy() == pytest.approx(prefill + step * (1.5 + 1.25 + 1.1 + 1.0), rel=1e-9)



def routed(write_profile, write_scenario, router: str, rate: float, output_tokens: dict, prefill: float,
           step: float = 0.001):
    """Requests of one prefill pass and output_tokens - 1 decode steps, Poisson at `rate`, one at a time
    on each of 4 replicas, routed by `router`: their mean wait and each replica's share."""
    profile = write_profile(prefill=lambda b, p: prefill, decode=lambda b, c: step)
    s = one_at_a_time(profile, rate, 40_000, output_tokens)
    s["deployment"] |= {"replicas": 4, "router": router}
    _, frame, _ = run_scenario(write_scenario(s))
    return frame["queue_s"].mean(), frame["replica"].value_counts(normalize=True).to_numpy()


def test_random_routing_splits_poisson_arrivals_into_independent_md1_queues(write_profile, write_scenario):
    # A Poisson stream split at random is 4 Poisson streams of a quarter the rate: 4 M/D/1 queues.
    wait, share = routed(write_profile, write_scenario, "random", 20.0, {"kind": "fixed", "value": 1}, 0.1)
    lam, service = 20.0 / 4, 0.1
    assert wait == pytest.approx(lam * service**2 / (2 * (1 - lam * service)), rel=0.06)  # 0.05 s
    assert share == pytest.approx([0.25] * 4, abs=0.01)


def test_joining_the_shortest_queue_waits_less_than_round_robin_which_waits_less_than_random(
        write_profile, write_scenario):
    # At 80% load with variable service (1-40 output tokens), random routing is 4 M/G/1 queues;
    # round-robin evens the gaps each replica sees (Erlang-4 arrivals), and least-outstanding also
    # sees the queues, which with variable service is better still (here 0.25, 0.076 and 0.057 s).
    # With fixed service times round-robin alone is near the best, and beats least-outstanding,
    # which sends a request to the lowest-numbered of the replicas holding one, however far along
    # (0.038 against 0.046 s). A router that ignored its rule would break the order.
    prefill, step, lengths = 0.02, 0.004, {"kind": "uniform", "low": 1, "high": 40}
    s = prefill + (np.arange(1, 41) - 1) * step
    rate = float(4 * 0.8 / s.mean())
    waits = {router: routed(write_profile, write_scenario, router, rate, lengths, prefill, step)
             for router in ("random", "round-robin", "least-outstanding")}
    lam = rate / 4
    assert waits["random"][0] == pytest.approx(lam * (s**2).mean() / (2 * (1 - lam * s.mean())), rel=0.1)
    assert waits["least-outstanding"][0] < 0.9 * waits["round-robin"][0]
    assert waits["round-robin"][0] < 0.5 * waits["random"][0]
    assert waits["round-robin"][1] == pytest.approx([0.25] * 4, abs=1e-4)
