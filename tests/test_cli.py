"""The commands as a user meets them: clear one-line errors, atomic outputs, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import yaml

from calibration.profile import SCHEMA_VERSION
from conftest import ROOT, base_scenario, flood_section, synthetic_profile
from sim.scheduler import Step


def run(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_simulate_is_byte_identical_for_the_same_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        proc = run("sim.cli", "scenarios/bursty.yaml", "--out", str(out), "--quiet")
        assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in a.iterdir())
    assert {"requests.csv", "timeseries.csv", "summary.json", "autoscaler.csv"} <= set(files)
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    other = run("sim.cli", "scenarios/bursty.yaml", "--out", str(tmp_path / "c"), "--seed", "8", "--quiet")
    assert (tmp_path / "c/requests.csv").read_bytes() != (a / "requests.csv").read_bytes(), other.stderr


def test_simulate_json_summary(tmp_path):
    proc = run("sim.cli", "scenarios/steady.yaml", "--out", str(tmp_path / "r"), "--json", "--quiet")
    summary = json.loads(proc.stdout)
    assert summary["requests"] == 2000 and summary["served"] == 2000
    assert set(summary["ttft_s"]) == {"p50", "p90", "p95", "p99", "mean"}


BAD_SCENARIOS = [
    (lambda s: s["deployment"].update(replicaz=2), "deployment: unknown key 'replicaz'"),
    (lambda s: s.update(name="../elsewhere"), "name: '../elsewhere' is not a plain name"),  # was results/../elsewhere
    (lambda s: s["deployment"].update(replicas="two"), "deployment.replicas: expected a number"),
    (lambda s: s["deployment"].update(replicas=[1] * 10**4),  # the message held every value
     "deployment.replicas: expected a number, got [1, 1, 1, 1, 1, 1, ...]"),
    # the keys a section takes hang on its policy: a policy changed alone leaves the old one's behind
    (lambda s: s.update(autoscaler={"policy": False, "interval_s": 5}),  # YAML 1.1 reads `off` as false
     "autoscaler: unknown key 'interval_s' with policy 'off' (allowed here: policy)"),
    (lambda s: s["deployment"].update(replicas=10**3000),  # math.isfinite stopped on OverflowError
     "deployment.replicas: must be at most 1e+18 in size, got 100000000000000000...0000000000000000000"),
    (lambda s: s["deployment"].update({1: "x", None: "y"}), "deployment: unknown key 1"),  # sorting them: TypeError
    (lambda s: s["deployment"].update(replicas=0), "deployment.replicas: must be >= 1"),
    (lambda s: s["deployment"].update(replicas=10**6), "deployment.replicas: must be <= 100000"),  # filled memory
    # Both ran for ever: an autoscaler acting, and a monitor sampling, every 1e-12 s.
    (lambda s: s.update(autoscaler={"policy": "queue-depth", "max_replicas": 2, "target_queue_per_replica": 4,
                                    "interval_s": 1e-12}), "autoscaler.interval_s: must be >= 0.01, got 1e-12"),
    (lambda s: s.update(output={"sample_interval_s": 1e-12}),
     "output.sample_interval_s: 1e-12 s took 1,000,000 samples by 1e-06 s into the run: raise it"),
    (lambda s: s["deployment"]["batching"].update(policy="magic"), "deployment.batching.policy: 'magic' is not one of"),
    (lambda s: s["workload"]["arrivals"].update(rate=-1), "workload.arrivals.rate: must be > 0"),
    (lambda s: s["workload"].pop("output_tokens"), "workload.output_tokens: is required"),
    (lambda s: s["workload"].update(arrivals={"kind": "step", "rates": [5, 0], "durations_s": [10, 10]}),
     "workload.arrivals.rates: the final rate holds after the schedule and is 0"),
    (lambda s: s["deployment"].update(mode="int4"), "has no mode 'int4'"),
    (lambda s: s["deployment"].update(profile="no-such-profile"), "deployment.profile: profile 'no-such-profile' not found"),
    (lambda s: s.update(autoscaler={"policy": "queue-depth", "max_replicas": 2, "min_replicas": 3,
                                    "target_queue_per_replica": 4}), "autoscaler.max_replicas: must be >= 3"),
    (lambda s: s["deployment"].update(workers_per_gpu=100, gpu_memory_utilization=0.1), "do not fit"),
    (lambda s: s["deployment"].update(gpu_memory_utilization=0.05),  # it blamed "1 copies" of the model
     "deployment.gpu_memory_utilization: 4.66 GiB (0.05 of synthetic test device) does not hold the 9.31 GiB model"),
    # A set KV cache skipped the weights' check: a million copies of the model ran as if they fitted.
    (lambda s: s["deployment"].update(workers_per_gpu=100, kv_cache_tokens=10),
     "deployment.workers_per_gpu: 100 copies of the 9.31 GiB model do not fit in 83.82 GiB"),
    (lambda s: s["deployment"].update(kv_cache_tokens=10**9),  # 1 TB of cache on a 100 GB card
     "deployment.kv_cache_tokens: 1,000,000,000 tokens per worker do not fit: 83.82 GiB (0.9 of synthetic test "
     "device) less 1 x the 9.31 GiB model holds at most 80,000,000"),
    (lambda s: s["workload"].update(num_requests=None, duration_s=0.001), "workload: generates no request"),
    (lambda s: s["workload"]["arrivals"].update(rate=1e-30),  # the passes vanished: every latency 0.0
     "workload: arrivals run past 1e+12 s, where the clock cannot time a forward pass"),
    (lambda s: s["workload"].update(num_requests=None, duration_s=1e-200,  # 0 expected: a ValueError
                                    arrivals={"kind": "ramp", "start_rate": 0, "end_rate": 1, "duration_s": 1}),
     "workload: generates no request"),
    # Generating them filled memory before the run began (or, at a rate of 1e300, never ended).
    (lambda s: s["workload"].update(num_requests=None, duration_s=3600, arrivals={"kind": "poisson", "rate": 1e6}),
     "workload.duration_s: 3600 s at up to 1e+06 req/s may ask for 3.6e+09 requests, more than a run holds"),
    (lambda s: s["workload"].update(num_requests=10**9), "workload.num_requests: must be <= 100000000"),
    (lambda s: s["workload"].update(num_requests=None, duration_s=0.5, arrivals={"kind": "gamma", "rate": 1, "cv": 1e6}),
     "workload.arrivals.cv: must be <= 100"),  # its gaps were all 0.0, drawn until memory filled
    # Drawn state by state, microsecond bursts took hours and filled memory with empty states.
    (lambda s: s["workload"].update(arrivals={"kind": "bursty", "rates": [2, 30], "mean_durations_s": [1e-6, 1e-6]}),
     "workload.arrivals.mean_durations_s: at these rates and durations the states change about 3.12e+07 times"),
    (lambda s: s["workload"].update(prompt_keys={"distinct": 10**12}), "workload.prompt_keys.distinct: must be <= 100000000"),
    (lambda s: s.update(workload={"num_requests": 20000, "arrivals": {  # it replayed the 19,366 silently
        "kind": "trace", "trace": str(ROOT / "scenarios/traces/azure-conv-2023.csv")}}),
     "workload.num_requests: the trace holds 19,366 requests"),
    (lambda s: s["deployment"].update(batching={"policy": "continuous", "kv_layout": "padded", "prefix_caching": True}),
     "deployment.batching.prefix_caching: prefix caching needs a paged KV cache"),
    # A budget under the batch: with chunked prefill it capped the batch at 30, without it 64 decodes overran it.
    (lambda s: s["deployment"].update(batching={"policy": "continuous", "max_num_seqs": 64, "max_batched_tokens": 30}),
     "deployment.batching.max_batched_tokens: 30 tokens is less than max_num_seqs (64)"),
    # A mode with no KV cache priced a prefix cache's hits and chunks attending to earlier chunks.
    (lambda s: s["deployment"].update(profile="cpu-gpt2-tiny", mode="fp32-nocache",
                                      batching={"policy": "continuous", "chunked_prefill": True}),
     "deployment.batching.chunked_prefill: mode 'fp32-nocache' keeps no KV cache"),
]


@pytest.mark.parametrize("mutate,message", BAD_SCENARIOS, ids=[m for _, m in BAD_SCENARIOS])
def test_bad_scenarios_fail_with_one_clear_line_and_write_nothing(tmp_path, write_profile, mutate, message):
    s = base_scenario(write_profile(weights_bytes=10**10, memory_bytes=10**11))
    mutate(s)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(s))
    out = tmp_path / "out"
    proc = run("sim.cli", str(path), "--out", str(out), "--quiet")
    assert_one_line_error(proc, str(path), message)
    assert not out.exists()


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("workload: [unclosed\n")
    assert_one_line_error(run("sim.cli", str(path)), str(path), "invalid YAML")
    assert_one_line_error(run("sim.cli", str(tmp_path / "nope.yaml")), "nope.yaml", "cannot read scenario")
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("name: café\n".encode("latin-1"))
    assert_one_line_error(run("sim.cli", str(latin)), "latin1.yaml", "cannot read scenario", "utf-8")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert_one_line_error(run("sim.cli", str(empty)), "empty.yaml: (top level): is empty")
    deep = tmp_path / "deep.yaml"  # past Python's recursion limit: a RecursionError traceback
    deep.write_text("workload: " + "[" * 5000 + "]" * 5000 + "\n")
    assert_one_line_error(run("sim.cli", str(deep)), "deep.yaml: invalid YAML: nested too deeply")
    # Nine lists of ten, each the one before repeated, through aliases: 10^9 values (a plan filled 2 GB in a minute).
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text("workload:\n  - &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)))
    assert_one_line_error(run("sim.cli", str(laughs)), "laughs.yaml: invalid YAML: holds more than 1,000,000 values")
    # Values YAML cannot construct were a ValueError traceback: a date that is none, a number past
    # Python's 4,300 digits.
    for name, value, problem in (("date", "2023-13-45", "month must be in 1..12"),
                                 ("digits", "1" + "0" * 5000, "Exceeds the limit (4300 digits)")):
        bad = tmp_path / f"{name}.yaml"
        bad.write_text(f"seed: {value}\n")
        assert_one_line_error(run("sim.cli", str(bad)), f"{name}.yaml: invalid YAML: a value it cannot read: {problem}")


def test_a_plan_and_a_scenario_each_name_the_command_that_runs_them(tmp_path):
    plan = "scenarios/experiments/capacity.yaml"
    assert_one_line_error(run("sim.cli", plan, "--out", str(tmp_path / "a")), "this is a plan", f"run `plan {plan}`")
    scenario = "scenarios/bursty.yaml"
    assert_one_line_error(run("sim.plan", scenario, "--out", str(tmp_path / "b")),
                          "this is a scenario", f"run `simulate {scenario}`")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_trace_row_is_named_by_line_and_column(tmp_path, write_profile):
    trace = tmp_path / "trace.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,5\n0.5,ten,5\n")
    s = base_scenario(write_profile())
    s["workload"] = {"arrivals": {"kind": "trace", "trace": str(trace)}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(s))
    assert_one_line_error(run("sim.cli", str(path), "--out", str(tmp_path / "o")),
                          "line 3: column num_prefill_tokens", "'ten'")


@pytest.mark.parametrize("rows,message", [
    ("0.0,10,5,7\n", "line 2: more fields than the header names"),  # pandas would shift it into 10,5,7
    ("0.0,10,5\n0.5,10,5,7\n", "Expected 3 fields in line 3, saw 4"),
    ("0.0,10\n", "line 2: column num_decode_tokens: expected a whole number from 1 to 1e\\+18, got ''"),
    # int64 wrapped it, and recording the request stopped on OverflowError
    ("0.0,1e22,5\n", "line 2: column num_prefill_tokens: expected a whole number from 1 to 1e\\+18, got '1e22'"),
    pytest.param("0.0," + "1" * 5000 + ",5\n", "got '1{27}\\.\\.\\.1{28}'$",
                 id="a long value by its start"),  # not all 5,000 digits
])
def test_a_trace_row_of_the_wrong_width_or_range_is_refused(tmp_path, rows, message):
    from sim.errors import InputError
    from sim.workload import read_trace

    trace = tmp_path / "trace.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" + rows)
    with pytest.raises(InputError, match=message):
        read_trace(trace)


def test_a_trace_header_of_no_layout_is_named_by_its_start(tmp_path):
    from sim.errors import InputError
    from sim.workload import read_trace

    trace = tmp_path / "trace.csv"
    trace.write_text("a,b," + "c" * 5000 + "\n1,2,3\n")  # the message held all 5,000 characters
    with pytest.raises(InputError, match=r"unknown trace columns \['a', 'b', 'c+\.\.\.c+'\] \(expected") as e:
        read_trace(trace)
    assert len(str(e.value)) < 300


@pytest.mark.parametrize("content,message", [
    ("{not json", "invalid JSON"),
    pytest.param("[" * 5000 + "]" * 5000, "JSON nested too deeply", id="nested-too-deeply"),  # was a traceback
    ('{"schema_version": 99}', "schema_version: is 99"),
    pytest.param('{"schema_version": 1' + "0" * 5000 + "}", "invalid JSON (Exceeds the limit (4300 digits)",
                 id="past 4,300 digits"),  # was a traceback
    pytest.param('{"schema_version": 1' + "0" * 3000 + "}", "schema_version: is 100000000000000000...0000000000000000000; ",
                 id="3,000 digits"),  # quoted whole
    (f'{{"schema_version": {SCHEMA_VERSION}, "name": "x"}}', "device: is required"),
    (json.dumps(synthetic_profile(model_config={"n_positions": "big"})),
     "model.config: the context window must be a positive integer, got 'big'"),
    # Past overflow once multiplied: the engine overhead's fit stopped on "SVD did not converge".
    (json.dumps(synthetic_profile(flood=flood_section([Step(decode_seqs=1, decode_context=64, reshuffle_tokens=1e308)],
                                                      [0.01], [0.001]))),
     "modes.fp16.flood.reshuffle_tokens[0]: must be at most 1e+18 in size, got 1e+308"),
])
def test_corrupt_profiles_are_rejected_clearly(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    s = base_scenario(bad)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(s))
    assert_one_line_error(run("sim.cli", str(path), "--out", str(tmp_path / "o")), str(bad), message)


def test_azure_layout_trace_is_read(tmp_path):
    from sim.workload import read_trace

    path = tmp_path / "azure.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n")
    trace = read_trace(path)
    assert trace.arrived_at.tolist() == pytest.approx([0.0, 4.314579])
    assert trace.prompt_tokens.tolist() == [374, 396]


def test_azure_timestamps_with_offsets_are_read_and_others_refused(tmp_path):
    """Rows may carry different UTC offsets (pandas raised "Mixed timezones detected"); a time
    that is not ISO 8601 is refused by line, not guessed by dateutil with a warning."""
    from sim.errors import InputError
    from sim.workload import read_trace

    path = tmp_path / "azure.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2024-05-10 00:00:00+00:00,5,5\n2024-05-10 02:00:01+02:00,5,5\n")
    assert read_trace(path).arrived_at.tolist() == [0.0, 1.0]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n10,5,5\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match="line 2: column TIMESTAMP: not an ISO 8601 timestamp: '10'"):
            read_trace(path)


def test_a_results_folder_replaces_only_a_results_folder(tmp_path):
    """A results folder is replaced whole, so `--out` may name nothing, an empty folder or a folder
    a command wrote before; a folder holding anything else (`--out .`), or a file, is refused up
    front and left as it was."""
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out, named, message in ((kept, kept, "a folder servesim did not write"), (afile, afile, "not a folder"),
                                (afile / "sub", afile, "not a folder")):
        proc = run("sim.cli", "scenarios/bursty.yaml", "--out", str(out), "--quiet")
        assert_one_line_error(proc, str(named), message)
    assert (kept / "notes.txt").read_text() == "mine" and afile.read_text() == "mine"
    assert_one_line_error(run("calibration.validate", "scenarios/validation/steady.yaml", "--out", str(kept)),
                          str(kept), "a folder servesim did not write")
    assert_one_line_error(run("profiler.cli", "--device", "cpu", "--quick", "--out", str(kept)),
                          str(kept), "a folder, not a file")
    out = tmp_path / "results"
    for _ in range(2):  # the second run replaces the first's folder
        proc = run("sim.cli", "scenarios/bursty.yaml", "--out", str(out), "--quiet", "--no-report",
                   "--set", "workload.num_requests=50")
        assert proc.returncode == 0, proc.stderr
        assert (out / ".servesim").is_file()


def test_a_run_of_one_request_counts_it_in_the_singular(tmp_path):
    # It read "1 requests simulated" and, in the report, "1 requests over 0 simulated seconds".
    proc = run("sim.cli", "scenarios/bursty.yaml", "--set", "workload.num_requests=1", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert "autoscaler  0 actions\n\n1 request simulated in" in proc.stdout
    assert "1 request over 1.07 s of simulated time" in (tmp_path / "o" / "report.html").read_text()


@pytest.mark.parametrize("args,message", [
    (("sim.cli", "scenarios/bursty.yaml", "--seed", "-1"), "seed: must be >= 0"),
    (("calibration.validate", "scenarios/validation/steady.yaml", "--requests", "0"),
     "argument --requests: expected a whole number, at least 1, got '0'"),
    (("calibration.validate", "scenarios/validation/steady.yaml", "--runs", "-3"), "argument --runs: expected"),
    (("sim.plan", "scenarios/experiments/capacity.yaml", "--workers", "0"), "argument --workers: expected"),
    (("profiler.cli", "--threads", "two"), "argument --threads: expected"),
    (("profiler.cli", "--device", "cpu", "--modes", ","), "--modes ',': names no mode"),  # it measured the defaults
    (("profiler.cli", "--device", "cpu", "--modes", "fp32,fp16,fp32"), "--modes: fp32 is named twice"),  # twice
    # argparse's own errors too: one line, not the usage and then the error
    (("sim.cli", "scenarios/bursty.yaml", "--replicas", "2"), "unrecognized arguments: --replicas 2 (see simulate --help)"),
    (("sim.cli",), "the following arguments are required: scenario"),
])
def test_bad_command_line_values_fail_with_one_clear_line(tmp_path, args, message):
    assert_one_line_error(run(*args, "--out", str(tmp_path / "out")), message)
    assert not (tmp_path / "out").exists()


def test_report_names_the_results_file_that_is_missing_or_corrupt(tmp_path):
    out = tmp_path / "run"
    proc = run("sim.cli", "scenarios/steady.yaml", "--out", str(out), "--quiet", "--no-report")
    assert proc.returncode == 0, proc.stderr
    good = {name: (out / name).read_bytes() for name in ("summary.json", "timeseries.csv", "requests.csv")}
    cut = good["requests.csv"][:300]  # mid-row: pandas would fill the row's missing cells with NaN
    header, first, rest = good["requests.csv"].split(b"\n", 2)
    cells = first.split(b",")
    cells[header.split(b",").index(b"finished_at")] = b"inf"  # drew the report, with numpy's warnings
    infinite = b"\n".join((header, b",".join(cells), rest))
    for name, data, message in (("summary.json", b"{bad", "corrupt"), ("summary.json", b"[" * 5000, "nested too deeply"),
                                ("summary.json", b"[1" + b"0" * 5000 + b"]", "corrupt: Exceeds the limit (4300 digits)"),
                                ("timeseries.csv", b"", "corrupt"),
                                ("requests.csv", cut, "corrupt: the last row is cut off"),
                                ("requests.csv", infinite, "corrupt: column 'finished_at' holds an infinite number")):
        (out / name).write_bytes(data)
        assert_one_line_error(run("reports.cli", str(out)), str(out / name), message)
        (out / name).write_bytes(good[name])
    # Files that parse but lack what the report draws (edited, or another version's) were a KeyError.
    for name, data in (("summary.json", b"[]"), ("requests.csv", good["requests.csv"].replace(b"ttft_s", b"x"))):
        (out / name).write_bytes(data)
        assert_one_line_error(run("reports.cli", str(out)), "results lack what the report needs",
                              "another servesim version")
        (out / name).write_bytes(good[name])
    (out / "requests.csv").unlink()
    assert_one_line_error(run("reports.cli", str(out)), "requests.csv is missing")
    # Neither a folder nor a profile: a file was a NotADirectoryError's traceback.
    assert_one_line_error(run("reports.cli", str(out / "summary.json" / "x")), "no such folder or profile")
    assert_one_line_error(run("reports.cli", str(out / "timeseries.csv")), "not a results folder nor a profile")


def test_a_workload_too_big_for_memory_is_one_line_and_writes_nothing(tmp_path):
    import resource

    def cap_memory():  # 2 GB of address space: the most requests a run takes (100 million) need more
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "sim.cli", "scenarios/steady.yaml", "--out", str(out), "--quiet",
                           "--set", "workload.num_requests=100000000"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, preexec_fn=cap_memory)
    assert_one_line_error(proc, "out of memory", "fewer requests")
    assert not out.exists()


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="reads Linux's MemAvailable")
def test_a_queue_that_outgrows_the_memory_stops_the_run_in_one_line(tmp_path):
    # Linux overcommits: without the check, requests queued faster than one replica serves them
    # grew until the kernel killed the run (exit 137, no word). Here the machine has 300 MB for it.
    script = ("import os, sys; from sim import memory; "
              "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'); "
              "budget = rss() + (300 << 20); memory.available = lambda: budget - rss(); "
              "from sim.cli import main; sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-c", script, "scenarios/steady.yaml", "--out", str(out), "--quiet",
                           "--set", "workload.num_requests=400000", "--set", "deployment.replicas=1",
                           "--set", "workload.arrivals.rate=1000"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert_one_line_error(proc, "out of memory (", " of 400,000 requests arrived, where their results need 140 MB)",
                          "fewer requests")
    assert not out.exists()


def test_the_memory_a_run_can_take_is_what_its_tightest_cgroup_leaves(tmp_path, monkeypatch):
    # A container's memory limit is a cgroup's: MemAvailable reads the host's. In a 400 MB cgroup, a
    # run of 2,000,000 requests was killed by signal 9 after 64 s; it is refused in under a second.
    from sim import memory

    def cgroup(folder, limit: str, usage: int, stat: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        names = ("memory.max", "memory.current") if "v2" in folder.parts else ("memory.limit_in_bytes",
                                                                              "memory.usage_in_bytes")
        (folder / names[0]).write_text(limit + "\n")
        (folder / names[1]).write_text(f"{usage}\n")
        (folder / "memory.stat").write_text(stat)

    mb = 2**20
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    cgroup(v1 / "a" / "b", str(400 * mb), 300 * mb, f"cache 1\ntotal_inactive_file {100 * mb}\n")  # 200 MB left
    cgroup(v1 / "a", "9223372036854771712", 350 * mb, "total_inactive_file 0\n")  # v1's "no limit"
    cgroup(v2, str(1000 * mb), 900 * mb, f"anon 1\ninactive_file {30 * mb}\n")  # 130 MB: the container's root
    (tmp_path / "cgroup").write_text("9:cpu,cpuacct:/x\n\n4:memory:/a/b\n0::/docker/abc\nodd\n")
    monkeypatch.setattr(memory, "PROC_CGROUP", str(tmp_path / "cgroup"))
    monkeypatch.setattr(memory, "CGROUP_FILES", {2: (str(v2),) + memory.CGROUP_FILES[2][1:],
                                                 1: (str(v1),) + memory.CGROUP_FILES[1][1:]})
    assert sorted(memory._cgroup_headroom()) == [130 * mb, 200 * mb]
    assert memory.available() == 130 * mb
    (v2 / "memory.max").write_text("max\n")  # no limit: the v1 cgroup's is the tightest
    assert memory.available() == 200 * mb
    with pytest.raises(MemoryError, match=r"^200 MB free after 0 of 1,000,000 requests arrived, where their "
                                          r"results need 255 MB$"):
        memory.check(1_000_000, 0, 0)


def test_python_s_own_memory_error_has_no_words_and_the_line_no_empty_brackets(capsys):
    from sim.cli_util import run_command

    def run_out():
        raise MemoryError  # as a Python list or dict that cannot grow raises it: "out of memory ()" once

    assert run_command(run_out) == 2
    assert capsys.readouterr().err == "error: out of memory; ask for fewer requests or a shorter duration\n"


def test_a_write_cut_short_by_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    import resource
    import signal

    def cap_file_size():  # a file past 64 KB fails as on a full disk (EFBIG) rather than killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "sim.cli", "scenarios/steady.yaml", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, preexec_fn=cap_file_size)
    assert_one_line_error(proc, f"{out}: cannot finish writing: File too large (left as it was)")
    assert list(tmp_path.iterdir()) == []  # nor the temporary folder it was filling


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("what,moment,left", [
    ("results folder", "while its files are written", "old"),  # undone
    ("results folder", "between the renames that replace it", "new"),  # held, then finished
    ("file", "before the rename onto it", "old"),  # undone
])
def test_a_stop_while_writing_leaves_the_old_results_or_the_new(tmp_path, stop, what, moment, left):
    """A timeout's SIGTERM killed at once, leaving the temporary twin beside the target; between the
    two renames that replace a results folder, it or a Ctrl-C left no results folder at all (the
    old one moved aside). Either still stops the command."""
    import signal

    from sim.files import atomic_folder, write_atomic

    out = tmp_path / "o"
    if what == "file":
        write_atomic(out, "old\n")
    else:
        with atomic_folder(out) as tmp:
            (tmp / "a.csv").write_text("old\n")
    script = f"""
import os, signal
from pathlib import Path
from sim.files import atomic_folder, write_atomic

def stop():
    os.kill(os.getpid(), signal.{stop})

replace = os.replace
out = Path({str(out)!r})
def stopped_on_the_way(a, b):
    if Path(b) == out and {moment != "while its files are written"}:
        stop()
    replace(a, b)
os.replace = stopped_on_the_way
if {what == "file"}:
    write_atomic(out, "new\\n")
else:
    with atomic_folder(out) as tmp:
        if {moment == "while its files are written"}:
            stop()
        (tmp / "a.csv").write_text("new\\n")
print("survived the signal")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == -getattr(signal, stop) and proc.stdout == "", proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temporary twin, no old folder aside
    assert (out if what == "file" else out / "a.csv").read_text() == f"{left}\n"


def test_an_unwritable_out_fails_before_the_work(tmp_path):
    # before minutes of profiling, not after them; /proc refuses a new file even to root
    assert_one_line_error(run("profiler.cli", "--device", "cpu", "--model", "gpt2-tiny", "--out", "/proc/p.json"),
                          "/proc: cannot write here")
    # The profile's rename put a regular file where the pipe was (as root, where /dev/null was).
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert_one_line_error(run("profiler.cli", "--device", "cpu", "--quick", "--out", str(fifo)),
                          f"{fifo}: not a regular file")
    assert fifo.is_fifo()
    # A trailing slash named a folder, and the profile was written as a file of that name.
    assert_one_line_error(run("profiler.cli", "--device", "cpu", "--quick", "--out", f"{tmp_path}/new/"),
                          "argument --out:", "names a folder: give the file too")
    assert not (tmp_path / "new").exists()


def test_profile_refuses_a_model_whose_weights_exceed_the_free_memory_in_its_widest_mode(tmp_path):
    # 20 MiB free: gpt2-tiny's weights take 15 MiB in bf16, which the model is built in, and 30
    # in fp32, which it is converted to for the second mode.
    out = tmp_path / "p.json"
    script = ("import sys; from profiler import regime; regime.available_memory = lambda device: 20 * 2**20; "
              f"from profiler.cli import main; sys.exit(main(['--device', 'cpu', '--quick', '--modes', 'bf16,fp32', "
              f"'--out', {str(out)!r}]))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert_one_line_error(proc, "gpt2-tiny: its weights take 0.03 GiB in float32, more than the 0.02 GiB free on cpu")
    assert not out.exists()


def test_profile_unknown_model_lists_the_known_ones():
    proc = run("profiler.cli", "--device", "cpu", "--model", "gpt5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown model 'gpt5'" in proc.stderr and "llama-3.1-8b" in proc.stderr


def test_profile_gpu_without_cuda_suggests_cpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_line_error(run("profiler.cli", "--gpu", "0", "--model", "gpt2-tiny"), "--gpu 0", "--device cpu")


def test_autoscaler_off_survives_yaml_booleans(tmp_path, write_profile):
    from sim.scenario import load

    s = base_scenario(write_profile())
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(s) + "autoscaler: {policy: off}\n")  # YAML 1.1: off is false
    assert load(path).autoscaler is None


def test_exponent_numbers_are_numbers_in_files_and_overrides(tmp_path, write_profile):
    from sim.scenario import load

    s = base_scenario(write_profile())
    s["workload"]["arrivals"] = {"kind": "poisson", "rate": "RATE"}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(s).replace("RATE", "2e1"))  # YAML 1.1 would read a string
    assert load(path).workload.arrivals.params["rate"] == 20.0
    assert load(path, ["workload.arrivals.rate=2.5e-1"]).workload.arrivals.params["rate"] == 0.25


def test_a_mode_without_kv_cache_simulates_and_says_so(tmp_path):
    proc = run("sim.cli", "scenarios/experiments/single-request.yaml", "--set", "deployment.mode=fp32-nocache",
               "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert "no KV cache in this mode" in proc.stdout


def test_simulate_report_and_the_figures_of_a_validation_need_no_torch(tmp_path):
    """Nothing on the simulator's side imports torch or transformers (they are the profiler's and
    the live engine's): `simulate` and `report` run with both unimportable, and so do the modules
    that read a validation's figures and draw its report."""
    blocked = "import sys; sys.modules.update(torch=None, transformers=None); "
    out = tmp_path / "r"
    for code in (f"from sim.cli import main; sys.exit(main(['scenarios/bursty.yaml', '--set', "
                 f"'workload.num_requests=100', '--out', {str(out)!r}, '--quiet']))",
                 f"from reports.cli import main; sys.exit(main([{str(out)!r}]))",
                 "import calibration.compare, calibration.cost_model, reports.validation_report, sim.plan"):
        proc = subprocess.run([sys.executable, "-c", blocked + code], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert (out / "report.html").is_file()
