#!/usr/bin/env bash
# The embedded default, end to end: tiny local models, the demo data, both stages.
# Run from the repository root (`make demo` does). Rerunning resumes and redoes nothing.
set -euo pipefail
export TOKENIZERS_PARALLELISM=false
python data/demo.py models runs/demo/models
echo "== stage one: score the train and eval data with the reference"
selpipe score-ref --config configs/demo-score.json --no-progress >/dev/null
selpipe score-ref --config configs/demo-score.json --input data/demo/eval.jsonl --output runs/demo/eval-cache --no-progress >/dev/null
selpipe inspect runs/demo/cache
echo "== stage two: Selective-DPO (k=0.4) on DeepSpeed ZeRO-2, CPU"
selpipe train --config configs/demo-train.json > runs/demo/train.log 2>&1 || { tail -30 runs/demo/train.log; exit 1; }
python data/summarize_run.py runs/demo/train/summary.json
