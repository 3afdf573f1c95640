"""Turning a simulation run into tidy tables, a summary, and files on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sim.files import atomic_folder
from sim.scenario import Scenario
from sim.simulator import REJECT_REASONS, Outcome, Run
from sim.workload import Trace

PERCENTILES = (50, 90, 95, 99)


def requests_frame(t: Trace, o: Outcome) -> pd.DataFrame:
    """One row per request (of a simulated or a live run), times in seconds from the trace's start."""
    decode_steps = t.output_tokens - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(decode_steps > 0, (o.finished_at - o.first_token_at) / decode_steps, np.nan)
    tpot[o.cache_hit] = np.nan  # a cached answer has no decoding
    return pd.DataFrame({
        "request_id": np.arange(len(t)),
        "arrived_at": t.arrived_at,
        "scheduled_at": o.scheduled_at,
        "first_token_at": o.first_token_at,
        "finished_at": o.finished_at,
        "prompt_tokens": t.prompt_tokens,
        "output_tokens": t.output_tokens,
        "queue_s": o.scheduled_at - t.arrived_at,
        "ttft_s": o.first_token_at - t.arrived_at,
        "tpot_s": tpot,
        "e2e_s": o.finished_at - t.arrived_at,
        "replica": o.replica,
        "worker": o.worker,
        "cache_hit": o.cache_hit,
        "preemptions": o.preemptions,
        "prefix_cached_tokens": o.prefix_cached_tokens,
        "rejected": np.array(REJECT_REASONS, dtype=object)[o.rejected],
    }, copy=False)  # views of the trace's and the outcome's arrays: copies were 67 bytes a request


def timeseries_frame(run: Run) -> pd.DataFrame:
    return pd.DataFrame({name: np.asarray(column) for name, column in run.samples.items()})


def _stats(values: pd.Series) -> dict[str, float | None]:
    v = values.dropna().to_numpy()
    if len(v) == 0:
        return {f"p{p}": None for p in PERCENTILES} | {"mean": None}
    out = {f"p{p}": float(x) for p, x in zip(PERCENTILES, np.percentile(v, PERCENTILES))}
    out["mean"] = float(v.mean())
    return out


def prefix_hit_rate(prefilled: pd.DataFrame) -> float | None:
    """vLLM's prefix cache hit rate: the prompt tokens the prefills found in the cache, over the
    prompt tokens they asked for (None when no request reached a prefill)."""
    asked = int(prefilled["prompt_tokens"].sum())
    return int(prefilled["prefix_cached_tokens"].sum()) / asked if asked else None


def meets_slo(frame: pd.DataFrame, scenario: Scenario) -> pd.Series:
    """Per request: served, and within every SLO bound (a request with no TPOT meets that one)."""
    ok = frame["finished_at"].notna()
    for target in scenario.slo:
        col = frame[f"{target.metric}_s"]
        ok &= col.isna() | (col <= target.max_s) if target.metric == "tpot" else col <= target.max_s
    return ok


def summarise(run: Run, scenario: Scenario, frame: pd.DataFrame) -> dict[str, Any]:
    is_served = frame["finished_at"].notna()
    served = frame[is_served]
    start = float(frame["arrived_at"].min())
    # With nothing served every rate is 0 (an infinite span), not NaN, which JSON cannot hold.
    span = max(float(served["finished_at"].max()) - start, 1e-12) if len(served) else math.inf
    output_tokens = int(served["output_tokens"].sum())
    good = meets_slo(frame, scenario)
    slo = {}
    for target in scenario.slo:
        # A rejected request never gets its tokens: it counts as missing every bound, so a
        # deployment that turns away more than the percentile allows fails (value None), however
        # fast it serves the rest. A served request with no TPOT (one token, a cache hit) is left out.
        # With no request left (every one served in one token or from the cache), none misses it.
        col = frame[f"{target.metric}_s"].where(is_served, math.inf).dropna()
        with np.errstate(invalid="ignore"):  # inf - inf between two rejected requests
            at = float(np.percentile(col, target.percentile)) if len(col) else math.nan
        value = at if math.isfinite(at) else None
        met = value <= target.max_s if value is not None else not len(col)
        slo[target.metric] = {"percentile": target.percentile, "max_s": target.max_s, "value_s": value, "met": met}
    gpu_hours = run.gpu_seconds / 3600
    cost = gpu_hours * scenario.usd_per_gpu_hour
    ts = timeseries_frame(run)
    with np.errstate(invalid="ignore", divide="ignore"):
        kv_frac = (ts["kv_used_tokens"] / ts["kv_capacity_tokens"]).replace([np.inf, -np.inf], np.nan)
    passes = run.batch_sizes
    rejected = frame["rejected"][frame["rejected"] != ""].value_counts().sort_index()
    workers = scenario.deployment.workers_per_gpu
    return {
        "scenario": scenario.name,
        "seed": scenario.seed,
        "profile": str(scenario.deployment.profile.stem),
        "mode": scenario.deployment.mode,
        "policy": scenario.deployment.batching.policy,
        "requests": int(len(frame)),
        "served": int(len(served)),
        "rejected": {str(k): int(v) for k, v in rejected.items()},
        "ttft_s": _stats(served["ttft_s"]),
        "tpot_s": _stats(served["tpot_s"]),
        "e2e_s": _stats(served["e2e_s"]),
        "queue_s": _stats(served["queue_s"]),
        "throughput_rps": len(served) / span,
        "output_tokens_per_s": output_tokens / span,
        "goodput_rps": int(good.sum()) / span,
        "slo_attainment": float(good.mean()),
        "slo": slo,
        "slo_met": all(s["met"] for s in slo.values()),
        "mean_batch_size": float((passes * np.arange(len(passes))).sum() / max(passes.sum(), 1)),
        "forward_passes": int(passes.sum()),
        "gpu_utilization": min(run.busy_s / max(run.gpu_seconds * workers, 1e-12), 1.0),
        "kv_cache_utilization_mean": float(kv_frac.mean()) if kv_frac.notna().any() else None,
        "kv_cache_utilization_max": float(kv_frac.max()) if kv_frac.notna().any() else None,
        "kv_cache_tokens_per_worker": None if math.isinf(run.kv_capacity) else int(run.kv_capacity),
        "preemptions": int(frame["preemptions"].sum()),
        "cache_hit_rate": float(frame["cache_hit"].mean()),
        "prefix_cache_hit_rate": prefix_hit_rate(served[~served["cache_hit"]]),
        "gpu_hours": gpu_hours,
        "cost_usd": cost,
        "usd_per_million_output_tokens": cost / output_tokens * 1e6 if output_tokens else None,
        "autoscaler_actions": len(run.actions),
        "simulated_s": run.end_s,
    }


def fmt_seconds(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def counted(n: int, noun: str) -> str:
    """A count with its noun, singular for one: "1 replica", "2 replicas"."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def fmt_cache_hits(summary: dict[str, Any]) -> str:
    """Both caches' hit rates, each counted as its own kind of cache is."""
    return (f"{summary['cache_hit_rate']:.1%} of requests (response cache), "
            f"{summary['prefix_cache_hit_rate'] or 0:.1%} of prompt tokens (prefix cache)")


def fmt_slo_value(target: dict[str, Any], summary: dict[str, Any]) -> str:
    """An SLO metric's value at its percentile, or why it has none."""
    if target["value_s"] is None and summary["served"] < summary["requests"]:
        return "rejected"  # the percentile falls among the requests turned away
    return fmt_seconds(target["value_s"])


def table(summary: dict[str, Any]) -> str:
    """The summary as a human-readable table."""
    s = summary
    lines = [f"servesim: {s['scenario']}  ({s['policy']} batching, profile {s['profile']} / {s['mode']}, seed {s['seed']})",
             "",
             f"{'latency':<10}{'p50':>12}{'p90':>12}{'p95':>12}{'p99':>12}{'mean':>12}"]
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E"), ("queue_s", "queueing")):
        st = s[key]
        lines.append(f"{label:<10}" + "".join(f"{fmt_seconds(st[k]):>12}" for k in ("p50", "p90", "p95", "p99", "mean")))
    rejected = ", ".join(f"{k} {v}" for k, v in s["rejected"].items()) or "none"
    kv = s["kv_cache_utilization_mean"]
    cost_m = s["usd_per_million_output_tokens"]
    rows = [
        ("requests", f"{s['requests']:,} ({s['served']:,} served; rejected: {rejected})"),
        ("throughput", f"{s['throughput_rps']:.2f} req/s, {s['output_tokens_per_s']:,.0f} output tok/s"),
        ("goodput", f"{s['goodput_rps']:.2f} req/s meeting every SLO ({s['slo_attainment']:.1%} of requests)"),
    ]
    for metric, t in s["slo"].items():
        verdict = "PASS" if t["met"] else "FAIL"
        value, bound = fmt_slo_value(t, s), fmt_seconds(t["max_s"])
        rows.append((f"SLO {metric}", f"p{t['percentile']:g} {value} vs {bound}  {verdict}"))
    rows += [
        ("batching", f"mean batch {s['mean_batch_size']:.2f} over {s['forward_passes']:,} forward passes"),
        ("GPU", f"utilisation {s['gpu_utilization']:.1%}, {s['gpu_hours']:.3f} GPU-hours"),
        ("KV cache", "no KV cache in this mode" if kv is None or s["kv_cache_tokens_per_worker"] is None else
         f"mean {kv:.1%}, max {s['kv_cache_utilization_max']:.1%} of {s['kv_cache_tokens_per_worker']:,} tokens/worker"),
        ("preemptions", f"{s['preemptions']:,}"),
        ("cache hits", fmt_cache_hits(s)),
        ("cost", f"${s['cost_usd']:.2f}" + (f", ${cost_m:.3f} per 1M output tokens" if cost_m is not None else "")),
        ("autoscaler", counted(s["autoscaler_actions"], "action")),
    ]
    lines.append("")
    lines += [f"{k:<12}{v}" for k, v in rows]
    return "\n".join(lines)


def write(out: Path, run: Run, scenario: Scenario, frame: pd.DataFrame, summary: dict[str, Any],
          report: bool = True) -> None:
    """Write the results folder atomically: requests.csv, timeseries.csv, autoscaler.csv,
    batch_sizes.csv, summary.json, the scenario, and report.html built from them."""
    with atomic_folder(out) as tmp:
        frame.to_csv(tmp / "requests.csv", index=False)
        timeseries_frame(run).to_csv(tmp / "timeseries.csv", index=False)
        pd.DataFrame(run.actions, columns=["time_s", "action", "replicas_before", "replicas_after", "reason"]) \
            .to_csv(tmp / "autoscaler.csv", index=False)
        pd.DataFrame({"batch_size": np.arange(len(run.batch_sizes)), "forward_passes": run.batch_sizes}) \
            .to_csv(tmp / "batch_sizes.csv", index=False)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (tmp / "scenario.yaml").write_text(Path(scenario.path).read_text(encoding="utf-8"), encoding="utf-8")
        if report:
            from reports.run_report import write_run_report

            write_run_report(tmp)
