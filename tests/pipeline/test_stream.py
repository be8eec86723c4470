from pathlib import Path

import pytest

from ..conftest import demo, write_jsonl
from selpipe.stages.score_ref import run_score_ref
from selpipe.pipeline.cache import CacheError, load_manifest
from selpipe.pipeline.stream import CacheStream, StreamPosition, eval_shards


def take(stream, position, count):
    batches = stream.batches(position)
    return [next(batches) for _ in range(count)]


def make(cache, rank=0, world=1, batch=8, window=3, seed=0):
    return CacheStream(cache, load_manifest(cache), rank=rank, world_size=world, global_batch_size=batch,
                       seed=seed, shuffle_window=window)


def ids(rows):
    return [r["id"] for r in rows]


def test_an_epoch_visits_every_row_once_and_the_next_epoch_reshuffles(demo_cache):
    stream = make(demo_cache)
    epoch = take(stream, StreamPosition(), 2 * stream.batches_per_epoch)
    first = [i for _, rows in epoch[:stream.batches_per_epoch] for i in ids(rows)]
    second = [i for _, rows in epoch[stream.batches_per_epoch:] for i in ids(rows)]
    assert len(first) == len(set(first)) == 96 and set(first) == set(second)
    assert first != second
    assert epoch[-1][0] == StreamPosition(1, 96)


def test_global_batches_are_the_same_on_any_number_of_ranks(demo_cache):
    single = take(make(demo_cache), StreamPosition(), 12)
    for world in (2, 4):
        per_rank = [take(make(demo_cache, rank, world), StreamPosition(), 12) for rank in range(world)]
        for step in range(12):
            joined = [i for rank in range(world) for i in ids(per_rank[rank][step][1])]
            assert joined == ids(single[step][1])
            assert len({per_rank[rank][step][0] for rank in range(world)}) == 1


def test_resuming_at_a_position_continues_exactly(demo_cache):
    uninterrupted = take(make(demo_cache, seed=3), StreamPosition(), 20)
    position = uninterrupted[6][0]
    resumed = take(make(demo_cache, seed=3), position, 13)
    assert [ids(r) for _, r in resumed] == [ids(r) for _, r in uninterrupted[7:]]
    assert [p for p, _ in resumed] == [p for p, _ in uninterrupted[7:]]


def test_seed_changes_the_order(demo_cache):
    assert ids(take(make(demo_cache, seed=0), StreamPosition(), 1)[0][1]) != ids(take(make(demo_cache, seed=1), StreamPosition(), 1)[0][1])


def test_eval_shards_cover_every_row_with_equal_micro_batch_counts():
    covered = []
    for rank in range(3):
        mine, micro_batches = eval_shards(10, rank, 3, 2)
        covered += mine
        assert micro_batches == 2
    assert covered == list(range(10))


@pytest.fixture(scope="module")
def uneven_cache(tmp_path_factory, score_config):
    """100 rows in shards of 16 (the last holds 4) cut into row groups of 5, 5, 5 and 1."""
    root = tmp_path_factory.mktemp("uneven")
    rows = write_jsonl(root / "rows.jsonl", demo.generate_pairs(100, seed=9, id_prefix="u"))
    run_score_ref(score_config(rows, root / "cache", shard_size=16, row_group_size=5))
    return root / "cache"


@pytest.mark.parametrize("world", [2, 3])
def test_uneven_row_groups_on_several_ranks_resume_across_an_epoch_boundary(uneven_cache, world):
    """Global batch 6: 16 batches an epoch (96 of 100 rows, 4 dropped). Every rank resumed after
    step 14 must go on, into epoch 1, with exactly the rows of its uninterrupted run; the ranks'
    slices of each step joined give the single-process batch."""
    groups = [rows for _, _, rows in make(uneven_cache, batch=6, window=4).row_groups]
    assert sorted(set(groups)) == [1, 4, 5]
    single = take(make(uneven_cache, batch=6, window=4), StreamPosition(), 24)
    for rank in range(world):
        uninterrupted = take(make(uneven_cache, rank, world, batch=6, window=4), StreamPosition(), 24)
        resumed = take(make(uneven_cache, rank, world, batch=6, window=4), uninterrupted[13][0], 10)
        assert [ids(r) for _, r in resumed] == [ids(r) for _, r in uninterrupted[14:]]
        for step in range(24):
            share = 6 // world
            assert ids(uninterrupted[step][1]) == ids(single[step][1])[rank * share:(rank + 1) * share]
    assert single[15][0] == StreamPosition(0, 96) and single[16][0] == StreamPosition(1, 6)


def _copy(cache, tmp_path):
    import shutil

    return Path(shutil.copytree(cache, tmp_path / "cache"))


def test_a_shard_changed_while_training_runs_stops_in_one_line(demo_cache, tmp_path):
    """After the first batch every shard is swapped for another (same names, manifest untouched):
    the next shard the stream opens fails its sha256 and the run stops in one line, before any
    row of it is handed out (no loss jump, no IndexError from foreign ids)."""
    cache = _copy(demo_cache, tmp_path)
    stream = CacheStream(cache, load_manifest(cache), rank=0, world_size=1, global_batch_size=8, seed=0,
                         shuffle_window=3, keep_bytes=0)
    batches = stream.batches(StreamPosition())
    next(batches)
    shards = sorted(cache.glob("part-*.parquet"))
    contents = [s.read_bytes() for s in shards]
    for shard, content in zip(shards, contents[1:] + contents[:1]):
        shard.write_bytes(content)
    with pytest.raises(CacheError) as caught:
        for _ in range(12):  # an epoch is 12 batches: some window must open a swapped shard
            next(batches)
    message = str(caught.value)
    assert "\n" not in message and "checksum mismatch (the shard was truncated or altered while training ran)" in message


def test_shards_kept_in_memory_are_trained_as_checked(demo_cache, tmp_path):
    """With the whole cache kept (it is small), a shard changed after it was read is never read
    again: the epoch yields exactly the rows of an unchanged cache."""
    cache = _copy(demo_cache, tmp_path)
    expected = take(make(demo_cache), StreamPosition(), 12)
    stream = CacheStream(cache, load_manifest(cache), rank=0, world_size=1, global_batch_size=8, seed=0,
                         shuffle_window=3, keep_bytes=1 << 30)
    batches = stream.batches(StreamPosition())
    got = [next(batches)]
    for window in range(1, 8):  # read every shard once: 24 row groups in windows of 3
        stream._read_window(stream._windows(0)[window])
    for shard in cache.glob("part-*.parquet"):
        shard.write_bytes(b"PAR1" + b"\0" * 100 + b"PAR1")
    got += [next(batches) for _ in range(11)]
    assert [(p, ids(r)) for p, r in got] == [(p, ids(r)) for p, r in expected]
    assert stream.reader.bytes_read == load_manifest(demo_cache)["totals"]["bytes"]  # each shard read once


def test_row_groups_from_the_start_up_check_give_the_same_stream(demo_cache):
    from selpipe.pipeline.cache import check_values

    checked = check_values(demo_cache, load_manifest(demo_cache), 512)
    given = CacheStream(demo_cache, load_manifest(demo_cache), rank=0, world_size=1, global_batch_size=8, seed=0,
                        shuffle_window=3, row_groups=checked.row_groups)
    assert given.row_groups == make(demo_cache).row_groups
    assert [ids(r) for _, r in take(given, StreamPosition(), 12)] == [ids(r) for _, r in take(make(demo_cache), StreamPosition(), 12)]


def test_an_anchor_shard_changed_while_training_runs_stops_in_one_line(demo_cache, tmp_path):
    import shutil

    anchor = Path(shutil.copytree(demo_cache, tmp_path / "anchor"))
    stream = CacheStream(demo_cache, load_manifest(demo_cache), rank=0, world_size=1, global_batch_size=8, seed=0,
                         shuffle_window=3, keep_bytes=0, anchor=(anchor, load_manifest(anchor)))
    batches = stream.batches(StreamPosition())
    next(batches)
    for shard in anchor.glob("part-*.parquet"):
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"anchor/part-\d{5}-\d{6}\.parquet: checksum mismatch .*while training ran"):
        for _ in range(12):
            next(batches)
