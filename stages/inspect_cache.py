"""`selpipe inspect CACHE`: what a score cache holds, without loading any model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from selpipe.pipeline.cache import load_manifest

QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


def inspect_cache(path: str | Path, max_tokens: int = 2_000_000) -> dict[str, Any]:
    """Manifest facts, totals, skipped rows by reason, and the distribution of reference log-probs."""
    path = Path(path)
    manifest = load_manifest(path)
    values: list[np.ndarray] = []
    seen = 0
    for shard in manifest["shards"]:
        if seen >= max_tokens:
            break
        table = pq.read_table(path / shard["file"], columns=["chosen_ref_logps", "rejected_ref_logps"])
        for column in table.columns:
            flat = column.combine_chunks().flatten().to_numpy()
            values.append(flat)
            seen += flat.size
    logps = np.concatenate(values) if values else np.zeros(0, dtype=np.float32)
    distribution = {
        "tokens_sampled": int(logps.size),
        "mean": float(logps.mean()) if logps.size else None,
        "min": float(logps.min()) if logps.size else None,
        **({f"q{int(q * 100):02d}": float(np.quantile(logps, q)) for q in QUANTILES} if logps.size else {}),
    }
    return {
        "cache": str(path),
        "schema_version": manifest["schema_version"],
        "reference": manifest["reference"],
        "backend": manifest["backend"],
        "tokenization": manifest["tokenization"],
        "input": manifest["input"],
        "totals": manifest["totals"],
        "ref_logp_distribution": distribution,
    }


def format_summary(report: dict[str, Any]) -> str:
    totals, dist = report["totals"], report["ref_logp_distribution"]
    bpt = totals["bytes_per_completion_token"]
    lines = [
        f"cache        {report['cache']} (schema v{report['schema_version']})",
        f"reference    {report['reference']['model']} ({report['reference']['dtype']}), "
        f"backend {report['backend']['name']} {report['backend']['version']}",
        f"rows         {totals['rows']} scored of {totals['rows_read']} read, {totals['truncated']} truncated, "
        f"{totals['shards']} shards",
        f"skipped      {', '.join(f'{k}: {v}' for k, v in totals['skipped'].items()) or 'none'}",
        f"tokens       {totals['prompt_tokens']} prompt, {totals['completion_tokens']} completion",
        f"size         {totals['bytes'] / 1e6:.3f} MB, {bpt:.2f} bytes per completion token" if bpt else
        f"size         {totals['bytes'] / 1e6:.3f} MB",
    ]
    if dist["tokens_sampled"]:
        quantiles = "  ".join(f"{k}={v:.3f}" for k, v in dist.items() if k.startswith("q"))
        lines.append(f"ref log-p    mean={dist['mean']:.3f}  min={dist['min']:.3f}  {quantiles}")
    return "\n".join(lines)
