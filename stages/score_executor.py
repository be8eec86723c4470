"""Stage one's executor: how the workers of a score-ref job share one cache directory.

`stages/score_ref.py` scores shards; this module decides which shards are whose and when the
cache is whole. It holds no model and tokenizes nothing.

Slicing. Worker `i` of `N` gets a deterministic part of the input, recorded in the header so every
worker agrees: whole files when there are at least `N` (each worker reads only its own), else rows
by a hash of their id. Its part is cut into shards of `shard_size` rows, the unit of restart.

The protocol, in the order files appear:

    header.json                 the claim: what this cache is (model, tokenizer, input, settings)
    config-worker-WWWWW.json    worker W registered, with its resolved settings
    part-WWWWW-SSSSSS.parquet   a shard, renamed into place whole
    part-WWWWW-SSSSSS.json      its record: checksum, counts, skipped rows, and the digest of the
                                header it was scored under (the completion marker, written last)
    worker-WWWWW.done.json      worker W finished its slice
    manifest.json               the commit point: written by the worker that finds all N done,
                                after checking that every record was scored under this header

Who may share the directory. The workers of one job do, by design: they agree on the header
(compared by content, not path) and each writes only its own worker index's files, so a lease on
the whole directory would serialize a job against itself. Two processes for one worker index
never do: each worker holds an exclusive lease on its index (`.selpipe-lease-worker-WWWWW.json`,
`pipeline.ownership`'s NFS-safe lease) for its whole run, so a second run of that worker into
the same `--output` at once is refused, unless the holder is provably gone (a dead process on
this host, or a Slurm requeue of the same job and array task). Creating, joining, replacing and
withdrawing the header happen under a short lock on the directory
(`.selpipe-lease-claim.json`, milliseconds, waited for), so those decisions never interleave.

What commits. A header commits the directory once a shard is finished under it, or while a worker
holding its lease works under it: then a run with other settings is refused. A header with
neither (its run died before its first shard, by SIGKILL or out of memory) is no commitment and
a corrected rerun replaces it. A resumed shard must carry this header's digest as well as its own
checksum and this slice's rows, so a shard scored by another model or settings (left by an
earlier run, or copied in) is never sealed into the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from selpipe.pipeline.atomic import create_exclusive, write_json_atomic
from selpipe.pipeline.cache import ShardRecord, completed_shard, read_record, shard_name, summarize, write_manifest
from selpipe.pipeline.config import ConfigError, ScoreConfig, to_dict
from selpipe.pipeline.errors import CacheError, library_errors, storage_errors
from selpipe.pipeline.formats import BadRowError, InputError, InputSource, Record, parse_row, read_file_records
from selpipe.pipeline.ownership import Holder, acquire, check_output, setting_differences
from selpipe.pipeline.workers import place_worker

HEADER = "header.json"
CLAIM_LOCK = ".selpipe-lease-claim.json"
# The keys of a header that say what a cache holds; a rerun must agree on all of them.
IDENTITY_KEYS = ("schema_version", "reference", "tokenizer_fingerprint", "input", "settings", "slicing", "backend")


# ---------------------------------------------------------------------------- slicing

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
    """How the input is split among workers: whole files when there are at least as many as
    workers (each worker reads only its own), else rows by a hash of their id."""
    if num_workers > 1 and len(source.files) >= num_workers:
        owner = deal_files([(f.label, f.path.stat().st_size) for f in source.files], num_workers)
        return {"by": "file", "files": [[f.label, owner[f.label]] for f in source.files]}
    return {"by": "row id", "rule": "sha1(id) mod num_workers"}


def _records(source: InputSource, files: list[Any], max_row_bytes: int) -> Iterator[Record]:
    for file in files:
        with storage_errors("read the input", file.path, InputError):
            yield from read_file_records(file, file.label if source.scoped else "", max_row_bytes)


def slice_shards(cfg: ScoreConfig, source: InputSource, plan: dict[str, Any]) -> Iterator[list[Record]]:
    """This worker's records, `shard_size` at a time."""
    if plan["by"] == "file":
        owner = dict(plan["files"])
        mine: Iterator[Record] = _records(source, [f for f in source.files if owner[f.label] == cfg.worker_index],
                                          cfg.max_row_bytes)
    else:
        mine = (r for r in _records(source, list(source.files), cfg.max_row_bytes)
                if worker_of(_record_key(r), cfg.num_workers) == cfg.worker_index)
    while shard := list(islice(mine, cfg.shard_size)):
        yield shard


# ---------------------------------------------------------------------------- placement and the output

def place(cfg: ScoreConfig, out: Path) -> tuple[ScoreConfig, str]:
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


def refuse_output_inside_input(out: Path, source: InputSource) -> None:
    """A cache whose files the input would read on the next run (inside the dataset folder, whose
    data-file patterns would take its shards, or matched by the glob) could never resume: refuse it."""
    written = ("part-00000-000000.parquet", "part-00000-000000.json", HEADER, "manifest.json",
               "config-worker-00000.json", "worker-00000.done.json")
    if source.would_read(out) or any(source.would_read(out / name) for name in written):
        raise ConfigError(f"--output {out} is where --input {source.spec} reads, so a rerun would read the cache's own "
                          f"files as input; choose an --output outside it")
    if out.exists() and not out.is_dir():
        raise CacheError(f"{out}: --output is a file; give a directory for the cache")


# ---------------------------------------------------------------------------- the header

def header_digest(header: dict[str, Any]) -> str:
    """What a shard record carries to say which cache it was scored for: a digest of the header's
    identity, by content (the model's and the input's paths are left out: see `_comparable`)."""
    identity = {key: _comparable(key, header.get(key)) for key in IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _comparable(key: str, entry: Any) -> Any:
    # The same bytes may be mounted at another path on another node, or named by another glob.
    if not isinstance(entry, dict):
        return entry
    if key == "input":
        return {"fingerprint": entry.get("fingerprint")}
    if key == "reference":
        return {k: v for k, v in entry.items() if k != "model"}
    if key == "backend":
        return {"name": entry.get("name")}
    return entry


def differences(existing: dict[str, Any], header: dict[str, Any]) -> list[str]:
    """What differs between two headers, one `key.field: old -> new` entry each."""
    keys = [k for k in IDENTITY_KEYS if k != "slicing" or "slicing" in existing]  # old caches were sliced by row id
    return setting_differences({k: _comparable(k, existing.get(k)) for k in keys},
                               {k: _comparable(k, header.get(k)) for k in keys}, keys=keys)


def _read_header(path: Path) -> dict[str, Any] | None:
    """The header in the directory, or None when it cannot be read as one (torn, damaged, not an object).

    Read under the claim lease, so it is never caught mid-write by another worker of this tool.
    """
    try:
        header = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return header if isinstance(header, dict) else None


def _header_text(header: dict[str, Any]) -> str:
    return json.dumps(header, indent=2) + "\n"


# ---------------------------------------------------------------------------- leases

def worker_lease_name(worker: int) -> str:
    return f".selpipe-lease-worker-{worker:05d}.json"


def _judge() -> Holder:
    """This process as the judge of other workers' leases. A worker of the same Slurm job (a torchrun
    rank beside this one) is alive as far as anyone here knows, so the requeue rule (same job:
    gone) that lets a worker take over its own index must not declare its siblings gone."""
    return dataclasses.replace(Holder.me("score-ref"), slurm_job_id=None)


def _holder_of(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # released meanwhile, or not a lease: no live holder to wait for


def _live_workers(out: Path, but: int) -> list[int]:
    """Indices of other workers whose lease is held now by a process not provably gone."""
    judge, live = _judge(), []
    for path in out.glob(".selpipe-lease-worker-*.json"):
        index = int(path.name[len(".selpipe-lease-worker-"):-len(".json")])
        holder = _holder_of(path)
        if index != but and holder is not None and not holder.is_gone(judge):
            live.append(index)
    return sorted(live)


@contextmanager
def _claim_lock(out: Path) -> Iterator[None]:
    """The directory's short lock around header decisions (milliseconds): waited for, taken over
    only from a holder provably gone (never from a sibling of the same job, see `_judge`)."""
    path, me = out / CLAIM_LOCK, Holder.me("score-ref")
    text = json.dumps(dataclasses.asdict(me)) + "\n"
    deadline = time.monotonic() + 30
    with storage_errors("lock the cache's header", path, CacheError):
        while not create_exclusive(path, text):
            holder = _holder_of(path)
            if holder is not None and holder.is_gone(_judge()):
                path.unlink(missing_ok=True)  # its holder died inside the lock
            elif time.monotonic() > deadline:
                who = holder.describe() if holder is not None else "an unreadable holder"
                raise CacheError(f"{path}: the lock on {out}'s header is held by {who} for over 30 s; if no selpipe "
                                 f"run is starting there, remove {path}")
            time.sleep(0.02)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


@contextmanager
def _worker_lease(out: Path, worker: int) -> Iterator[None]:
    """One process per worker index at a time (`pipeline.ownership`'s lease): a second run of the
    same worker into this --output is refused unless the first is provably gone."""
    with storage_errors(f"take worker {worker}'s lease", out / worker_lease_name(worker), CacheError):
        lease = acquire(out, "score-ref", worker_lease_name(worker))
    try:
        yield
    finally:
        lease.release()


# ---------------------------------------------------------------------------- the claim

@dataclass
class Claim:
    """This worker's hold on the cache directory: the header every worker agrees on, and its digest."""

    out: Path
    worker: int
    header: dict[str, Any]
    digest: str


def _decide(out: Path, header: dict[str, Any], worker: int) -> dict[str, Any]:
    """Under the claim lease: create the header, join an agreeing one, replace one that commits to
    nothing, or refuse. Returns the header this worker works under."""
    path = out / HEADER
    records = any(out.glob("part-*.json"))
    if not path.exists():
        if records or any(out.glob("part-*.parquet")):
            raise CacheError(f"{out} holds shards but no {HEADER}, so nothing says how they were made; "
                             f"write to a new --output (or move the shards away)")
        check_output(out, markers=(HEADER,), ignore_hidden=True, kind="score cache")  # new or empty, else refused
        write_json_atomic(path, header)
        return header
    existing = _read_header(path)
    differing = ["damaged"] if existing is None else differences(existing, header)
    if not differing:
        return existing
    live = _live_workers(out, but=worker)
    if (records or live) and existing is None:
        raise CacheError(f"{path}: damaged (not a JSON object), and the cache has finished shards or a worker at work, "
                         f"so nothing says how they were made; write to a new --output, or remove {out} to score it "
                         f"anew here")
    if records or live:
        shown = "; ".join(d if len(d) < 200 else d[:200] + "..." for d in differing)
        why = "its finished shards" if records else f"worker(s) {live} working under it now"
        raise CacheError(f"{out} already holds a cache made with other settings ({shown}), committed by {why}; "
                         f"write to a new --output, rerun with the settings it was made with, or remove {out} "
                         f"to score it anew here")
    # No finished shard and nobody at work: what the dead run left commits to nothing.
    for stale in [*out.glob("config-worker-*.json"), *out.glob("worker-*.done.json"), *out.glob("part-*.parquet")]:
        stale.unlink()
    write_json_atomic(path, header)
    return header


@contextmanager
def claim_cache(cfg: ScoreConfig, out: Path, header: dict[str, Any], origin: str) -> Iterator[Claim]:
    """Hold worker `cfg.worker_index`'s lease and the cache's header for the block.

    If the block fails before this worker has a finished shard, its registration is withdrawn, the
    header too when nothing else commits to it, and the directory when this run made it and it is
    empty again: a corrected rerun starts as if this one never ran.
    """
    created = not out.exists()
    with storage_errors("create the cache directory", out, CacheError):
        out.mkdir(parents=True, exist_ok=True)
    try:
        with _worker_lease(out, cfg.worker_index):
            with storage_errors("write the cache header", out / HEADER, CacheError):
                with _claim_lock(out):
                    agreed = _decide(out, header, cfg.worker_index)
                    # This worker is (re)writing shards: until it finishes, no manifest may claim the cache whole.
                    (out / f"worker-{cfg.worker_index:05d}.done.json").unlink(missing_ok=True)
                    (out / "manifest.json").unlink(missing_ok=True)
                    write_json_atomic(out / f"config-worker-{cfg.worker_index:05d}.json",
                                      {"//": f"worker {cfg.worker_index} of {cfg.num_workers}: {origin}", **to_dict(cfg)})
            try:
                yield Claim(out, cfg.worker_index, agreed, header_digest(agreed))
            except BaseException:
                _withdraw(out, cfg.worker_index)
                raise
    except BaseException:
        try:
            if created and not any(out.iterdir()):
                out.rmdir()
        except OSError:
            pass  # the error being raised is the one to report
        raise


def _withdraw(out: Path, worker: int) -> None:
    """After a failure, if this worker has no finished shard: remove its registration, and the header
    when no other worker has a shard or works now (under the claim lease, so no one joins meanwhile)."""
    try:
        with _claim_lock(out):
            if any(out.glob(f"part-{worker:05d}-*.json")):
                return  # this worker's shards from an earlier run: the claim stands and they resume
            (out / f"config-worker-{worker:05d}.json").unlink(missing_ok=True)
            if not any(out.glob("part-*.json")) and not _live_workers(out, but=worker):
                (out / HEADER).unlink(missing_ok=True)
    except (OSError, CacheError):
        pass  # a read-only directory keeps what it has; the error being raised is the one to report


# ---------------------------------------------------------------------------- resuming and finishing

def _slot_key(record: Record) -> str:
    """What a slice position holds, as a shard records it: the row's id, else its row number."""
    try:
        return parse_row(record).id
    except BadRowError as err:
        return err.row_id if err.row_id is not None else f"#row {err.row}"


def resumable_shard(claim: Claim, records: list[Record], index: int) -> ShardRecord | None:
    """The record of this worker's shard `index` if it is finished and may resume, else None (score it:
    no shard, or one whose record is torn or whose checksum fails, left by a run killed mid-write).

    A finished shard resumes only if it was scored under this header (its record carries the
    header's digest) and holds this slice's rows: its rows plus skips are the slice's count and its
    ids the slice's. A shard that fails either is not this cache's to seal, nor to overwrite: refused.
    """
    out, name = claim.out, shard_name(claim.worker, index)
    move = f"move {name} and {name[:-len('.parquet')]}.json out of {out} and rerun: the shard is scored again"
    if (out / name).is_symlink() or (out / name).with_suffix(".json").is_symlink():
        raise CacheError(f"{out / name}: a shard (or its record) that is a symbolic link; a cache holds its shards "
                         f"itself: {move}")
    done = completed_shard(out, claim.worker, index)  # a torn record proves nothing: the shard is scored again
    if done is None:
        return None
    if (done.file, done.worker, done.index) != (name, claim.worker, index):
        raise CacheError(f"{(out / name).with_suffix('.json')}: the record of another shard ({done.file!r}); {move}")
    if done.header_digest != claim.digest:
        raise CacheError(f"{out / done.file}: a finished shard scored under another header (another reference model, "
                         f"tokenizer, input or settings than {out / HEADER} says); it is not this cache's: {move}")
    _check_rows(out, done, records, index, move)
    return done


def _check_rows(out: Path, done: ShardRecord, records: list[Record], index: int, move: str) -> None:
    expected = Counter(_slot_key(r) for r in records)
    with library_errors("read the shard", out / done.file, f"it is not a shard score-ref wrote: {move}", error=CacheError):
        held = Counter(pq.read_table(out / done.file, columns=["id"]).column("id").to_pylist())
    held += Counter(s.id if s.id is not None else f"#row {s.row}" for s in done.skipped)
    if held != expected:
        missing = sorted((expected - held).elements())
        raise CacheError(
            f"{out / done.file}: a completed shard whose rows are not slice {index} of this worker's input "
            f"({done.rows} rows + {len(done.skipped)} skipped recorded, the slice has {len(records)}; "
            f"{len(missing)} of its ids are missing{', e.g. ' + repr(missing[0]) if missing else ''}); it is not this "
            f"cache's: {move}")


def all_records(out: Path) -> list[ShardRecord]:
    """Every shard record in the directory, or one line naming the first that is torn or another's."""
    records = []
    for path in sorted(out.glob("part-*.json")):
        record = read_record(path)
        if record.file != path.name[:-len(".json")] + ".parquet" or path.is_symlink():
            raise CacheError(f"{path}: the record of another shard ({record.file!r}), or a link; remove it and its "
                             f".parquet shard, and rerun worker {record.worker} to score it again")
        records.append(record)
    return records


def finish_worker(claim: Claim, cfg: ScoreConfig) -> tuple[list[ShardRecord], bool]:
    """Mark this worker done; the worker that finds every worker done seals the manifest.
    Returns this worker's records and whether the cache is now complete."""
    out = claim.out
    with storage_errors("write the worker's totals", out, CacheError):
        mine = [r for r in all_records(out) if r.worker == cfg.worker_index]
        write_json_atomic(out / f"worker-{cfg.worker_index:05d}.done.json", {"shards": len(mine), **summarize(mine)})
        complete = len(list(out.glob("worker-*.done.json"))) == cfg.num_workers
        if complete:
            _refuse_foreign_records(claim)
            if claim.header["slicing"]["by"] == "file":
                _refuse_ids_across_workers(out)
            write_manifest(out, claim.header)
    return mine, complete


def _refuse_foreign_records(claim: Claim) -> None:
    """The manifest seals every record in the directory: each must have been scored under this header."""
    for record in all_records(claim.out):
        if record.header_digest != claim.digest:
            raise CacheError(f"{claim.out / record.file}: scored under another header than {claim.out / HEADER} (another "
                             f"reference model, tokenizer, input or settings), so the cache is not sealed; move it and "
                             f"its .json out of {claim.out} and rerun worker {record.worker}: the shard is scored again")


def _refuse_ids_across_workers(out: Path) -> None:
    """Rows dealt by file reach workers that cannot see each other's ids: check them once, at the end."""
    first: dict[str, str] = {}
    for record in all_records(out):
        for row_id in pq.read_table(out / record.file, columns=["id"]).column("id").to_pylist():
            if row_id in first:
                raise CacheError(f"{out}: id {row_id!r} is in {first[row_id]} and in {record.file}: two input files "
                                 f"repeat it; make the ids unique (or drop the id column to derive them) and rescore")
            first[row_id] = record.file
