"""`selpipe verify CACHE --model M`: recompute a random sample with transformers, and the verdict.

vLLM and transformers do not agree bit for bit (different kernels, different reduction
orders); this reports by how much, per token, and fails above a tolerance. The cache is first
opened with every check `selpipe train` runs (layout, names confined to the cache, checksums,
the tokenizer against --model's, every value against --model's vocabulary), so verify never
passes a cache that train refuses. The rescoring is `selpipe.pipeline.scoring`'s, the very code
score-ref's hf backend runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

from selpipe.pipeline.cache import check_tokenizer, check_values, sample_rows
from selpipe.pipeline.cache_summary import open_checked, reading
from selpipe.pipeline.config import ConfigError, DType, VerifyConfig
from selpipe.pipeline.logprobs import check_output_head
from selpipe.pipeline.model import load_causal_lm
from selpipe.pipeline.scoring import score_requests
from selpipe.pipeline.tokenization import load_tokenizer, tokenizer_fingerprint

SIDES = ("chosen", "rejected")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_verify(cfg: VerifyConfig) -> tuple[dict[str, Any], str | None]:
    """`selpipe verify`: the report, and the failure line that makes the exit status 1 (None: passed)."""
    report = verify_cache(cfg.cache, cfg.model, sample=cfg.sample, tolerance=cfg.tolerance, seed=cfg.seed,
                          device=cfg.device, dtype=cfg.dtype, token_budget=cfg.token_budget)
    return report, verdict(report)


def verdict(report: dict[str, Any]) -> str | None:
    """Why the cache fails verification, or None. Nothing checked vouches for nothing, so it fails."""
    if not report["tokens_checked"]:
        return "verify: no tokens were checked (the cache holds no scored rows), so nothing is verified"
    if not report["passed"]:
        return f"verify: max |diff| {report['max_abs_diff']:.3g} is above the tolerance {report['tolerance']:g}"
    return None


def _load(model: str, manifest: dict[str, Any], device: str, dtype: str | None) -> torch.nn.Module:
    reference = manifest["reference"]
    dtype = dtype or reference.get("dtype", "float32")
    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"the cache's reference dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}; give --dtype")
    where = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    loaded = load_causal_lm(model, dtype=TORCH_DTYPES[dtype], flag="--model", revision=reference.get("revision"))
    loaded = loaded.to(where).eval()
    check_output_head(loaded)
    return loaded


def verify_cache(path: str | Path, model: str, *, sample: int = 64, tolerance: float = 1e-3, seed: int = 0,
                 device: str = "auto", dtype: str | None = None, token_budget: int = 16384) -> dict[str, Any]:
    """Rescore `sample` seeded rows with transformers and compare per token; `passed` needs at least one token."""
    if sample < 1:
        raise ConfigError(f"--sample must be at least 1; got {sample}")
    if dtype is not None and dtype not in get_args(DType):
        raise ConfigError(f"--dtype must be one of {', '.join(get_args(DType))}; got {dtype!r}")
    manifest = open_checked(path, checksums=False)  # check_values below hashes every shard as it decodes it
    tokenizer = load_tokenizer(model)
    check_tokenizer(path, manifest, tokenizer_fingerprint(tokenizer))
    scorer = _load(model, manifest, device, dtype)
    with reading(path):
        check_values(path, manifest, scorer.config.vocab_size)
        chosen = sample_rows(path, manifest, sample, seed)
    requests, cached, sources = [], [], []
    for row in chosen:
        for side in SIDES:
            requests.append((row["prompt_ids"] + row[f"{side}_ids"], len(row["prompt_ids"])))
            cached.append(np.asarray(row[f"{side}_ref_logps"], dtype=np.float64))
            sources.append((row, side))
    fresh = [np.asarray(f, dtype=np.float64) for f in score_requests(scorer, requests, token_budget=token_budget)]
    diffs = [np.abs(f - c) for f, c in zip(fresh, cached)]
    flat = np.concatenate(diffs) if diffs else np.zeros(0)
    return {
        "cache": str(path), "model": model, "rows_checked": len(chosen), "tokens_checked": int(flat.size),
        "mean_abs_diff": float(flat.mean()) if flat.size else 0.0,
        "max_abs_diff": float(flat.max()) if flat.size else 0.0,
        # An empty sample compares nothing, so it cannot vouch for the cache.
        "tolerance": tolerance, "passed": bool(flat.size and flat.max() <= tolerance),
        "worst_token": _worst(diffs, cached, fresh, sources) if flat.size else None,
    }


def _worst(diffs: list[np.ndarray], cached: list[np.ndarray], fresh: list[np.ndarray],
           sources: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """The token that differs most: its row, side and position among the side's completion tokens (`{side}_ids`)."""
    request = max((i for i in range(len(diffs)) if diffs[i].size), key=lambda i: diffs[i].max())
    position = int(np.argmax(diffs[request]))
    row, side = sources[request]
    return {"id": row["id"], "side": side, "position": position, "token_id": row[f"{side}_ids"][position],
            "cached": float(cached[request][position]), "fresh": float(fresh[request][position])}
