"""Invariants that every simulation must satisfy, on hand-picked and on generated scenarios."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import base_scenario, flood_section
from helpers import run_scenario
from sim.scheduler import Step
from sim.simulator import MAX_SAMPLES


def check_invariants(run, frame: pd.DataFrame, summary: dict, scenario: dict) -> None:
    served = frame["finished_at"].notna()
    rejected = frame["rejected"] != ""
    # Each request either finishes once or is rejected with a reason - never both, never neither.
    assert (served ^ rejected).all()
    assert frame["request_id"].is_unique
    s = frame[served]
    eps = 1e-9
    assert (s["scheduled_at"] >= s["arrived_at"] - eps).all()
    assert (s["first_token_at"] >= s["scheduled_at"] - eps).all()
    assert (s["finished_at"] >= s["first_token_at"] - eps).all()
    batching = scenario["deployment"]["batching"]
    limit = batching.get("max_num_seqs", 256) if batching["policy"] == "continuous" else batching.get("max_batch_size", 8)
    assert len(run.batch_sizes) <= limit + 1 and run.batch_sizes[0] == 0
    kv_used = np.array(run.samples["kv_used_tokens"], float)
    kv_cap = np.array(run.samples["kv_capacity_tokens"], float)
    assert (kv_used <= kv_cap + 1e-9).all()
    assert summary["served"] + sum(summary["rejected"].values()) == len(frame)


# Steps of a calibration flood whose engine overhead has a fixed, a per-row and a per-copy part, so
# jumps over runs of decode steps are checked against step-by-step pricing of all three, and of
# the first decodes after a prefill.
ENGINE_FLOOD = flood_section(
    [Step(prefill_seqs=4, prefill_len=64), Step(decode_seqs=4, decode_context=300),
     Step(decode_seqs=2, decode_context=160, reshuffle_tokens=160), Step(decode_seqs=1, decode_context=81)],
    [0.004, 0.0021, 0.0021, 0.002], [5e-4, 3.5e-4, 4e-4, 2.8e-4])
AFTER_PREFILL = ((1, 16), (64, 1024), (((0.3, 0.1, 0.05), (0.8, 0.4, 0.1)),  # a run's first decodes cost more
                                       ((0.1, 0.05, 0.0), (0.4, 0.1, 0.05))))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    policy=st.sampled_from(["static", "dynamic", "continuous"]),
    chunked=st.booleans(),
    padded=st.booleans(),
    replicas=st.integers(1, 3),
    rate=st.floats(0.5, 200.0),
    kv_tokens=st.one_of(st.none(), st.integers(600, 20_000)),  # None: a mode with no KV cache
    max_seqs=st.integers(1, 32),
    budget=st.integers(64, 4096),
    router=st.sampled_from(["round-robin", "least-outstanding", "random"]),
    workers_per_gpu=st.integers(1, 3),
    autoscale=st.booleans(),
    prefix=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_scenarios_keep_invariants_and_jumps_change_nothing(
        write_profile, write_scenario, policy, chunked, padded, replicas, rate, kv_tokens, max_seqs, budget, router,
        workers_per_gpu, autoscale, prefix, seed):
    profile = write_profile(prefill=lambda b, p: 0.003 + 2e-6 * b * p,
                            decode=lambda b, c: 0.002 + 1e-4 * b + 1e-8 * b * c, flood=ENGINE_FLOOD,
                            wake=((0.005, 0.05), (0.001, 0.002)), after_prefill=AFTER_PREFILL,
                            kv_bytes_per_token=0 if kv_tokens is None else 1000, concurrency={1: 0.01, 2: 0.014})
    batching = {"policy": policy}
    chunked = chunked and kv_tokens is not None  # chunks attend to the KV of the chunks before
    paged = not (padded and not chunked)
    prefix = prefix and policy == "continuous" and paged and kv_tokens is not None  # it works on KV blocks
    if policy == "continuous":
        batching |= {"max_num_seqs": max_seqs, "max_batched_tokens": budget, "chunked_prefill": chunked,
                     "prefix_caching": prefix, "kv_layout": "paged" if paged else "padded"}
    else:
        batching |= {"max_batch_size": max_seqs}
        if policy == "dynamic":
            batching["max_wait_ms"] = 20
    s = base_scenario(profile, replicas=replicas, router=router, kv_cache_tokens=kv_tokens, batching=batching,
                      workers_per_gpu=workers_per_gpu)
    s["seed"] = seed
    s["workload"]["num_requests"] = 150
    s["workload"]["arrivals"] = {"kind": "poisson", "rate": rate}
    if prefix:
        s["workload"]["shared_prefix"] = {"groups": 2, "tokens": 40}
    if autoscale:  # replicas added and drained mid-run
        s["autoscaler"] = {"policy": "queue-depth", "target_queue_per_replica": 4, "min_replicas": 1,
                           "max_replicas": 3, "interval_s": 0.2, "cooldown_s": 0}
    path = write_scenario(s)
    run, frame, summary = run_scenario(path)
    check_invariants(run, frame, summary, s)
    # Advancing whole runs of decode steps as one event must give exactly the step-by-step answer.
    _, stepwise, _ = run_scenario(path, jump=False)
    cols = ["scheduled_at", "first_token_at", "finished_at", "preemptions", "worker", "rejected"]
    pd.testing.assert_frame_equal(frame[cols], stepwise[cols], check_exact=False, rtol=1e-9, atol=1e-9)


def test_tight_kv_cache_preempts_and_still_finishes_everyone(write_profile, write_scenario):
    profile = write_profile(decode=lambda b, c: 0.001 + 1e-4 * b)
    s = base_scenario(profile, kv_cache_tokens=1200, batching={"policy": "continuous", "max_num_seqs": 64})
    s["workload"] |= {"arrivals": {"kind": "poisson", "rate": 50.0},
                      "prompt_tokens": {"kind": "uniform", "low": 100, "high": 400},
                      "output_tokens": {"kind": "uniform", "low": 100, "high": 300}}
    run, frame, summary = run_scenario(write_scenario(s))
    check_invariants(run, frame, summary, s)
    assert summary["preemptions"] > 0
    assert summary["served"] == len(frame)


@pytest.mark.parametrize("policy", [{"policy": "continuous"}, {"policy": "dynamic"}])
def test_requests_over_the_kv_cache_or_the_context_window_are_rejected_with_a_reason(
        write_profile, write_scenario, policy):
    profile = write_profile(model_config={"n_positions": 500})  # GPT-2's key for its context window
    s = base_scenario(profile, kv_cache_tokens=300, batching=policy)
    s["workload"]["prompt_tokens"] = {"kind": "uniform", "low": 16, "high": 600}
    run, frame, summary = run_scenario(write_scenario(s))
    check_invariants(run, frame, summary, s)
    tokens = frame["prompt_tokens"] + frame["output_tokens"]
    over_window = tokens > 500
    over_cache = ~over_window & (tokens - 1 > 300)
    assert over_window.any() and over_cache.any()
    assert (frame.loc[over_window, "rejected"] == "exceeds_context_window").all()
    assert (frame.loc[over_cache, "rejected"] == "kv_cache_too_small").all()
    assert (frame.loc[~over_window & ~over_cache, "rejected"] == "").all()


def test_a_run_that_serves_nothing_reports_zero_rates_as_strict_json(write_profile, write_scenario):
    s = base_scenario(write_profile(), kv_cache_tokens=10)  # no prompt of 16 tokens or more fits
    run, frame, summary = run_scenario(write_scenario(s))
    check_invariants(run, frame, summary, s)
    assert summary["served"] == 0 and summary["rejected"] == {"kv_cache_too_small": 500}
    assert summary["throughput_rps"] == summary["goodput_rps"] == summary["output_tokens_per_s"] == 0.0
    json.loads(json.dumps(summary), parse_constant=lambda c: pytest.fail(f"summary holds {c}"))


def test_a_batch_limit_far_above_the_requests_counts_passes_up_to_the_requests(write_profile, write_scenario):
    """A limit of 10^9 rows reads as "no limit": it allocated a counter per possible batch size,
    8 GB, or stopped on MemoryError, reported as too many requests."""
    s = base_scenario(write_profile(), batching={"policy": "continuous", "max_num_seqs": 10**9,
                                                 "max_batched_tokens": 10**9})
    s["workload"] |= {"num_requests": 20, "arrivals": {"kind": "poisson", "rate": 1e6}}
    run, frame, summary = run_scenario(write_scenario(s))
    check_invariants(run, frame, summary, s)
    assert len(run.batch_sizes) == 21 and run.batch_sizes[20] > 0  # the flood's one batch of all 20


def test_static_batching_waits_for_full_batches(write_profile, write_scenario):
    profile = write_profile()
    s = base_scenario(profile, batching={"policy": "static", "max_batch_size": 4})
    s["workload"]["num_requests"] = 10  # two full batches, then a partial one at the end
    run, frame, _ = run_scenario(write_scenario(s))
    starts = frame.groupby("scheduled_at").size().tolist()
    assert starts == [4, 4, 2]
    # A batch starts no earlier than its last member's arrival.
    for t, group in frame.groupby("scheduled_at"):
        assert group["arrived_at"].max() <= t


def test_dynamic_batching_flushes_after_max_wait(write_profile, write_scenario):
    profile = write_profile(prefill=lambda b, p: 0.001, decode=lambda b, c: 0.0001)
    s = base_scenario(profile, batching={"policy": "dynamic", "max_batch_size": 64, "max_wait_ms": 200})
    s["workload"] |= {"num_requests": 200, "arrivals": {"kind": "poisson", "rate": 2.0}}
    _, frame, _ = run_scenario(write_scenario(s))
    # At 2 req/s a batch of 64 never fills: each batch starts 200 ms after its oldest arrived.
    first_of_batch = frame.groupby("scheduled_at")["arrived_at"].min()
    assert np.allclose(first_of_batch.index - first_of_batch.to_numpy(), 0.2)


def test_a_pass_after_an_idle_gap_pays_the_wake_penalty(tmp_path, write_profile, write_scenario):
    # 5 ms extra after 100 ms idle or more; nothing when a pass follows another directly.
    profile = write_profile(prefill=lambda b, p: 0.01, wake=((0.01, 0.1), (0.002, 0.005)))
    trace = tmp_path / "trace.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,16,1\n0.5,16,1\n0.502,16,1\n")
    s = base_scenario(profile, batching={"policy": "continuous", "max_num_seqs": 1})
    s["workload"] = {"arrivals": {"kind": "trace", "trace": str(trace)}}
    _, frame, _ = run_scenario(write_scenario(s))
    # The first two find the device idle (cold, then 485 ms since the last pass); the third
    # queues behind the second and runs straight after it.
    assert frame["ttft_s"].tolist() == pytest.approx([0.015, 0.015, 0.015 + 0.01 - 0.002])


def test_the_response_cache_answers_a_repeat_until_its_entry_expires(write_profile, write_scenario):
    # One prompt repeated: a request is a hit exactly when a miss finished before it arrived and
    # within the TTL (each miss's finish sets the entry's expiry; a hit does not extend it).
    ttl = 3.0
    s = base_scenario(write_profile(prefill=lambda b, p: 0.2, decode=lambda b, c: 0.05))
    s["workload"] |= {"num_requests": 300, "arrivals": {"kind": "poisson", "rate": 2.0},
                      "prompt_keys": {"distinct": 1}}
    s["response_cache"] = {"ttl_s": ttl, "capacity": 10}
    run, frame, summary = run_scenario(write_scenario(s))
    check_invariants(run, frame, summary, s)
    misses = frame[~frame["cache_hit"]]
    expected = []
    for t in frame["arrived_at"]:
        before = misses["finished_at"][misses["finished_at"] < t]
        expected.append(bool(len(before)) and t < before.max() + ttl)
    assert frame["cache_hit"].tolist() == expected
    assert 0 < frame["cache_hit"].sum() < len(frame) - 1  # both outcomes occur
    hits = frame[frame["cache_hit"]]
    assert (hits["e2e_s"] == 0).all() and (hits["replica"] == -1).all()


@pytest.mark.parametrize("policy", [{"policy": "queue-depth", "target_queue_per_replica": 8},
                                    {"policy": "latency", "target_ttft_s": 0.5, "window_s": 5}])
def test_the_autoscaler_adds_replicas_under_load_and_routes_none_before_they_have_loaded(
        write_profile, write_scenario, policy):
    load_s = 5.0
    profile = write_profile(prefill=lambda b, p: 0.02 + 1e-4 * b * p, decode=lambda b, c: 0.01, model_load_s=load_s)
    s = base_scenario(profile)
    s["workload"] |= {"num_requests": 1500, "arrivals": {"kind": "poisson", "rate": 40.0}}
    s["autoscaler"] = policy | {"min_replicas": 1, "max_replicas": 4, "interval_s": 1, "cooldown_s": 2}
    run, frame, summary = run_scenario(write_scenario(s))
    check_invariants(run, frame, summary, s)
    ups = [a for a in run.actions if a[1] == "scale_up"]
    assert ups and max(a[3] for a in run.actions) > 1
    # Replicas are numbered in the order they are added; each is ready model_load_s later.
    ready_at = [0.0]
    for time_s, action, before, after, _ in run.actions:
        if action == "scale_up":
            ready_at += [time_s + load_s] * (after - before)
    assert 1 <= frame["replica"].max() <= len(ready_at) - 1  # one added late may serve nothing
    # The router picks a replica as a request arrives, among those that have loaded.
    served = frame[frame["replica"] >= 0]
    assert (served["arrived_at"] >= served["replica"].map(lambda r: ready_at[r])).all()


@pytest.mark.parametrize("policy", [{"policy": "queue-depth", "target_queue_per_replica": 8},
                                    {"policy": "latency", "target_ttft_s": 0.5, "window_s": 5}])
def test_the_autoscaler_gives_back_idle_replicas_in_a_lull(write_profile, write_scenario, policy):
    """A burst, then a minute with no traffic: both policies are back at min_replicas before the
    lull ends. The latency policy has no TTFT to judge an idle minute by, and held its replicas."""
    profile = write_profile(prefill=lambda b, p: 0.02 + 1e-4 * b * p, decode=lambda b, c: 0.01, model_load_s=2.0)
    s = base_scenario(profile)
    s["workload"] |= {"num_requests": None, "duration_s": 90.0,
                      "arrivals": {"kind": "step", "rates": [40.0, 0.0, 1.0], "durations_s": [20.0, 60.0, 10.0]}}
    s["autoscaler"] = policy | {"min_replicas": 1, "max_replicas": 4, "interval_s": 1, "cooldown_s": 2}
    run, frame, summary = run_scenario(write_scenario(s))
    check_invariants(run, frame, summary, s)
    assert max(a[3] for a in run.actions) > 1
    replicas = 1
    for time_s, _, _, after, _ in run.actions:
        if time_s < 80:
            replicas = after
    assert replicas == 1


def _two_bursts_a_billion_seconds_apart(write_profile, **deployment) -> dict:
    """1,000 requests: 200 req/s for 2.5 s, none for 1e9 s, then 200 req/s until the rest have come."""
    profile = write_profile(prefill=lambda b, p: 0.02 + 1e-4 * b * p, decode=lambda b, c: 0.01, model_load_s=2.0)
    s = base_scenario(profile, **deployment)
    s["workload"] |= {"num_requests": 1000,
                      "arrivals": {"kind": "step", "rates": [200.0, 0.0, 200.0], "durations_s": [2.5, 1e9, 1.0]}}
    return s


@pytest.mark.parametrize("policy,batching", [
    ({"policy": "queue-depth", "target_queue_per_replica": 8}, {"policy": "continuous"}),
    ({"policy": "latency", "target_ttft_s": 0.5, "window_s": 5}, {"policy": "continuous"}),
    # requests left waiting for a full batch through the lull: it holds with work in hand
    ({"policy": "queue-depth", "target_queue_per_replica": 8}, {"policy": "static", "max_batch_size": 64})])
def test_the_autoscaler_sleeps_through_a_lull_and_wakes_on_its_tick_grid(write_profile, write_scenario, policy,
                                                                         batching):
    """Two bursts a billion seconds apart. Every tick of the lull holds, and it ticked through it
    (10^8 ticks); it now sleeps until a request comes, then acts on the first tick of its grid after it."""
    s = _two_bursts_a_billion_seconds_apart(write_profile, batching=batching)
    s["workload"]["output_tokens"] = {"kind": "fixed", "value": 500}
    s["autoscaler"] = policy | {"min_replicas": 1, "max_replicas": 4, "interval_s": 10, "cooldown_s": 0}
    run, frame, summary = run_scenario(write_scenario(s))
    check_invariants(run, frame, summary, s)
    first = [a for a in run.actions if a[0] < 1e9]
    assert first[0][:2] == (10.0, "scale_up") and first[-1][3] == 1  # up in the burst, down in the lull
    assert run.actions[len(first)][:2] == (1e9 + 10.0, "scale_up")  # the second burst began at 1e9 + 2.5


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    policy=st.sampled_from(["queue-depth", "latency"]),
    batching=st.sampled_from(["static", "dynamic", "continuous"]),
    arrivals=st.sampled_from([{"kind": "bursty", "rates": [0.5, 40.0], "mean_durations_s": [20, 5]},
                              {"kind": "step", "rates": [30.0, 0.0, 20.0], "durations_s": [5, 100, 5]},
                              {"kind": "poisson", "rate": 3.0}, {"kind": "poisson", "rate": 0.3}]),
    interval=st.sampled_from([0.05, 0.3, 2.5]),
    cooldown=st.sampled_from([0, 2, 10]),
    window=st.sampled_from([0.5, 5.0, 50.0]),
    target_ttft=st.sampled_from([0.001, 0.2]),
    min_replicas=st.integers(1, 2),
    workers_per_gpu=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_the_autoscalers_sleep_changes_nothing(write_profile, write_scenario, policy, batching, arrivals, interval,
                                               cooldown, window, target_ttft, min_replicas, workers_per_gpu, seed):
    """Sleeping through ticks that can only hold must give exactly what ticking through them gives."""
    from sim.simulator import Simulation

    profile = write_profile(prefill=lambda b, p: 0.003 + 2e-5 * b * p, decode=lambda b, c: 0.005 + 1e-3 * b,
                            model_load_s=1.0)
    s = base_scenario(profile, replicas=min_replicas, workers_per_gpu=workers_per_gpu,
                      batching={"policy": batching} | ({"max_batch_size": 4} if batching != "continuous" else {}))
    s["seed"] = seed
    # Long outputs: a latency autoscaler's first TTFT comes ticks before its request finishes.
    s["workload"] |= {"num_requests": 200, "arrivals": arrivals, "output_tokens": {"kind": "uniform", "low": 1, "high": 400}}
    rule = {"target_queue_per_replica": 4} if policy == "queue-depth" else {"target_ttft_s": target_ttft, "window_s": window}
    s["autoscaler"] = {"policy": policy, "min_replicas": min_replicas, "max_replicas": 4, "interval_s": interval,
                       "cooldown_s": cooldown} | rule
    path = write_scenario(s)
    run, frame, _ = run_scenario(path)

    def tick_through(self, k, every, until):
        return k
        yield  # a generator that never waits

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Simulation, "_sleep", tick_through)
        ticked, ticked_frame, _ = run_scenario(path)
    assert run.actions == ticked.actions
    pd.testing.assert_frame_equal(frame, ticked_frame)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batching=st.sampled_from([{"policy": "dynamic", "max_batch_size": 4}, {"policy": "continuous", "max_num_seqs": 8},
                              {"policy": "continuous", "max_num_seqs": 8, "kv_layout": "padded"}]),
    kv_tokens=st.sampled_from([1200, 10**6]),  # 1,200: rejections and preemptions
    autoscaler=st.sampled_from([None, "queue-depth", "latency"]),
    replicas=st.integers(1, 3),
    workers_per_gpu=st.integers(1, 3),
    model_load_s=st.sampled_from([0.0, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_the_least_outstanding_heap_picks_what_a_scan_of_the_ready_workers_picks(
        write_profile, write_scenario, batching, kv_tokens, autoscaler, replicas, workers_per_gpu, model_load_s, seed):
    """The router's heap must choose, request by request, the worker the scan it replaced chose: the
    fewest outstanding, the first in `ready` among equals, through replicas loading, draining and
    stopping, rejected requests and siblings on one device; and stay bounded."""
    from operator import attrgetter

    from sim.simulator import LeastOutstanding

    profile = write_profile(prefill=lambda b, p: 0.003 + 2e-5 * b * p, decode=lambda b, c: 0.005 + 1e-3 * b,
                            model_load_s=model_load_s)
    s = base_scenario(profile, replicas=replicas, workers_per_gpu=workers_per_gpu, kv_cache_tokens=kv_tokens,
                      batching=batching)
    s["seed"] = seed
    s["workload"] |= {"num_requests": 300, "arrivals": {"kind": "bursty", "rates": [0.5, 60.0], "mean_durations_s": [10, 3]}}
    if autoscaler:
        rule = {"target_queue_per_replica": 4} if autoscaler == "queue-depth" else {"target_ttft_s": 0.05, "window_s": 2}
        s["autoscaler"] = {"policy": autoscaler, "min_replicas": 1, "max_replicas": 5, "interval_s": 0.5,
                           "cooldown_s": 0} | rule
    picks = []
    pick = LeastOutstanding.pick

    def checked(self):
        chosen, scanned = pick(self), min(self.sim.ready, key=attrgetter("outstanding"))
        picks.append(chosen is scanned)
        assert chosen is scanned, (chosen.index, chosen.outstanding, scanned.index, scanned.outstanding)
        assert len(self.heap) <= self.limit + 1 and self.limit <= 4 * len(self.sim.workers) + 64
        return chosen

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LeastOutstanding, "pick", checked)
        run, frame, _ = run_scenario(write_scenario(s))
    assert len(picks) > 0 and frame["finished_at"].notna().sum() + (frame["rejected"] != "").sum() == 300


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batching=st.sampled_from([{"policy": "static", "max_batch_size": 4}, {"policy": "dynamic", "max_batch_size": 4},
                              {"policy": "continuous", "max_num_seqs": 8},
                              {"policy": "continuous", "max_num_seqs": 8, "kv_layout": "padded"},
                              {"policy": "continuous", "max_batched_tokens": 256, "chunked_prefill": True}]),
    kv_tokens=st.sampled_from([1200, 5000, 10**6]),  # 1,200: preemptions
    autoscale=st.booleans(),
    workers_per_gpu=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_the_monitor_reading_only_busy_workers_sees_what_reading_all_sees(write_profile, write_scenario, batching,
                                                                          kv_tokens, autoscale, workers_per_gpu, seed):
    """An idle worker holds no queue, batch or cache, so the time series may skip it, and the cache
    counted is kept as replicas load and stop: they must be the same as when every live worker and
    replica is read at each sample, through preemptions, padded batches and drained replicas."""
    from sim import results
    from sim.simulator import Simulation

    profile = write_profile(prefill=lambda b, p: 0.003 + 2e-5 * b * p, decode=lambda b, c: 0.005 + 1e-3 * b,
                            model_load_s=2.0)
    s = base_scenario(profile, replicas=2, workers_per_gpu=workers_per_gpu, kv_cache_tokens=kv_tokens,
                      batching=batching)
    s["seed"] = seed
    s["workload"] |= {"num_requests": 150, "arrivals": {"kind": "bursty", "rates": [0.5, 40.0], "mean_durations_s": [10, 3]}}
    if autoscale:
        s["autoscaler"] = {"policy": "queue-depth", "target_queue_per_replica": 4, "min_replicas": 1,
                           "max_replicas": 4, "interval_s": 0.5, "cooldown_s": 0}  # some drained while they load
    path = write_scenario(s)
    run, _, _ = run_scenario(path)

    class EveryLiveWorker:
        def __init__(self, sim):
            self.sim = sim

        def add(self, worker):
            pass

        def discard(self, worker):
            pass

        def __iter__(self):
            return (w for r in self.sim.live for w in r.workers)

    init = Simulation.__init__

    def reading_all(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.busy = EveryLiveWorker(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Simulation, "__init__", reading_all)
        patch.setattr(Simulation, "holding", property(lambda self: sum(len(r.workers) for r in self.live if r.ready),
                                                      lambda self, value: None), raising=False)
        read_all, _, _ = run_scenario(path)
    pd.testing.assert_frame_equal(results.timeseries_frame(run), results.timeseries_frame(read_all))


def test_the_autoscaler_sleeps_through_its_cooldown_and_acts_at_its_end(write_profile, write_scenario):
    """Every request in hand asks for the most replicas, and a cooldown of 10^7 s holds them there:
    at 0.01 s ticks it ticked 10^9 times through it. It now sleeps to the cooldown's last ticks."""
    s = _two_bursts_a_billion_seconds_apart(write_profile)
    s["autoscaler"] = {"policy": "queue-depth", "target_queue_per_replica": 1e-9, "min_replicas": 1,
                       "max_replicas": 4, "interval_s": 0.01, "cooldown_s": 1e7}
    run, frame, summary = run_scenario(write_scenario(s))
    check_invariants(run, frame, summary, s)
    (up, down, again), times = run.actions[:3], [a[0] for a in run.actions[:3]]
    assert up[1:4] == ("scale_up", 1, 4) and times[0] == pytest.approx(0.01)
    assert down[1:4] == ("scale_down", 4, 1) and 0 <= times[1] - times[0] - 1e7 < 0.01 + 1e-6
    assert again[1:4] == ("scale_up", 1, 4) and 1e9 + 2.5 < times[2] < 1e9 + 2.52


def test_a_draining_replica_keeps_its_kv_cache_in_the_capacity_until_it_stops(write_profile, write_scenario):
    """Three replicas, and a queue-depth target that wants one: at 0.5 s two drain while their
    requests still decode. The capacity counted only replicas the router may choose, so the cache
    in use (theirs included) read 3x the capacity, a KV utilisation of 300%."""
    profile = write_profile(decode=lambda b, c: 0.01)
    s = base_scenario(profile, replicas=3, kv_cache_tokens=5000)
    s["workload"] |= {"num_requests": 30, "arrivals": {"kind": "poisson", "rate": 100.0},
                      "prompt_tokens": {"kind": "fixed", "value": 100}, "output_tokens": {"kind": "fixed", "value": 200}}
    s["autoscaler"] = {"policy": "queue-depth", "target_queue_per_replica": 100, "min_replicas": 1,
                       "max_replicas": 3, "interval_s": 0.5, "cooldown_s": 0}
    run, frame, summary = run_scenario(write_scenario(s))
    check_invariants(run, frame, summary, s)
    assert run.actions[0][:4] == (0.5, "scale_down", 3, 1)
    drained = frame[frame["replica"] > 0]
    assert len(drained) > 0 and (drained["finished_at"] > 0.5).all()
    assert summary["kv_cache_utilization_max"] <= 1.0


def test_the_prefix_cache_hit_rate_counts_the_prompt_tokens_found_cached(write_profile, write_scenario):
    """One shared prefix of 60 tokens on 100-token prompts, arrivals far apart: the first prefill
    computes it, each later one finds it, so the rate is 60 (n - 1) / (100 n), as vLLM counts it."""
    n = 40
    s = base_scenario(write_profile(prefill=lambda b, p: 0.01, decode=lambda b, c: 0.01),
                      batching={"policy": "continuous", "prefix_caching": True})
    s["workload"] |= {"num_requests": n, "arrivals": {"kind": "poisson", "rate": 0.5},
                      "prompt_tokens": {"kind": "fixed", "value": 100}, "output_tokens": {"kind": "fixed", "value": 2},
                      "shared_prefix": {"groups": 1, "tokens": 60}}
    run, frame, summary = run_scenario(write_scenario(s))
    check_invariants(run, frame, summary, s)
    assert frame["prefix_cached_tokens"].tolist() == [0] + [60] * (n - 1)
    assert summary["prefix_cache_hit_rate"] == pytest.approx(60 * (n - 1) / (100 * n))


def test_continuous_batching_without_a_kv_cache_runs_and_jumps_exactly(write_profile, write_scenario):
    """A mode with no KV cache (fp32-nocache) holds nothing between steps, so its capacity is
    unbounded: the runs of decode steps between events were cut at `inf // rows`, which is nan,
    and every such simulation stopped on "cannot convert float NaN to integer"."""
    s = base_scenario(write_profile(kv_bytes_per_token=0), batching={"policy": "continuous", "max_num_seqs": 8})
    s["workload"]["num_requests"] = 200
    path = write_scenario(s)
    run, frame, summary = run_scenario(path)
    check_invariants(run, frame, summary, s)
    assert summary["served"] == 200 and summary["kv_cache_tokens_per_worker"] is None
    _, stepwise, _ = run_scenario(path, jump=False)
    cols = ["scheduled_at", "first_token_at", "finished_at", "preemptions", "worker", "rejected"]
    pd.testing.assert_frame_equal(frame[cols], stepwise[cols], check_exact=False, rtol=1e-9, atol=1e-9)


def test_a_run_long_past_its_arrivals_keeps_a_bounded_evenly_spaced_time_series(write_profile, write_scenario):
    # Every request arrives within a millisecond, so the default interval is 10 ms, and four rows at
    # a time serve them for minutes: a saturation flood's shape.
    s = base_scenario(write_profile(decode=lambda b, c: 0.05), batching={"policy": "continuous", "max_num_seqs": 4})
    s["workload"]["arrivals"] = {"kind": "poisson", "rate": 1e6}
    run, frame, _ = run_scenario(write_scenario(s))
    times = np.array(run.samples["time_s"])
    assert MAX_SAMPLES // 2 < len(times) <= MAX_SAMPLES and run.end_s > 100
    spacing = np.diff(times)
    assert times[0] == 0 and np.allclose(spacing, spacing[0]) and times[-1] <= run.end_s < times[-1] + spacing[0]
    assert {len(column) for column in run.samples.values()} == {len(times)}
    # An interval the scenario sets is kept however long the run, and the monitor only watches.
    s["output"] = {"sample_interval_s": 0.01}
    fixed, fixed_frame, _ = run_scenario(write_scenario(s))
    assert len(fixed.samples["time_s"]) == pytest.approx(run.end_s / 0.01, abs=2)
    pd.testing.assert_frame_equal(frame, fixed_frame)


def prepared(raw: dict, write_profile):
    """A scenario dict parsed, with its trace and profile, for a test that calls `simulate` itself."""
    from calibration.profile import load as load_profile
    from sim import scenario as scenario_mod, workload

    scenario = scenario_mod.parse(raw, "test.yaml", write_profile().parent)
    return scenario, workload.generate(scenario.workload, scenario.seed), load_profile(scenario.deployment.profile)


def test_a_run_holds_little_beyond_its_results_per_request(write_profile):
    # What a run must keep is its trace (48 bytes a request, before it starts), each request's
    # outcome (46) and the table's derived columns (48). The simulator once held the trace again as
    # Python lists through the whole run (86 bytes a request here, 130 with longer prompts) and the
    # table copied the columns it shares with the trace and the outcome (67 more): at 100,000,000
    # requests, 25 GB of memory where their results need 14.
    import tracemalloc

    from sim import results
    from sim.simulator import simulate

    raw = base_scenario(write_profile(), replicas=8)
    raw["workload"] |= {"num_requests": 20_000, "arrivals": {"kind": "poisson", "rate": 500.0}}
    scenario, trace, profile = prepared(raw, write_profile)
    tracemalloc.start()
    try:
        run = simulate(scenario, profile, trace)
        _, simulating = tracemalloc.get_traced_memory()
        frame = results.requests_frame(trace, run.outcome)
        _, tabling = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(frame) == 20_000 and frame["finished_at"].notna().all()
    assert simulating / len(trace) < 100  # 75 now, fixed costs included; 148 with the lists
    assert tabling / len(trace) < 175  # 156 now; 223 with the copies


def sampled_often(write_profile, num_requests: int, interval: float):
    """A scenario, its trace and profile: a short burst of requests sampled every `interval` seconds."""
    raw = base_scenario(write_profile(), replicas=2)
    raw["workload"] |= {"num_requests": num_requests, "arrivals": {"kind": "poisson", "rate": 1000.0}}
    raw["output"] = {"sample_interval_s": interval}
    return prepared(raw, write_profile)


def test_a_time_series_sampled_often_holds_eight_bytes_a_column_a_sample(write_profile):
    # A set interval keeps up to a million samples; as lists of Python numbers (a float and its slot
    # take 32 bytes) they took 148 bytes a sample, 148 MB at the cap before the table and the report.
    import tracemalloc

    from sim.simulator import simulate

    scenario, trace, profile = sampled_often(write_profile, 20, 1e-6)
    tracemalloc.start()
    try:
        run = simulate(scenario, profile, trace)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    samples = len(run.samples["time_s"])
    assert samples > 50_000 and {len(column) for column in run.samples.values()} == {samples}
    assert peak / samples < 7 * 8 * 1.5  # 7 columns: 59 bytes a sample now, 148 as lists


def test_a_time_series_that_outgrows_the_memory_after_the_arrivals_stops_the_run(write_profile, monkeypatch):
    # Every request has arrived (and been checked) within a second, but a tiny interval keeps sampling
    # while they are served: the samples alone must be able to stop the run, naming the interval.
    from sim import memory
    from sim.simulator import simulate

    scenario, trace, profile = sampled_often(write_profile, 20, 1e-6)
    monkeypatch.setattr(memory, "available", lambda: memory.RESERVE_BYTES + 20 * memory.RESULT_BYTES + 5 * 10**6)
    with pytest.raises(MemoryError, match=r" MB free after 20 of 20 requests arrived and 53,248 time-series samples "
                                          r"taken \(raise output.sample_interval_s\), where their results need 69 MB$"):
        simulate(scenario, profile, trace)
    assert trace.arrived_at[-1] < 53_248 * 1e-6  # they had all arrived


@pytest.mark.parametrize("mean_gap, window_s", [(0.001, 10.0), (0.05, 10.0), (0.0, 1.0), (1.0, 0.5)])
def test_the_ttft_windows_arrays_hold_what_a_list_of_the_last_window_holds(mean_gap, window_s):
    # The window keeps its TTFTs in arrays it compacts and grows in place (from 1,024 entries); a list
    # is the reference. Windows of thousands (grown), of hundreds (compacted), ties, and of one or none.
    from sim.simulator import TtftWindow

    rng = np.random.default_rng(7)
    window, reference, now = TtftWindow(), [], 0.0
    for gap, ttft, tick in zip(rng.exponential(mean_gap, 8000).round(3), rng.exponential(1.0, 8000),
                               rng.random(8000) < 0.05):
        now += gap
        window.add(now, ttft)
        reference.append((now, ttft))
        if tick:  # the autoscaler's tick: expire, then read
            window.expire(now - window_s)
            reference = [(t, v) for t, v in reference if t >= now - window_s]
            assert len(window) == len(reference) > 0
            assert window.oldest() == reference[0][0]
            assert window.percentile(95) == float(np.percentile([v for _, v in reference], 95))
