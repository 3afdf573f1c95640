"""The validation report: live vs simulated latency distributions and per-request agreement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from calibration.compare import LEGEND, MEANINGS, summary
from reports.html import figure, page, table

METRICS = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E"))


def _cdf(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.sort(v[~np.isnan(v)])
    return v, np.arange(1, len(v) + 1) / max(len(v), 1)


def write_validation_report(result: dict, requests: pd.DataFrame, steps: pd.DataFrame, path: Path) -> None:
    """The report of a validation: its figures (validation.json's `result`), then per load the
    latency distributions and, over the runs' time, the device's speed and each request's TTFT,
    drawn from requests.csv's and steps.csv's frames."""
    rows = []
    for case in result["cases"]:
        for key, r in case["comparison"].items():
            unit, suffix = (1, " req/s") if key == "throughput_rps" else (1000, " ms")
            fmt = lambda v: "-" if v is None else f"{v * unit:,.1f}{suffix}"  # noqa: E731
            pct = lambda v: "-" if v is None else f"{v:+.1%}"  # noqa: E731
            at_speed = case["comparison_at_run_speed"][key]
            rows.append([case["load"], key, fmt(r["live_mean"]), fmt(r["sim"]), pct(r["error"]),
                         "-" if r["noise"] is None else f"{r['noise']:.1%}", fmt(at_speed["sim"]),
                         pct(at_speed["error"])])
    runs = lambda case: ", ".join(f"{v:.3f}" for v in case["device_speed_per_run"])  # noqa: E731
    sweeps = lambda case: ", ".join(f"{v:.3f}" for v in case["sweep_levels"])  # noqa: E731
    turned_away = lambda case: (f"; {sum(case['rejected'].values()):,} of {case['requests']:,} requests turned "  # noqa: E731
                                "away, live and simulated" if case.get("rejected") else "")
    device = [[case["load"], f"{case['offered_rps']:.2f} req/s ({case['realized_load']:.0%}{turned_away(case)})",
               f"{case['device_speed']:.3f} ({runs(case)}; prefill {case['device_speed_by_kind']['prefill']:.3f}, "
               f"decode {case['device_speed_by_kind']['decode']:.3f})", sweeps(case),
               f"{case['engine_overhead_s']['profile'] * 1000:.2f} ms",
               ", ".join(f"{v * 1000:.2f} ms" for v in case["engine_overhead_s"]["live"])]
              for case in result["cases"]]
    by_pass = [[case["load"], f"{g['pass']} of {g['rows']} row{'s' if g['rows'] != '1' else ''}", g["steps"],
                f"{g['live_ms']:.2f} ms", f"{g['priced_ms']:.2f} ms", f"{g['speed']:.3f}"]
               for case in result["cases"] for g in case["device_speed_by_pass"]]
    sections = ["<h2>Live vs simulated</h2>",
                "<p>" + " ".join(f"<b>{name}</b>: {meaning}" for name, meaning in LEGEND) + "</p>",
                table(["load", "metric", "live (mean of runs)", "simulated", "error", "live run-to-run",
                       "simulated at run speed", "error"], rows),
                "<p>" + "<br>".join(summary(result["cases"])) + "</p>",
                "<h2>The device during the live runs</h2>",
                table(["load", "offered (load met: of the saturation the sweeps around the runs price)",
                       "forward time, live / profile (each run; by kind of pass, which prices at run speed)",
                       "each sweep the profile pools, over the pool (the device's drift)",
                       "engine overhead priced (mean over the runs' steps)",
                       "engine overhead in the live runs (mean)"], device),
                "<p>The same forward time by kind of pass: the device's drift moves every kind alike, a grid that "
                "times some shape unlike the live engine runs it moves that one alone.</p>",
                table(["load", "pass", "steps", "live (mean)", "priced (mean)", "live / priced"], by_pass)]
    for i, case in enumerate(result["cases"]):
        label = case["load"]
        sections.append(figure(_distributions(requests[requests.load == label], label), f"case{i}", 360))
        sections.append(figure(_timeline(requests[requests.load == label], steps[steps.load == label], label),
                               f"timeline{i}", 560))
    subtitle = (f"{result['policy']} batching · profile {result['profile']} / {result['mode']} · "
                f"{result['device']} · torch {result['torch']} · {result['runs']} live runs per load")
    page(f"servesim validation: {result['scenario']}", subtitle, sections, path)


LIVE, SIMULATED = "#1f77b4", "#d62728"  # one colour per side in every panel, so one legend reads for all


def _distributions(requests: pd.DataFrame, label: str) -> go.Figure:
    """CDFs of the first live run and the prediction, and their E2E request by request."""
    live, sim = (requests[requests.run == run] for run in ("live 1", MEANINGS[0][0]))
    fig = make_subplots(rows=1, cols=4, subplot_titles=[m for _, m in METRICS] + ["E2E per request"])
    for col, (key, name) in enumerate(METRICS, start=1):
        for frame, who, dash, colour in ((live, "live", None, LIVE), (sim, "simulated", "dash", SIMULATED)):
            x, y = _cdf(frame[key].to_numpy(float))
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=who, line_dash=dash, line_color=colour,
                                     legendgroup=who, showlegend=col == 1), row=1, col=col)
    e_live, e_sim = live["e2e_s"].to_numpy(float), sim["e2e_s"].to_numpy(float)
    fig.add_trace(go.Scatter(x=e_live, y=e_sim, mode="markers", marker_size=4, marker_color="#444",
                             name="request", showlegend=False), row=1, col=4)
    top = float(np.nanmax([np.nanmax(e_live), np.nanmax(e_sim)]))
    fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", line_dash="dot", line_color="#999",
                             showlegend=False), row=1, col=4)
    fig.update_xaxes(title_text="live E2E (s)", row=1, col=4)
    fig.update_yaxes(title_text="simulated E2E (s)", row=1, col=4)
    fig.update_layout(title=f"load {label}: CDFs (seconds) and per-request E2E")
    return fig


def _timeline(requests: pd.DataFrame, steps: pd.DataFrame, label: str) -> go.Figure:
    """Over each live run's time: how fast the device ran its steps against their price (a
    running median over 25 steps: a slow second shows as a hump), and each request's TTFT by its
    arrival, live and simulated. A miss that sits in one burst, behind a hump, is the device's."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=["forward time, live / priced (running median of 25 steps)",
                                        "TTFT by arrival (seconds)"])
    shades = {"live 1": LIVE, "live 2": "#6baed6"}
    for run, group in steps.groupby("run", sort=False):
        ratio = (group.forward_s / group.priced_forward_s).rolling(25, center=True, min_periods=1).median()
        fig.add_trace(go.Scatter(x=group.started_s, y=ratio, mode="lines", name=run, legendgroup=run,
                                 line_color=shades.get(run, "#444")), row=1, col=1)
    fig.add_hline(y=1.0, line_dash="dot", line_color="#999", row=1, col=1)
    for run, colour in (*shades.items(), (MEANINGS[0][0], SIMULATED)):
        frame = requests[requests.run == run]
        fig.add_trace(go.Scatter(x=frame.arrived_at, y=frame.ttft_s, mode="markers", marker_size=4,
                                 marker_color=colour, name=run, legendgroup=run,
                                 showlegend=run not in set(steps.run)), row=2, col=1)
    fig.update_xaxes(title_text="seconds from the run's start", row=2, col=1)
    fig.update_layout(title=f"load {label}: the device and the requests through the runs")
    return fig
