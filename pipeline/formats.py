"""Preference data in the formats users already have.

A row is `prompt`/`chosen`/`rejected`, either as strings ("standard") or as lists of chat
messages ("conversational"). Files: JSONL, JSONL compressed with zstd, Parquet, or a directory
written by `datasets.Dataset.save_to_disk`. Every row gets a stable id: its `id` column when
present, else a hash of its content and position, which survives reruns of the same file.

Rows come out as `RawRow`s; a row that cannot be read raises `BadRowError` naming the file, the
row (1-based) and the field, so the caller can stop or count a skip.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadRowError, InputError

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class RawRow:
    """One input row, before tokenization. `position` is 0-based in the input."""

    id: str
    position: int
    prompt: str | list[dict[str, str]]
    chosen: str | list[dict[str, str]]
    rejected: str | list[dict[str, str]]

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass(frozen=True)
class Record:
    """What a reader yields: the parsed object, or the error it raised, at a position."""

    position: int
    value: dict[str, Any] | None
    error: BadRowError | None = None


def input_kind(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "dataset"
    if name.endswith(".jsonl.zst") or name.endswith(".jsonl.zstd"):
        return "jsonl.zst"
    if name.endswith(".jsonl") or name.endswith(".json"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise InputError(f"{path}: unknown input kind; expected .jsonl, .jsonl.zst, .parquet or a saved dataset directory")


def fingerprint_input(path: str | Path) -> str:
    """sha256 over the input's bytes (every file of a directory, in name order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _jsonl_records(source: str, lines: Iterable[bytes]) -> Iterator[Record]:
    for position, line in enumerate(lines):
        row = position + 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield Record(position, None, BadRowError(source, row, None, "invalid_utf8", f"invalid UTF-8 at byte {err.start}"))
            continue
        if not text.strip():
            yield Record(position, None, BadRowError(source, row, None, "empty_line", "empty line"))
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            yield Record(position, None, BadRowError(source, row, None, "invalid_json", f"not valid JSON ({err.msg})"))
            continue
        if not isinstance(value, dict):
            yield Record(position, None, BadRowError(source, row, None, "not_an_object", "expected a JSON object"))
            continue
        yield Record(position, value)


def _zstd_blocks(path: Path, handle: Any) -> Iterator[bytes]:
    """The decompressed bytes of every frame in the file, a block at a time.

    `stream_reader` reports a clean EOF when the file ends inside a frame, which silently drops the
    rows of a cut-off file; a decompressobj says whether its frame ended, so truncation is caught.
    """
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    frame, in_frame = decompressor.decompressobj(), False
    for data in iter(lambda: handle.read(1 << 16), b""):
        while data:
            try:
                block = frame.decompress(data)
            except zstandard.ZstdError as err:
                raise InputError(f"{path}: corrupt zstd stream ({err})") from None
            in_frame = True
            if block:
                yield block
            if frame.eof:  # a decompressobj reads one frame; the bytes after it start the next
                data, frame, in_frame = frame.unused_data, decompressor.decompressobj(), False
            else:
                data = b""
    if in_frame:
        raise InputError(f"{path}: truncated zstd stream: the file ends inside a frame, so its last rows are missing")


def _split_lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines, newline kept, across block boundaries; split on LF only, as iterating a binary file is."""
    pending = bytearray()
    for block in blocks:
        end = block.rfind(b"\n")
        if end < 0:
            pending += block
            continue
        pending += block[:end]
        for line in pending.split(b"\n"):
            yield bytes(line) + b"\n"
        pending = bytearray(block[end + 1:])
    if pending:
        yield bytes(pending)


def read_records(path: str | Path, split: str = "train") -> Iterator[Record]:
    """Yield every record of the input in file order."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: input does not exist")
    kind = input_kind(path)
    source = str(path)
    if kind == "jsonl":
        with open(path, "rb") as handle:
            head = handle.read(4)
            if head.startswith(b"PAR1") or head.startswith(b"\x28\xb5\x2f\xfd"):
                raise InputError(f"{path}: the suffix says JSONL but the file is binary (Parquet or zstd?)")
            handle.seek(0)
            yield from _jsonl_records(source, handle)
    elif kind == "jsonl.zst":
        with open(path, "rb") as handle:
            if handle.read(4) != b"\x28\xb5\x2f\xfd":
                raise InputError(f"{path}: the suffix says .zst but the file is not zstd-compressed")
            handle.seek(0)
            yield from _jsonl_records(source, _split_lines(_zstd_blocks(path, handle)))
    elif kind == "parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises ArrowInvalid and OSError for non-Parquet files
            raise InputError(f"{path}: the suffix says Parquet but the file is not Parquet ({err})") from None
        position = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for value in batch.to_pylist():
                yield Record(position, value)
                position += 1
    else:
        yield from _dataset_records(path, split)


def _dataset_records(path: Path, split: str) -> Iterator[Record]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise InputError(f"{path}: not a directory saved by datasets.save_to_disk ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise InputError(f"{path}: no split '{split}'; it has {', '.join(loaded)} (use --split)")
        loaded = loaded[split]
    for position, value in enumerate(loaded):
        yield Record(position, value)


def _check_text(source: str, row: int, field: str, text: str, row_id: str | None, where: str = "") -> str:
    """A JSON escape such as \\ud800 decodes to a lone surrogate, which no UTF-8 encoder (tokenizer,
    Parquet writer) accepts: reject it here as the invalid UTF-8 it stands for."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRowError(source, row, field, "invalid_utf8",
                          f"{where}invalid UTF-8: lone surrogate {text[err.start]!r} at character {err.start}", row_id) from None
    return text


def _check_messages(source: str, row: int, field: str, value: list, row_id: str) -> list[dict[str, str]]:
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise BadRowError(source, row, field, "bad_message", f"message {index} must be an object with string 'role' and 'content'", row_id)
        for key in ("role", "content"):
            _check_text(source, row, field, message[key], row_id, f"message {index} {key}: ")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def derive_id(position: int, value: dict[str, Any]) -> str:
    content = json.dumps([value.get(name) for name in FIELDS], sort_keys=True, ensure_ascii=False, default=str)
    # surrogatepass: a row with a lone surrogate still gets an id to report its skip under.
    return hashlib.sha1(f"{position}\0{content}".encode("utf-8", "surrogatepass")).hexdigest()[:20]


def parse_row(source: str, record: Record) -> RawRow:
    """Validate one record into a RawRow, or raise BadRowError naming the field."""
    if record.error is not None:
        raise record.error
    value, row = record.value, record.position + 1
    assert value is not None
    raw_id = value.get("id")
    # bool is a subclass of int, but `true` is no id.
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
        raise BadRowError(source, row, "id", "bad_id", f"expected a string or integer, got {type(raw_id).__name__}")
    if isinstance(raw_id, str):
        _check_text(source, row, "id", raw_id, None)
    row_id = str(raw_id) if raw_id is not None else derive_id(record.position, value)
    fields: dict[str, Any] = {}
    for name in FIELDS:
        if name not in value or value[name] is None:
            raise BadRowError(source, row, name, "missing_field", "missing", row_id)
        item = value[name]
        if isinstance(item, str):
            fields[name] = _check_text(source, row, name, item, row_id)
        elif isinstance(item, list):
            fields[name] = _check_messages(source, row, name, item, row_id)
        else:
            raise BadRowError(source, row, name, "wrong_type", f"expected a string or a list of messages, got {type(item).__name__}", row_id)
    conversational = [isinstance(fields[name], list) for name in ("chosen", "rejected")]
    if conversational[0] != conversational[1]:
        raise BadRowError(source, row, "rejected", "mixed_format", "chosen and rejected must both be strings or both be message lists", row_id)
    if conversational[0]:
        if isinstance(fields["prompt"], str):
            fields["prompt"] = [{"role": "user", "content": fields["prompt"]}]
        elif not fields["prompt"]:
            raise BadRowError(source, row, "prompt", "empty_prompt", "empty message list", row_id)
        for name in ("chosen", "rejected"):
            if not fields[name]:
                raise BadRowError(source, row, name, "empty_completion", "empty message list", row_id)
            if not any(m["role"] == "assistant" for m in fields[name]):
                raise BadRowError(source, row, name, "no_assistant_turn", "has no assistant message", row_id)
            if not any(m["content"] for m in fields[name] if m["role"] == "assistant"):
                raise BadRowError(source, row, name, "empty_completion", "assistant message is empty", row_id)
    else:
        if isinstance(fields["prompt"], list):
            raise BadRowError(source, row, "prompt", "mixed_format", "a message-list prompt needs message-list completions", row_id)
        for name in ("chosen", "rejected"):
            if not fields[name]:
                raise BadRowError(source, row, name, "empty_completion", "empty string", row_id)
    return RawRow(id=row_id, position=record.position, **fields)
