"""The report of one simulation run, built from its results folder (so `report` can rebuild it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from reports.html import figure, page, table
from sim.errors import InputError, parse_words
from sim.results import counted, fmt_cache_hits, fmt_seconds, fmt_slo_value

METRICS = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E"))
# A time series of more than twice this many samples is drawn window by window: a set sample interval
# keeps up to a million, and 850,000 drawn whole made a 69 MB page that a browser crawls through.
DRAWN_WINDOWS = 2000


def read_json(folder: Path, name: str) -> dict:
    return _read_saved(folder, name, lambda path: json.loads(path.read_text(encoding="utf-8")))


def read_csv(folder: Path, name: str, columns: tuple[str, ...] | None = None) -> pd.DataFrame:
    """A results CSV, or only its `columns` (those of them it has: a missing one is the drawing's
    KeyError, as it would be read whole)."""
    def parse(path: Path) -> pd.DataFrame:
        # Every row servesim writes ends in a newline; pandas would fill a cut-off last row with NaN.
        size = path.stat().st_size
        with path.open("rb") as f:
            f.seek(max(size - 1, 0))
            if size and f.read(1) != b"\n":
                raise pd.errors.ParserError("the last row is cut off")
        # Only empty cells are missing: a rejection reason or a label is never read as NaN.
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""],
                            usecols=None if columns is None else lambda column: column in columns)
        # Every number of a requests.csv is finite (a time not reached is empty); an edited infinite
        # one bent the axes and histograms drawn from its column. Elsewhere infinities are meant: the
        # capacity of a mode with no KV cache, the idle time before a live run's first step.
        if name == "requests.csv":
            numbers = frame.select_dtypes("number")
            infinite = numbers.columns[np.isinf(numbers).any()]
            if len(infinite):
                raise ValueError(f"column {infinite[0]!r} holds an infinite number")
        return frame

    return _read_saved(folder, name, parse)


def _read_saved(folder: Path, name: str, parse):
    try:
        return parse(folder / name)
    except FileNotFoundError:
        raise InputError(f"{folder}: not a servesim results folder: {name} is missing") from None
    except ValueError as e:  # not JSON or CSV, not UTF-8, a cut-off row, a number past 4,300 digits
        raise InputError(f"{folder / name}: corrupt: {parse_words(e)}") from None
    except RecursionError:
        raise InputError(f"{folder / name}: corrupt: nested too deeply") from None


def _read(folder: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    summary = read_json(folder, "summary.json")
    # Of requests.csv, only what the report draws: read whole, its 17 columns took 420 bytes a
    # request, and `simulate` of 1,000,000 requests peaked at 652 MB where its results took 231.
    requests = read_csv(folder, "requests.csv", ("arrived_at", "finished_at", "output_tokens") + tuple(
        key for key, _ in METRICS))
    return (summary, requests, *(read_csv(folder, name) for name in ("timeseries.csv", "autoscaler.csv",
                                                                     "batch_sizes.csv")))


def _summary_section(s: dict) -> str:
    slo_rows = [[m.upper(), f"p{t['percentile']:g}", fmt_slo_value(t, s), fmt_seconds(t["max_s"]),
                 f"<span class='{'pass' if t['met'] else 'fail'}'>{'PASS' if t['met'] else 'FAIL'}</span>"]
                for m, t in s["slo"].items()]
    lat_rows = [[label] + [fmt_seconds(s[key][p]) for p in ("p50", "p90", "p95", "p99", "mean")]
                for key, label in METRICS + (("queue_s", "queueing"),)]
    cost_m = s["usd_per_million_output_tokens"]
    kv = s["kv_cache_utilization_mean"]
    facts = [
        ["requests", f"{s['requests']:,} ({s['served']:,} served, {sum(s['rejected'].values()):,} rejected)"],
        ["throughput", f"{s['throughput_rps']:.2f} req/s · {s['output_tokens_per_s']:,.0f} output tok/s"],
        ["goodput", f"{s['goodput_rps']:.2f} req/s meeting every SLO ({s['slo_attainment']:.1%})"],
        ["GPU", f"utilisation {s['gpu_utilization']:.1%} · {s['gpu_hours']:.3f} GPU-hours"],
        ["cost", f"${s['cost_usd']:.2f}" + (f" · ${cost_m:.3f} per 1M output tokens" if cost_m else "")],
        ["batching", f"mean batch {s['mean_batch_size']:.2f} over {s['forward_passes']:,} passes"],
        ["KV cache", "no KV cache" if kv is None else f"mean {kv:.1%}, max {s['kv_cache_utilization_max']:.1%}"],
        ["preemptions · autoscaler", f"{s['preemptions']:,} · {counted(s['autoscaler_actions'], 'action')}"],
        ["cache hits", fmt_cache_hits(s)],
    ]
    verdict = ("<span class='pass'>SLO MET</span>" if s["slo_met"] else "<span class='fail'>SLO MISSED</span>") \
        if s["slo"] else "no SLO given"
    return (f"<h2>Summary — {verdict}</h2><div class='grid'><div>"
            + table(["SLO", "percentile", "simulated", "target", ""], slo_rows)
            + table(["latency", "p50", "p90", "p95", "p99", "mean"], lat_rows)
            + "</div><div>" + table(["figure", "value"], facts) + "</div></div>")


def _cdfs(req: pd.DataFrame, s: dict) -> go.Figure:
    fig = make_subplots(rows=1, cols=3, subplot_titles=[label for _, label in METRICS])
    for col, (key, label) in enumerate(METRICS, start=1):
        v = np.sort(req[key].dropna().to_numpy())
        if len(v) == 0:
            continue
        idx = np.unique(np.linspace(0, len(v) - 1, min(len(v), 400)).astype(int))  # a light curve
        fig.add_trace(go.Scatter(x=v[idx], y=(idx + 1) / len(v), mode="lines", name=label, showlegend=False),
                      row=1, col=col)
        target = s["slo"].get(key[:-2])
        if target:
            fig.add_vline(x=target["max_s"], line_dash="dash", line_color="red", row=1, col=col)
        fig.update_xaxes(title_text="seconds", row=1, col=col)
    fig.update_yaxes(title_text="fraction of requests", row=1, col=1)
    fig.update_layout(title="latency CDFs (red: SLO bound)")
    return fig


def _windows(req: pd.DataFrame, n: int = 60) -> tuple[np.ndarray, pd.core.groupby.DataFrameGroupBy]:
    edges = np.linspace(req["arrived_at"].min(), req["arrived_at"].max() + 1e-9, n + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    return centers, req.groupby(pd.cut(req["arrived_at"], edges, labels=False), observed=True)


def _over_time(req: pd.DataFrame, s: dict) -> go.Figure:
    centers, groups = _windows(req)
    fig = go.Figure()
    for key, label in (("ttft_s", "TTFT"), ("e2e_s", "E2E")):
        for q in (50, 95):
            series = groups[key].quantile(q / 100)
            fig.add_trace(go.Scatter(x=centers[series.index.astype(int)], y=series.to_numpy(), mode="lines",
                                     name=f"{label} p{q}"))
        target = s["slo"].get(key[:-2])
        if target:
            fig.add_hline(y=target["max_s"], line_dash="dash", line_color="red",
                          annotation_text=f"{label} SLO")
    fig.update_layout(title="latency percentiles over time (by arrival window)", xaxis_title="time (s)",
                      yaxis_title="seconds")
    return fig


def _envelope(t: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A long series as each of DRAWN_WINDOWS windows' least and greatest sample, in time order: at a
    page's width the same line, its peaks kept (every k-th sample would skip a burst's)."""
    n = len(v)
    if n <= 2 * DRAWN_WINDOWS:
        return t, v
    k = -(-n // DRAWN_WINDOWS)  # samples a window
    windows = -(-n // k)
    grid = np.full(windows * k, np.nan)  # the last window padded with gaps, which are never picked
    grid[:n] = v
    grid = grid.reshape(windows, k)
    gap = np.isnan(grid)  # KV use where no replica holds a cache
    low, high = np.where(gap, np.inf, grid).argmin(axis=1), np.where(gap, -np.inf, grid).argmax(axis=1)
    idx = np.unique(np.concatenate([low, high]) + np.tile(np.arange(windows) * k, 2))
    return t[idx], v[idx]


def _system(ts: pd.DataFrame) -> go.Figure:
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=["requests queued and running", "replicas", "KV cache use"])
    t = ts["time_s"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        kv = ts["kv_used_tokens"] / ts["kv_capacity_tokens"].replace(0, np.nan)
    lines = [("queued", ts["queued"], 1, {}), ("running (batch)", ts["running"], 1, {}),
             ("replicas (allocated)", ts["replicas"], 2, {"line_shape": "hv"}),
             ("replicas (serving)", ts["ready_replicas"], 2, {"line_shape": "hv"}),
             ("KV used / capacity", kv.replace([np.inf], np.nan), 3, {})]
    for name, values, row, style in lines:
        x, y = _envelope(t, values.to_numpy())
        fig.add_trace(go.Scatter(x=x, y=y, name=name, mode="lines", **style), row=row, col=1)
    fig.update_yaxes(tickformat=".1%", row=3, col=1)
    fig.update_xaxes(title_text="time (s)", row=3, col=1)
    title = "the deployment over time"
    if len(ts) > 2 * DRAWN_WINDOWS:
        title += (f" ({len(ts):,} samples in timeseries.csv, drawn as each of {DRAWN_WINDOWS:,} windows' "
                  "least and greatest)")
    fig.update_layout(title=title)
    return fig


def _throughput(req: pd.DataFrame) -> go.Figure:
    done = req.dropna(subset=["finished_at"])
    edges = np.linspace(0, done["finished_at"].max() + 1e-9, 61)
    width = edges[1] - edges[0]
    counts, _ = np.histogram(done["finished_at"], edges)
    tokens, _ = np.histogram(done["finished_at"], edges, weights=done["output_tokens"])
    arrivals, _ = np.histogram(req["arrived_at"], edges)
    centers = (edges[:-1] + edges[1:]) / 2
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=centers, y=arrivals / width, name="arrivals (req/s)", mode="lines"))
    fig.add_trace(go.Scatter(x=centers, y=counts / width, name="completions (req/s)", mode="lines"))
    fig.add_trace(go.Scatter(x=centers, y=tokens / width, name="output tok/s", mode="lines", line_dash="dot"),
                  secondary_y=True)
    fig.update_layout(title="offered load and throughput", xaxis_title="time (s)")
    fig.update_yaxes(title_text="requests/s", secondary_y=False)
    fig.update_yaxes(title_text="output tokens/s", secondary_y=True)
    return fig


def _batches(batch_sizes: pd.DataFrame) -> go.Figure:
    b = batch_sizes[batch_sizes["forward_passes"] > 0]
    fig = go.Figure(go.Bar(x=b["batch_size"], y=b["forward_passes"]))
    fig.update_layout(title="forward passes by batch size (rows in the pass)", xaxis_title="batch size",
                      yaxis_title="forward passes")
    return fig


def write_run_report(folder: Path) -> Path:
    """Build report.html inside a results folder from the files there."""
    s, req, ts, actions, batch_sizes = _read(folder)
    sections = [_summary_section(s), figure(_cdfs(req, s), "cdfs", 340), figure(_over_time(req, s), "latency_time"),
                figure(_system(ts), "system", 620), figure(_throughput(req), "throughput"),
                figure(_batches(batch_sizes), "batches", 320)]
    if len(actions):
        sections += ["<h2>Autoscaler actions</h2>", table(
            ["time", "action", "replicas", "reason"],
            [[f"{r.time_s:.1f} s", r.action, f"{r.replicas_before} → {r.replicas_after}", r.reason]
             for r in actions.itertuples()])]
    subtitle = (f"{s['policy']} batching · profile {s['profile']} / {s['mode']} · seed {s['seed']} · "
                f"{counted(s['requests'], 'request')} over {fmt_seconds(s['simulated_s'])} of simulated time")
    out = folder / "report.html"
    page(f"servesim: {s['scenario']}", subtitle, sections, out)
    return out
