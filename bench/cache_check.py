"""Start-up cache checking on 2 processes against 1, and the bytes each rank reads, before and after.

    .venv/bin/python bench/cache_check.py [--pairs N] [--repeats R]

Writes a cache of N synthetic pairs at UltraFeedback-like lengths (prompt 120, chosen 250,
rejected 220 tokens; `bench/realistic_data.py` cites the distribution) with the cache's own
writer, then starts two gloo processes (torch.distributed, as `selpipe train` runs) and times,
in R interleaved rounds, four ways of checking it before step 1:

- before, 1 process / 2 processes: what selpipe did up to commit 63972ac, reproduced in
  `check_before`: every rank reads each shard twice (sha256, then the value checks of
  `check_row_group` from the file again).
- after, 1 process / 2 processes: `open_training_caches` as now: one pass (each shard read once,
  hashed, decoded from the same bytes), by rank 0 alone, whose verdict is broadcast.

"1 process" is rank 0 checking while rank 1 idles; "2 processes" has both ranks start at a
barrier and ends when the slower one has its verdict. Bytes read per rank are counted by the
kernel (`rchar` of /proc/self/io, every read(2)/pread(2) of the process), not by the code measured.
Reports medians, the ratios, and the load average (2 shared cores: read it with the numbers).
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

from benchlib import WORK_DIR, write_results

from selpipe.pipeline.cache import (
    ScoredPair, check_layout, check_row_group, check_tokenizer, file_sha256, load_manifest, open_training_caches,
    write_manifest, write_shard,
)

PROMPT, CHOSEN, REJECTED, VOCAB = 120, 250, 220, 151_936
FINGERPRINT = {"vocab": "synthetic"}


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
    write_manifest(directory, {"schema_version": 1, "tokenizer_fingerprint": FINGERPRINT,
                               "reference": {"dtype": "float32"}, "tokenization": {}})
    return pairs * (PROMPT + CHOSEN + REJECTED)


def check_before(directory: Path) -> None:
    """The start-up check as it was (63972ac: layout, `verify_checksums`, tokenizer, `check_values`):
    sha256 of each file, then every row group read from the file again and checked."""
    import pyarrow.parquet as pq

    manifest = load_manifest(directory)
    check_layout(directory, manifest)
    for shard in manifest["shards"]:
        assert file_sha256(directory / shard["file"]) == shard["sha256"]
    check_tokenizer(directory, manifest, FINGERPRINT)
    for shard in manifest["shards"]:
        parquet = pq.ParquetFile(directory / shard["file"])
        for group in range(parquet.metadata.num_row_groups):
            check_row_group(f"{shard['file']} {group}", parquet.read_row_group(group), VOCAB)


def bytes_read_so_far() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def _measure(dist, rank: int, directory: Path, variant: str, processes: int) -> tuple[float, list[int]]:
    """(seconds from the common start until the slower checking rank has its verdict, bytes each
    rank read). The page cache is warm for every variant alike (dropping it needs root)."""
    dist.barrier()
    before, started = bytes_read_so_far(), time.perf_counter()
    if rank < processes:
        if variant == "before":
            check_before(directory)
        elif processes == 1:
            open_training_caches(str(directory), None, None, FINGERPRINT, VOCAB)
        else:
            def broadcast(text):
                box = [text]
                dist.broadcast_object_list(box, src=0)
                return box[0]
            open_training_caches(str(directory), None, None, FINGERPRINT, VOCAB, rank=rank, broadcast=broadcast)
    seconds, read = time.perf_counter() - started, bytes_read_so_far() - before
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (seconds if rank < processes else 0.0, read))
    return max(s for s, _ in gathered), [b for _, b in gathered]


def worker(rank: int, directory: str, repeats: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results: dict[str, list[tuple[float, list[int]]]] = {}
    for _ in range(repeats):  # interleaved: each round runs every variant once
        for variant in ("after", "before"):
            for processes in (1, 2):
                results.setdefault(f"{variant}_{processes}", []).append(
                    _measure(dist, rank, Path(directory), variant, processes))
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    started = time.time()
    directory = WORK_DIR / f"cache-check-{args.pairs}"
    if not (directory / "manifest.json").exists():
        build_cache(directory, args.pairs)
    out = WORK_DIR / "cache-check-times.json"
    load_before = os.getloadavg()
    mp.spawn(worker, args=(str(directory), args.repeats, 29500 + os.getpid() % 1000, str(out)), nprocs=2)
    load_after = os.getloadavg()
    results = json.loads(out.read_text())
    shard_bytes = sum(p.stat().st_size for p in directory.glob("part-*.parquet"))
    row = {"pairs": args.pairs, "shard_bytes": shard_bytes, "repeats": args.repeats,
           "load_average_before": load_before, "load_average_after": load_after}
    for name, runs in results.items():
        row[f"{name}_seconds_median"] = round(statistics.median(s for s, _ in runs), 3)
        row[f"{name}_seconds"] = [round(s, 3) for s, _ in runs]
        row[f"{name}_bytes_read_rank0_median"] = statistics.median(b[0] for _, b in runs)
        row[f"{name}_bytes_read_rank1_median"] = statistics.median(b[1] for _, b in runs)
    row["ratio_2_vs_1_before"] = round(row["before_2_seconds_median"] / row["before_1_seconds_median"], 3)
    row["ratio_2_vs_1_after"] = round(row["after_2_seconds_median"] / row["after_1_seconds_median"], 3)
    print(json.dumps(row, indent=2))
    print(f"2 processes vs 1: before {row['ratio_2_vs_1_before']}x, after {row['ratio_2_vs_1_after']}x (target <= 1.1x); "
          f"bytes read at start-up on 2 processes, as a multiple of the shards' bytes: before rank 0 "
          f"{row['before_2_bytes_read_rank0_median'] / shard_bytes:.2f}x, rank 1 "
          f"{row['before_2_bytes_read_rank1_median'] / shard_bytes:.2f}x; after rank 0 "
          f"{row['after_2_bytes_read_rank0_median'] / shard_bytes:.2f}x, rank 1 "
          f"{row['after_2_bytes_read_rank1_median'] / shard_bytes:.2f}x")
    write_results("cache_check", vars(args), [row], started)


if __name__ == "__main__":
    sys.exit(main())
