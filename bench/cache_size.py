"""Score-cache size on disk and read speed of the training stream.

    .venv/bin/python bench/cache_size.py [--reduced]

One cache is written by `selpipe.stages.score_ref.run_score_ref` (hf backend). Its rows are then
rewritten, unchanged, as: selpipe's Parquet encodings (`pipeline/cache.py` PARQUET_OPTIONS),
Parquet with pyarrow's defaults (snappy, dictionaries), Parquet with zstd but no byte-stream
split, JSON Lines, and zstd-compressed JSON Lines. Size is bytes per completion token (chosen +
rejected), the unit the per-token log-probs are stored in; every format also holds the ids.

Read speed: one epoch of `CacheStream` (shuffled, as training reads it) through `collate_pairs`
into micro batches, in pairs/s. It is compared with the pairs/s a training step consumes, taken
from `bench/results/train_throughput.json` (same-size reference case) when that file exists.

The log-probs come from a randomly initialised model: near-uniform distributions whose values
sit close to -log(vocab). A trained model's log-probs spread wider (many near 0, a long tail),
which changes how well any of these encodings compress them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchlib import (
    RESULTS_DIR, THREADS, WORK_DIR, ModelSpec, build_model, parameter_count, preference_rows, print_table,
    set_threads, spec_dict, write_jsonl, write_results,
)

SETTINGS = {
    "reduced": {"pairs": 256, "completion_sentences": 6},
    "full": {"pairs": 2048, "completion_sentences": 12},
}
MODEL = ModelSpec(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=384, vocab=8192)
MAX_LENGTH, MAX_PROMPT_LENGTH = 256, 32
GLOBAL_BATCH, MICRO_BATCH = 16, 4


def encodings(table, directory: Path) -> dict[str, int]:
    """Bytes of `table` in each format."""
    import pyarrow.parquet as pq
    import zstandard

    from selpipe.pipeline.cache import PARQUET_OPTIONS

    directory.mkdir(parents=True, exist_ok=True)
    writers = {
        "selpipe parquet": lambda p: pq.write_table(table, p, row_group_size=256, **PARQUET_OPTIONS),
        "parquet defaults": lambda p: pq.write_table(table, p),
        "parquet zstd, no byte-stream split": lambda p: pq.write_table(table, p, compression="zstd", compression_level=6),
    }
    sizes = {}
    for name, write in writers.items():
        path = directory / (name.replace(" ", "_").replace(",", "") + ".parquet")
        write(path)
        sizes[name] = path.stat().st_size
    lines = "".join(json.dumps(row) + "\n" for row in table.to_pylist()).encode()
    sizes["jsonl"] = len(lines)
    sizes["jsonl.zst"] = len(zstandard.ZstdCompressor(level=6).compress(lines))
    return sizes


def stream_pairs_per_second(cache: Path, manifest: dict) -> tuple[float, int]:
    """One shuffled epoch of the training stream, collated into micro batches."""
    from selpipe.pipeline.batching import collate_pairs
    from selpipe.pipeline.stream import CacheStream, StreamPosition

    stream = CacheStream(cache, manifest, rank=0, world_size=1, global_batch_size=GLOBAL_BATCH, seed=0, shuffle_window=16)
    batches = stream.batches(StreamPosition())
    pairs = 0
    started = time.perf_counter()
    for _ in range(stream.batches_per_epoch):
        _, rows = next(batches)
        for start in range(0, len(rows), MICRO_BATCH):
            collate_pairs(rows[start:start + MICRO_BATCH])
        pairs += len(rows)
    return pairs / (time.perf_counter() - started), pairs


def training_pairs_per_second() -> float | None:
    path = RESULTS_DIR / "train_throughput.json"
    if not path.exists():
        return None
    rows = json.loads(path.read_text())["rows"]
    return next(r["selpipe_pairs_per_s"] for r in rows if r["kind"] == "throughput" and r["reference"] == "same size")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="fewer, shorter pairs (a minute or two on 2 cores)")
    args = parser.parse_args()
    setting = "reduced" if args.reduced else "full"
    s = SETTINGS[setting]
    started = time.perf_counter()
    set_threads()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from selpipe.pipeline.cache import load_manifest
    from selpipe.pipeline.config import ScoreConfig
    from selpipe.stages.score_ref import run_score_ref

    work = WORK_DIR / f"cache-size-{setting}"
    model = build_model(MODEL, WORK_DIR / "models" / MODEL.label(), seed=3)
    data = write_jsonl(preference_rows(s["pairs"], s["completion_sentences"], seed=3), work / "pairs.jsonl")
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    run_score_ref(ScoreConfig(input=str(data), output=str(cache), model=str(model), backend="hf", device="cpu",
                              max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH, progress=False))
    manifest = load_manifest(cache)
    totals = manifest["totals"]
    table = pa.concat_tables(pq.read_table(cache / shard["file"]) for shard in manifest["shards"])
    sizes = encodings(table, work / "encodings")

    completion = totals["completion_tokens"]
    rows = [{"kind": "size", "format": name, "bytes": size, "bytes_per_completion_token": size / completion,
             "ratio_to_selpipe": size / sizes["selpipe parquet"]} for name, size in sizes.items()]
    rows.append({"kind": "size", "format": "selpipe cache as written (manifest)", "bytes": totals["bytes"],
                 "bytes_per_completion_token": totals["bytes"] / completion, "ratio_to_selpipe": totals["bytes"] / sizes["selpipe parquet"]})
    stream_rate, streamed = stream_pairs_per_second(cache, manifest)
    train_rate = training_pairs_per_second()
    rows.append({"kind": "stream", "stream_pairs_per_s": stream_rate, "pairs_streamed": streamed,
                 "training_pairs_per_s": train_rate,
                 "ratio_stream_over_training": stream_rate / train_rate if train_rate else None})

    settings = {"setting": setting, **s, "model": spec_dict(MODEL), "max_length": MAX_LENGTH,
                "max_prompt_length": MAX_PROMPT_LENGTH, "rows": totals["rows"], "completion_tokens": completion,
                "prompt_tokens": totals["prompt_tokens"], "global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH,
                "threads": THREADS}
    path = write_results("cache_size", settings, rows, started)
    print(f"{totals['rows']} pairs, {completion:,} completion tokens ({completion / totals['rows'] / 2:.0f} per response), "
          f"{totals['prompt_tokens']:,} prompt tokens; scored by a {parameter_count(MODEL):,}-parameter "
          f"model, vocab {MODEL.vocab}")
    print_table([r for r in rows if r["kind"] == "size"], ["format", "bytes", "bytes_per_completion_token", "ratio_to_selpipe"],
                "cache size on disk")
    print_table([r for r in rows if r["kind"] == "stream"],
                ["stream_pairs_per_s", "pairs_streamed", "training_pairs_per_s", "ratio_stream_over_training"],
                "training stream read speed (CacheStream + collate_pairs) vs what training consumes")
    print(f"\nrows written to {path}")


if __name__ == "__main__":
    main()
