#!/usr/bin/env bash
# The CPU validation matrix behind the README's tables: steady and bursty arrivals, dynamic and
# continuous batching, at 30%, 60% and 90% of saturation, 120 requests, two live runs each (11-17 minutes).
#   bash benchmarks/validate_cpu.sh [out-folder] [profile]    (profile default: the scenarios' cpu-gpt2-tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/validation}
profile=(${2:+--set "deployment.profile=$2"})
dynamic='deployment.batching={policy: dynamic, max_batch_size: 16, max_wait_ms: 20}'
for arrivals in steady bursty; do
  validate "scenarios/validation/$arrivals.yaml" --loads 0.3,0.6,0.9 --requests 120 "${profile[@]}" --out "$out/$arrivals-continuous" --quiet
  validate "scenarios/validation/$arrivals.yaml" --loads 0.3,0.6,0.9 --requests 120 --set "$dynamic" "${profile[@]}" --out "$out/$arrivals-dynamic" --quiet
done
