import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from selpipe.pipeline.errors import ConfigError
from selpipe.pipeline.formats import BadRowError, InputError, parse_row, read_records, resolve_input

from ..conftest import write_jsonl

ROWS = [
    {"id": "a", "prompt": "What is 1 plus 2?", "chosen": "3.", "rejected": "4."},
    {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "assistant", "content": "Go away."}]},
]


def parsed(path, **kwargs):
    return [parse_row(record) for record in read_records(path, **kwargs)]


def rows_of(spec, config=None, split="train"):
    return [parse_row(record) for record in read_records(resolve_input(str(spec), config, split))]


def first_error(rows, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BadRowError) as info:
        for record in read_records(path):
            parse_row(record)
    return info.value


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
     "chosen", "message 0 has role 'user': a completion holds only assistant messages"),
    ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "y"}]},
     "chosen", "a string 'role' and a 'content'"),
    ({"prompt": "p", "chosen": "c", "rejected": [{"role": "assistant", "content": "y"}]}, "rejected", "both be strings"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, row, field, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    records = list(read_records(path))
    parse_row(records[0])
    with pytest.raises(BadRowError) as info:
        parse_row(records[1])
    text = str(info.value)
    assert f"{path}: row 2" in text and f"field '{field}'" in text and message in text


def test_invalid_utf8_and_json_name_the_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n' + b"{not json\n")
    records = list(read_records(path))
    with pytest.raises(BadRowError, match=r"row 2: invalid UTF-8"):
        parse_row(records[1])
    with pytest.raises(BadRowError, match=r"row 3: not valid JSON"):
        parse_row(records[2])


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
    with pytest.raises(InputError, match="suffix says JSON but the file is binary"):
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
        parse_row(next(read_records(path)))
    assert info.value.reason == "invalid_utf8" and f"{path}: row 1" in str(info.value) and f"field '{field}'" in str(info.value)


@pytest.mark.parametrize("row, field, reason, message", [
    ({"id": True, "prompt": "p", "chosen": "c", "rejected": "r"}, "id", "bad_id", "expected a string or integer, got bool"),
    ({"prompt": [], "chosen": [{"role": "assistant", "content": "y"}], "rejected": [{"role": "assistant", "content": "n"}]},
     "prompt", "empty_prompt", "empty message list"),
])
def test_bool_id_and_empty_prompt_list_are_bad_rows(tmp_path, row, field, reason, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(BadRowError) as info:
        parse_row(next(read_records(path)))
    assert info.value.reason == reason and f"field '{field}': {message}" in str(info.value)


# ---------------------------------------------------------------------------- the shapes TRL users have

STANDARD = [{"prompt": f"What is {i} plus 1?", "chosen": f"{i + 1}.", "rejected": f"{i + 2}."} for i in range(5)]


def test_bom_and_blank_lines_are_not_errors(tmp_path):
    """Rows 1 and 3 of the file (line numbers count the blank line) hold the two pairs."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(STANDARD[0]).encode() + b"\n\n  \t\n" + json.dumps(STANDARD[1]).encode() + b"\n\n")
    rows = parsed(path)
    assert [r.prompt for r in rows] == [STANDARD[0]["prompt"], STANDARD[1]["prompt"]] and [r.position for r in rows] == [0, 3]
    (tmp_path / "bom.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(path.read_bytes()))
    assert parsed(tmp_path / "bom.jsonl.zst") == rows


def test_a_json_array_file_and_an_arrow_file(tmp_path):
    array = tmp_path / "rows.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(STANDARD, indent=2).encode())
    lines = write_jsonl(tmp_path / "lines.json", STANDARD)  # .json holding JSON Lines, as pandas writes it
    assert [r.prompt for r in parsed(array)] == [r["prompt"] for r in STANDARD] and parsed(lines) == parsed(array)
    table = pa.Table.from_pylist(STANDARD)
    with pa.OSFile(str(tmp_path / "rows.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    assert parsed(tmp_path / "rows.arrow") == parsed(array)
    (tmp_path / "bad.json").write_text(json.dumps([STANDARD[0], 7]))
    with pytest.raises(BadRowError, match=r"bad\.json: row 2: array element is a int, expected a JSON object"):
        parsed(tmp_path / "bad.json")
    (tmp_path / "object.json").write_text(json.dumps({"data": STANDARD}, indent=2))
    with pytest.raises(InputError, match=r"object\.json: holds one JSON object \(keys: data\), not rows"):
        parsed(tmp_path / "object.json")


def hub_folder(root, rows):
    """A dataset folder as `huggingface-cli download --local-dir` leaves it: README configs, data/*.parquet."""
    (root / "data").mkdir(parents=True)
    (root / "tools").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:3]), root / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), root / "data" / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), root / "data" / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1:3]), root / "tools" / "train.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "  - split: test\n    path: data/test-*\n- config_name: tool_use\n  data_files:\n  - split: train\n"
        "    path: tools/*.parquet\n---\n# prefs\n")
    return root


def test_a_dataset_folder_by_its_readme_configs_and_splits(tmp_path):
    folder = hub_folder(tmp_path / "prefs", STANDARD)
    source = resolve_input(str(folder))
    assert source.kind == "dataset folder" and [f.label for f in source.files] == [
        "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert [r.prompt for r in rows_of(folder)] == [r["prompt"] for r in STANDARD]
    assert [r.prompt for r in rows_of(folder, split="test")] == [STANDARD[0]["prompt"]]
    assert [r.prompt for r in rows_of(folder, config="tool_use")] == [r["prompt"] for r in STANDARD[1:3]]
    with pytest.raises(InputError, match=r"no split 'validation'; it has train, test \(use --split\)"):
        resolve_input(str(folder), split="validation")
    with pytest.raises(InputError, match=r"BuilderConfig 'nope' not found. Available: \['default', 'tool_use'\]"):
        resolve_input(str(folder), config="nope")
    bad = rows_of(folder)[3]  # row 1 of the second file: its errors name that file
    assert bad.position == 0
    with pytest.raises(ConfigError, match="--input-config 'x' names a subset"):
        resolve_input(str(folder / "data" / "train-00000-of-00002.parquet"), config="x")


def test_several_files_and_globs_keep_ids_apart(tmp_path):
    """Two files with the same rows: derived ids differ by file, so no row is taken for a duplicate."""
    for name in ("a.jsonl", "b.jsonl"):
        write_jsonl(tmp_path / name, STANDARD[:2])
    listed = rows_of(f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}")
    globbed = rows_of(tmp_path / "*.jsonl")
    assert listed == globbed and len({r.id for r in listed}) == 4
    single = parsed(tmp_path / "a.jsonl")
    assert [r.id for r in single] != [r.id for r in listed[:2]]  # one file alone keeps its old ids
    with pytest.raises(InputError, match=r"nope\*\.jsonl: the pattern matches no files"):
        resolve_input(str(tmp_path / "nope*.jsonl"))
    with pytest.raises(InputError, match="listed twice"):
        resolve_input(f"{tmp_path / 'a.jsonl'},{tmp_path / 'a.jsonl'}")


def test_a_hub_name_from_the_hub_cache_or_the_datasets_cache(tmp_path, monkeypatch):
    """Offline: files a `huggingface-cli download` left in the hub cache, or what `datasets` prepared."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    repo = tmp_path / "hub" / "datasets--org--prefs"
    hub_folder(repo / "snapshots" / "abc123", STANDARD)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    source = resolve_input("org/prefs", "tool_use")
    assert source.kind == "hub dataset (downloaded files)" and source.files[0].source == "org/prefs:tools/train.parquet"
    assert [r.prompt for r in rows_of("org/prefs")] == [r["prompt"] for r in STANDARD]

    prepared = datasets.Dataset.from_list(STANDARD[:2])
    cached = tmp_path / "datasets" / "org___prepared" / "default" / "0.0.0" / "0123abcd"
    prepared.save_to_disk(str(tmp_path / "saved"))
    cached.mkdir(parents=True)
    (tmp_path / "saved" / "data-00000-of-00001.arrow").rename(cached / "prepared-train.arrow")
    info = json.loads((tmp_path / "saved" / "dataset_info.json").read_text())
    info.update(config_name="default", dataset_name="prepared",
                splits={"train": {"name": "train", "num_examples": 2, "num_bytes": 0, "dataset_name": "prepared"}})
    (cached / "dataset_info.json").write_text(json.dumps(info))
    assert resolve_input("org/prepared").kind == "hub dataset (datasets cache)"
    assert [r.prompt for r in rows_of("org/prepared")] == [r["prompt"] for r in STANDARD[:2]]
    with pytest.raises(InputError, match=r"org/absent: no such file or directory, and not a dataset the local Hugging Face "
                                         r"cache can give \(it is not in the local cache\)"):
        resolve_input("org/absent")
    with pytest.raises(InputError, match=r"data/absent\.jsonl: input does not exist"):
        resolve_input("data/absent.jsonl")


def test_saved_dataset_dict_reads_the_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(STANDARD[:3]),
                          "test": datasets.Dataset.from_list(STANDARD[3:])}).save_to_disk(str(tmp_path / "dd"))
    assert [r.prompt for r in rows_of(tmp_path / "dd", split="test")] == [r["prompt"] for r in STANDARD[3:]]


CHAT = [{"role": "user", "content": "What color is the sky?"}]


@pytest.mark.parametrize("row", [
    {"chosen": "Human: Sky color?\n\nAssistant: It is blue.", "rejected": "Human: Sky color?\n\nAssistant: It is green."},
    {"chosen": "Q: 2+2? A: four", "rejected": "Q: 2+2? A: five"},  # TRL cuts inside the word: "Q: 2+2? A: f"
    {"chosen": CHAT + [{"role": "assistant", "content": "It is blue."}],
     "rejected": CHAT + [{"role": "assistant", "content": "It is green."}]},
    # HuggingFaceH4/ultrafeedback_binarized: a string prompt beside completions that carry the conversation.
    {"prompt": "What color is the sky?", "chosen": CHAT + [{"role": "assistant", "content": "It is blue."}],
     "rejected": CHAT + [{"role": "assistant", "content": "It is green."}]},
])
def test_implicit_prompts_are_cut_as_trl_cuts_them(tmp_path, row):
    from trl.data_utils import maybe_extract_prompt

    expected = maybe_extract_prompt(dict(row))
    got = parsed(write_jsonl(tmp_path / "rows.jsonl", [row]))[0]
    assert (got.prompt, got.chosen, got.rejected) == (expected["prompt"], expected["chosen"], expected["rejected"])


def test_implicit_prompt_golden_cut():
    """TRL leaves the space before the differing word to the completions: '...It is' | ' blue.'"""
    from selpipe.pipeline.formats import shared_prefix

    chosen, rejected = "Human: Hi\n\nAssistant: It is blue.", "Human: Hi\n\nAssistant: It is green."
    assert chosen[:shared_prefix(chosen, rejected)] == "Human: Hi\n\nAssistant: It is"
    assert shared_prefix("A: yes", "A: no") == 2 and shared_prefix([1, 2, 3], [1, 2, 4]) == 2


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}


def test_tools_tool_calls_and_text_parts_are_kept(tmp_path):
    row = {"prompt": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                      {"role": "user", "content": "Weather in Paris?"}],
           "chosen": [CALL], "rejected": [{"role": "assistant", "content": "No idea."}], "tools": json.dumps(TOOLS)}
    got = parsed(write_jsonl(tmp_path / "rows.jsonl", [row]))[0]
    assert got.tools == TOOLS and got.chosen == [CALL] and got.prompt[0]["content"] == [{"type": "text", "text": "Be brief."}]
    # Parquet stores every key of a message struct, absent ones as null: a null is an absent key.
    pq.write_table(pa.Table.from_pylist([dict(row, prompt=CHAT, tools=None)]), tmp_path / "rows.parquet")
    from_parquet = parsed(tmp_path / "rows.parquet")[0]
    assert from_parquet.chosen[0].keys() == {"role", "tool_calls"} and from_parquet.rejected == row["rejected"]
    assert from_parquet.tools is None


@pytest.mark.parametrize("row, field, reason, message", [
    ({"prompt": CHAT, "chosen": [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Sure?"}],
      "rejected": [{"role": "assistant", "content": "Green."}]},
     "chosen", "not_assistant_turn", "message 1 has role 'user': a completion holds only assistant messages "
                                     "(earlier turns belong in the prompt)"),
    ({"prompt": CHAT, "chosen": [{"role": "tool", "content": "22C"}], "rejected": [{"role": "assistant", "content": "x"}]},
     "chosen", "not_assistant_turn", "message 0 has role 'tool'"),
    ({"prompt": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]}],
      "chosen": [{"role": "assistant", "content": "A cat."}], "rejected": [{"role": "assistant", "content": "A dog."}]},
     "prompt", "unsupported_content", "message 0 content part 1 is a 'image' part: selpipe scores text only; drop image "
                                      "and audio parts or use a text-only dataset"),
    ({"prompt": CHAT, "chosen": [{"role": "assistant", "content": [{"type": "input_audio", "input_audio": {}}]}],
      "rejected": [{"role": "assistant", "content": "x"}]}, "chosen", "unsupported_content", "message 0 content part 0 is a 'input_audio' part"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "tools": TOOLS}, "tools", "bad_tools",
     "tools are passed to the chat template, so they need message-list rows"),
    ({"prompt": CHAT, "chosen": [CALL], "rejected": [CALL], "tools": "{not json"}, "tools", "bad_tools", "not valid JSON"),
    ({"chosen": "Same.", "rejected": "Other."}, "prompt", "empty_prompt",
     "no prompt given, and they share no prefix to take the prompt from"),
    ({"prompt": CHAT, "chosen": [{"role": "assistant", "content": ""}], "rejected": [{"role": "assistant", "content": "x"}]},
     "chosen", "empty_completion", "assistant message is empty"),
])
def test_bad_chat_rows_say_what_is_wrong(tmp_path, row, field, reason, message):
    error = first_error([row], tmp_path)
    assert error.reason == reason and f"bad.jsonl: row 1" in str(error) and f"field '{field}': {message}" in str(error)


@pytest.mark.parametrize("pattern, path, matches", [
    ("data/*.jsonl", "data/cache/part-00000-000000.parquet", False),
    ("data/*.jsonl", "data/a.jsonl", True),
    ("data/**/*.json", "data/cache/header.json", True),   # ** spans the cache's directory
    ("data/*/*.parquet", "data/cache/part-00000-000000.parquet", True),
    ("data/*", "data/.hidden", False),                   # glob skips dot-files unless asked
])
def test_glob_matching_is_globs_own(pattern, path, matches):
    from selpipe.pipeline.formats import _glob_matches

    assert _glob_matches(tuple(pattern.split("/")), tuple(path.split("/"))) is matches


def _outcomes(records):
    """(id or None, skip reason or None) per record, as a stage sees them."""
    outcomes = []
    for record in records:
        try:
            outcomes.append((parse_row(record).id, None))
        except BadRowError as err:
            outcomes.append((err.row_id, err.reason))
    return outcomes


@pytest.mark.parametrize("depth", [65, 5_000, 100_000])
def test_a_row_nested_deeper_than_any_row_is_a_bad_row_not_a_recursion_error(tmp_path, depth):
    """Nesting 65 parses as JSON (and would recurse in the checks), 100,000 defeats the JSON decoder
    itself; either way row 2 is a bad row `too_deep` between two good rows, in order."""
    deep = '{"id": "deep", "prompt": "p", "chosen": "c", "rejected": "r", "tools": ' + "[" * depth + "]" * depth + "}"
    good = json.dumps(ROWS[0])
    path = tmp_path / "deep.jsonl"
    path.write_text(f"{good}\n{deep}\n{json.dumps(dict(ROWS[0], id='b'))}\n")
    outcomes = _outcomes(read_records(path))
    assert [reason for _, reason in outcomes] == [None, "too_deep", None]
    assert outcomes[0][0] == "a" and outcomes[2][0] == "b"
    with pytest.raises(BadRowError, match=r"deep.jsonl: row 2.*nest more than 64 levels deep"):
        parse_row(list(read_records(path))[1])


def test_a_row_over_max_row_bytes_is_skipped_unread_in_plain_and_zstd_files(tmp_path):
    """Rows of 76 and 3,000,076 bytes (newline not counted), one of exactly 1,000,000 and a last one
    with no newline, with a bound of 1,000,000: the second is a bad row `row_too_large` stating its
    size; the others keep their row numbers (one at exactly the bound passes). The zstd reader sees
    the same, across 64 KiB blocks."""
    small = json.dumps(ROWS[0])
    big = json.dumps(dict(ROWS[0], id="big", chosen="x" * 3_000_000))
    padding = 1_000_000 - len(json.dumps(dict(ROWS[0], id="exact", chosen="")))
    exact = json.dumps(dict(ROWS[0], id="exact", chosen="y" * padding))
    assert len(exact.encode()) == 1_000_000
    text = f"{small}\n{big}\n{exact}\n{json.dumps(dict(ROWS[0], id='last'))}"  # the last line has no newline
    (tmp_path / "rows.jsonl").write_text(text)
    (tmp_path / "rows.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    for name in ("rows.jsonl", "rows.jsonl.zst"):
        records = list(read_records(tmp_path / name, max_row_bytes=1_000_000))
        assert _outcomes(records) == [("a", None), (None, "row_too_large"), ("exact", None), ("last", None)], name
        assert str(records[1].error) == (f"{tmp_path / name}: row 2: the row is {len(big):,} bytes, over --max-row-bytes "
                                         f"1,000,000; it was not parsed (raise --max-row-bytes to score it)")
        assert [r.position for r in records] == [0, 1, 2, 3]
        assert _outcomes(read_records(tmp_path / name))[1] == ("big", None)  # no bound: read whole
