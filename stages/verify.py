"""`selpipe verify CACHE --model M`: recompute a random sample with the transformers backend.

vLLM and transformers do not agree bit for bit (different kernels, different reduction
orders); this reports by how much, per token, and fails above a tolerance.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

import pyarrow.parquet as pq

from selpipe.pipeline.cache import load_manifest, verify_checksums


def sample_rows(path: str | Path, manifest: dict[str, Any], sample: int, seed: int) -> list[dict[str, Any]]:
    """A seeded uniform sample of rows, reading only the shards that hold them."""
    total = sum(s["rows"] for s in manifest["shards"])
    wanted = sorted(random.Random(seed).sample(range(total), min(sample, total)))
    rows, start = [], 0
    for shard in manifest["shards"]:
        stop = start + shard["rows"]
        local = [i - start for i in wanted if start <= i < stop]
        if local:
            rows += pq.read_table(Path(path) / shard["file"]).take(local).to_pylist()
        start = stop
    return rows


def verify_cache(path: str | Path, model: str, *, sample: int = 64, tolerance: float = 1e-3, seed: int = 0,
                 device: str = "auto", dtype: str | None = None, token_budget: int = 16384) -> dict[str, Any]:
    from .backends import HFScorer

    manifest = load_manifest(path)
    verify_checksums(path, manifest)
    chosen = sample_rows(path, manifest, sample, seed)
    scorer = HFScorer(model, revision=manifest["reference"]["revision"], dtype=dtype or manifest["reference"]["dtype"],
                      device=device, token_budget=token_budget)
    requests, cached = [], []
    for row in chosen:
        for side in ("chosen", "rejected"):
            requests.append((row["prompt_ids"] + row[f"{side}_ids"], len(row["prompt_ids"])))
            cached.append(np.asarray(row[f"{side}_ref_logps"], dtype=np.float64))
    fresh = scorer.score(requests)
    diffs = np.concatenate([np.abs(np.asarray(f, dtype=np.float64) - c) for f, c in zip(fresh, cached)]) if requests else np.zeros(0)
    worst = int(np.argmax(diffs)) if diffs.size else None
    return {
        "cache": str(path), "model": model, "rows_checked": len(chosen), "tokens_checked": int(diffs.size),
        "mean_abs_diff": float(diffs.mean()) if diffs.size else 0.0,
        "max_abs_diff": float(diffs.max()) if diffs.size else 0.0,
        "tolerance": tolerance, "passed": bool(diffs.size == 0 or diffs.max() <= tolerance),
        "worst_token_index": worst,
    }
