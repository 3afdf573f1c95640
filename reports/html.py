"""One self-contained, offline HTML page of Plotly figures (plotly.js inlined once, no CDN).

Figure ids are fixed, so the same data always gives the same bytes.
"""

from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from sim.files import write_atomic

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
td, th { border: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.pass { color: #fff; background: #2a8a3e; padding: 2px 8px; border-radius: 4px; font-weight: 600; }
.fail { color: #fff; background: #c0392b; padding: 2px 8px; border-radius: 4px; font-weight: 600; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }
"""


def table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(fig: go.Figure, div_id: str, height: int = 380) -> str:
    fig.update_layout(height=height, margin=dict(l=60, r=20, t=50, b=50), template="plotly_white")
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def page(title: str, subtitle: str, sections: list[str], path: Path) -> None:
    text = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(title)}</h1><p class='sub'>{html.escape(subtitle)}</p>"
            + "\n".join(sections) + "</body></html>\n")
    write_atomic(path, text)
