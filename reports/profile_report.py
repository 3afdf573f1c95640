"""The profile report: cost curves per mode, memory, roofline utilisation, fit quality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from calibration.cost_model import EngineOverhead, held_out_errors
from calibration.profile import Profile
from reports.html import figure, page, table


def _curves(profile: Profile, kind: str) -> go.Figure:
    fig = go.Figure()
    for mode in profile.modes.values():
        grid = getattr(mode, kind)
        for i, b in enumerate(grid.batch):
            fig.add_trace(go.Scatter(x=grid.x, y=grid.seconds[i] * 1000, mode="lines+markers",
                                     name=f"{mode.name} b={int(b)}", legendgroup=mode.name))
    xlabel = "prompt length (tokens)" if kind == "prefill" else "context (cached tokens)"
    fig.update_layout(title=f"{kind} pass time", xaxis_title=xlabel, yaxis_title="ms (median)")
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return fig


def _decode_throughput(profile: Profile) -> go.Figure:
    fig = go.Figure()
    for mode in profile.modes.values():
        g = mode.decode
        j = int(np.argmin(np.abs(g.x - 1024)))
        fig.add_trace(go.Scatter(x=g.batch, y=g.batch / g.seconds[:, j], mode="lines+markers",
                                 name=f"{mode.name} (context {int(g.x[j])})"))
    fig.update_layout(title="decode throughput: where batching stops paying", xaxis_title="batch size",
                      yaxis_title="output tokens/s")
    fig.update_xaxes(type="log")
    return fig


def _roofline(profile: Profile) -> tuple[go.Figure, list[list[object]]]:
    """Decode: bytes of weights + KV read per step over step time, against the copy bandwidth.
    Prefill: 2 x matmul parameters FLOPs per token over pass time, against the matmul peak
    (profiles older than the matmul parameter count get no prefill row rather than a wrong one)."""
    bandwidth = profile.raw["device"].get("copy_bytes_per_s")
    params = profile.raw["model"].get("matmul_params")
    fig = go.Figure()
    rows = []
    for mode in profile.modes.values():
        peak_flops = mode.raw.get("peak_flops")
        if mode.kv_cache and bandwidth:
            g = mode.decode
            b, c = np.meshgrid(g.batch, g.x, indexing="ij")
            moved = mode.weights_bytes + mode.kv_bytes_per_token * b * c
            frac = moved / g.seconds / bandwidth
            fig.add_trace(go.Scatter(x=g.batch, y=frac[:, 0], mode="lines+markers",
                                     name=f"{mode.name} decode, context {int(g.x[0])}"))
            rows.append([mode.name, "decode: memory bandwidth", f"{np.nanmax(frac):.0%}"])
        if peak_flops and params:
            g = mode.prefill
            b, p = np.meshgrid(g.batch, g.x, indexing="ij")
            frac = 2 * params * b * p / g.seconds / peak_flops
            rows.append([mode.name, "prefill: matmul throughput", f"{np.nanmax(frac):.0%}"])
    fig.update_layout(title="decode: achieved fraction of measured copy bandwidth", xaxis_title="batch size",
                      yaxis_title="fraction of peak")
    fig.update_xaxes(type="log")
    return fig, rows


def _memory(profile: Profile) -> go.Figure | None:
    fig, any_data = go.Figure(), False
    for mode in profile.modes.values():
        peaks = mode.raw["decode"].get("peak_memory_bytes")
        if not peaks or all(v is None for row in peaks for v in row):
            continue
        any_data = True
        arr = np.array([[np.nan if v is None else v for v in row] for row in peaks], float)
        fig.add_trace(go.Scatter(x=mode.decode.batch, y=arr[:, -1] / 2**30, mode="lines+markers",
                                 name=f"{mode.name}, context {int(mode.decode.x[-1])}"))
    fig.update_layout(title="peak device memory during decode", xaxis_title="batch size", yaxis_title="GiB")
    return fig if any_data else None


def write_report(profile: Profile, path: Path) -> None:
    d = profile.raw["device"]
    modes_rows = []
    for mode in profile.modes.values():
        err = held_out_errors(mode)
        mb = mode.raw.get("max_batch") or {}
        shared = mode.raw.get("passes_of")
        flood = (f"{len(mode.flood.forward_s)} steps" if mode.flood
                 else "none (no KV cache" + (f"; its passes timed once, as {shared}'s)" if shared else ")"))
        modes_rows.append([
            mode.name, mode.dtype, "yes" if mode.kv_cache else "no", "yes" if mode.compiled else "no",
            f"{mode.weights_bytes / 2**20:,.1f} MiB", f"{mode.kv_bytes_per_token:,} B",
            f"{mb.get('batch')} at {mb.get('context')}" if mb.get("batch") else "not probed",
            err["prefill"].cell(), err["decode"].cell(), flood,
        ])
    sections = [
        "<h2>Modes</h2>",
        table(["mode", "dtype", "KV cache", "compiled", "weights", "KV per token", "largest batch",
               "prefill held-out error (median / max)", "decode held-out error", "calibration floods"], modes_rows),
        "<p>Held-out error: each grid line left out in turn and predicted from the rest "
        "(interior lines test interpolation, edge lines extrapolation). Calibration floods: the live "
        "engine's steps through floods of short requests (one after each grid column), from which the "
        "engine overhead above is fitted.</p>",
        "<div class='grid'>" + figure(_curves(profile, "prefill"), "prefill") +
        figure(_curves(profile, "decode"), "decode") + "</div>",
        figure(_decode_throughput(profile), "throughput"),
    ]
    roof, roof_rows = _roofline(profile)
    sections += ["<h2>Roofline</h2>",
                 f"<p>Measured ceilings: copy {d.get('copy_bytes_per_s', 0) / 1e9:,.0f} GB/s (read + write).</p>",
                 table(["mode", "limit", "best achieved"], roof_rows), figure(roof, "roofline")]
    memory = _memory(profile)
    if memory is not None:
        sections.append(figure(memory, "memory"))
    after_rows = [[m.name, str(rows), f"{tokens:g}"] + [f"+{e:.0%}" for e in row]
                  for m in profile.modes.values() if m.after_prefill
                  for rows, excess in zip(m.after_prefill.rows, m.after_prefill.excess)
                  for tokens, row in zip(m.after_prefill.tokens, excess)]
    if after_rows:
        decodes = len(after_rows[0]) - 3
        sections += ["<h2>Decodes just after a prefill</h2>",
                     "<p>How much slower each of the first decodes of that many rows after a prefill (one "
                     "row of that many tokens) ran than the same decode with none before it; the simulator "
                     "adds it to those decodes' price, interpolated over rows and tokens.</p>",
                     table(["mode", "decode rows", "prefill tokens"] + [f"decode {k + 1}" for k in range(decodes)],
                           after_rows)]
    conc_rows = [[m.name] + [f"{k} workers: {v * 1000:.2f} ms" for k, v in sorted(m.concurrency.items())]
                 for m in profile.modes.values() if m.concurrency]
    if conc_rows:
        sections += ["<h2>Workers sharing the device (decode step, batch 1)</h2>",
                     table(["mode"] + [""] * (len(conc_rows[0]) - 1), conc_rows)]
    subtitle = (f"{profile.model_name} on {profile.device_name} · torch {d.get('torch')} · "
                f"transformers {d.get('transformers')} · {profile.raw.get('created_at', '')} · "
                f"model load {profile.model_load_s:.2f} s · "
                f"engine overhead {EngineOverhead.fit(profile)} · first pass after the longest "
                f"idle gap measured: "
                + ", ".join(f"+{m.wake.extra_s[-1] * 1000:.2f} ms after {m.wake.gap_s[-1] * 1000:g} ms ({m.name})"
                            for m in profile.modes.values()))
    page(f"servesim profile: {profile.name}", subtitle, sections, path)
