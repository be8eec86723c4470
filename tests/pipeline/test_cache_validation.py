"""Every cache a training run reads is checked end to end before step 1.

Each poisoned cache below has its checksums resealed (manifest and shard record rewritten to the
damaged file's size and sha256), so only the values, or the layout, are wrong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selpipe.pipeline.cache import PARQUET_OPTIONS, file_sha256, load_manifest, open_training_caches
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
