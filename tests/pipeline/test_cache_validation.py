"""Every cache a training run reads is checked end to end before step 1.

Each poisoned cache below has its checksums resealed (manifest and shard record rewritten to the
damaged file's size and sha256), so only the values, or the layout, are wrong.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selpipe.pipeline.cache import (
    PARQUET_OPTIONS, RECORD_TOTALS, check_values, completed_shard, file_sha256, load_manifest, open_cache,
    open_training_caches, rank_rows, read_record, read_rows, read_rows_at,
)
from selpipe.pipeline.stream import eval_shards
from selpipe.pipeline.errors import CacheError
from selpipe.pipeline.tokenization import load_tokenizer, tokenizer_fingerprint

VOCAB = 512  # the tiny models' vocabulary (data/demo.py)


def reseal(cache: Path) -> None:
    """Make the manifest and shard records agree with whatever the shard files now hold."""
    manifest = json.loads((cache / "manifest.json").read_text())
    for shard in manifest["shards"]:
        path = cache / shard["file"]
        if path.exists():
            shard["bytes"], shard["sha256"] = path.stat().st_size, file_sha256(path)
            (cache / shard["file"]).with_suffix(".json").write_text(json.dumps(shard))
    manifest["totals"]["bytes"] = sum(s["bytes"] for s in manifest["shards"])
    (cache / "manifest.json").write_text(json.dumps(manifest))


def poison(cache: Path, column: str, value) -> Path:
    """Set the first element of `column` in row 2 of the first shard to `value`."""
    shard = cache / load_manifest(cache)["shards"][0]["file"]
    table = pq.read_table(shard)
    values = table.column(column).to_pylist()
    values[2] = [value, *values[2][1:]]
    table = table.set_column(table.schema.get_field_index(column), table.schema.field(column),
                             pa.array(values, type=table.schema.field(column).type))
    pq.write_table(table, shard, row_group_size=4, **PARQUET_OPTIONS)
    reseal(cache)
    return cache


@pytest.fixture
def cache(demo_cache, tmp_path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(demo_cache, copy)
    return copy


@pytest.fixture
def tokenizer(models):
    """The tokenizer saved with the reference the demo cache was scored by."""
    return load_tokenizer(str(models["reference"]))


def check(cache: Path, tokenizer, anchor: Path | None = None):
    return open_training_caches(str(cache), str(anchor) if anchor else None, None, tokenizer_fingerprint(tokenizer), VOCAB)


def test_an_intact_cache_passes(cache, tokenizer):
    assert check(cache, tokenizer).train["totals"]["rows"] == 96


@pytest.mark.parametrize("column, value, message", [
    ("chosen_ref_logps", float("nan"), "chosen_ref_logps holds NaN or infinite values"),
    ("rejected_ref_logps", float("inf"), "rejected_ref_logps holds NaN or infinite values"),
    ("chosen_ref_logps", 0.5, "chosen_ref_logps holds 0.5, above 0: not a log-probability"),
    ("chosen_ids", VOCAB, f"chosen_ids holds token id {VOCAB}, outside the policy's vocabulary of {VOCAB}"),
    ("prompt_ids", -1, f"prompt_ids holds token id -1, outside the policy's vocabulary of {VOCAB}"),
])
def test_poisoned_values_are_refused_naming_the_shard_and_row_group(cache, tokenizer, column, value, message):
    poison(cache, column, value)
    with pytest.raises(CacheError, match=r"part-00000-000000\.parquet row group 0: " + message.replace("(", r"\(")):
        check(cache, tokenizer)


def test_fp32_rounding_just_above_zero_is_accepted(cache, tokenizer):
    """log-softmax may round a near-certain token a few ulps above 0 (slack 1e-4, see cache.py)."""
    poison(cache, "chosen_ref_logps", 3e-6)
    check(cache, tokenizer)


def test_log_probs_of_another_length_than_the_ids_are_refused(cache, tokenizer):
    shard = cache / load_manifest(cache)["shards"][0]["file"]
    table = pq.read_table(shard)
    logps = table.column("chosen_ref_logps").to_pylist()
    logps[1] = logps[1] + [-1.0]
    table = table.set_column(table.schema.get_field_index("chosen_ref_logps"), table.schema.field("chosen_ref_logps"),
                             pa.array(logps, type=table.schema.field("chosen_ref_logps").type))
    pq.write_table(table, shard, row_group_size=4, **PARQUET_OPTIONS)
    reseal(cache)
    with pytest.raises(CacheError, match="chosen_ref_logps and chosen_ids differ in length"):
        check(cache, tokenizer)


def test_an_unlisted_shard_is_refused(cache, tokenizer):
    shutil.copy(cache / "part-00000-000000.parquet", cache / "part-00000-000099.parquet")
    with pytest.raises(CacheError, match=r"part-00000-000099\.parquet are not in the manifest"):
        check(cache, tokenizer)


def test_a_foreign_shard_in_place_of_a_listed_one_is_refused(cache, demo_cache, tokenizer, tmp_path):
    """A shard of the same name from another cache: resealed, so only its row count gives it away."""
    manifest = load_manifest(cache)
    first, second = manifest["shards"][0]["file"], manifest["shards"][1]["file"]
    table = pq.read_table(cache / second).slice(0, 12)
    pq.write_table(table, cache / first, row_group_size=4, **PARQUET_OPTIONS)
    reseal(cache)
    with pytest.raises(CacheError, match=r"part-00000-000000\.parquet: holds 12 rows, the manifest says 16"):
        check(cache, tokenizer)


@pytest.mark.parametrize("name", ["../outside.parquet", "/etc/passwd", "sub/part-00000-000000.parquet"])
def test_a_manifest_entry_outside_the_cache_is_refused(cache, tokenizer, name):
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][0]["file"] = name
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"shard entry 0 names .*, not a shard file of this cache"):
        check(cache, tokenizer)


def test_totals_that_disagree_with_the_shards_are_refused(cache, tokenizer):
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["totals"]["rows"] += 1
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="totals.rows is 97 but the shards add up to 96"):
        check(cache, tokenizer)


def test_a_truncated_manifest_is_one_line(cache, tokenizer):
    text = (cache / "manifest.json").read_text()
    (cache / "manifest.json").write_text(text[:len(text) // 2])
    with pytest.raises(CacheError, match=r"manifest.json: damaged manifest, not valid JSON"):
        check(cache, tokenizer)


def test_an_anchor_with_other_rows_is_refused_once_before_training(cache, demo_cache, tokenizer, tmp_path):
    anchor = tmp_path / "anchor"
    shutil.copytree(demo_cache, anchor)
    poison(anchor, "chosen_ids", 7)
    with pytest.raises(CacheError, match=r"row group 0 holds other chosen_ids than the scoring cache"):
        check(cache, tokenizer, anchor=anchor)


def test_a_shard_whose_every_row_was_skipped_passes(cache, tokenizer):
    """score-ref writes a shard of 0 rows when all of its rows were skipped (e.g. --truncation skip)."""
    manifest = json.loads((cache / "manifest.json").read_text())
    last = manifest["shards"][-1]
    empty = pq.read_table(cache / last["file"]).slice(0, 0)
    pq.write_table(empty, cache / last["file"], row_group_size=4, **PARQUET_OPTIONS)
    for key in ("rows", "prompt_tokens", "completion_tokens"):
        manifest["totals"][key] -= last[key]
        last[key] = 0
    (cache / "manifest.json").write_text(json.dumps(manifest))
    reseal(cache)
    assert check(cache, tokenizer).train["totals"]["rows"] == 80


# ------------------------------------------------------------------ issue 21: hostile manifests and shards


def _manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def _write_manifest(cache: Path, manifest: dict) -> None:
    (cache / "manifest.json").write_text(json.dumps(manifest))


def _one_line(call, pattern: str):
    with pytest.raises(CacheError) as caught:
        call()
    assert "\n" not in str(caught.value)
    assert re.search(pattern, str(caught.value)), str(caught.value)


def test_a_shard_listed_twice_is_refused_even_with_totals_edited_to_match(cache, tokenizer):
    manifest = _manifest(cache)
    manifest["shards"].append(dict(manifest["shards"][0]))
    for key in RECORD_TOTALS:
        manifest["totals"][key] += manifest["shards"][0][key]
    _write_manifest(cache, manifest)
    _one_line(lambda: open_cache(cache), r"lists shard part-00000-000000\.parquet more than once")
    _one_line(lambda: check(cache, tokenizer), r"more than once")


def test_ids_repeated_across_shards_are_refused(cache, tokenizer):
    """Shard 1 replaced by a copy of shard 0 (resealed): every id of shard 0 now appears twice."""
    shutil.copy(cache / "part-00000-000000.parquet", cache / "part-00000-000001.parquet")
    reseal(cache)
    first_id = pq.read_table(cache / "part-00000-000000.parquet").column("id")[0].as_py()
    _one_line(lambda: check(cache, tokenizer), r"id '.+' appears in more than one row \(in part-00000-000000\.parquet, "
                                               r"part-00000-000001\.parquet\)")
    assert first_id  # the shards hold ids, so the copy repeats them


@pytest.mark.parametrize("damage, pattern", [
    ("deleted", r"part-00000-000001\.parquet: shard listed in the manifest is missing"),
    ("symlink out", r"a symlink to .*, outside the cache"),
    ("symlink to text", r"part-00000-000001\.parquet: .*not a Parquet file"),
    ("directory", r"listed as a shard but not a regular file"),
    ("truncated", r"holds \d+ bytes, the manifest says \d+"),
])
def test_every_command_opens_a_damaged_shard_in_one_line(cache, tmp_path, damage, pattern):
    shard = cache / "part-00000-000001.parquet"
    outside = tmp_path / "outside.parquet"
    shutil.copy(shard, outside)
    shard.unlink()
    if damage == "symlink out":
        shard.symlink_to(outside)
    elif damage == "symlink to text":
        text = cache / "notes.txt"
        text.write_text("x" * outside.stat().st_size)  # the recorded size: only the content gives it away
        shard.symlink_to(text)
    elif damage == "directory":
        shard.mkdir()
    elif damage == "truncated":
        shard.write_bytes(outside.read_bytes()[:-7])
    _one_line(lambda: open_cache(cache), pattern)


def test_a_symlink_within_the_cache_is_accepted(cache, tokenizer):
    shard = cache / "part-00000-000001.parquet"
    (cache / "store").mkdir()
    shard.rename(cache / "store" / "kept.parquet")
    shard.symlink_to(cache / "store" / "kept.parquet")
    assert check(cache, tokenizer).train["totals"]["rows"] == 96


@pytest.mark.parametrize("damage, pattern", [
    ("lacks tokenization", r"manifest.json: damaged manifest, missing or malformed: tokenization"),
    ("shard lacks sha256", r"shard part-00000-000000\.parquet has missing or malformed sha256"),
    ("shard lacks rows", r"shard part-00000-000000\.parquet has missing or malformed rows"),
    ("shard is a string", r"shard entry 0 names None"),
    ("torn", r"damaged manifest, not valid JSON"),
])
def test_a_manifest_lacking_a_key_or_torn_is_one_line(cache, damage, pattern):
    manifest = _manifest(cache)
    if damage == "lacks tokenization":
        del manifest["tokenization"]
    elif damage == "shard lacks sha256":
        del manifest["shards"][0]["sha256"]
    elif damage == "shard lacks rows":
        del manifest["shards"][0]["rows"]
    elif damage == "shard is a string":
        manifest["shards"][0] = "part-00000-000000.parquet"
    _write_manifest(cache, manifest)
    if damage == "torn":
        (cache / "manifest.json").write_text(json.dumps(manifest)[:100])
    _one_line(lambda: open_cache(cache), pattern)


def test_a_torn_header_or_record_is_one_line(cache):
    (cache / "manifest.json").unlink()
    (cache / "header.json").write_text('{"settings": {"num_wor')
    _one_line(lambda: open_cache(cache), r"header.json: cache incomplete \(no manifest.json\) and its header is damaged")
    record = cache / "part-00000-000000.json"
    record.write_text(record.read_text()[:30])
    _one_line(lambda: read_record(record), r"part-00000-000000\.json: damaged shard record")
    assert completed_shard(cache, 0, 0) is None  # a torn record is no proof of a whole shard: redone


def test_one_pass_reads_each_shard_byte_once(cache):
    """check_values reads every shard whole once (sha256 and values from the same bytes): the
    bytes it reads equal the cache's shard bytes exactly, not twice that."""
    manifest = open_cache(cache)
    checked = check_values(cache, manifest, VOCAB)
    assert checked.bytes_read == manifest["totals"]["bytes"]
    assert len(checked.row_groups) == 24 and sum(rows for _, _, rows in checked.row_groups) == 96  # 6 shards x 4 groups of 4


def test_a_shard_altered_in_place_is_refused_by_the_one_pass(cache):
    shard = cache / "part-00000-000002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte, same size
    shard.write_bytes(bytes(data))
    manifest = open_cache(cache)  # size and magic still hold: only the content differs
    _one_line(lambda: check_values(cache, manifest, VOCAB), r"part-00000-000002\.parquet: checksum mismatch")


# ------------------------------------------------------------------ train, eval and anchor scored alike


def test_an_eval_cache_of_another_reference_is_refused_naming_the_difference(cache, demo_cache, tokenizer, tmp_path):
    evaluation = tmp_path / "eval"
    shutil.copytree(demo_cache, evaluation)
    manifest = _manifest(evaluation)
    manifest["reference"]["fingerprint"] = "0" * 64
    _write_manifest(evaluation, manifest)
    fingerprint = tokenizer_fingerprint(tokenizer)
    with pytest.raises(CacheError) as caught:
        open_training_caches(str(cache), None, str(evaluation), fingerprint, VOCAB)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"--eval-cache {evaluation} was scored otherwise than --cache {cache} ")
    assert "reference.fingerprint: " in message and "-> '" + "0" * 64 + "'" in message
    manifest["reference"]["fingerprint"] = _manifest(cache)["reference"]["fingerprint"]
    manifest["reference"]["model"] = "/mounted/elsewhere"  # the same model by another path is the same reference
    _write_manifest(evaluation, manifest)
    assert open_training_caches(str(cache), None, str(evaluation), fingerprint, VOCAB).eval["totals"]["rows"] == 96
    manifest["tokenization"]["max_length"] += 1
    _write_manifest(evaluation, manifest)
    with pytest.raises(CacheError, match=r"tokenization.max_length: \d+ -> \d+"):
        open_training_caches(str(cache), None, str(evaluation), fingerprint, VOCAB)


def test_an_anchor_tokenized_otherwise_is_refused_naming_the_setting(cache, demo_cache, tokenizer, tmp_path):
    anchor = tmp_path / "anchor"
    shutil.copytree(demo_cache, anchor)
    manifest = _manifest(anchor)
    manifest["tokenization"]["max_prompt_length"] = 7
    manifest["reference"]["fingerprint"] = "another scorer"  # an anchor may come from another model
    _write_manifest(anchor, manifest)
    with pytest.raises(CacheError, match=r"the anchor cache was tokenized otherwise .*max_prompt_length: \d+ -> 7"):
        check(cache, tokenizer, anchor=anchor)


# ------------------------------------------------------------------ rank 0 checks, every rank gets the verdict


def test_rank_zero_checks_and_the_other_ranks_receive_the_verdict_reading_nothing(cache, tokenizer, tmp_path):
    fingerprint = tokenizer_fingerprint(tokenizer)
    sent: list[str] = []

    def rank0_broadcast(text):
        sent.append(text)
        return text

    checked = open_training_caches(str(cache), None, None, fingerprint, VOCAB, rank=0, broadcast=rank0_broadcast)
    assert checked.bytes_read == checked.train["totals"]["bytes"] and len(sent) == 1
    # Rank 1 gets the same caches from the broadcast alone: its cache path may not even exist.
    received = open_training_caches(str(tmp_path / "nothing"), None, None, fingerprint, VOCAB, rank=1,
                                    broadcast=lambda text: sent[0])
    assert received == checked and received.row_groups["train"] == checked.row_groups["train"]


def test_rank_zeros_refusal_reaches_every_rank_as_the_same_line(cache, tokenizer):
    poison(cache, "chosen_ids", VOCAB)
    fingerprint = tokenizer_fingerprint(tokenizer)
    sent: list[str] = []
    with pytest.raises(CacheError) as on_rank0:
        open_training_caches(str(cache), None, None, fingerprint, VOCAB, rank=0, broadcast=lambda t: sent.append(t) or t)
    with pytest.raises(CacheError) as on_rank1:
        open_training_caches(str(cache), None, None, fingerprint, VOCAB, rank=1, broadcast=lambda t: sent[0])
    assert str(on_rank1.value) == str(on_rank0.value) and "outside the policy's vocabulary" in str(on_rank0.value)


def test_a_bug_on_rank_zero_is_a_traceback_there_and_one_line_elsewhere(cache, tokenizer, monkeypatch):
    import selpipe.pipeline.cache as cache_module

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(cache_module, "check_values", broken)
    sent: list[str] = []
    fingerprint = tokenizer_fingerprint(tokenizer)
    with pytest.raises(TypeError):
        open_training_caches(str(cache), None, None, fingerprint, VOCAB, rank=0, broadcast=lambda t: sent.append(t) or t)
    with pytest.raises(CacheError, match=r"^rank 0 failed checking the caches \(TypeError\); see rank 0's traceback$"):
        open_training_caches(str(cache), None, None, fingerprint, VOCAB, rank=1, broadcast=lambda t: sent[0])


# ------------------------------------------------------------------ the evaluator's rows


@pytest.mark.parametrize("world", [1, 2, 5])
def test_rank_rows_are_the_ranks_block_and_read_only_its_shards(cache, world, monkeypatch):
    import selpipe.pipeline.cache as cache_module

    manifest = open_cache(cache)
    every = list(read_rows(cache, manifest))
    opened: list[str] = []
    original = cache_module.read_verified
    monkeypatch.setattr(cache_module, "read_verified", lambda d, s, c="": opened.append(s["file"]) or original(d, s, c))
    joined = []
    for rank in range(world):
        opened.clear()
        rows = rank_rows(cache, manifest, rank, world)
        indices, _ = eval_shards(96, rank, world, 4)
        assert rows == [every[i] for i in indices]
        # 16-row shards: only those holding rows [start, stop) are read
        start, stop = indices[0], indices[-1] + 1
        assert opened == [f"part-00000-{s:06d}.parquet" for s in range(start // 16, (stop - 1) // 16 + 1)]
        joined += rows
    assert joined == every


def test_read_rows_at_reads_only_the_row_groups_and_shards_holding_them(cache, monkeypatch):
    import selpipe.pipeline.cache as cache_module

    manifest = open_cache(cache)
    every = list(read_rows(cache, manifest))
    opened: list[str] = []
    original = cache_module.read_verified
    monkeypatch.setattr(cache_module, "read_verified", lambda d, s, c="": opened.append(s["file"]) or original(d, s, c))
    picked = [3, 17, 18, 95]  # shards 0, 1, 1, 5 (16 rows each)
    assert read_rows_at(cache, manifest, picked) == [every[i] for i in picked]
    assert opened == ["part-00000-000000.parquet", "part-00000-000001.parquet", "part-00000-000005.parquet"]
    with pytest.raises(ValueError):
        read_rows_at(cache, manifest, [5, 2])
