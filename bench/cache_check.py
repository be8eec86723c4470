"""What checking every cache value before step 1 costs (`pipeline.cache.open_training_caches`).

    .venv/bin/python bench/cache_check.py [--pairs N] [--repeats R]

Writes a cache of N synthetic pairs at UltraFeedback-like lengths (prompt 120, chosen 250,
rejected 220 tokens; `bench/realistic_data.py` cites the distribution) with the cache's own
writer, then times the whole pre-training check (layout, checksums, tokenizer fingerprint, every
value with Arrow compute) over R repeats and reports the median, per million tokens, and as a
fraction of one epoch of `selpipe train` at the fastest rate bench/results/train_throughput.json
measured (the tiny CPU benchmark model: the least favourable comparison; a real policy trains
orders of magnitude fewer pairs per second).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchlib import BENCH_DIR, WORK_DIR, write_results

from selpipe.pipeline.cache import ScoredPair, open_training_caches, write_manifest, write_shard

PROMPT, CHOSEN, REJECTED, VOCAB = 120, 250, 220, 151_936


def build_cache(directory: Path, pairs: int, shard_size: int = 4096) -> int:
    """A cache of `pairs` rows of random ids and log-probs; returns its token count."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, pairs, shard_size)):
        rows = []
        for i in range(start, min(pairs, start + shard_size)):
            rows.append(ScoredPair(
                id=f"p{i}", prompt_ids=rng.integers(0, VOCAB, PROMPT).tolist(),
                chosen_ids=rng.integers(0, VOCAB, CHOSEN).tolist(), rejected_ids=rng.integers(0, VOCAB, REJECTED).tolist(),
                chosen_ref_logps=(-rng.exponential(2.0, CHOSEN)).astype(np.float32).tolist(),
                rejected_ref_logps=(-rng.exponential(2.0, REJECTED)).astype(np.float32).tolist()))
        write_shard(directory, 0, index, rows, [], 0, row_group_size=256)
    fingerprint = {"vocab": "synthetic"}
    write_manifest(directory, {"schema_version": 1, "tokenizer_fingerprint": fingerprint, "reference": {"dtype": "float32"},
                               "tokenization": {}})
    return pairs * (PROMPT + CHOSEN + REJECTED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    started = time.time()
    directory = WORK_DIR / f"cache-check-{args.pairs}"
    if not (directory / "manifest.json").exists():
        build_cache(directory, args.pairs)
    tokens = args.pairs * (PROMPT + CHOSEN + REJECTED)
    seconds = []
    for _ in range(args.repeats):
        begin = time.perf_counter()
        open_training_caches(str(directory), None, None, {"vocab": "synthetic"}, VOCAB)
        seconds.append(time.perf_counter() - begin)
    median = statistics.median(seconds)
    throughput = json.loads((BENCH_DIR / "results" / "train_throughput.json").read_text())
    rates = [r["selpipe_pairs_per_s"] for r in throughput["rows"] if r.get("selpipe_pairs_per_s")]
    fastest = max(rates) if rates else None
    row = {"pairs": args.pairs, "tokens": tokens, "bytes": sum(p.stat().st_size for p in directory.glob("part-*.parquet")),
           "check_seconds_median": round(median, 3), "check_seconds": [round(s, 3) for s in seconds],
           "seconds_per_million_tokens": round(median / tokens * 1e6, 4), "load_average": os.getloadavg(),
           "fastest_benchmark_pairs_per_second": fastest,
           "fraction_of_one_epoch_at_that_rate": round(median / (args.pairs / fastest), 4) if fastest else None}
    print(json.dumps(row, indent=2))
    write_results("cache_check", vars(args), [row], started)


if __name__ == "__main__":
    sys.exit(main())
