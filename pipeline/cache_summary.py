"""What a score cache holds, in numbers and in a few lines of text, without loading any model:
what `selpipe inspect` prints, and what `selpipe score-ref` prints once the cache is complete.

The caller passes a manifest it has already checked (`describe_cache` checks it itself when
given none), so shard names are confined to the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .cache import check_layout, load_manifest, verify_checksums

QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


def open_checked(path: str | Path) -> dict[str, Any]:
    """The manifest of a cache whose layout and checksums hold (the checks `selpipe train` runs)."""
    manifest = load_manifest(path)
    check_layout(path, manifest)
    verify_checksums(path, manifest)
    return manifest


def logp_distribution(path: str | Path, manifest: dict[str, Any], max_tokens: int = 2_000_000) -> dict[str, Any]:
    """Mean, minimum and quantiles of the reference log-probs of the first `max_tokens` or so tokens."""
    values: list[np.ndarray] = []
    seen = 0
    for shard in manifest["shards"]:
        if seen >= max_tokens:
            break
        table = pq.read_table(Path(path) / shard["file"], columns=["chosen_ref_logps", "rejected_ref_logps"])
        for column in table.columns:
            flat = column.combine_chunks().flatten().to_numpy()
            values.append(flat)
            seen += flat.size
    logps = np.concatenate(values) if values else np.zeros(0, dtype=np.float32)
    return {
        "tokens_sampled": int(logps.size),
        "mean": float(logps.mean()) if logps.size else None,
        "min": float(logps.min()) if logps.size else None,
        **({f"q{int(q * 100):02d}": float(np.quantile(logps, q)) for q in QUANTILES} if logps.size else {}),
    }


def describe_cache(path: str | Path, manifest: dict[str, Any] | None = None, max_tokens: int = 2_000_000) -> dict[str, Any]:
    """Manifest facts, totals, skipped rows by reason, and the distribution of reference log-probs."""
    manifest = manifest if manifest is not None else open_checked(path)
    return {
        "cache": str(path),
        "schema_version": manifest["schema_version"],
        "reference": manifest["reference"],
        "backend": manifest.get("backend", {}),
        "tokenization": manifest["tokenization"],
        "input": manifest.get("input", {}),
        "totals": manifest["totals"],
        "ref_logp_distribution": logp_distribution(path, manifest, max_tokens),
    }


def format_summary(report: dict[str, Any]) -> str:
    totals, dist = report["totals"], report["ref_logp_distribution"]
    reference, backend = report["reference"], report["backend"]
    bpt = totals.get("bytes_per_completion_token")
    size = totals.get("bytes", 0) / 1e6
    lines = [
        f"cache        {report['cache']} (schema v{report['schema_version']})",
        f"reference    {reference.get('model')} ({reference.get('dtype')}), "
        f"backend {backend.get('name')} {backend.get('version')}",
        f"rows         {totals.get('rows')} scored of {totals.get('rows_read')} read, {totals.get('truncated')} truncated, "
        f"{totals.get('shards')} shards",
        f"skipped      {', '.join(f'{k}: {v}' for k, v in (totals.get('skipped') or {}).items()) or 'none'}",
        f"tokens       {totals.get('prompt_tokens')} prompt, {totals.get('completion_tokens')} completion",
        f"size         {size:.3f} MB, {bpt:.2f} bytes per completion token" if bpt else f"size         {size:.3f} MB",
    ]
    if dist["tokens_sampled"]:
        quantiles = "  ".join(f"{k}={v:.3f}" for k, v in dist.items() if k.startswith("q"))
        lines.append(f"ref log-p    mean={dist['mean']:.3f}  min={dist['min']:.3f}  {quantiles}")
    return "\n".join(lines)
