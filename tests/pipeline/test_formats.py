import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from selpipe.pipeline.formats import BadRowError, InputError, parse_row, read_records

from ..conftest import write_jsonl

ROWS = [
    {"id": "a", "prompt": "What is 1 plus 2?", "chosen": "3.", "rejected": "4."},
    {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "assistant", "content": "Go away."}]},
]


def parsed(path, **kwargs):
    return [parse_row(str(path), record) for record in read_records(path, **kwargs)]


def test_four_file_kinds_give_the_same_rows(tmp_path):
    import datasets

    jsonl = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    (tmp_path / "rows.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl.read_bytes()))
    standard = [r for r in ROWS if isinstance(r["chosen"], str)]
    pq.write_table(pa.Table.from_pylist(standard), tmp_path / "rows.parquet")
    datasets.Dataset.from_list(standard).save_to_disk(str(tmp_path / "saved"))

    from_jsonl = parsed(jsonl)
    assert parsed(tmp_path / "rows.jsonl.zst") == from_jsonl
    assert parsed(tmp_path / "rows.parquet") == from_jsonl[:1]
    assert parsed(tmp_path / "saved") == from_jsonl[:1]
    assert from_jsonl[0].id == "a" and not from_jsonl[0].conversational
    assert from_jsonl[1].conversational and from_jsonl[1].prompt == [{"role": "user", "content": "Hi"}]


def test_derived_ids_are_stable_and_distinct(tmp_path):
    row = {k: v for k, v in ROWS[0].items() if k != "id"}
    path = write_jsonl(tmp_path / "rows.jsonl", [row, row])
    first, second = parsed(path), parsed(path)
    assert [r.id for r in first] == [r.id for r in second]
    assert first[0].id != first[1].id  # same content, different position


def test_dataset_dict_needs_a_known_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([ROWS[0]])}).save_to_disk(str(tmp_path / "dd"))
    assert len(parsed(tmp_path / "dd")) == 1
    with pytest.raises(InputError, match="no split 'test'; it has train"):
        parsed(tmp_path / "dd", split="test")


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": "p", "chosen": "c"}, "rejected", "missing"),
    ({"prompt": "p", "chosen": 5, "rejected": "r"}, "chosen", "expected a string or a list of messages, got int"),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "chosen", "empty string"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]},
     "chosen", "has no assistant message"),
    ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "y"}]},
     "chosen", "string 'role' and 'content'"),
    ({"prompt": "p", "chosen": "c", "rejected": [{"role": "assistant", "content": "y"}]}, "rejected", "both be strings"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, row, field, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    records = list(read_records(path))
    parse_row(str(path), records[0])
    with pytest.raises(BadRowError) as info:
        parse_row(str(path), records[1])
    text = str(info.value)
    assert f"{path}: row 2" in text and f"field '{field}'" in text and message in text


def test_invalid_utf8_and_json_name_the_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n' + b"{not json\n")
    records = list(read_records(path))
    with pytest.raises(BadRowError, match=r"row 2: invalid UTF-8"):
        parse_row(str(path), records[1])
    with pytest.raises(BadRowError, match=r"row 3: not valid JSON"):
        parse_row(str(path), records[2])


def test_files_that_are_missing_or_not_what_their_suffix_says(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list(read_records(tmp_path / "nope.jsonl"))
    (tmp_path / "fake.parquet").write_text('{"prompt": "p"}\n')
    with pytest.raises(InputError, match="not Parquet"):
        list(read_records(tmp_path / "fake.parquet"))
    (tmp_path / "fake.jsonl.zst").write_text('{"prompt": "p"}\n')
    with pytest.raises(InputError, match="not zstd-compressed"):
        list(read_records(tmp_path / "fake.jsonl.zst"))
    pq.write_table(pa.Table.from_pylist([ROWS[0]]), tmp_path / "real.parquet")
    (tmp_path / "real.parquet").rename(tmp_path / "binary.jsonl")
    with pytest.raises(InputError, match="suffix says JSONL but the file is binary"):
        list(read_records(tmp_path / "binary.jsonl"))
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unknown input kind"):
        list(read_records(tmp_path / "rows.csv"))


def test_truncated_zstd_raises_and_every_frame_is_read(tmp_path, demo_rows):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", demo_rows)
    compressed = zstandard.ZstdCompressor().compress(jsonl.read_bytes())
    (tmp_path / "cut.jsonl.zst").write_bytes(compressed[:len(compressed) * 95 // 100])
    with pytest.raises(InputError, match=r"cut\.jsonl\.zst: truncated zstd stream"):
        list(read_records(tmp_path / "cut.jsonl.zst"))
    lines = jsonl.read_bytes().splitlines(keepends=True)
    half = len(lines) // 2
    frames = [zstandard.ZstdCompressor().compress(b"".join(part)) for part in (lines[:half], lines[half:])]
    (tmp_path / "two.jsonl.zst").write_bytes(b"".join(frames))
    assert parsed(tmp_path / "two.jsonl.zst") == parsed(jsonl) and len(parsed(jsonl)) == len(demo_rows)


@pytest.mark.parametrize("row, field", [
    ({"id": "a\ud800", "prompt": "p", "chosen": "c", "rejected": "r"}, "id"),
    ({"prompt": "p\ud800", "chosen": "c", "rejected": "r"}, "prompt"),
    ({"prompt": "p", "chosen": "\udfff", "rejected": "r"}, "chosen"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "ok"}],
      "rejected": [{"role": "assistant", "content": "x\ud800"}]}, "rejected"),
])
def test_lone_surrogates_are_invalid_utf8(tmp_path, row, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])  # json.dumps writes them as \ud800-style escapes
    with pytest.raises(BadRowError, match="invalid UTF-8: lone surrogate") as info:
        parse_row(str(path), next(read_records(path)))
    assert info.value.reason == "invalid_utf8" and f"{path}: row 1" in str(info.value) and f"field '{field}'" in str(info.value)


@pytest.mark.parametrize("row, field, reason, message", [
    ({"id": True, "prompt": "p", "chosen": "c", "rejected": "r"}, "id", "bad_id", "expected a string or integer, got bool"),
    ({"prompt": [], "chosen": [{"role": "assistant", "content": "y"}], "rejected": [{"role": "assistant", "content": "n"}]},
     "prompt", "empty_prompt", "empty message list"),
])
def test_bool_id_and_empty_prompt_list_are_bad_rows(tmp_path, row, field, reason, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(BadRowError) as info:
        parse_row(str(path), next(read_records(path)))
    assert info.value.reason == reason and f"field '{field}': {message}" in str(info.value)
