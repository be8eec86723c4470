"""Stage one at realistic prompt lengths: the hf backend as it was vs its two levers.

    .venv/bin/python bench/scoring_levers.py [--reduced] [--repeats N]

`selpipe score-ref --backend hf` (in this process, a fresh cache each run) on pairs whose lengths
follow UltraFeedback's (`bench/realistic_data.py`), three ways:

- `before`: `--token-budget 16384`, prompts scored once per completion (the defaults until now);
- `budget auto`: `--token-budget auto`, the budget timed at start-up (start-up included);
- `auto + shared prompts`: also `--share-prompts`, each pair's prompt scored once for both responses.

Runs are interleaved (each repeat runs the three in an order rotated by the repeat); the headline
is each variant's median tokens/s (prompt + completion tokens of every sequence, as score-ref
reports it), with the load average recorded per run. All three write the same log-probs to float
noise; the largest difference from `before` is reported.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import time

import numpy as np

from benchlib import WORK_DIR, ModelSpec, build_model, parameter_count, print_table, set_threads, spec_dict, write_jsonl, write_results
from realistic_data import realistic_rows

SETTINGS = {
    "reduced": {"model": ModelSpec(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=8192), "pairs": 48,
                "repeats": 1},
    "full": {"model": ModelSpec(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1536, vocab=32768), "pairs": 128,
             "repeats": 3},
}
MAX_LENGTH, MAX_PROMPT_LENGTH = 1024, 512
VARIANTS = {"before": {"token_budget": 16384}, "budget auto": {"token_budget": "auto"},
            "auto + shared prompts": {"token_budget": "auto", "share_prompts": True}}


def score(model, data, cache, settings) -> dict:
    from selpipe.pipeline.config import ScoreConfig
    from selpipe.stages.score_ref import run_score_ref

    shutil.rmtree(cache, ignore_errors=True)
    cfg = ScoreConfig(input=str(data), output=str(cache), model=str(model), device="cpu", max_length=MAX_LENGTH,
                      max_prompt_length=MAX_PROMPT_LENGTH, progress=False, **settings)
    load = os.getloadavg()
    summary = run_score_ref(cfg)
    return {"tokens_per_second": summary["tokens_per_second"], "seconds": summary["seconds"], "load_average": load,
            "backend_info": summary["backend_info"]}


def logps(cache) -> np.ndarray:
    import pandas as pd

    table = pd.read_parquet(sorted(glob.glob(str(cache / "part-*.parquet"))))
    return np.concatenate([np.concatenate(table[c].tolist()) for c in ("chosen_ref_logps", "rejected_ref_logps")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    setting = SETTINGS["reduced" if args.reduced else "full"]
    repeats = args.repeats or setting["repeats"]
    started = time.perf_counter()
    set_threads()
    work = WORK_DIR / "scoring-levers"
    model = build_model(setting["model"], WORK_DIR / f"scorer-{setting['model'].hidden}x{setting['model'].layers}")
    data = write_jsonl(realistic_rows(setting["pairs"], seed=3, max_prompt_length=MAX_PROMPT_LENGTH,
                                      max_length=MAX_LENGTH), work / "pairs.jsonl")
    names = list(VARIANTS)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            print(f"[repeat {repeat + 1}/{repeats}] {name}; load average {os.getloadavg()}", flush=True)
            runs[name].append(score(model, data, work / name.replace(" ", "-"), VARIANTS[name]))
    baseline = logps(work / "before")
    rows = []
    for name in names:
        rates = [r["tokens_per_second"] for r in runs[name]]
        rows.append({"variant": name, "tokens_per_second": statistics.median(rates), "runs": len(rates),
                     "ratio_to_before": statistics.median(rates) / statistics.median(r["tokens_per_second"] for r in runs["before"]),
                     "max_abs_diff_to_before": float(np.abs(logps(work / name.replace(" ", "-")) - baseline).max()),
                     "token_budget": runs[name][-1]["backend_info"].get("token_budget"), "all_runs": runs[name]})
    print_table(rows, ["variant", "tokens_per_second", "ratio_to_before", "token_budget", "max_abs_diff_to_before"],
                f"score-ref hf backend at realistic lengths ({parameter_count(setting['model']):,} parameters)")
    write_results("scoring_levers", {"setting": "reduced" if args.reduced else "full", "model": spec_dict(setting["model"]),
                                     "pairs": setting["pairs"], "max_length": MAX_LENGTH, "repeats": repeats}, rows, started)


if __name__ == "__main__":
    main()
