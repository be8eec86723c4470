"""Preference data in the formats users already have.

A row is `prompt`/`chosen`/`rejected`, either as strings ("standard") or as lists of chat
messages ("conversational"), optionally with a `tools` list for the chat template. As in TRL, the
prompt may be implicit: rows with only `chosen` and `rejected` take their shared prefix as the
prompt (TRL's `extract_prompt`).

`--input` names, in the order tried (`resolve_input`):

- a file: JSON Lines (`.jsonl`, or `.json` holding one object per line), `.jsonl.zst`, a `.json`
  file holding one JSON array, Parquet, Arrow;
- a directory written by `datasets.Dataset.save_to_disk`, or any other dataset folder
  `datasets.load_dataset` reads (as `huggingface-cli download` leaves it: `data/train-*.parquet`,
  a README whose `configs:` name the subsets and splits);
- several files, comma-separated, or a glob;
- a Hugging Face Hub dataset name, read offline from the local caches (the files
  `huggingface-cli download` stored, or what `datasets.load_dataset` prepared).

`datasets` only resolves which files hold the chosen subset and split; selpipe reads each file
itself, so a worker can be dealt whole files, a cut-off `.jsonl.zst` is an error rather than
fewer rows, and every error names the file and row. Every row gets a stable id: its `id` column
when present, else a hash of its content and position (and file, when there are several).

Rows come out as `RawRow`s; a row that cannot be read raises `BadRowError` naming the file, the
row (1-based) and the field, so the caller can stop or count a skip.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadRowError, ConfigError, InputError, first_line

FIELDS = ("prompt", "chosen", "rejected")
Message = dict[str, Any]
BOM = b"\xef\xbb\xbf"
WILDCARDS = "*?["
# Content parts a text model cannot score; anything but "text" is refused, these by name.
NON_TEXT_PARTS = ("image", "image_url", "audio", "input_audio", "video", "video_url", "file")


@dataclass(frozen=True)
class RawRow:
    """One input row, before tokenization. `position` is 0-based in its file."""

    id: str
    position: int
    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message]
    tools: list[Any] | None = None

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass(frozen=True)
class Record:
    """What a reader yields: the parsed object, or the error it raised, at a position of a file.

    `source` names the file as the user knows it; `scope` is empty for a one-file input and the
    file's label otherwise, so derived ids stay unique across files.
    """

    position: int
    value: dict[str, Any] | None
    error: BadRowError | None = None
    source: str = "input"
    scope: str = ""


@dataclass(frozen=True)
class DataFile:
    """One file of the input: where it is, how messages name it, its label (its path relative to the
    input's root, what fingerprints and ids use, so the same data mounted elsewhere agrees), its kind."""

    path: Path
    source: str
    label: str
    kind: str


@dataclass(frozen=True)
class InputSource:
    """What `--input` resolved to: its files in reading order, the directories it reads (as a whole)
    and the globs it expands, which the output must stay out of."""

    spec: str
    kind: str
    files: tuple[DataFile, ...]
    roots: tuple[Path, ...] = ()
    patterns: tuple[str, ...] = ()

    def would_read(self, path: Path) -> bool:
        """Whether a file at `path` would be input on a rerun: inside a directory it reads, or matched by its glob."""
        real = Path(os.path.realpath(path))
        for root in self.roots:
            real_root = Path(os.path.realpath(root))
            if real == real_root or real_root in real.parents:
                return True
        return any(_glob_matches(Path(os.path.abspath(p)).parts, Path(os.path.abspath(path)).parts) for p in self.patterns)

    @property
    def scoped(self) -> bool:
        return len(self.files) > 1


def _glob_matches(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """`glob.glob(pattern, recursive=True)` semantics, path component by component: `**` spans any
    number of directories, other wildcards stay within one, and a leading dot must be matched."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_matches(pattern[1:], parts[i:]) for i in range(len(parts) + 1)
                   if not any(p.startswith(".") for p in parts[:i]))
    if not parts or (parts[0].startswith(".") and not pattern[0].startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_matches(pattern[1:], parts[1:])


def file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl.zst", ".jsonl.zstd")):
        return "jsonl.zst"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    raise InputError(f"{path}: unknown input kind; expected .jsonl, .json, .jsonl.zst, .parquet, .arrow, "
                     f"a dataset directory or a Hugging Face dataset name")


def _single(path: Path, spec: str) -> DataFile:
    return DataFile(path, spec, path.name, file_kind(path))


def _looks_like_a_path(spec: str) -> bool:
    """A name that cannot be a Hub dataset id (`name` or `namespace/name`) is a missing path."""
    return (spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec
            or spec.lower().endswith((".jsonl", ".json", ".zst", ".zstd", ".parquet", ".arrow", ".csv", ".gz")))


def resolve_input(spec: str, config: str | None = None, split: str = "train") -> InputSource:
    """Resolve `--input` to the files that hold the rows of `split` (and subset `config`)."""
    path = Path(spec)
    if path.is_file():
        _no_config(spec, config, "a file")
        return InputSource(spec, "file", (_single(path, spec),))
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            _no_config(spec, config, "a directory saved by datasets.save_to_disk")
            return InputSource(spec, "saved dataset", _saved_files(path, spec, split), (path,))
        return InputSource(spec, "dataset folder", _folder_files(path, spec, config, split), (path,))
    if any(char in spec for char in WILDCARDS) or "," in spec:
        _no_config(spec, config, "a list of files")
        return _listed_files(spec)
    if _looks_like_a_path(spec):
        raise InputError(f"{spec}: input does not exist")
    return _hub_files(spec, config, split)


def _no_config(spec: str, config: str | None, what: str) -> None:
    if config is not None:
        raise ConfigError(f"--input-config {config!r} names a subset of a dataset folder or Hub dataset; {spec} is {what}")


def _listed_files(spec: str) -> InputSource:
    """Comma-separated files or globs (`data/*.jsonl`, `a.jsonl,b.jsonl`), each file once, in the order given."""
    paths: list[Path] = []
    patterns: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if any(char in item for char in WILDCARDS):
            matched = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matched:
                raise InputError(f"{item}: the pattern matches no files")
            patterns.append(item)
        elif Path(item).is_dir():
            raise InputError(f"{item}: is a directory; list files (or give the directory alone as --input)")
        elif not Path(item).is_file():
            raise InputError(f"{item}: input does not exist")
        else:
            matched = [Path(item)]
        paths += matched
    seen: set[str] = set()
    for path in paths:
        key = os.path.realpath(path)
        if key in seen:
            raise InputError(f"{path}: listed twice in --input {spec}")
        seen.add(key)
    base = os.path.commonpath([os.path.abspath(p.parent) for p in paths])
    files = tuple(DataFile(p, str(p), os.path.relpath(os.path.abspath(p), base), file_kind(p)) for p in paths)
    return InputSource(spec, "files", files, patterns=tuple(patterns))


@contextmanager
def _offline() -> Iterator[None]:
    """No network at run time: `datasets` and the Hub client read only what the local caches hold."""
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _saved_files(path: Path, spec: str, split: str) -> tuple[DataFile, ...]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise InputError(f"{spec}: not a directory saved by datasets.save_to_disk ({first_line(err)[:300]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise InputError(f"{spec}: no split '{split}'; it has {', '.join(loaded)} (use --split)")
        loaded = loaded[split]
    return tuple(DataFile(Path(f["filename"]), os.path.join(spec, os.path.relpath(f["filename"], path)),
                          os.path.relpath(f["filename"], path), "arrow") for f in loaded.cache_files)


def _folder_files(path: Path, source: str, config: str | None, split: str, separator: str = "/") -> tuple[DataFile, ...]:
    """The files `datasets.load_dataset(path, config, split=split)` would read, as its own resolver finds them."""
    import datasets

    try:
        with _offline():
            builder = datasets.load_dataset_builder(str(path), name=config)
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        raise InputError(f"{source}: datasets cannot read this folder ({first_line(err)[:300]})") from None
    data_files = builder.config.data_files or {}
    if split not in data_files:
        subset = f" of subset '{builder.config.name}'" if config else ""
        raise InputError(f"{source}: no split '{split}'{subset}; it has {', '.join(map(str, data_files)) or 'none'} (use --split)")
    files = []
    for name in data_files[split]:
        label = os.path.relpath(name, path)
        files.append(DataFile(Path(name), f"{source.rstrip('/')}{separator}{label}", label, file_kind(Path(name))))
    return tuple(files)


def _hub_files(name: str, config: str | None, split: str) -> InputSource:
    """A Hub dataset from the local caches: the raw files of a `huggingface-cli download`, else
    what `datasets.load_dataset` prepared when it last ran online. Nothing is downloaded."""
    import datasets
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        with _offline():
            folder = snapshot_download(name, repo_type="dataset", local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError):
        folder = None
    if folder is not None:
        return InputSource(name, "hub dataset (downloaded files)", _folder_files(Path(folder), name, config, split, ":"))
    try:
        with _offline():
            loaded = datasets.load_dataset(name, config, split=split)
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        reason = first_line(err)[:300] if not isinstance(err, ConnectionError) else "it is not in the local cache"
        raise InputError(f"{name}: no such file or directory, and not a dataset the local Hugging Face cache can give "
                         f"({reason}); give a path, or download it first (`huggingface-cli download --repo-type "
                         f"dataset {name}`): selpipe reads offline") from None
    files = tuple(DataFile(Path(f["filename"]), f"{name}:{Path(f['filename']).name}", Path(f["filename"]).name, "arrow")
                  for f in loaded.cache_files)
    return InputSource(name, "hub dataset (datasets cache)", files)


def fingerprint_input(source: InputSource) -> str:
    """sha256 over each file's label and bytes, in reading order: the content, wherever it is mounted."""
    digest = hashlib.sha256()
    for file in source.files:
        digest.update(file.label.encode())
        with open(file.path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class OversizedLine:
    """A line longer than the bound, skipped unread: only its length was counted."""

    size: int
    limit: int


def _decode_row(source: str, row: int, line: bytes) -> dict[str, Any] | BadRowError:
    """One JSON Lines row's object, or the BadRowError saying why it is none."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return BadRowError(source, row, None, "invalid_utf8", f"invalid UTF-8 at byte {err.start}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return BadRowError(source, row, None, "invalid_json", f"not valid JSON ({err.msg})")
    except RecursionError:  # the decoder recurses once per level of nesting
        return BadRowError(source, row, None, "too_deep", f"lists and objects nest more than {MAX_NESTING} levels deep; "
                           f"no preference row does")
    if not isinstance(value, dict):
        return BadRowError(source, row, None, "not_an_object", "expected a JSON object")
    return value


def _jsonl_records(file: DataFile, scope: str, lines: Iterable[bytes | OversizedLine]) -> Iterator[Record]:
    source = file.source
    for position, line in enumerate(lines):
        row = position + 1
        if isinstance(line, OversizedLine):
            yield Record(position, None, BadRowError(
                source, row, None, "row_too_large", f"the row is {line.size:,} bytes, over --max-row-bytes "
                f"{line.limit:,}; it was not parsed (raise --max-row-bytes to score it)"), source, scope)
            continue
        if position == 0 and line.startswith(BOM):
            line = line[len(BOM):]  # editors on Windows write one; it is no part of the data
        if not line.strip():
            continue  # a blank line holds no row: nothing is lost by passing it
        value = _decode_row(source, row, line)
        if isinstance(value, BadRowError):
            yield Record(position, None, value, source, scope)
        else:
            yield Record(position, value, None, source, scope)


def _bounded_lines(handle: Any, limit: int | None) -> Iterator[bytes | OversizedLine]:
    """The file's lines (split on LF, newline kept), none held longer than `limit` bytes: a longer
    line is read past in blocks and stands as an `OversizedLine`, so memory stays bounded."""
    if limit is None:
        yield from handle
        return
    while line := handle.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        size = len(line)
        while not line.endswith(b"\n") and (line := handle.readline(1 << 20)):
            size += len(line)
        yield OversizedLine(size - line.endswith(b"\n"), limit)


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


def _split_lines(blocks: Iterable[bytes], limit: int | None = None) -> Iterator[bytes | OversizedLine]:
    """Lines, newline kept, across block boundaries; split on LF only, as iterating a binary file is.
    A line over `limit` bytes is not kept: it stands as an `OversizedLine` (see `_bounded_lines`)."""
    pending, oversized = bytearray(), 0  # `oversized`: bytes of a line over the limit, counted, not kept
    for block in blocks:
        start = 0
        while (end := block.find(b"\n", start)) >= 0:
            yield _line_of(pending, oversized, block[start:end], limit)
            pending, oversized, start = bytearray(), 0, end + 1
        pending, oversized = _extend(pending, oversized, block[start:], limit)
    if pending or oversized:
        line = _line_of(pending, oversized, b"", limit)
        yield line if isinstance(line, OversizedLine) else line[:-1]


def _extend(pending: bytearray, oversized: int, piece: bytes, limit: int | None) -> tuple[bytearray, int]:
    if oversized or (limit is not None and len(pending) + len(piece) > limit):
        return bytearray(), oversized + len(pending) + len(piece)
    pending += piece
    return pending, 0


def _line_of(pending: bytearray, oversized: int, tail: bytes, limit: int | None) -> bytes | OversizedLine:
    pending, oversized = _extend(pending, oversized, tail, limit)
    if oversized:
        return OversizedLine(oversized, limit or 0)
    return bytes(pending) + b"\n"


def _first_char(path: Path) -> bytes:
    """The first byte that is not a BOM or whitespace: `[` opens a JSON array, `{` a JSON Lines row."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 12)
    return head.removeprefix(BOM).lstrip()[:1]


def _json_array_records(file: DataFile, scope: str) -> Iterator[Record]:
    data = file.path.read_bytes().removeprefix(BOM)
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(f"{file.source}: invalid UTF-8 at byte {err.start}") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{file.source}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except RecursionError:
        raise InputError(f"{file.source}: its JSON nests too deep to read (no preference data set does); give one "
                         f"row object per line, so a bad row is one row") from None
    for position, item in enumerate(value):
        if isinstance(item, dict):
            yield Record(position, item, None, file.source, scope)
        else:
            yield Record(position, None, BadRowError(file.source, position + 1, None, "not_an_object",
                                                     f"array element is a {type(item).__name__}, expected a JSON object"),
                         file.source, scope)


def _one_object(file: DataFile) -> list[str] | None:
    """The keys of a file that holds one JSON object (not rows), else None."""
    try:
        value = json.loads(file.path.read_bytes().removeprefix(BOM))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return sorted(value) if isinstance(value, dict) else None


def read_file_records(file: DataFile, scope: str = "", max_row_bytes: int | None = None) -> Iterator[Record]:
    """Yield every record of one file in file order. A JSON Lines row (plain or zstd) over
    `max_row_bytes` is a bad row `row_too_large`, skipped unread (None: no bound)."""
    path = file.path
    if not path.exists():
        raise InputError(f"{file.source}: input does not exist")
    if file.kind in ("jsonl", "json"):
        with open(path, "rb") as handle:
            head = handle.read(4)
        if head.startswith(b"PAR1") or head.startswith(b"\x28\xb5\x2f\xfd"):
            raise InputError(f"{file.source}: the suffix says JSON but the file is binary (Parquet or zstd?)")
        if _first_char(path) == b"[":
            yield from _json_array_records(file, scope)
            return
        with open(path, "rb") as handle:
            records = _jsonl_records(file, scope, _bounded_lines(handle, max_row_bytes))
            for record in records:
                if record.position == 0 and record.error is not None and record.error.reason == "invalid_json":
                    keys = _one_object(file)
                    if keys is not None:
                        raise InputError(f"{file.source}: holds one JSON object (keys: {', '.join(keys[:5])}), not rows; "
                                         f"give a JSON array of row objects or one object per line")
                yield record
    elif file.kind == "jsonl.zst":
        with open(path, "rb") as handle:
            if handle.read(4) != b"\x28\xb5\x2f\xfd":
                raise InputError(f"{file.source}: the suffix says .zst but the file is not zstd-compressed")
            handle.seek(0)
            yield from _jsonl_records(file, scope, _split_lines(_zstd_blocks(path, handle), max_row_bytes))
    elif file.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises ArrowInvalid and OSError for non-Parquet files
            raise InputError(f"{file.source}: the suffix says Parquet but the file is not Parquet ({err})") from None
        yield from _batch_records(file, scope, parquet.iter_batches(batch_size=1024))
    else:
        yield from _batch_records(file, scope, _arrow_batches(file))


def _arrow_batches(file: DataFile) -> Iterator[Any]:
    """Record batches of an Arrow IPC file: the stream format `datasets` writes, or the file format."""
    import pyarrow as pa

    with pa.memory_map(str(file.path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                opened = pa.ipc.open_file(source)
            except pa.ArrowInvalid as err:
                raise InputError(f"{file.source}: the suffix says Arrow but the file is not Arrow IPC ({err})") from None
            reader = (opened.get_batch(i) for i in range(opened.num_record_batches))
        yield from reader


def _batch_records(file: DataFile, scope: str, batches: Iterable[Any]) -> Iterator[Record]:
    position = 0
    for batch in batches:
        for value in batch.to_pylist():
            yield Record(position, value, None, file.source, scope)
            position += 1


def read_records(source: InputSource | str | Path, split: str = "train", max_row_bytes: int | None = None) -> Iterator[Record]:
    """Yield every record of the input, file after file, each in file order."""
    if not isinstance(source, InputSource):
        source = resolve_input(str(source), split=split)
    for file in source.files:
        yield from read_file_records(file, file.label if source.scoped else "", max_row_bytes)


def _check_text(source: str, row: int, field: str, text: str, row_id: str | None, where: str = "") -> str:
    """A JSON escape such as \\ud800 decodes to a lone surrogate, which no UTF-8 encoder (tokenizer,
    Parquet writer) accepts: reject it here as the invalid UTF-8 it stands for."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRowError(source, row, field, "invalid_utf8",
                          f"{where}invalid UTF-8: lone surrogate {text[err.start]!r} at character {err.start}", row_id) from None
    return text


def _check_strings(source: str, row: int, field: str, value: Any, row_id: str, where: str) -> None:
    """Every string inside a nested value (tool calls, tool schemas) is valid UTF-8."""
    if isinstance(value, str):
        _check_text(source, row, field, value, row_id, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(source, row, field, key, row_id, where)
            _check_strings(source, row, field, item, row_id, where)
    elif isinstance(value, list):
        for item in value:
            _check_strings(source, row, field, item, row_id, where)


def _check_content(source: str, row: int, field: str, content: Any, row_id: str, where: str) -> Any:
    """A string, or a list of text parts; image, audio and other parts are refused."""
    if isinstance(content, str):
        return _check_text(source, row, field, content, row_id, f"{where}content: ")
    if not isinstance(content, list):
        raise BadRowError(source, row, field, "bad_message",
                          f"{where}content must be a string or a list of parts, got {type(content).__name__}", row_id)
    parts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            shown = f"a {kind!r} part" if isinstance(kind, str) else "not a part with a 'type'"
            why = "selpipe scores text only; drop image and audio parts or use a text-only dataset" \
                if kind in NON_TEXT_PARTS else "only {'type': 'text', 'text': ...} parts are accepted"
            raise BadRowError(source, row, field, "unsupported_content", f"{where}content part {index} is {shown}: {why}", row_id)
        if not isinstance(part.get("text"), str):
            raise BadRowError(source, row, field, "bad_message", f"{where}content part {index} needs a string 'text'", row_id)
        _check_text(source, row, field, part["text"], row_id, f"{where}content part {index}: ")
        parts.append({key: value for key, value in part.items() if value is not None})
    return parts


def _check_messages(source: str, row: int, field: str, value: list, row_id: str) -> list[Message]:
    messages = []
    for index, message in enumerate(value):
        where = f"message {index} "
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRowError(source, row, field, "bad_message", f"{where}must be an object with a string 'role' and a 'content'", row_id)
        # Arrow gives every message every key of the column's struct, absent ones as null: a null is an absent key.
        kept = {key: item for key, item in message.items() if item is not None}
        _check_text(source, row, field, kept["role"], row_id, f"{where}role: ")
        if "content" in kept:
            kept["content"] = _check_content(source, row, field, kept["content"], row_id, where)
        elif not (kept["role"] == "assistant" and kept.get("tool_calls")):
            raise BadRowError(source, row, field, "bad_message", f"{where}must be an object with a string 'role' and a 'content'", row_id)
        if "tool_calls" in kept and not isinstance(kept["tool_calls"], list):
            raise BadRowError(source, row, field, "bad_message", f"{where}tool_calls must be a list", row_id)
        _check_strings(source, row, field, {k: v for k, v in kept.items() if k not in ("role", "content")}, row_id, where)
        messages.append(kept)
    return messages


def _text(content: Any) -> str:
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def derive_id(position: int, value: dict[str, Any], scope: str = "") -> str:
    content = [value.get(name) for name in FIELDS] + ([value["tools"]] if value.get("tools") is not None else [])
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)
    prefix = f"{scope}\0" if scope else ""
    # surrogatepass: a row with a lone surrogate still gets an id to report its skip under.
    return hashlib.sha1(f"{prefix}{position}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()[:20]


def shared_prefix(chosen: str | list, rejected: str | list) -> int:
    """Where chosen and rejected first differ, as TRL's `extract_prompt` cuts them: a string prompt
    leaves its trailing space to the completions."""
    index = 0
    while index < min(len(chosen), len(rejected)) and chosen[index] == rejected[index]:
        index += 1
    if isinstance(chosen, str) and index < min(len(chosen), len(rejected)) and index > 0 and chosen[index - 1] == " ":
        index -= 1
    return index


def _tools(source: str, row: int, value: Any, row_id: str) -> list[Any] | None:
    tools = value.get("tools")
    if isinstance(tools, str):  # Parquet columns often hold them as JSON text
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise BadRowError(source, row, "tools", "bad_tools", f"not valid JSON ({err.msg})", row_id) from None
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise BadRowError(source, row, "tools", "bad_tools", "expected a list of tool schemas (JSON objects)", row_id)
    _check_strings(source, row, "tools", tools, row_id, "")
    return tools


# Deeper than any chat row or tool schema nests; deeper rows are refused before anything recurses into them.
MAX_NESTING = 64


def _nesting_depth(value: Any, limit: int) -> int:
    """How deep lists and objects nest in `value`, counted without recursion and up to `limit + 1`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_row(record: Record) -> RawRow:
    """Validate one record into a RawRow, or raise BadRowError naming the field."""
    if record.error is not None:
        raise record.error
    source, value, row = record.source, record.value, record.position + 1
    assert value is not None
    if _nesting_depth(value, MAX_NESTING) > MAX_NESTING:  # before anything recurses into it (ids, checks, templates)
        given = value.get("id")
        raise BadRowError(source, row, None, "too_deep", f"lists and objects nest more than {MAX_NESTING} levels deep; "
                          f"no preference row does", str(given) if isinstance(given, (str, int)) else None)
    row_id = _row_id(record)
    fields = _read_fields(source, row, value, row_id)
    tools = _tools(source, row, value, row_id)
    chosen, rejected = fields["chosen"], fields["rejected"]
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise BadRowError(source, row, "rejected", "mixed_format", "chosen and rejected must both be strings or both be message lists", row_id)
    _cut_implicit_prompt(source, row, fields, row_id)
    if isinstance(chosen, list):
        _check_conversational(source, row, fields, row_id)
    else:
        _check_standard(source, row, fields, tools, row_id)
    return RawRow(id=row_id, position=record.position, tools=tools, **fields)


def _row_id(record: Record) -> str:
    """The row's `id` (a string or an integer), else one derived from its content and position."""
    source, value, row = record.source, record.value, record.position + 1
    raw_id = value.get("id")
    # bool is a subclass of int, but `true` is no id.
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
        raise BadRowError(source, row, "id", "bad_id", f"expected a string or integer, got {type(raw_id).__name__}")
    if isinstance(raw_id, str):
        _check_text(source, row, "id", raw_id, None)
    return str(raw_id) if raw_id is not None else derive_id(record.position, value, record.scope)


def _read_fields(source: str, row: int, value: dict[str, Any], row_id: str) -> dict[str, Any]:
    """prompt (if present), chosen and rejected, each a checked string or message list."""
    fields: dict[str, Any] = {}
    for name in FIELDS:
        item = value.get(name)
        if item is None:
            if name == "prompt":
                continue  # implicit: the shared prefix of chosen and rejected (`_cut_implicit_prompt`)
            raise BadRowError(source, row, name, "missing_field", "missing", row_id)
        if isinstance(item, str):
            fields[name] = _check_text(source, row, name, item, row_id)
        elif isinstance(item, list):
            fields[name] = _check_messages(source, row, name, item, row_id)
        else:
            raise BadRowError(source, row, name, "wrong_type", f"expected a string or a list of messages, got {type(item).__name__}", row_id)
    return fields


def _cut_implicit_prompt(source: str, row: int, fields: dict[str, Any], row_id: str) -> None:
    """TRL's maybe_extract_prompt: with no prompt, or a string prompt beside completions that both carry
    the conversation themselves (they open with a non-assistant turn), the shared prefix is the prompt."""
    chosen, rejected = fields["chosen"], fields["rejected"]
    carried = isinstance(chosen, list) and isinstance(fields.get("prompt"), str) and all(
        side and side[0]["role"] != "assistant" for side in (chosen, rejected))
    if "prompt" in fields and not carried:
        return
    cut = shared_prefix(chosen, rejected)
    fields["prompt"], fields["chosen"], fields["rejected"] = chosen[:cut], chosen[cut:], rejected[cut:]
    if not fields["prompt"]:
        why = "no prompt given" if not carried else "chosen and rejected carry the conversation (as TRL reads them)"
        raise BadRowError(source, row, "prompt", "empty_prompt",
                          f"{why}, and they share no prefix to take the prompt from", row_id)


def _check_conversational(source: str, row: int, fields: dict[str, Any], row_id: str) -> None:
    if isinstance(fields["prompt"], str):
        fields["prompt"] = [{"role": "user", "content": fields["prompt"]}]
    elif not fields["prompt"]:
        raise BadRowError(source, row, "prompt", "empty_prompt", "empty message list", row_id)
    for name in ("chosen", "rejected"):
        messages = fields[name]
        if not messages:
            raise BadRowError(source, row, name, "empty_completion", "empty message list", row_id)
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                raise BadRowError(source, row, name, "not_assistant_turn",
                                  f"message {index} has role {message['role']!r}: a completion holds only assistant "
                                  f"messages (earlier turns belong in the prompt)", row_id)
        if not any(_text(m.get("content", "")) or m.get("tool_calls") for m in messages):
            raise BadRowError(source, row, name, "empty_completion", "assistant message is empty", row_id)


def _check_standard(source: str, row: int, fields: dict[str, Any], tools: list[Any] | None, row_id: str) -> None:
    if isinstance(fields["prompt"], list):
        raise BadRowError(source, row, "prompt", "mixed_format", "a message-list prompt needs message-list completions", row_id)
    if tools is not None:
        raise BadRowError(source, row, "tools", "bad_tools", "tools are passed to the chat template, so they need message-list rows", row_id)
    for name in ("chosen", "rejected"):
        if not fields[name]:
            raise BadRowError(source, row, name, "empty_completion", "empty string", row_id)
