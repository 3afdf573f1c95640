#!/usr/bin/env bash
# A model's GPU profile and live validations, made in one call on a lent GPU (the README's GPU
# tables): profile the model on GPU 0, then validate it in MODE for each case at 30%, 60% and
# 90% of saturation. Each validation gets the time left of SECONDS, so the whole run ends inside
# the lease; one cut short keeps the loads it finished (validate writes its folder after each).
#   bash benchmarks/validate_gpu.sh SECONDS MODEL MODES MODE REQUESTS CASE...
#   bash benchmarks/validate_gpu.sh 560 gpt2 fp32-nocache,fp32,fp16,bf16 bf16 120 steady-continuous steady-dynamic
# CASE is <steady|bursty>-<continuous|dynamic>. Profiles go to calibration/profiles/<gpu>-<model>.json;
# one already there is used as it is (a lease's calls are 10 minutes each: the first profiles and
# validates, a later one, given the first's profile back, spends its time on validations),
# validations to results/gpu/<gpu>-<model>/<case>/, and the card's clocks, load, power and
# temperature every half second throughout to results/gpu/<gpu>-<model>/clocks.csv: whether a
# drift in speed is the card's (clocks falling) or the host's (clocks steady, load low). First,
# seconds long, benchmarks/attention_plans.py to results/gpu/<gpu>-<model>/attention_plans.txt:
# what attention costs on a shape met for the first time, with cuDNN and without (the regime).
set -uo pipefail
cd "$(dirname "$0")/.."
budget=$1 model=$2 modes=$3 mode=$4 requests=$5
shift 5
py=${PYTHON:-python3}
gpu=$($py -c "import torch; from profiler.cli import slug; print(slug(torch.cuda.get_device_name(0)))") || exit
name=$gpu-$model
mkdir -p "results/gpu/$name"
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,utilization.gpu,power.draw,temperature.gpu \
  --format=csv -lms 500 > "results/gpu/$name/clocks.csv" &
logger=$!
trap 'kill $logger' EXIT
$py benchmarks/attention_plans.py | tee "results/gpu/$name/attention_plans.txt"
if [[ -f calibration/profiles/$name.json ]]; then
  echo "using calibration/profiles/$name.json as it is"
else
  $py -m profiler.cli --gpu 0 --model "$model" --modes "$modes" --out "calibration/profiles/$name.json" --quiet || exit
fi
dynamic='deployment.batching={policy: dynamic, max_batch_size: 16, max_wait_ms: 20}'
for case in "$@"; do
  arrivals=${case%-*} policy=${case#*-}
  left=$((budget - SECONDS))
  (( left > 30 )) || { echo "no time left for $case"; break; }
  batching=()
  [[ $policy == dynamic ]] && batching=(--set "$dynamic")
  echo "validating $case ($left s left)"
  timeout "$left" $py -m calibration.validate "scenarios/validation/$arrivals.yaml" --gpu 0 --loads 0.3,0.6,0.9 \
    --requests "$requests" --set "deployment.profile=$name" --set "deployment.mode=$mode" "${batching[@]}" \
    --out "results/gpu/$name/$case" --quiet || echo "$case did not finish"
done
