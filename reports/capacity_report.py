"""The capacity report of a plan: latency vs load, saturation, capacity table, Pareto, pick."""

from __future__ import annotations

import math
from pathlib import Path

import plotly.graph_objects as go

from reports.html import figure, page, table
from sim.plan import operating_point, shortfall
from sim.results import counted


def _latency_vs_load(results: list[dict], metric: str, target: dict, x_key: str, x_title: str) -> go.Figure:
    """Each configuration's SLO metric at the SLO's own percentile, against its bound. A point
    with no value (the percentile falls among rejected requests) is left out."""
    fig = go.Figure()
    for r in results:
        pts = [p for p in r["curve"] if p["slo"][metric]["value_s"] is not None]
        fig.add_trace(go.Scatter(x=[p[x_key] for p in pts], y=[p["slo"][metric]["value_s"] for p in pts],
                                 mode="lines+markers", name=r["config"]))
    # On a log axis plotly places a line at its value but an annotation at 10**value (plotly.py
    # issue #2580): add_hline's own annotation at an SLO of 10 s stretched the axis to 1e10 s.
    fig.add_hline(y=target["max_s"], line_dash="dash", line_color="red")
    fig.add_annotation(y=math.log10(target["max_s"]), x=1, xref="paper", text="SLO", showarrow=False,
                       xanchor="right", yanchor="bottom", font_color="red")
    fig.update_layout(title=f"{metric.upper()} p{target['percentile']:g} vs {x_title}", xaxis_title=x_title,
                      yaxis_title="seconds", yaxis_type="log")
    return fig


def _saturation(results: list[dict]) -> go.Figure:
    fig = go.Figure()
    for r in results:
        pts = r["curve"]
        fig.add_trace(go.Scatter(x=[p["offered_rps"] for p in pts], y=[p["throughput_rps"] for p in pts],
                                 mode="lines+markers", name=r["config"]))
    fig.update_layout(title="throughput vs offered load: where adding load stops adding throughput",
                      xaxis_title="offered req/s", yaxis_title="served req/s")
    return fig


def _pareto(results: list[dict], front: list[str]) -> go.Figure:
    fig = go.Figure()
    for on in (True, False):
        pts = [(r["config"], operating_point(r)) for r in results if (r["config"] in front) == on]
        pts = [(n, p) for n, p in pts if p is not None]
        fig.add_trace(go.Scatter(x=[p["usd_per_million_output_tokens"] for _, p in pts],
                                 y=[p["e2e_p95_s"] for _, p in pts], text=[n for n, _ in pts],
                                 mode="markers", marker_size=12 if on else 8,
                                 name="Pareto front" if on else "dominated"))
    fig.update_layout(title="cost vs latency at each configuration's operating point",
                      xaxis_title="$ per 1M output tokens", yaxis_title="p95 E2E (s)")
    return fig


def write_capacity_report(summary: dict, path: Path) -> None:
    results, rec, target = summary["results"], summary["recommendation"], summary["target_rps"]
    slo = next((p["slo"] for r in results for p in r["curve"]), {})
    rows = []
    for r in results:
        p = operating_point(r)
        if p is None:
            rows.append([r["config"], "-", "-", "-", shortfall(r)])
        elif target is None:
            rows.append([r["config"], f"{r['max_rps']:.2f} req/s", f"${p['usd_per_million_output_tokens'] or 0:.3f}",
                         f"{r['requests_per_dollar']:,.0f}", f"{p['e2e_p95_s']:.2f} s"])
        else:
            rows.append([r["config"], counted(r["replicas"], "replica"),
                         f"${p['usd_per_million_output_tokens'] or 0:.3f}",
                         f"${r['usd_per_hour']:.2f}/h", f"{p['e2e_p95_s']:.2f} s"])
    header = (["configuration", "max rate within SLO", "$ per 1M output tokens", "requests per $", "p95 E2E"]
              if target is None else
              ["configuration", "fewest replicas", "$ per 1M output tokens", "cost", "p95 E2E"])
    verdict = (f"<h2>Recommended: {rec['config']}</h2><p>{rec['why']}; the worst SLO metric is "
               f"{rec['slo_margin']:.0%} under its bound.</p>") if rec else \
        "<h2><span class='fail'>No configuration meets the SLO</span></h2>"
    x_key, x_title = ("offered_rps", "offered load (req/s)") if target is None else ("replicas", "replicas")
    sections = [verdict, table(header, rows)]
    for metric in ("ttft", "tpot", "e2e"):
        if metric in slo:
            sections.append(figure(_latency_vs_load(results, metric, slo[metric], x_key, x_title), f"lat_{metric}"))
    if target is None:
        sections.append(figure(_saturation(results), "saturation"))
    sections.append(figure(_pareto(results, summary["pareto"]), "pareto"))
    subtitle = ("maximum sustainable rate per configuration" if target is None
                else f"fewest replicas for {target:g} req/s") + f" · {len(results)} configurations"
    page(f"servesim capacity plan: {summary['plan']}", subtitle, sections, path)
