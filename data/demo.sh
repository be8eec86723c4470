#!/usr/bin/env bash
# The embedded default, end to end: tiny local models, the demo data, both stages.
# Run from the repository root (`make demo` does). Rerunning resumes and redoes nothing.
# Extra arguments go to `selpipe train` and get a run directory of their own, e.g.
#   make demo ARGS="--loss-type ipo --beta 0.5"      make demo ARGS="--lora-rank 8 --learning-rate 1e-3"
set -euo pipefail
export TOKENIZERS_PARALLELISM=false
python data/demo.py models runs/demo/models
echo "== stage one: score the train and eval data with the reference"
selpipe score-ref --config configs/demo-score.json --no-progress >/dev/null
selpipe score-ref --config configs/demo-score.json --input data/demo/eval.jsonl --output runs/demo/eval-cache --no-progress >/dev/null
selpipe inspect runs/demo/cache
run=runs/demo/train
if [ "$#" -gt 0 ]; then run="runs/demo/train-$(echo "$*" | tr -cs 'A-Za-z0-9.' '-' | sed 's/^-*//; s/-*$//')"; fi
echo "== stage two: Selective-DPO (k=0.4) on DeepSpeed ZeRO-2, CPU ${*:+(with $*)}"
selpipe train --config configs/demo-train.json --output "$run" "$@" > "$run.log" 2>&1 || { tail -30 "$run.log"; exit 1; }
python data/summarize_run.py "$run/summary.json"
