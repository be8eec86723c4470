"""What a score cache holds, in numbers and in a few lines of text, without loading any model:
what `selpipe inspect` prints, and what `selpipe score-ref` prints once the cache is complete.

The caller passes a manifest it has already checked (`describe_cache` checks it itself when
given none), so shard names are confined to the cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .cache import open_cache, verify_checksums
from .errors import CacheError, library_errors

QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


def open_checked(path: str | Path, *, checksums: bool = True) -> dict[str, Any]:
    """The manifest of a cache opened as `selpipe train` opens it (`cache.open_cache`: names confined
    to the cache, no absolute or `../` path, no symlink out of it, every shard a Parquet file of
    its recorded size), and with `checksums` every shard's sha256 checked too (a caller that runs
    `cache.check_values`, which hashes as it decodes, passes False and reads each byte once)."""
    manifest = open_cache(path)
    if checksums:
        verify_checksums(path, manifest)
    return manifest


@contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Shards that pass their checksums and still are not Parquet (a manifest edited to match): one line."""
    with library_errors("read the cache's shards", path, "a shard is not Parquet or not this cache's schema: rescore",
                        error=CacheError):
        yield


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
        "ref_logp_distribution": _distribution(path, manifest, max_tokens),
    }


def _distribution(path: str | Path, manifest: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    with reading(path):
        return logp_distribution(path, manifest, max_tokens)


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
