"""The score cache: zstd Parquet shards of per-token reference log-probs, plus a manifest.

Layout of a cache directory:

    header.json                    what the cache is: schema, model, backend, tokenizer and input
                                   fingerprints, the settings that shaped it (written first)
    part-WWWWW-SSSSSS.parquet      shard SSSSSS of worker WWWWW: one row per pair
    part-WWWWW-SSSSSS.json         its record: rows, bytes, sha256, tokens, skipped rows
    worker-WWWWW.done.json         worker WWWWW finished its slice
    manifest.json                  header + every shard's record; written once all workers are done

Every file is written under a temporary name and renamed into place when complete, so a file
that exists is whole. A shard counts as done only when its record exists and the record's
checksum matches the Parquet file.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .atomic import atomic_path, write_json_atomic
from .errors import CacheError, ConfigError, SelpipeError, first_line, library_errors, os_error_message
from .ownership import setting_differences
from .tokenization import TokenizedPair, fingerprint_differences

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("chosen_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("rejected_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("chosen_ref_logps", pa.list_(pa.float32()), nullable=False),
    pa.field("rejected_ref_logps", pa.list_(pa.float32()), nullable=False),
])

# Log-probs are high-entropy floats: splitting their bytes into streams lets zstd find the
# shared exponents (about 30% smaller than plain). Dictionaries only cost space on them.
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 6,
    "use_dictionary": ["id"],
    "column_encoding": {
        "chosen_ref_logps.list.element": "BYTE_STREAM_SPLIT",
        "rejected_ref_logps.list.element": "BYTE_STREAM_SPLIT",
    },
    "write_statistics": False,
}

SHARD_PATTERN = re.compile(r"^part-(\d{5})-(\d{6})\.parquet$")


@dataclass(frozen=True, kw_only=True)
class ScoredPair(TokenizedPair):
    """A tokenized pair with the reference's log-prob of every completion token (one cache row)."""

    chosen_ref_logps: list[float]
    rejected_ref_logps: list[float]


@dataclass
class SkippedRow:
    id: str | None
    row: int
    reason: str
    message: str


@dataclass
class ShardRecord:
    file: str
    worker: int
    index: int
    rows: int = 0
    bytes: int = 0
    sha256: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)
    header_digest: str = ""  # which cache it was scored for (stages/score_executor.header_digest); "" before it was recorded

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["skipped"] = [s.__dict__ for s in self.skipped]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardRecord:
        data = dict(data)
        data["skipped"] = [SkippedRow(**s) for s in data.get("skipped", [])]
        return cls(**data)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_name(worker: int, index: int) -> str:
    return f"part-{worker:05d}-{index:06d}.parquet"


def pairs_to_table(pairs: list[ScoredPair]) -> pa.Table:
    columns = {name: [getattr(p, name) for p in pairs] for name in SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def write_shard(directory: Path, worker: int, index: int, pairs: list[ScoredPair],
                skipped: list[SkippedRow], truncated: int, row_group_size: int, header_digest: str = "") -> ShardRecord:
    """Write one shard and its record; the Parquet file appears only when complete."""
    name = shard_name(worker, index)
    final = directory / name
    with atomic_path(final, fsync=True) as tmp:
        pq.write_table(pairs_to_table(pairs), tmp, row_group_size=row_group_size, **PARQUET_OPTIONS)
        record = ShardRecord(
            file=name, worker=worker, index=index, rows=len(pairs), bytes=tmp.stat().st_size,
            sha256=file_sha256(tmp),
            prompt_tokens=sum(len(p.prompt_ids) for p in pairs),
            completion_tokens=sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
            truncated=truncated, skipped=skipped, header_digest=header_digest,
        )
    # The record is the completion marker: written last, so a record implies a whole shard.
    write_json_atomic(final.with_suffix(".json"), record.to_json())
    return record


def read_record(path: Path) -> ShardRecord:
    """A shard record (`part-*.json`), or one line saying it is damaged."""
    try:
        data = json.loads(path.read_text())
        return ShardRecord.from_json(data)
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as err:
        raise CacheError(f"{path}: damaged shard record ({type(err).__name__}: {first_line(err)[:200]}); remove it and "
                         f"its .parquet shard, and rerun its worker to score it again") from None


def completed_shard(directory: Path, worker: int, index: int) -> ShardRecord | None:
    """The record of a shard that is complete and intact, else None (it will be redone).
    A record that cannot be read is no proof of a whole shard: the shard is redone too."""
    final = directory / shard_name(worker, index)
    marker = final.with_suffix(".json")
    if not (final.is_file() and marker.is_file()):
        return None
    try:
        record = read_record(marker)
    except CacheError:
        return None
    if record.bytes != final.stat().st_size or record.sha256 != file_sha256(final):
        return None
    return record


def shard_records(directory: Path) -> list[ShardRecord]:
    return [read_record(path) for path in sorted(directory.glob("part-*.json"))]


def summarize(records: list[ShardRecord]) -> dict[str, Any]:
    skipped = Counter(s.reason for r in records for s in r.skipped)
    rows = sum(r.rows for r in records)
    completion = sum(r.completion_tokens for r in records)
    size = sum(r.bytes for r in records)
    return {
        "rows": rows,
        "rows_read": rows + sum(skipped.values()),
        "skipped": dict(sorted(skipped.items())),
        "truncated": sum(r.truncated for r in records),
        "prompt_tokens": sum(r.prompt_tokens for r in records),
        "completion_tokens": completion,
        "bytes": size,
        "bytes_per_completion_token": size / completion if completion else None,
        "shards": len(records),
    }


def write_manifest(directory: Path, header: dict[str, Any]) -> dict[str, Any]:
    records = shard_records(directory)
    manifest = {**header, "totals": summarize(records), "shards": [r.to_json() for r in records]}
    write_json_atomic(directory / "manifest.json", manifest)
    return manifest


# What training reads from a manifest, with its JSON type.
MANIFEST_KEYS = {"shards": list, "totals": dict, "tokenizer_fingerprint": dict, "reference": dict, "tokenization": dict}


def _incomplete(directory: Path) -> CacheError:
    """Why a directory without a manifest is not (yet) a cache."""
    header = directory / "header.json"
    if not header.exists():
        return CacheError(f"{directory}: not a score cache (no manifest.json)")
    try:
        workers = json.loads(header.read_text())["settings"]["num_workers"]
        done = sorted(int(p.name[7:12]) for p in directory.glob("worker-*.done.json"))
        missing = sorted(set(range(int(workers))) - set(done))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as err:
        return CacheError(f"{header}: cache incomplete (no manifest.json) and its header is damaged ({type(err).__name__}); "
                          f"score it again into a new --output")
    return CacheError(f"{directory}: cache incomplete, workers {missing} of {workers} have not finished; rerun them")


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest, its schema version known and every key training reads present with its type."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.exists():
        raise _incomplete(directory)
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"{path}: damaged manifest, not valid JSON ({err}); rerun `selpipe score-ref` with the same "
                         f"settings to rewrite it") from None
    except OSError as err:
        raise CacheError(os_error_message(err, "read the manifest")) from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{path}: damaged manifest, not a JSON object; rerun `selpipe score-ref` to rewrite it")
    version = manifest.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise CacheError(
            f"{directory}: cache schema version {version} is not one this selpipe knows "
            f"({', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); rescore with this version or upgrade selpipe"
        )
    missing = [key for key, kind in MANIFEST_KEYS.items() if not isinstance(manifest.get(key), kind)]
    if missing:
        raise CacheError(f"{path}: damaged manifest, missing or malformed: {', '.join(missing)}; rerun `selpipe score-ref` "
                         f"with the same settings to rewrite it")
    return manifest


def open_cache(directory: str | Path) -> dict[str, Any]:
    """The one way every command opens a cache: its manifest (`load_manifest`), after the checks
    that need no shard's content (`check_layout`): names confined to the cache, no shard listed
    twice, every listed shard a regular Parquet file of the recorded size inside the cache."""
    manifest = load_manifest(directory)
    check_layout(directory, manifest)
    return manifest


def read_verified(directory: Path, shard: dict[str, Any], changed: str = "") -> bytes:
    """A shard's bytes, read once and checked against its manifest record (size and sha256), or
    one line. Whatever decodes them next (`parquet_of`) decodes exactly the bytes checked.
    `changed` adds to the refusal when it happens after start-up (the shard changed meanwhile)."""
    path = directory / shard["file"]
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise CacheError(f"{path}: shard listed in the manifest is missing{changed}; restore it or rescore") from None
    except OSError as err:
        raise CacheError(os_error_message(err, "read the shard")) from None
    if len(data) != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise CacheError(f"{path}: checksum mismatch (the shard was truncated or altered{changed}); rescore it or "
                         f"restore the file")
    return data


def parquet_of(path: Path, data: bytes) -> pq.ParquetFile:
    """Parquet decoded from bytes already read (and checked), never from the file again."""
    with library_errors("read the shard as Parquet", path, "it is not a shard score-ref wrote: rescore", error=CacheError):
        return pq.ParquetFile(pa.BufferReader(data))


class ShardReader:
    """Opens a cache's shards read whole, checked against the manifest, decoded from memory.

    Each open reads and hashes the file once. Up to `keep_bytes` of opened shards stay in memory
    (least recently used dropped first), so a shard reopened while kept is not read again: the
    run then uses the bytes it checked, whatever happens to the file. `bytes_read` counts what
    was read from disk.
    """

    def __init__(self, directory: str | Path, manifest: dict[str, Any], *, keep_bytes: int = 0, changed: str = ""):
        self.directory = Path(directory)
        self.records = {shard["file"]: shard for shard in manifest["shards"]}
        self.keep_bytes, self.changed = keep_bytes, changed
        self.bytes_read = 0
        self._kept: OrderedDict[str, tuple[int, pq.ParquetFile]] = OrderedDict()

    def open(self, name: str) -> pq.ParquetFile:
        if name in self._kept:
            self._kept.move_to_end(name)
            return self._kept[name][1]
        data = read_verified(self.directory, self.records[name], self.changed)
        self.bytes_read += len(data)
        parquet = parquet_of(self.directory / name, data)
        if len(data) <= self.keep_bytes:
            self._kept[name] = (len(data), parquet)
            while sum(size for size, _ in self._kept.values()) > self.keep_bytes:
                self._kept.popitem(last=False)
        return parquet


def verify_checksums(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Every shard's size and sha256 against the manifest (each read once; see `check_values`
    for the pass that also checks the values from the same bytes)."""
    for shard in manifest["shards"]:
        read_verified(Path(directory), shard)


def cache_identity(manifest: dict[str, Any]) -> str:
    """A digest of the cache's content (its shards' checksums in order), whatever path it is reached by."""
    return hashlib.sha256("".join(shard["sha256"] for shard in manifest["shards"]).encode()).hexdigest()


def check_tokenizer(directory: str | Path, manifest: dict[str, Any], fingerprint: dict[str, str]) -> None:
    differing = fingerprint_differences(manifest["tokenizer_fingerprint"], fingerprint)
    if differing:
        raise CacheError(
            f"{directory}: the policy's tokenizer differs from the one the cache was scored with "
            f"(differs in: {', '.join(differing)}); train a policy with the cache's tokenizer "
            f"({manifest['reference'].get('model')}) or rescore the data"
        )


def iter_row_groups(directory: str | Path, manifest: dict[str, Any]) -> Iterator[tuple[str, int, int]]:
    """(file, row group index, rows) for every row group of the cache, in shard order."""
    directory = Path(directory)
    for shard in manifest["shards"]:
        metadata = pq.ParquetFile(directory / shard["file"]).metadata
        for group in range(metadata.num_row_groups):
            yield shard["file"], group, metadata.row_group(group).num_rows


def read_rows(directory: str | Path, manifest: dict[str, Any], columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Every row of the cache as a dict, in shard order (for inspection and verification)."""
    directory = Path(directory)
    for shard in manifest["shards"]:
        yield from pq.read_table(directory / shard["file"], columns=columns).to_pylist()


def _read_local_rows(parquet: pq.ParquetFile, local: list[int]) -> list[dict[str, Any]]:
    """Rows `local` (sorted) of one shard, reading only the row groups that hold them."""
    sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
    starts = [0, *accumulate(sizes)]
    owner = [bisect.bisect_right(starts, i) - 1 for i in local]
    groups = sorted(set(owner))
    # Where each group's rows begin in the table that holds only the groups read.
    offset = dict(zip(groups, accumulate((sizes[g] for g in groups), initial=0)))
    picks = [offset[g] + i - starts[g] for i, g in zip(local, owner)]
    return parquet.read_row_groups(groups).take(picks).to_pylist()


def sample_rows(path: str | Path, manifest: dict[str, Any], sample: int, seed: int) -> list[dict[str, Any]]:
    """A seeded uniform sample of rows, in cache order, reading only the row groups that hold them.

    Indices are drawn from the manifest's per-shard row counts, so a cache of any size costs
    memory for the sampled rows' row groups alone.
    """
    total = sum(s["rows"] for s in manifest["shards"])
    wanted = sorted(random.Random(seed).sample(range(total), min(sample, total)))
    rows, start = [], 0
    for shard in manifest["shards"]:
        stop = start + shard["rows"]
        local = [i - start for i in wanted if start <= i < stop]
        if local:
            rows += _read_local_rows(pq.ParquetFile(Path(path) / shard["file"]), local)
        start = stop
    return rows


# ---------------------------------------------------------------------------- validation before training

# log-softmax in fp32 can round a near-certain token's log-prob a few ulps above 0 (the logits'
# ulps, about 4e-6 at a logit of 30); anything larger is not a log-prob.
LOGP_ROUNDING_SLACK = 1e-4
RECORD_TOTALS = ("rows", "bytes", "prompt_tokens", "completion_tokens")
# Opened shards the training stream keeps in memory, per cache and rank (`ShardReader`): a window's
# shards at default sizes (16 row groups of 256 pairs), so most are read from disk once per window.
STREAM_KEEP_BYTES = 256 << 20


def check_layout(directory: str | Path, manifest: dict[str, Any]) -> None:
    """The manifest and the directory agree, reading no shard's content: every listed shard is a
    bare shard name, listed once, a regular Parquet file of its recorded size inside this cache
    (a symlink may point only within it); every shard file here is listed; the totals equal the
    sum of the shard records."""
    directory = Path(directory)
    listed = [_listed_shard(directory, position, shard) for position, shard in enumerate(manifest["shards"])]
    twice = sorted({name for name in listed if listed.count(name) > 1})
    if twice:
        raise CacheError(f"{directory / 'manifest.json'}: lists shard {twice[0]} more than once (its rows would be "
                         f"trained on twice); the manifest is damaged or edited: rescore")
    present = sorted(p.name for p in directory.glob("part-*.parquet"))
    unlisted = sorted(set(present) - set(listed))
    if unlisted:
        raise CacheError(f"{directory}: shard file(s) {', '.join(unlisted[:3])} are not in the manifest; remove them or "
                         f"rescore (a cache must hold exactly the shards its manifest lists)")
    for key in RECORD_TOTALS:
        total = sum(shard[key] for shard in manifest["shards"])
        if manifest["totals"].get(key) != total:
            raise CacheError(f"{directory / 'manifest.json'}: totals.{key} is {manifest['totals'].get(key)!r} but the "
                             f"shards add up to {total}; the manifest is damaged: rescore")
    for shard in manifest["shards"]:
        _check_shard_file(directory, shard)


def _listed_shard(directory: Path, position: int, shard: Any) -> str:
    """The name of manifest entry `position`, refused unless it is a well-formed shard record."""
    name = shard.get("file") if isinstance(shard, dict) else None
    if not isinstance(name, str) or not SHARD_PATTERN.match(name):
        raise CacheError(f"{directory / 'manifest.json'}: shard entry {position} names {name!r}, not a shard file of "
                         f"this cache (part-WWWWW-SSSSSS.parquet); the manifest is damaged or foreign: rescore")
    bad = [key for key in RECORD_TOTALS if not isinstance(shard.get(key), int) or isinstance(shard[key], bool)
           or shard[key] < 0]
    bad += [] if isinstance(shard.get("sha256"), str) else ["sha256"]
    if bad:
        raise CacheError(f"{directory / 'manifest.json'}: shard {name} has missing or malformed {', '.join(bad)}; rescore")
    return name


def _check_shard_file(directory: Path, shard: dict[str, Any]) -> None:
    """A listed shard exists here, inside the cache, as a regular file of its recorded size that
    opens and ends like Parquet (`PAR1`): 8 bytes read, the content is checked by its sha256 later."""
    path = directory / shard["file"]
    if path.is_symlink() and not path.resolve().is_relative_to(directory.resolve()):
        raise CacheError(f"{path}: a symlink to {path.resolve()}, outside the cache; a cache's shards must lie inside "
                         f"it: copy the file in or rescore")
    if not path.exists():
        raise CacheError(f"{path}: shard listed in the manifest is missing; restore it or rescore")
    if not path.is_file():
        raise CacheError(f"{path}: listed as a shard but not a regular file; restore the shard or rescore")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise CacheError(f"{path}: holds {size} bytes, the manifest says {shard['bytes']} (the shard was truncated or "
                         f"replaced); rescore it or restore the file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
            handle.seek(max(0, size - 4))
            tail = handle.read(4)
    except OSError as err:
        raise CacheError(os_error_message(err, "read the shard")) from None
    if head != b"PAR1" or tail != b"PAR1":
        raise CacheError(f"{path}: not a Parquet file; restore the shard score-ref wrote or rescore")


def _values(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.list_flatten(column)


def check_row_group(where: str, table: pa.Table, vocab_size: int) -> None:
    """Values one row group must hold to be trained on; Arrow compute, no Python loop over tokens."""
    for name in SCHEMA.names:
        if table.column(name).null_count:
            raise CacheError(f"{where}: column {name} holds nulls; rescore")
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        lengths = pc.list_value_length(table.column(column))
        if pc.min(lengths).as_py() < 1:
            row = pc.index(pc.less(lengths, 1), True).as_py()
            raise CacheError(f"{where}: row {table.column('id')[row]} has an empty {column}; rescore")
        ids = _values(table.column(column))
        low, high = pc.min_max(ids).values()
        if low.as_py() < 0 or high.as_py() >= vocab_size:
            bad = low.as_py() if low.as_py() < 0 else high.as_py()
            raise CacheError(f"{where}: {column} holds token id {bad}, outside the policy's vocabulary of {vocab_size}; "
                             f"the cache belongs to another model or is damaged")
    for side in ("chosen", "rejected"):
        logps = table.column(f"{side}_ref_logps")
        if not pc.all(pc.equal(pc.list_value_length(logps), pc.list_value_length(table.column(f"{side}_ids")))).as_py():
            raise CacheError(f"{where}: {side}_ref_logps and {side}_ids differ in length in some row; rescore")
        values = _values(logps)
        if not pc.all(pc.is_finite(values)).as_py():
            raise CacheError(f"{where}: {side}_ref_logps holds NaN or infinite values; rescore (check the reference "
                             f"model and --dtype)")
        top = pc.max(values).as_py()
        if top is not None and top > LOGP_ROUNDING_SLACK:
            raise CacheError(f"{where}: {side}_ref_logps holds {top:g}, above 0: not a log-probability; rescore")


@dataclass
class CacheCheck:
    """What one pass over a cache found: its row groups (file, group, rows) and the bytes it read."""

    row_groups: list[tuple[str, int, int]]
    bytes_read: int


def check_values(directory: str | Path, manifest: dict[str, Any], vocab_size: int,
                 anchor: tuple[str | Path, dict[str, Any]] | None = None) -> CacheCheck:
    """One pass over the cache, each byte read once: every shard is read whole, its sha256 checked,
    and its row groups decoded from those same bytes and checked (`check_row_group`); no id may
    appear twice across the cache. The manifest must have passed `check_layout` (`open_cache`).

    With `anchor` (a second cache whose log-probs anchor the reward), it must hold the same rows
    cut into the same row groups, token for token, so the stream can read the two side by side.
    """
    directory = Path(directory)
    reader = ShardReader(directory, manifest)
    anchor_reader = None
    if anchor is not None:
        anchor_reader = ShardReader(anchor[0], anchor[1])
        _check_anchor_layout(directory, manifest, anchor_reader.directory, anchor[1])
    row_groups: list[tuple[str, int, int]] = []
    ids: list[pa.ChunkedArray] = []
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        parquet = reader.open(shard["file"])
        if parquet.metadata.num_rows != shard["rows"]:
            raise CacheError(f"{path}: holds {parquet.metadata.num_rows} rows, the manifest says {shard['rows']}; rescore")
        other = anchor_reader.open(shard["file"]) if anchor_reader is not None else None
        if other is not None and other.metadata.num_row_groups != parquet.metadata.num_row_groups:
            raise CacheError(f"{anchor_reader.directory / shard['file']}: the anchor cache's shards or row groups differ "
                             f"from {path}'s (other row groups); score the anchor with the same --row-group-size")
        for group in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            row_groups.append((shard["file"], group, rows))
            if rows == 0:
                continue  # a shard whose every row was skipped: nothing to check, nothing to train on
            ids.append(_check_group(path, parquet, group, vocab_size, other, anchor_reader))
    _refuse_duplicate_ids(directory, manifest, ids)
    return CacheCheck(row_groups, reader.bytes_read + (anchor_reader.bytes_read if anchor_reader else 0))


def _check_anchor_layout(directory: Path, manifest: dict[str, Any], anchor_dir: Path, anchor: dict[str, Any]) -> None:
    if manifest["tokenization"] != anchor["tokenization"]:
        differing = setting_differences(manifest["tokenization"], anchor["tokenization"])
        raise CacheError(f"{anchor_dir}: the anchor cache was tokenized otherwise than {directory} "
                         f"({'; '.join(differing)}); score both with the same limits")
    if [(s["file"], s["rows"]) for s in manifest["shards"]] != [(s["file"], s["rows"]) for s in anchor["shards"]]:
        raise CacheError(f"{anchor_dir}: the anchor cache's shards differ from {directory}'s; score the anchor from the "
                         f"same input with the same --num-workers, --shard-size, --row-group-size and limits")


def _check_group(path: Path, parquet: pq.ParquetFile, group: int, vocab_size: int, other: pq.ParquetFile | None,
                 anchor_reader: ShardReader | None) -> pa.ChunkedArray:
    """Check row group `group` (and the anchor's), returning its ids."""
    table = parquet.read_row_group(group)
    if table.schema.remove_metadata() != SCHEMA.remove_metadata():
        raise CacheError(f"{path}: its columns are not the cache schema's ({', '.join(table.schema.names)}); rescore")
    check_row_group(f"{path} row group {group}", table, vocab_size)
    if other is not None and anchor_reader is not None:
        anchor_path = anchor_reader.directory / path.name
        theirs = other.read_row_group(group)
        if theirs.schema.remove_metadata() != SCHEMA.remove_metadata():
            raise CacheError(f"{anchor_path}: its columns are not the cache schema's; rescore")
        check_row_group(f"{anchor_path} row group {group}", theirs, vocab_size)
        for column in ("id", "prompt_ids", "chosen_ids", "rejected_ids"):
            if not theirs.column(column).equals(table.column(column)):
                raise CacheError(f"{anchor_path}: row group {group} holds other {column} than the scoring "
                                 f"cache; score the anchor from the same input with the same settings")
    return table.column("id")


def _refuse_duplicate_ids(directory: Path, manifest: dict[str, Any], ids: list[pa.ChunkedArray]) -> None:
    """No pair twice: score-ref gives every input row its own id, so a repeated id is a shard
    copied under another name or a manifest edited to list rows again."""
    if not ids:
        return
    every = pa.chunked_array([chunk for column in ids for chunk in column.chunks], type=pa.string())
    if pc.count_distinct(every).as_py() == len(every):
        return
    counts = pc.value_counts(every)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
    holders = [shard["file"] for shard, column in zip(_shards_with_rows(manifest, ids), ids)
               if pc.any(pc.equal(column, repeated)).as_py()]
    raise CacheError(f"{directory}: id {repeated!r} appears in more than one row (in {', '.join(sorted(set(holders)))}); "
                     f"a cache holds each pair once: rescore, or remove the copied shard and rescore")


def _shards_with_rows(manifest: dict[str, Any], ids: list[pa.ChunkedArray]) -> list[dict[str, Any]]:
    """The shard of each entry of `ids` (one per non-empty row group, in shard order)."""
    owners = []
    remaining = iter(manifest["shards"])
    shard, left = None, 0
    for column in ids:
        while left == 0:
            shard = next(remaining)
            left = shard["rows"]
        owners.append(shard)
        left -= len(column)
    return owners


# The reference a cache was scored by, as far as its log-probs depend on it (not the path it was
# reached by: the same model may be mounted elsewhere).
REFERENCE_IDENTITY = ("fingerprint", "revision", "dtype")


def _scored_alike(train: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """How the log-probs of `other` would differ in making from those of `train`: its reference
    (by fingerprint, or by name where no fingerprint was recorded) and its tokenization."""
    keys = REFERENCE_IDENTITY if "fingerprint" in train["reference"] or "fingerprint" in other["reference"] \
        else ("model", *REFERENCE_IDENTITY[1:])
    differing = setting_differences(train["reference"], other["reference"], keys=keys, name=lambda k: f"reference.{k}")
    return differing + setting_differences(train["tokenization"], other["tokenization"], name=lambda k: f"tokenization.{k}")


def check_eval_pairing(train: str, evaluation: str, train_manifest: dict[str, Any], eval_manifest: dict[str, Any]) -> None:
    """An eval cache scored otherwise than the training cache is refused: its reference log-probs
    are not the training reference's, so a policy equal to the reference would not show the eval
    loss ln 2 at step 0, and the eval metrics would measure the difference between two references."""
    differing = _scored_alike(train_manifest, eval_manifest)
    if differing:
        raise CacheError(f"--eval-cache {evaluation} was scored otherwise than --cache {train} ({'; '.join(differing)}); "
                         f"score the eval data with the same reference and settings (`selpipe score-ref`)")


@dataclass
class TrainingCaches:
    """The manifests of the caches a training run reads, each checked end to end, with the row
    groups of each cache (from the checked bytes) and the bytes the check read."""

    train: dict[str, Any]
    anchor: dict[str, Any] | None
    eval: dict[str, Any] | None
    row_groups: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    bytes_read: int = 0

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "row_groups": {k: [list(g) for g in v] for k, v in self.row_groups.items()}})

    @classmethod
    def from_json(cls, text: str) -> TrainingCaches:
        data = json.loads(text)
        data["row_groups"] = {k: [tuple(g) for g in v] for k, v in data["row_groups"].items()}
        return cls(**data)


def check_training_caches(train: str, anchor: str | None, evaluation: str | None, fingerprint: dict[str, str],
                          vocab_size: int) -> TrainingCaches:
    """Refuse, before any training, a cache that is damaged, altered, foreign to the policy, paired
    with caches scored otherwise, or holds values training cannot use: layout (`open_cache`),
    tokenizer, pairing, then one pass over each cache's bytes (`check_values`)."""
    manifests: dict[str, dict[str, Any] | None] = {}
    for name, path in (("train", train), ("anchor", anchor), ("eval", evaluation)):
        manifests[name] = None if path is None else open_cache(path)
        if path is not None:
            check_tokenizer(path, manifests[name], fingerprint)
    if manifests["eval"] is not None and manifests["eval"]["totals"]["rows"] == 0:
        raise CacheError(f"{evaluation}: the eval cache holds no rows (see `selpipe inspect` for why); "
                         f"drop --eval-cache or rescore it")
    if evaluation is not None:
        check_eval_pairing(train, evaluation, manifests["train"], manifests["eval"])
    checked = {"train": check_values(train, manifests["train"], vocab_size,
                                     anchor=(anchor, manifests["anchor"]) if anchor else None)}
    if evaluation is not None:
        checked["eval"] = check_values(evaluation, manifests["eval"], vocab_size)
    row_groups = {name: check.row_groups for name, check in checked.items()}
    if anchor is not None:
        row_groups["anchor"] = row_groups["train"]  # the same row groups, checked side by side
    return TrainingCaches(**manifests, row_groups=row_groups, bytes_read=sum(c.bytes_read for c in checked.values()))


def open_training_caches(train: str, anchor: str | None, evaluation: str | None, fingerprint: dict[str, str],
                         vocab_size: int, *, rank: int = 0,
                         broadcast: Callable[[str | None], str] | None = None) -> TrainingCaches:
    """`check_training_caches`, run once per job: without `broadcast`, by this process; with it,
    by rank 0 alone, while every other rank receives its verdict, the checked caches or the same
    one-line error, and reads no shard.

    `broadcast(text)` is a collective every rank calls once: rank 0 passes its verdict (a JSON
    string) and every rank gets rank 0's string back (e.g. torch.distributed.broadcast_object_list
    of [text]; the others pass None). Plain JSON, so no rank ever unpickles what another sent.
    """
    if broadcast is None:
        return check_training_caches(train, anchor, evaluation, fingerprint, vocab_size)
    if rank != 0:
        return _received(broadcast(None))
    try:
        caches = check_training_caches(train, anchor, evaluation, fingerprint, vocab_size)
    except SelpipeError as err:
        broadcast(json.dumps({"refused": type(err).__name__, "message": str(err)}))
        raise
    except BaseException as err:
        broadcast(json.dumps({"refused": "bug", "message": f"rank 0 failed checking the caches "
                                                          f"({type(err).__name__}); see rank 0's traceback"}))
        raise
    broadcast(caches.to_json())
    return caches


def _received(text: str) -> TrainingCaches:
    verdict = json.loads(text)
    if "refused" in verdict:
        kinds = {cls.__name__: cls for cls in (CacheError, ConfigError)}
        raise kinds.get(verdict["refused"], CacheError)(verdict["message"])
    return TrainingCaches.from_json(text)


def read_rows_at(directory: str | Path, manifest: dict[str, Any], indices: Sequence[int]) -> list[dict[str, Any]]:
    """The rows at `indices` (global positions in the manifest's shard order, ascending), reading
    only the shards that hold them, each checked by its sha256 as it is read (`ShardReader`)."""
    wanted = sorted(set(indices))
    if list(indices) != wanted:
        raise ValueError("read_rows_at takes ascending, distinct indices")
    reader = ShardReader(directory, manifest)
    rows: list[dict[str, Any]] = []
    start = 0
    for shard in manifest["shards"]:
        stop = start + shard["rows"]
        local = [i - start for i in wanted[bisect.bisect_left(wanted, start):bisect.bisect_left(wanted, stop)]]
        if local:
            rows += _read_local_rows(reader.open(shard["file"]), local)
        start = stop
    return rows


def rank_rows(directory: str | Path, manifest: dict[str, Any], rank: int, world_size: int) -> list[dict[str, Any]]:
    """Rank `rank` of `world_size`'s contiguous block of the cache's rows (`eval_block`, the block
    `stream.eval_shards` gives it), reading only the shards that hold them."""
    return read_rows_at(directory, manifest, range(*eval_block(manifest["totals"]["rows"], rank, world_size)))


def eval_block(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank `rank`'s contiguous block of `rows`: ceil(rows / world) each, the last short."""
    per_rank = -(-rows // world_size)
    return min(rows, rank * per_rank), min(rows, (rank + 1) * per_rank)
