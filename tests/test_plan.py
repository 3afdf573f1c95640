"""The capacity planner: search, decisions, bad plans, and a real local Dask cluster."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, base_scenario
from sim.results import fmt_seconds


def write_plan(tmp_path, profile, plan: dict, base: dict | None = None):
    base = base or base_scenario(profile, batching={"policy": "dynamic", "max_batch_size": 1, "max_wait_ms": 0})
    base["workload"] |= {"num_requests": 400, "prompt_tokens": {"kind": "fixed", "value": 64},
                         "output_tokens": {"kind": "fixed", "value": 1}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base": "base.yaml"} | plan))
    return path


def run_plan(path, *extra):
    out = path.parent / "out"
    proc = subprocess.run([sys.executable, "-m", "sim.plan", str(path), "--out", str(out), "--workers", "2", *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    result = json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else None
    return proc, result


def test_target_mode_finds_the_fewest_replicas(tmp_path, write_profile):
    # Each request is one 0.1 s pass: one replica serves at most 10 req/s, so 15 req/s needs two.
    profile = write_profile(prefill=lambda b, p: 0.1)
    path = write_plan(tmp_path, profile, {"target_rps": 15, "max_replicas": 8,
                                          "slo": {"e2e": {"max_s": 1.0, "percentile": 95}}})
    proc, result = run_plan(path)
    assert proc.returncode == 0, proc.stderr
    (r,) = result["results"]
    assert r["replicas"] == 2
    assert {p["replicas"]: p["slo_met"] for p in r["curve"]}[1] is False
    header, row = proc.stdout.splitlines()[2:4]  # a name shorter than "configuration" pushed the header right
    assert header.startswith("configuration") and row.startswith("* base") and len(header) == len(row)


def test_a_target_one_replica_meets_is_told_in_the_singular(tmp_path, write_profile):
    # It read "1 replicas at $0.50/hour meet 2 req/s", in the summary and the report alike.
    path = write_plan(tmp_path, write_profile(prefill=lambda b, p: 0.1), {
        "target_rps": 5, "max_replicas": 4, "slo": {"e2e": {"max_s": 1.0, "percentile": 95}}})
    proc, result = run_plan(path)
    assert proc.returncode == 0, proc.stderr
    assert result["results"][0]["replicas"] == 1
    assert "recommended: base — meets 5 req/s on 1 replica at $" in proc.stdout
    assert "<td>1 replica</td>" in (tmp_path / "out" / "report.html").read_text()


def test_max_rate_scales_with_replicas_and_stays_below_saturation(tmp_path, write_profile):
    profile = write_profile(prefill=lambda b, p: 0.1)
    path = write_plan(tmp_path, profile, {"slo": {"e2e": {"max_s": 0.5, "percentile": 95}},
                                          "search": {"deployment.replicas": [1, 2]}})
    proc, result = run_plan(path)
    assert proc.returncode == 0, proc.stderr
    one, two = result["results"]
    assert one["saturation_rps"] == pytest.approx(10, rel=0.05)
    assert 0 < one["max_rps"] < one["saturation_rps"]
    assert two["max_rps"] > 1.8 * one["max_rps"]
    assert one["at_max"]["slo_met"] and result["recommendation"]["config"] in {one["config"], two["config"]}


def test_num_requests_sets_every_simulations_length(tmp_path, write_profile):
    profile = write_profile(prefill=lambda b, p: 0.1)
    path = write_plan(tmp_path, profile, {"num_requests": 50, "slo": {"e2e": {"max_s": 0.5, "percentile": 95}}})
    proc, result = run_plan(path)
    assert proc.returncode == 0, proc.stderr
    assert {p["requests"] for p in result["results"][0]["curve"]} == {50}  # the base holds 400


def test_the_report_of_an_edited_plan_says_what_is_wrong_in_one_line(tmp_path, write_profile):
    path = write_plan(tmp_path, write_profile(), {"num_requests": 50, "slo": {"e2e": {"max_s": 0.5}}})
    proc, result = run_plan(path)
    assert proc.returncode == 0, proc.stderr
    result["results"][0]["config"] = [1, "a"]  # no string: plotly says so in several lines
    (tmp_path / "out" / "plan.json").write_text(json.dumps(result))
    proc = subprocess.run([sys.executable, "-m", "reports.cli", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "results lack what the report needs (ValueError: Invalid value of type" in proc.stderr


def test_unmeetable_slo_says_by_how_much(tmp_path, write_profile):
    profile = write_profile(prefill=lambda b, p: 0.1)
    path = write_plan(tmp_path, profile, {"slo": {"e2e": {"max_s": 0.05, "percentile": 95}}})
    proc, result = run_plan(path)
    assert proc.returncode == 1
    assert "no configuration meets the SLO" in proc.stderr and "misses the SLO by" in proc.stderr
    # ... naming the metric, its bound, and where it came closest: the light probe's rate
    probe = result["results"][0]["curve"][0]
    where = f"at {probe['offered_rps']:.2f} req/s on 1 replica"
    assert f"(e2e p95 {fmt_seconds(probe['e2e_p95_s'])} against 50.0 ms, {where})" in proc.stderr
    assert result["recommendation"] is None


@pytest.mark.parametrize("router", ["round-robin", "least-outstanding"])
def test_past_a_replica_per_request_more_replicas_change_no_latency(write_profile, write_scenario, router):
    # Why the target search stops at one replica per request (below): each request then has a replica
    # of its own, the same one however many more there are.
    from helpers import run_scenario

    s = base_scenario(write_profile(prefill=lambda b, p: 0.002 * b * p / 64, decode=lambda b, c: 0.01 * b),
                      router=router, batching={"policy": "continuous", "max_num_seqs": 4})
    s["workload"] |= {"num_requests": 40, "arrivals": {"kind": "poisson", "rate": 50.0}}
    frames = []
    for replicas in (40, 120):
        s["deployment"]["replicas"] = replicas
        frames.append(run_scenario(write_scenario(s))[1])
    assert frames[0]["replica"].max() < 40 and frames[0]["ttft_s"].max() > 2 * frames[0]["ttft_s"].min()
    assert frames[0].equals(frames[1])


def test_the_fewest_replicas_are_searched_up_to_one_per_request_at_most(tmp_path, write_profile):
    # Searched up to 100,000 replicas, 2,000 requests that missed the SLO took 6 minutes.
    path = write_plan(tmp_path, write_profile(prefill=lambda b, p: 0.1), {
        "target_rps": 5, "max_replicas": 100_000, "slo": {"e2e": {"max_s": 0.05, "percentile": 95}}})
    proc, result = run_plan(path)
    assert proc.returncode == 1 and "misses the SLO by 100%" in proc.stderr
    tried = [p["replicas"] for p in result["results"][0]["curve"]]
    assert max(tried) == 400 and len(tried) == 9  # 1..400 bisected


def test_a_configuration_that_rejects_every_request_says_so(tmp_path, write_profile):
    # Prompts of 64 tokens over a token budget of 8: the flood serves nothing, so there is no
    # saturation to bisect below, and one run at the base rate says why.
    path = write_plan(tmp_path, write_profile(), {
        "slo": {"e2e": {"max_s": 1.0}},
        "search": {"deployment.batching": [{"policy": "continuous", "max_num_seqs": 8, "max_batched_tokens": 8}]}})
    proc, result = run_plan(path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "rejects 400 of 400 requests (prompt_exceeds_max_batched_tokens 400)" in proc.stderr
    assert result["results"][0]["saturation_rps"] == 0


def test_a_configuration_that_rejects_more_than_the_percentile_allows_fails_and_says_why(tmp_path, write_profile):
    # A quarter of the requests (prompts of 100-128 tokens, and one output token) do not fit a
    # 100-token context window: served fast, the rest would meet a p95 bound, but a request turned
    # away misses it.
    base = base_scenario(write_profile(prefill=lambda b, p: 0.01, model_config={"max_position_embeddings": 100}))
    base["workload"] = {"num_requests": 400, "arrivals": {"kind": "poisson", "rate": 5.0},
                        "prompt_tokens": {"kind": "uniform", "low": 16, "high": 128},
                        "output_tokens": {"kind": "fixed", "value": 1}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base": "base.yaml", "slo": {"e2e": {"max_s": 1.0, "percentile": 95}}}))
    proc, result = run_plan(path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "rejects" in proc.stderr and "exceeds_context_window" in proc.stderr
    assert result["results"][0]["saturation_rps"] > 0
    # At p50 the turned-away quarter lies above the percentile, and the plan is met.
    path.write_text(yaml.safe_dump({"name": "t", "base": "base.yaml", "slo": {"e2e": {"max_s": 1.0, "percentile": 50}}}))
    proc, result = run_plan(path)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("plan,message", [
    ({"search": {"deployment.replicas": []}}, "search.deployment.replicas: must be a non-empty list"),
    ({"target_rps": 5, "search": {"deployment.replicas": [1, 2]}}, "searches replicas itself"),
    ({"hardware": [{"profile": "nope", "mode": "fp16", "usd_per_gpu_hour": 1}]}, "profile 'nope' not found"),
    ({"search": {"deployment.batching": [{"policy": "warp"}]}}, "'warp' is not one of"),
    ({"num_requests": 0}, "num_requests: must be >= 1, got 0"),
    ({"search": {"workload.arrivals.rate": [1, 4]}}, "the planner sets the offered rate itself"),
    ({"search": {"deployment.replicas": [1, 1]}}, "two configurations are named 'replicas=1'"),
    # Its bisection simulated half a trillion replicas: a worker died and the pool broke.
    ({"target_rps": 5, "max_replicas": 10**12}, "max_replicas: must be <= 100000"),
    # Both priced the replicas an autoscaler resized: a target search got the same p95 TTFT from 8 to
    # 16 replicas (it kept at most 6), and requests per dollar counted the replicas it began with.
    *[(plan | {"search": {"autoscaler": [{"policy": "queue-depth", "target_queue_per_replica": 4,
                                          "max_replicas": 6}]}},
       "]: autoscaler: a plan sizes fixed deployments, which an autoscaler resizes as it runs")
      for plan in ({}, {"target_rps": 8})],
    # Ten million configurations were built one by one before the first simulation.
    ({"search": {"seed": list(range(1000)), "workload.num_requests": list(range(1, 10001))}},
     "search: 1000 x 10000 values cross into 10,000,000 configurations, more than a plan runs (10,000)"),
])
def test_bad_plans_fail_clearly(tmp_path, write_profile, plan, message):
    path = write_plan(tmp_path, write_profile(), {"slo": {"e2e": {"max_s": 1.0}}} | plan)
    proc, _ = run_plan(path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr


def test_set_reaches_a_plans_dotted_search_keys_and_its_list_entries():
    """`--set` addresses what a plan holds: a search key that is itself dotted, an entry of a list."""
    from sim.errors import InputError
    from sim.scenario import apply_overrides

    plan = {"search": {"deployment.replicas": [1, 2, 4]}, "hardware": [{"usd_per_gpu_hour": 1.0}]}
    apply_overrides(plan, ["search.deployment.replicas=[8]", "hardware.0.usd_per_gpu_hour=2.5",
                           "slo.ttft.max_s=0.5"], "plan.yaml")
    assert plan == {"search": {"deployment.replicas": [8]}, "hardware": [{"usd_per_gpu_hour": 2.5}],
                    "slo": {"ttft": {"max_s": 0.5}}}
    with pytest.raises(InputError, match="'3' is not a mapping or an index into a list"):
        apply_overrides(plan, ["hardware.3.usd_per_gpu_hour=1"], "plan.yaml")
    # An empty value is a slip (a shell variable left unset), not a null: YAML read it as the default.
    for empty in ("num_requests=", "num_requests= "):
        with pytest.raises(InputError, match=rf"^--set '{empty}': no value \(to unset the key, write num_requests=null\)$"):
            apply_overrides(plan, [empty], "plan.yaml")
    assert apply_overrides(plan, ["num_requests=null"], "plan.yaml")["num_requests"] is None


def test_a_real_local_dask_cluster_gives_the_same_answers(tmp_path, write_profile):
    distributed = pytest.importorskip("distributed")
    profile = write_profile(prefill=lambda b, p: 0.1)
    path = write_plan(tmp_path, profile, {"slo": {"e2e": {"max_s": 0.5, "percentile": 95}},
                                          "search": {"deployment.replicas": [1, 2]}})
    _, local = run_plan(path)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        proc, remote = run_plan(path, "--scheduler", cluster.scheduler_address)
    assert proc.returncode == 0, proc.stderr
    assert remote == local


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:9", "no-port-here"])
def test_unreachable_scheduler_is_one_clear_line(tmp_path, write_profile, address):
    path = write_plan(tmp_path, write_profile(), {"slo": {"e2e": {"max_s": 1.0}}})
    proc, _ = run_plan(path, "--scheduler", address)
    assert proc.returncode == 2 and "cannot reach the Dask scheduler" in proc.stderr


def test_a_tpot_slo_with_no_request_to_measure_is_met(write_profile, write_scenario):
    # One output token each: no request has a time per output token, so none misses that bound,
    # and the planner does not take the empty percentile for a miss.
    from helpers import run_scenario
    from sim.plan import _worst

    s = base_scenario(write_profile())
    s["workload"]["output_tokens"] = {"kind": "fixed", "value": 1}
    s["slo"] = {"tpot": {"max_s": 0.001}, "e2e": {"max_s": 100.0}}
    _, frame, summary = run_scenario(write_scenario(s))
    assert frame["tpot_s"].isna().all()
    assert summary["slo"]["tpot"] == {"percentile": 95, "max_s": 0.001, "value_s": None, "met": True}
    assert summary["slo_met"] and _worst(summary)[0] == "e2e"


@pytest.mark.skipif(sys.platform != "linux", reason="workers stop with the plan through Linux's PR_SET_PDEATHSIG")
def test_a_killed_plan_takes_its_workers_with_it(tmp_path, write_profile):
    """Killed by a timeout or a job scheduler (SIGTERM), a plan left its pool workers running on,
    orphaned, each through its configuration's whole bisection."""
    import os
    import signal
    import time

    path = write_plan(tmp_path, write_profile(), {"slo": {"e2e": {"max_s": 1.0}}, "num_requests": 500_000,
                                                   "search": {"deployment.replicas": [1, 2]}})
    plan = subprocess.Popen([sys.executable, "-m", "sim.plan", str(path), "--out", str(tmp_path / "out"),
                             "--workers", "2", "--quiet"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def workers() -> list[int]:
        found = subprocess.run(["pgrep", "-P", str(plan.pid)], capture_output=True, text=True).stdout.split()
        return [int(pid) for pid in found]

    deadline = time.monotonic() + 120
    while len(workers()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    pool = workers()
    assert len(pool) == 2 and plan.poll() is None  # both at work on a bisection of 500,000-request runs
    plan.send_signal(signal.SIGTERM)
    plan.wait(timeout=60)
    deadline = time.monotonic() + 60
    while any(os.path.exists(f"/proc/{pid}") for pid in pool) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pool)


@pytest.mark.parametrize("target", [None, 4])
def test_a_workload_arriving_at_one_instant_is_one_clear_line(tmp_path, write_profile, target):
    """A plan scales the base workload's rate; one request, or a trace whose requests all arrive
    at 0 s, has none (an infinite rate scaled to 0: ZeroDivisionError in a worker)."""
    trace = tmp_path / "flood.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,64,1\n0.0,64,1\n0.0,64,1\n")
    extra = {"target_rps": target} if target else {}
    for one_instant, count in ((lambda w: w | {"num_requests": 1}, "1 request(s)"),
                               (lambda w: {"arrivals": {"kind": "trace", "trace": str(trace)}}, "3 request(s)")):
        path = write_plan(tmp_path, write_profile(), {"slo": {"e2e": {"max_s": 1.0}}} | extra)
        base = yaml.safe_load((tmp_path / "base.yaml").read_text())
        base["workload"] = one_instant(base["workload"])
        (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
        proc, _ = run_plan(path, "--quiet")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"workload: its {count} arrive at one instant" in proc.stderr


def test_odd_yaml_in_a_search_is_one_clear_line(tmp_path, write_profile):
    """Each configuration's values reached its scenario through JSON text: a date stopped on a
    TypeError traceback. Keys YAML reads as numbers were tracebacks too."""
    import datetime

    from sim.errors import InputError
    from sim.plan import load_plan

    path = write_plan(tmp_path, write_profile(), {"search": {"seed": [datetime.date(2023, 1, 1)]}})
    assert "- 2023-01-01\n" in path.read_text()  # as a user writes it
    with pytest.raises(InputError, match="seed: expected a number, got datetime.date"):
        load_plan(path)
    for search in ({1: [2]}, {1: 2, None: 3}):  # AttributeError (no split), TypeError (join) in naming it
        with pytest.raises(InputError, match="search.1: expected a key path such as deployment.replicas"):
            load_plan(write_plan(tmp_path, write_profile(), {"search": search}))


def test_a_long_wrong_search_value_is_named_by_its_start(tmp_path, write_profile):
    from sim.errors import InputError
    from sim.plan import load_plan

    path = write_plan(tmp_path, write_profile(), {"search": {"deployment.replicas": [[1] * 10_000]}})
    with pytest.raises(InputError) as e:
        load_plan(path)
    assert "[replicas=[1, 1, 1, 1, 1, 1, ...]]: deployment.replicas: expected a number" in str(e.value)
    assert len(str(e.value)) < 300  # the label held all 10,000 values
    path = write_plan(tmp_path, write_profile(), {"search": {"deployment.batching": [
        {"policy": "continuous", "max_num_seqs": [1] * 10_000, "chunked_prefill": True}]}})
    with pytest.raises(InputError) as e:  # a value inside a searched mapping, too
        load_plan(path)
    assert "chunked_prefill=true max_num_seqs=[1, 1, 1, 1, 1, 1, ...] continuous]: " in str(e.value)  # as YAML spells it
    assert len(str(e.value)) < 300
