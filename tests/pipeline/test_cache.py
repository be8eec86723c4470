import json

import pyarrow.parquet as pq
import pytest

from selpipe.pipeline.cache import (
    CacheError, ScoredPair, check_tokenizer, completed_shard, load_manifest, read_rows, sample_rows, verify_checksums,
    write_shard,
)


def test_shard_round_trip_encodings_and_completion_marker(tmp_path):
    pairs = [ScoredPair(id=f"r{i}", prompt_ids=[1, 2], chosen_ids=[3, 4, 5], rejected_ids=[6], chosen_ref_logps=[-0.5, -1.25, -2.0], rejected_ref_logps=[-3.0]) for i in range(10)]
    record = write_shard(tmp_path, 0, 0, pairs, [], truncated=0, row_group_size=4)
    parquet = pq.ParquetFile(tmp_path / record.file)
    assert parquet.metadata.num_row_groups == 3 and record.rows == 10 and record.completion_tokens == 40
    encodings = parquet.metadata.row_group(0).column(4).encodings
    assert "BYTE_STREAM_SPLIT" in encodings and parquet.metadata.row_group(0).column(4).compression == "ZSTD"
    assert pq.read_table(tmp_path / record.file).to_pylist()[0]["chosen_ref_logps"] == [-0.5, -1.25, -2.0]
    assert completed_shard(tmp_path, 0, 0) == record
    (tmp_path / record.file).write_bytes((tmp_path / record.file).read_bytes()[:-10])
    assert completed_shard(tmp_path, 0, 0) is None  # a damaged shard is redone on rerun


def test_cache_refusals(demo_cache, tmp_path, tokenizer):
    manifest = load_manifest(demo_cache)
    verify_checksums(demo_cache, manifest)
    check_tokenizer(demo_cache, manifest, manifest["tokenizer_fingerprint"])
    other = dict(manifest["tokenizer_fingerprint"], vocab="0" * 64)
    with pytest.raises(CacheError, match="differs in: vocab"):
        check_tokenizer(demo_cache, manifest, other)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(CacheError, match="schema version 99 is not one this selpipe knows"):
        load_manifest(bad)
    with pytest.raises(CacheError, match="not a score cache"):
        load_manifest(tmp_path)


def test_sample_rows_reads_only_the_row_groups_it_needs(demo_cache, monkeypatch):
    manifest = load_manifest(demo_cache)
    every = list(read_rows(demo_cache, manifest))
    read = []
    original = pq.ParquetFile.read_row_groups

    def spy(self, groups, *args, **kwargs):
        table = original(self, groups, *args, **kwargs)
        read.append(table.num_rows)
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    rows = sample_rows(demo_cache, manifest, 5, seed=11)
    # Row groups of 4 rows: at most one group per sampled row, never a whole 16-row shard beyond that.
    assert len(rows) == 5 and sum(read) <= 5 * 4
    assert all(row in every for row in rows)
    assert [every.index(row) for row in rows] == sorted(every.index(row) for row in rows)
    assert rows == sample_rows(demo_cache, manifest, 5, seed=11)
    assert rows != sample_rows(demo_cache, manifest, 5, seed=12)
    assert len(sample_rows(demo_cache, manifest, 1000, seed=0)) == 96

