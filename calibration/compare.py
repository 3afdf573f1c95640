"""How far a simulation is from live runs of the same requests: the figures both are read
down to, their relative error, the live runs' own noise beside it, and the text that `validate`
and the validation benchmarks print. Pure arithmetic on tidy frames: no torch."""

from __future__ import annotations

import math
import statistics
import textwrap

import numpy as np

METRICS = ("ttft_s", "tpot_s", "e2e_s")
QUANTILES = (50, 90, 99)
TARGETED = ("ttft_s.p50", "ttft_s.p90", "e2e_s.p50", "e2e_s.p90")  # the figures the 10% target covers
# The figures a validation table shows, and their column labels.
LABELS = {"ttft_s.p50": "TTFT p50", "ttft_s.p90": "TTFT p90", "e2e_s.p50": "E2E p50", "e2e_s.p90": "E2E p90",
          "tpot_s.p50": "TPOT p50", "throughput_rps": "throughput"}
# What each simulation of a case is, for the printed table and the HTML report.
MEANINGS = (
    ("simulated", "priced by the profile swept before, between and after the live runs (the prediction)."),
    ("at run speed", "the same, with prefill and decode times scaled by how fast the device ran the live runs' "
                     "prefill and decode passes, which takes the device's drift out and leaves the simulator's "
                     "own error."),
    ("scenario's profile", "the same simulation priced by the profile the scenario names, as it was measured, "
                           "not swept around the runs: how well a profile taken earlier predicts today's device."),
)
# The summary's last line: how far the live runs' own noise alone leaves a perfect simulation.
NOISE_LABEL = "a perfect simulation, against the runs' noise"
NOISE_MEANING = ("how many figures a simulation predicting exactly what a run gives on average would put within "
                 "10% of the mean of these live runs, drawn from their own spread (with two runs, as half "
                 "their difference): as many as these runs' noise allows, before the device's drift between "
                 "the sweeps and the runs.")
# What every line of a validation's text and report means, in the order they are printed.
LEGEND = (*MEANINGS, (NOISE_LABEL, NOISE_MEANING))


def percentiles(frame) -> dict:
    """One run's figures from its requests (a requests frame, live or simulated): TTFT, TPOT and
    E2E at each quantile, and the requests finished per second from the first arrival."""
    out = {}
    for m in METRICS:
        v = frame[m].dropna().to_numpy()
        out[m] = {f"p{q}": float(np.percentile(v, q)) if len(v) else None for q in QUANTILES}
    done = frame["finished_at"].dropna()
    out["throughput_rps"] = len(done) / float(done.max() - frame["arrived_at"].min())
    return out


def rel(a, b):
    return None if a is None or b is None or b == 0 else (a - b) / b


def compare(live: list[dict], sim: dict) -> dict:
    """Simulated vs the mean of the live runs, with the live runs' spread as the noise floor."""
    rows = {}
    keys = [(m, f"p{q}") for m in METRICS for q in QUANTILES] + [("throughput_rps", None)]
    for metric, q in keys:
        pick = (lambda d: d[metric][q]) if q else (lambda d: d[metric])
        lives = [pick(d) for d in live]
        mean = float(np.mean(lives)) if None not in lives else None
        noise = (max(lives) - min(lives)) / mean if mean and len(lives) > 1 else None
        rows[f"{metric}.{q}" if q else metric] = {"live": lives, "live_mean": mean, "sim": pick(sim),
                                                  "error": rel(pick(sim), mean), "noise": noise}
    return rows


def noise_error(lives: list[float]) -> float:
    """An error drawn as a perfect simulation's would be, from the live runs' own spread.

    A perfect simulation predicts the figure a run gives on average; its error against the mean
    of n runs, each off by its own noise, is that mean's noise: spread sigma / sqrt(n). The
    contrast k * (run 1 - the mean of the others), k = sqrt(n - 1) / n, has that same spread and
    no average (1/2 * (run 1 - run 2) for two runs), so it is one draw of that error: counted
    over a matrix, how many figures the runs' noise alone leaves within 10%. It knows nothing of
    the device's level drifting between the sweeps and the runs, which the prediction also pays."""
    n = len(lives)
    contrast = math.sqrt(n - 1) / n * (lives[0] - sum(lives[1:]) / (n - 1))
    return contrast / (sum(lives) / n)


def summary(cases: list[dict]) -> list[str]:
    """How many targeted figures the prediction, the same at run speed, and the scenario's own
    profile put within 10%, and as many as the live runs' own noise would leave a perfect one."""
    lines = []

    def line(label: str, errors: list[float]) -> None:
        lines.append(f"{label}: TTFT/E2E p50/p90 within 10%: {sum(e <= 0.10 for e in errors)} of {len(errors)}; "
                     f"median |error| {statistics.median(errors):.0%}, max {max(errors):.0%}")

    for label, which in (("prediction", "comparison"), ("at run speed", "comparison_at_run_speed"),
                         ("scenario's profile", "comparison_shipped")):
        if any(which not in case for case in cases):  # transformers' engine has no profile of its own
            continue
        line(label, [abs(case[which][key]["error"]) for case in cases for key in TARGETED])
    figures = [case["comparison"][key]["live"] for case in cases for key in TARGETED]
    if all(len(lives) > 1 for lives in figures):
        line(NOISE_LABEL, [abs(noise_error(lives)) for lives in figures])
    return lines


def table(result: dict) -> str:
    lines = [f"validation: {result['scenario']} ({result['policy']} batching, {result['profile']} / "
             f"{result['mode']}, {result['device']})", "",
             f"{'load':<9}{'metric':<16}{'live':>11}{'sim':>11}{'error':>9}{'live noise':>12}"
             f"{'sim at run speed':>18}{'error':>9}"]
    for case in result["cases"]:
        for key, row in case["comparison"].items():
            if key.endswith("p99"):
                continue
            at_speed = case["comparison_at_run_speed"][key]
            unit = 1 if key == "throughput_rps" else 1000
            fmt = (lambda v: "-" if v is None else f"{v * unit:,.1f}")
            pct = (lambda v: "-" if v is None else f"{v:+.1%}")
            label = key.replace("_s.", " ").replace("_rps", " req/s") + ("" if key == "throughput_rps" else " ms")
            lines.append(f"{case['load']:<9}{label:<16}{fmt(row['live_mean']):>11}{fmt(row['sim']):>11}"
                         f"{pct(row['error']):>9}{pct(row['noise']):>12}{fmt(at_speed['sim']):>18}"
                         f"{pct(at_speed['error']):>9}")
        lines.append(f"{case['load']:<9}offered {case['offered_rps']:.2f} req/s: {case['realized_load']:.0%} of the "
                     "saturation priced by the sweeps around the runs")
        if case.get("rejected"):  # absent from validations written before it was recorded
            reasons = ", ".join(f"{k} {v:,}" for k, v in case["rejected"].items())
            lines.append(f"{case['load']:<9}turned away {sum(case['rejected'].values()):,} of {case['requests']:,} "
                         f"requests, live and simulated ({reasons}): the figures are of the rest")
        overhead = case["engine_overhead_s"]
        runs = ", ".join(f"{v:.3f}" for v in case["device_speed_per_run"])
        sweeps = ", ".join(f"{v:.3f}" for v in case["sweep_levels"])
        kinds = case["device_speed_by_kind"]
        lines.append(f"{case['load']:<9}device ran {case['device_speed']:.3f}x the profile's forward times "
                     f"(prefill {kinds['prefill']:.3f}x, decode {kinds['decode']:.3f}x; runs: {runs}; "
                     f"the sweeps it pools ran {sweeps}x)")
        lines.append(f"{case['load']:<9}engine overhead {overhead['profile'] * 1000:.2f} ms/step priced, "
                     + ", ".join(f"{v * 1000:.2f}" for v in overhead["live"]) + " ms live")
        lines.append(f"{case['load']:<9}by pass, live / priced (steps): " + ", ".join(
            f"{g['pass']} {g['rows']} {g['speed']:.2f} ({g['steps']})" for g in case["device_speed_by_pass"]))
    lines += ["", *summary(result["cases"]), "",
              *(textwrap.fill(f"{name}: {meaning}", 100) for name, meaning in LEGEND)]
    return "\n".join(lines)
