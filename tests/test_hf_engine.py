"""transformers' continuous-batching engine: the step model that prices it, and how the simulator's
scheduler describes its batching."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from calibration.paged_steps import PagedStepModel, step_shape
from calibration.profile import load as load_profile
from conftest import base_scenario
from sim import results, scenario as scenario_mod, workload
from sim.request import Request
from sim.scheduler import ContinuousScheduler
from sim.simulator import simulate
from sim.workload import Trace

MODEL = PagedStepModel(step_s=3e-3, token_s=1.1e-4, kv_s=2e-9, pair_s=6e-8, row_s=3e-4)


def test_fit_recovers_the_seconds_that_made_the_steps():
    rng = np.random.default_rng(0)
    q = rng.integers(1, 256, 200).astype(float)
    kv = q + rng.integers(0, 4000, 200)
    rows = np.minimum(q, rng.integers(1, 32, 200)).astype(float)
    fitted = PagedStepModel.fit(q, kv, rows, MODEL.time(q, kv, rows))
    assert np.allclose([fitted.step_s, fitted.token_s, fitted.kv_s, fitted.pair_s, fitted.row_s],
                       [MODEL.step_s, MODEL.token_s, MODEL.kv_s, MODEL.pair_s, MODEL.row_s], rtol=1e-6)


def test_a_decode_run_costs_the_sum_of_its_steps():
    # Three requests decoding together: each step attends over one more token per request.
    sched = ContinuousScheduler(max_num_seqs=8, max_batched_tokens=512, kv_capacity=10_000, chunked_prefill=True)
    for i, prompt in enumerate((40, 90, 200)):
        sched.add(Request(i, 0.0, prompt, 50))
    sched.postprocess(sched.schedule(0.0), 0.0)  # the prompts, in one step
    first = step = sched.schedule(0.0)
    priced = []
    for _ in range(first.max_repeat):
        priced.append(MODEL.step_time(step))
        sched.postprocess(step, 0.0)
        step = sched.schedule(0.0)
    assert first.max_repeat == 49
    assert MODEL.decode_run(first.decode_seqs, first.decode_context, first.max_repeat) == pytest.approx(sum(priced))


def test_step_shape_counts_what_a_ragged_pass_computes_and_attends():
    sched = ContinuousScheduler(max_num_seqs=8, max_batched_tokens=100, kv_capacity=10_000, chunked_prefill=True)
    sched.add(Request(0, 0.0, 30, 5))
    sched.add(Request(1, 0.0, 150, 5))
    step = sched.schedule(0.0)
    assert step_shape(step) == (100, 100, 2)  # all of the first prompt, 70 tokens of the second
    sched.postprocess(step, 0.0)
    # One decode (30 cached + its new token) and the second prompt's last 80 tokens after its first 70.
    assert step_shape(sched.schedule(0.0)) == (81, 31 + 150, 2)


def test_jumps_over_decode_runs_change_nothing_under_a_paged_step_model(write_profile, write_scenario):
    s = base_scenario(write_profile(), kv_cache_tokens=20_000,
                      batching={"policy": "continuous", "max_num_seqs": 16, "max_batched_tokens": 256,
                                "chunked_prefill": True})
    s["workload"] |= {"num_requests": 300, "arrivals": {"kind": "poisson", "rate": 20.0}}
    scenario = scenario_mod.load(write_scenario(s))
    profile = load_profile(scenario.deployment.profile)
    trace = workload.generate(scenario.workload, scenario.seed)
    frames = [results.requests_frame(trace, simulate(scenario, profile, trace, jump=jump, cost=MODEL).outcome)
              for jump in (True, False)]
    cols = ["scheduled_at", "first_token_at", "finished_at"]
    pd.testing.assert_frame_equal(frames[0][cols], frames[1][cols], check_exact=False, rtol=1e-9, atol=1e-9)


def test_the_simulators_scheduler_forms_the_steps_transformers_runs():
    """A flood through transformers' engine, step by step, against the continuous scheduler told
    its limits: the same tokens computed, KV attended and requests, in the same order."""
    torch = pytest.importorskip("torch")
    from profiler.hf_engine import EngineConfig, HFEngine
    from profiler.models import MODELS, build

    torch.set_num_threads(1)
    config = EngineConfig(max_batch_tokens=128, max_requests=6)
    engine = HFEngine(build(MODELS["gpt2-tiny"], torch.float32, "cpu"), config)
    rng = np.random.default_rng(3)
    flood = Trace(np.zeros(10), rng.integers(8, 300, 10), rng.integers(1, 12, 10))
    try:
        run = engine.run(flood)
    finally:
        engine.stop()
    sched = ContinuousScheduler(config.max_requests, config.max_batch_tokens,
                                config.num_blocks * config.page_size, chunked_prefill=True)
    for i in range(len(flood)):
        sched.add(Request(i, 0.0, int(flood.prompt_tokens[i]), int(flood.output_tokens[i])))
    shapes = []
    while (step := sched.schedule(0.0)) is not None:
        shapes.append(step_shape(step))
        sched.postprocess(step, 0.0)
    recorded = list(zip(run.steps.q_tokens.astype(int), run.steps.kv_tokens.astype(int), run.steps.rows.astype(int)))
    assert recorded == shapes
    assert np.isfinite(run.outcome.finished_at).all()
