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
from collections import Counter
from collections.abc import Iterator
from itertools import accumulate
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .atomic import atomic_path, write_json_atomic
from .errors import CacheError
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


def completed_shard(directory: Path, worker: int, index: int) -> ShardRecord | None:
    """The record of a shard that is complete and intact, else None (it will be redone)."""
    final = directory / shard_name(worker, index)
    marker = final.with_suffix(".json")
    if not (final.exists() and marker.exists()):
        return None
    record = ShardRecord.from_json(json.loads(marker.read_text()))
    if record.bytes != final.stat().st_size or record.sha256 != file_sha256(final):
        return None
    return record


def shard_records(directory: Path) -> list[ShardRecord]:
    records = []
    for path in sorted(directory.glob("part-*.json")):
        records.append(ShardRecord.from_json(json.loads(path.read_text())))
    return records


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


def load_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.exists():
        if (directory / "header.json").exists():
            header = json.loads((directory / "header.json").read_text())
            workers = header["settings"]["num_workers"]
            done = sorted(int(p.name[7:12]) for p in directory.glob("worker-*.done.json"))
            missing = sorted(set(range(workers)) - set(done))
            raise CacheError(f"{directory}: cache incomplete, workers {missing} of {workers} have not finished; rerun them")
        raise CacheError(f"{directory}: not a score cache (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"{path}: damaged manifest, not valid JSON ({err}); rerun `selpipe score-ref` with the same "
                         f"settings to rewrite it") from None
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


def verify_checksums(directory: str | Path, manifest: dict[str, Any]) -> None:
    directory = Path(directory)
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        if not path.exists():
            raise CacheError(f"{path}: shard listed in the manifest is missing")
        if path.stat().st_size != shard["bytes"] or file_sha256(path) != shard["sha256"]:
            raise CacheError(f"{path}: checksum mismatch (the shard was truncated or altered); rescore it or restore the file")


def cache_identity(manifest: dict[str, Any]) -> str:
    """A digest of the cache's content (its shards' checksums in order), whatever path it is reached by."""
    return hashlib.sha256("".join(shard["sha256"] for shard in manifest["shards"]).encode()).hexdigest()


def check_tokenizer(directory: str | Path, manifest: dict[str, Any], fingerprint: dict[str, str]) -> None:
    differing = fingerprint_differences(manifest["tokenizer_fingerprint"], fingerprint)
    if differing:
        raise CacheError(
            f"{directory}: the policy's tokenizer differs from the one the cache was scored with "
            f"(differs in: {', '.join(differing)}); train a policy with the cache's tokenizer "
            f"({manifest['reference']['model']}) or rescore the data"
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


def _read_local_rows(file: Path, local: list[int]) -> list[dict[str, Any]]:
    """Rows `local` (sorted) of one shard, reading only the row groups that hold them."""
    parquet = pq.ParquetFile(file)
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
            rows += _read_local_rows(Path(path) / shard["file"], local)
        start = stop
    return rows


# ---------------------------------------------------------------------------- validation before training

# log-softmax in fp32 can round a near-certain token's log-prob a few ulps above 0 (the logits'
# ulps, about 4e-6 at a logit of 30); anything larger is not a log-prob.
LOGP_ROUNDING_SLACK = 1e-4
RECORD_TOTALS = ("rows", "bytes", "prompt_tokens", "completion_tokens")


def check_layout(directory: str | Path, manifest: dict[str, Any]) -> None:
    """The manifest and the directory agree: every listed shard is a bare shard name present here,
    every shard file here is listed, and the totals equal the sum of the shard records."""
    directory = Path(directory)
    listed = []
    for position, shard in enumerate(manifest["shards"]):
        name = shard.get("file") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not SHARD_PATTERN.match(name):
            raise CacheError(f"{directory / 'manifest.json'}: shard entry {position} names {name!r}, not a shard file of "
                             f"this cache (part-WWWWW-SSSSSS.parquet); the manifest is damaged or foreign: rescore")
        bad = [key for key in ("rows", *RECORD_TOTALS[1:]) if not isinstance(shard.get(key), int) or shard[key] < 0]
        bad += [] if isinstance(shard.get("sha256"), str) else ["sha256"]
        if bad:
            raise CacheError(f"{directory / 'manifest.json'}: shard {name} has malformed {', '.join(bad)}; rescore")
        listed.append(name)
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


def check_values(directory: str | Path, manifest: dict[str, Any], vocab_size: int,
                 anchor: tuple[str | Path, dict[str, Any]] | None = None) -> None:
    """Read every row group once and refuse any value training cannot use (see `check_row_group`).

    With `anchor` (a second cache whose log-probs anchor the reward), it must hold the same rows
    cut into the same row groups, token for token, so the stream can read the two side by side.
    """
    directory = Path(directory)
    if anchor is not None:
        anchor_dir, anchor_manifest = Path(anchor[0]), anchor[1]
        if manifest["tokenization"] != anchor_manifest["tokenization"]:
            raise CacheError(f"{anchor_dir}: the anchor cache was tokenized with {anchor_manifest['tokenization']}, "
                             f"{directory} with {manifest['tokenization']}; score both with the same limits")
        if [(s["file"], s["rows"]) for s in manifest["shards"]] != [(s["file"], s["rows"]) for s in anchor_manifest["shards"]]:
            raise CacheError(f"{anchor_dir}: the anchor cache's shards differ from {directory}'s; score the anchor from the "
                             f"same input with the same --num-workers, --shard-size, --row-group-size and limits")
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        parquet = pq.ParquetFile(path)
        if parquet.metadata.num_rows != shard["rows"]:
            raise CacheError(f"{path}: holds {parquet.metadata.num_rows} rows, the manifest says {shard['rows']}; rescore")
        anchor_file = pq.ParquetFile(anchor_dir / shard["file"]) if anchor is not None else None
        if anchor_file is not None and anchor_file.metadata.num_row_groups != parquet.metadata.num_row_groups:
            raise CacheError(f"{anchor_dir / shard['file']}: the anchor cache's shards or row groups differ from {path}'s "
                             f"(other row groups); score the anchor with the same --row-group-size")
        for group in range(parquet.metadata.num_row_groups):
            if parquet.metadata.row_group(group).num_rows == 0:
                continue  # a shard whose every row was skipped: nothing to check, nothing to train on
            table = parquet.read_row_group(group)
            if table.schema.remove_metadata() != SCHEMA.remove_metadata():
                raise CacheError(f"{path}: its columns are not the cache schema's ({', '.join(table.schema.names)}); rescore")
            check_row_group(f"{path} row group {group}", table, vocab_size)
            if anchor_file is None:
                continue
            other = anchor_file.read_row_group(group)
            check_row_group(f"{anchor_dir / shard['file']} row group {group}", other, vocab_size)
            for column in ("id", "prompt_ids", "chosen_ids", "rejected_ids"):
                if not other.column(column).equals(table.column(column)):
                    raise CacheError(f"{anchor_dir / shard['file']}: row group {group} holds other {column} than the scoring "
                                     f"cache; score the anchor from the same input with the same settings")


@dataclass
class TrainingCaches:
    """The manifests of the caches a training run reads, each checked end to end."""

    train: dict[str, Any]
    anchor: dict[str, Any] | None
    eval: dict[str, Any] | None


def open_training_caches(train: str, anchor: str | None, evaluation: str | None, fingerprint: dict[str, str],
                         vocab_size: int) -> TrainingCaches:
    """Refuse, before any training, a cache that is damaged, altered, foreign to the policy, or holds
    values training cannot use: layout, checksums, tokenizer, then every value (see `check_values`)."""
    manifests: dict[str, dict[str, Any] | None] = {}
    for name, path in (("train", train), ("anchor", anchor), ("eval", evaluation)):
        if path is None:
            manifests[name] = None
            continue
        manifest = load_manifest(path)
        check_layout(path, manifest)
        verify_checksums(path, manifest)
        check_tokenizer(path, manifest, fingerprint)
        manifests[name] = manifest
    if manifests["eval"] is not None and manifests["eval"]["totals"]["rows"] == 0:
        raise CacheError(f"{evaluation}: the eval cache holds no rows (see `selpipe inspect` for why); "
                         f"drop --eval-cache or rescore it")
    check_values(train, manifests["train"], vocab_size, anchor=(anchor, manifests["anchor"]) if anchor else None)
    if evaluation is not None:
        check_values(evaluation, manifests["eval"], vocab_size)
    return TrainingCaches(**manifests)
