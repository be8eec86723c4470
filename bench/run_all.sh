#!/usr/bin/env bash
# Every benchmark in turn, then the plots: `bash bench/run_all.sh` (full setting, about 25 minutes
# on 2 CPU cores) or `bash bench/run_all.sh --reduced` (a few minutes). Run from the repository root.
# Rows land in bench/results/*.json, plots in docs/img/. train_throughput runs first because
# cache_size compares the stream's read speed with the training pairs/s it measured.
set -euo pipefail
PY=.venv/bin/python
for script in train_throughput memory scoring cache_size; do
    echo "== bench/$script.py $*"
    "$PY" "bench/$script.py" "$@"
done
"$PY" bench/plots.py
