import pytest

from ..conftest import demo, write_jsonl
from selpipe.stages.score_ref import run_score_ref
from selpipe.pipeline.cache import load_manifest
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
