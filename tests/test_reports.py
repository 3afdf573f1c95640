"""Every kind of report opens in a real browser, renders its plots, and raises no JS error."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=8000", "--enable-logging=stderr", "--v=0"]


def open_in_browser(html: Path, screenshot: Path) -> tuple[str, str]:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("chromium not installed (apt-get install chromium)")
    profile = tempfile.mkdtemp()
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run([*common, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120)
    subprocess.run([*common, "--window-size=1280,2400", f"--screenshot={screenshot}", html.as_uri()],
                   capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    return dom.stdout, dom.stderr


def check(html: Path, tmp_path: Path) -> None:
    figures = len(re.findall(r'<div id="[a-z_0-9]+" class="plotly-graph-div"', html.read_text()))
    assert figures > 0
    shot = tmp_path / (html.parent.name + ".png")
    dom, log = open_in_browser(html, shot)
    assert "Uncaught" not in log and "SyntaxError" not in log, log
    rendered = dom.count('class="main-svg"')
    assert rendered >= figures, f"{rendered} plots rendered of {figures}"
    assert shot.exists() and shot.stat().st_size > 10_000


def test_run_report_renders(tmp_path):
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "sim.cli", "scenarios/bursty.yaml", "--out", str(out), "--quiet"],
                   check=True, cwd=ROOT, capture_output=True)
    check(out / "report.html", tmp_path)


def assert_report_rebuilds_identically(folder):
    """`report <folder>` rewrites the report the command wrote, byte for byte, from the saved results."""
    first = (folder / "report.html").read_bytes()
    (folder / "report.html").unlink()
    subprocess.run([sys.executable, "-m", "reports.cli", str(folder)], check=True, cwd=ROOT, capture_output=True)
    assert (folder / "report.html").read_bytes() == first


def test_rebuilt_report_matches(tmp_path):
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "sim.cli", "scenarios/steady.yaml", "--out", str(out), "--quiet"],
                   check=True, cwd=ROOT, capture_output=True)
    assert_report_rebuilds_identically(out)


def test_profile_report_renders_and_report_rebuilds_it_beside_the_profile(tmp_path):
    # A shipped profile's report is not in git, and `report <profile>` was a NotADirectoryError.
    from calibration.profile import load
    from reports.profile_report import write_report

    html = tmp_path / "profile" / "report.html"
    html.parent.mkdir()
    write_report(load(ROOT / "calibration/profiles/cpu-gpt2-tiny.json"), html)
    check(html, tmp_path)
    shutil.copy(ROOT / "calibration/profiles/cpu-gpt2-tiny.json", tmp_path / "p.json")
    proc = subprocess.run([sys.executable, "-m", "reports.cli", str(tmp_path / "p.json")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p.html").read_bytes() == html.read_bytes()
    # Fields the profile's parser leaves to the report: a string among the peak memories was a traceback.
    profile = json.loads((tmp_path / "p.json").read_text())
    profile["modes"]["fp32"]["decode"]["peak_memory_bytes"] = [["x"]]
    (tmp_path / "p.json").write_text(json.dumps(profile))
    proc = subprocess.run([sys.executable, "-m", "reports.cli", str(tmp_path / "p.json")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "p.json: the profile lacks what the report needs (ValueError: could not convert string" in proc.stderr


def test_capacity_report_renders(tmp_path):
    out = tmp_path / "plan"
    proc = subprocess.run([sys.executable, "-m", "sim.plan", "scenarios/experiments/capacity.yaml", "--out", str(out),
                           "--set", "num_requests=2000"],  # the rendering, not the edge: a short run will do
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    check(out / "report.html", tmp_path)
    assert_report_rebuilds_identically(out)


def test_the_capacity_reports_latency_curves_are_the_slos_own_percentile():
    from reports.capacity_report import _latency_vs_load

    def point(rps, value):
        return {"offered_rps": rps, "slo": {"ttft": {"percentile": 99, "max_s": 1.0, "value_s": value}}}

    curve = [point(1.0, 0.2), point(2.0, 0.5), point(3.0, None)]  # at 3 req/s the p99 is a rejected request
    fig = _latency_vs_load([{"config": "a", "curve": curve}], "ttft", curve[0]["slo"]["ttft"], "offered_rps", "load")
    assert fig.layout.title.text == "TTFT p99 vs load"
    assert list(fig.data[0].x) == [1.0, 2.0] and list(fig.data[0].y) == [0.2, 0.5]


def test_validation_report_renders(validation_run, tmp_path):
    check(validation_run / "report.html", tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(validation_run, copy)  # the run is shared with other tests: rebuild a copy
    assert_report_rebuilds_identically(copy)


def test_a_run_report_reads_only_the_requests_columns_it_draws(tmp_path, write_profile):
    # Read whole, requests.csv's 17 columns took 420 bytes a request: `simulate` of 1,000,000
    # requests peaked at 652 MB where its results took 231, and rebuilding the report of 3,000,000
    # took 1.3 GB. It draws 6 numeric columns from them, 48 bytes a request.
    import tracemalloc

    from conftest import base_scenario
    from helpers import run_scenario
    from reports.run_report import write_run_report
    from sim import results, scenario as scenario_mod

    s = base_scenario(write_profile(), replicas=8)
    s["workload"] |= {"num_requests": 100_000, "arrivals": {"kind": "poisson", "rate": 2000.0}}
    (tmp_path / "s.yaml").write_text(json.dumps(s))
    run, frame, summary = run_scenario(tmp_path / "s.yaml")
    out = tmp_path / "out"
    results.write(out, run, scenario_mod.load(tmp_path / "s.yaml"), frame, summary, report=False)
    write_run_report(out)  # plotly imports its validators as a figure first needs them

    def traced_peak() -> int:
        tracemalloc.start()
        try:
            write_run_report(out)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    whole = traced_peak()
    requests = (out / "requests.csv").read_bytes()
    (out / "requests.csv").write_bytes(requests[:requests.index(b"\n20000,")] + b"\n")  # its first 20,000
    # A request's share, past what every report takes (plotly.js, the page): 48 bytes traced, and 129
    # read whole (tracemalloc does not see the parser's own buffers, which RSS does)
    assert (whole - traced_peak()) / 80_000 < 90


def test_a_densely_sampled_run_is_drawn_window_by_window_keeping_its_peaks():
    # A set sample interval keeps up to a million samples: 850,000 drawn whole made a 69 MB page a
    # browser crawled through. Each window's least and greatest sample draw the same line at a page's
    # width, where every k-th sample would skip a one-sample burst.
    import numpy as np
    import pandas as pd

    from reports.run_report import DRAWN_WINDOWS, _system

    rng = np.random.default_rng(3)
    n = 50_001
    ts = pd.DataFrame({"time_s": np.arange(n) * 1e-3, "queued": rng.integers(0, 5, n),
                       "running": rng.integers(0, 9, n), "replicas": np.repeat([1, 3, 2], [20_000, 20_000, 10_001]),
                       "ready_replicas": np.repeat([1, 2, 2], [20_000, 20_000, 10_001]),
                       "kv_used_tokens": rng.integers(0, 500, n), "kv_capacity_tokens": 1000})
    ts.loc[12_345, "queued"] = 99  # a burst of one sample
    ts.loc[30_000:30_999, "kv_capacity_tokens"] = 0  # no replica holding a cache: a gap in the KV line
    kv = ts["kv_used_tokens"] / ts["kv_capacity_tokens"].replace(0, np.nan)
    columns = [ts["queued"], ts["running"], ts["replicas"], ts["ready_replicas"], kv]
    fig = _system(ts)
    for trace, column in zip(fig.data, columns, strict=True):
        x, y = np.asarray(trace.x), np.asarray(trace.y, float)
        assert len(x) <= 2 * DRAWN_WINDOWS and (np.diff(x) > 0).all()
        index = np.rint(x / 1e-3).astype(int)
        np.testing.assert_array_equal(y, column.to_numpy(float)[index])  # real samples, at their times
        assert np.nanmax(y) == column.max() and np.nanmin(y) == column.min()
    assert 99 in fig.data[0].y and np.isnan(np.asarray(fig.data[4].y, float)).any()
    assert "50,001 samples" in fig.layout.title.text
    short = _system(ts[:2 * DRAWN_WINDOWS])  # drawn whole, as every run with the default interval is
    assert [len(trace.x) for trace in short.data] == [2 * DRAWN_WINDOWS] * 5
