"""`selpipe verify CACHE --model M`: recompute a random sample with the transformers backend.

vLLM and transformers do not agree bit for bit (different kernels, different reduction
orders); this reports by how much, per token, and fails above a tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import numpy as np

from selpipe.pipeline.errors import first_line
from selpipe.pipeline.cache import load_manifest, sample_rows, verify_checksums
from selpipe.pipeline.config import ConfigError, DType

SIDES = ("chosen", "rejected")


def verify_cache(path: str | Path, model: str, *, sample: int = 64, tolerance: float = 1e-3, seed: int = 0,
                 device: str = "auto", dtype: str | None = None, token_budget: int = 16384) -> dict[str, Any]:
    """Rescore `sample` seeded rows with transformers and compare per token; `passed` needs at least one token."""
    from .backends import HFScorer

    if sample < 1:
        raise ConfigError(f"--sample must be at least 1; got {sample}")
    if dtype is not None and dtype not in get_args(DType):
        raise ConfigError(f"--dtype must be one of {', '.join(get_args(DType))}; got {dtype!r}")
    manifest = load_manifest(path)
    verify_checksums(path, manifest)
    chosen = sample_rows(path, manifest, sample, seed)
    try:
        scorer = HFScorer(model, revision=manifest["reference"]["revision"], dtype=dtype or manifest["reference"]["dtype"],
                          device=device, token_budget=token_budget)
    except ConfigError:
        raise
    # transformers raises OSError for a path or weights it cannot find, ValueError for a directory that is not a model.
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the model {model!r}: give a local model directory "
                          f"({first_line(err)})") from None
    requests, cached, sources = [], [], []
    for row in chosen:
        for side in SIDES:
            requests.append((row["prompt_ids"] + row[f"{side}_ids"], len(row["prompt_ids"])))
            cached.append(np.asarray(row[f"{side}_ref_logps"], dtype=np.float64))
            sources.append((row, side))
    fresh = [np.asarray(f, dtype=np.float64) for f in scorer.score(requests)]
    diffs = [np.abs(f - c) for f, c in zip(fresh, cached)]
    flat = np.concatenate(diffs) if diffs else np.zeros(0)
    worst = None
    if flat.size:
        request = max((i for i in range(len(diffs)) if diffs[i].size), key=lambda i: diffs[i].max())
        position = int(np.argmax(diffs[request]))
        row, side = sources[request]
        # `position` indexes the side's completion tokens (`{side}_ids`), as the cache stores them.
        worst = {"id": row["id"], "side": side, "position": position, "token_id": row[f"{side}_ids"][position],
                 "cached": float(cached[request][position]), "fresh": float(fresh[request][position])}
    return {
        "cache": str(path), "model": model, "rows_checked": len(chosen), "tokens_checked": int(flat.size),
        "mean_abs_diff": float(flat.mean()) if flat.size else 0.0,
        "max_abs_diff": float(flat.max()) if flat.size else 0.0,
        # An empty sample compares nothing, so it cannot vouch for the cache.
        "tolerance": tolerance, "passed": bool(flat.size and flat.max() <= tolerance),
        "worst_token": worst,
    }
