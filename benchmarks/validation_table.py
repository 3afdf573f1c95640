"""Print the validation matrix (results/validation/*/validation.json) as a Markdown table.

    python benchmarks/validation_table.py [results/validation]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = [("ttft_s.p50", "TTFT p50"), ("ttft_s.p90", "TTFT p90"), ("e2e_s.p50", "E2E p50"), ("e2e_s.p90", "E2E p90"),
        ("tpot_s.p50", "TPOT p50"), ("throughput_rps", "throughput")]


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "results/validation")
    print("| arrivals · batching | load | " + " | ".join(label for _, label in KEYS) + " | live run-to-run (max) |")
    print("|---|---|" + "---|" * len(KEYS) + "---|")
    for path in sorted(folder.glob("*/validation.json")):
        result = json.loads(path.read_text())
        for case in result["cases"]:
            cmp = case["comparison"]
            noise = max(cmp[k]["noise"] for k, _ in KEYS if cmp[k]["noise"] is not None)
            cells = [f"{cmp[k]['error']:+.0%}" for k, _ in KEYS]
            name = f"{result['scenario'].removeprefix('validate-')} · {result['policy']}"
            print(f"| {name} | {case['load']} ({case['offered_rps']:.1f} req/s) | " + " | ".join(cells) + f" | {noise:.0%} |")


if __name__ == "__main__":
    main()
