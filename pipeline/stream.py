"""The training stream: a score cache dealt to ranks, shuffled by seed, resumable by position.

One global order per epoch, the same whatever the number of ranks:

1. the cache's Parquet row groups are permuted with a generator seeded by (seed, epoch);
2. consecutive runs of `shuffle_window` row groups form windows, and the rows of each window
   are permuted with a generator seeded by (seed, epoch, window) (a shuffle buffer: only one
   window is in memory);
3. the stream is cut into global batches of `global_batch_size` rows (a short last batch is
   dropped), and rank r of W takes the r-th of W equal slices of each global batch.

So a global batch holds the same pairs on 1 GPU or 64, a resumed job at (epoch, offset) sees
exactly the rows it would have seen. (The order itself would survive a change in the number of
ranks, but DeepSpeed's ZeRO checkpoints do not.)
Each rank reads every window's Parquet but converts only its own rows to Python. Each shard is read
whole as it is opened and checked against the manifest's sha256 before any of it is decoded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .batching import length_bucketed_order
from .cache import STREAM_KEEP_BYTES, CacheError, ShardReader, eval_block, iter_row_groups

# The refusal's words when a shard's bytes no longer match the manifest after start-up.
CHANGED = " while training ran"

ANCHOR_COLUMNS = ["chosen_ref_logps", "rejected_ref_logps"]


@dataclass(frozen=True)
class StreamPosition:
    """Where the stream stands: `offset` rows of epoch `epoch` have been consumed."""

    epoch: int = 0
    offset: int = 0

    def to_json(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}


class CacheStream:
    def __init__(self, directory: str | Path, manifest: dict[str, Any], *, rank: int, world_size: int,
                 global_batch_size: int, seed: int, shuffle_window: int,
                 anchor: tuple[str | Path, dict[str, Any]] | None = None, length_bucketing: bool = False,
                 row_groups: list[tuple[str, int, int]] | None = None, keep_bytes: int = STREAM_KEEP_BYTES):
        """`row_groups`: the cache's (file, group, rows) as the start-up check found them in the
        checked bytes (`TrainingCaches.row_groups["train"]`); else read from the shards' footers.
        `keep_bytes`: how much of opened shards each cache keeps in memory (`cache.ShardReader`)."""
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} does not split over {world_size} ranks")
        self.directory = Path(directory)
        self.row_groups = list(row_groups) if row_groups is not None else list(iter_row_groups(self.directory, manifest))
        self.total_rows = sum(rows for _, _, rows in self.row_groups)
        self.rank, self.world_size = rank, world_size
        self.global_batch_size, self.seed, self.shuffle_window = global_batch_size, seed, shuffle_window
        self.length_bucketing = length_bucketing
        self.batches_per_epoch = self.total_rows // global_batch_size
        if self.batches_per_epoch == 0:
            raise CacheError(f"{directory}: {self.total_rows} rows cannot fill one global batch of {global_batch_size}; "
                             f"lower --global-batch-size")
        # Every shard is checked against the manifest as it is opened, so a shard changed while
        # training runs stops the run in one line instead of being trained on.
        self.reader = ShardReader(self.directory, manifest, keep_bytes=keep_bytes, changed=CHANGED)
        self.anchor_reader = ShardReader(anchor[0], anchor[1], keep_bytes=keep_bytes, changed=CHANGED) if anchor else None

    def _windows(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.row_groups))
        return [order[i:i + self.shuffle_window].tolist() for i in range(0, len(order), self.shuffle_window)]

    def _read_window(self, groups: list[int]) -> pa.Table:
        tables = []
        opened: dict[tuple[int, str], pq.ParquetFile] = {}  # each shard read once per window at most

        def shard(reader: ShardReader, file: str) -> pq.ParquetFile:
            if (id(reader), file) not in opened:
                opened[id(reader), file] = reader.open(file)
            return opened[id(reader), file]

        for index in groups:
            file, group, _ = self.row_groups[index]
            parquet = shard(self.reader, file)
            if group >= parquet.metadata.num_row_groups:
                raise CacheError(f"{self.directory / file}: has no row group {group} (it changed{CHANGED}); restore it "
                                 f"or rescore")
            table = parquet.read_row_group(group)
            if self.anchor_reader is not None:
                # Row for row the same pairs: checked once before training (`cache.check_values`).
                anchor = shard(self.anchor_reader, file).read_row_group(group, columns=ANCHOR_COLUMNS)
                table = table.append_column("chosen_anchor_logps", anchor.column("chosen_ref_logps"))
                table = table.append_column("rejected_anchor_logps", anchor.column("rejected_ref_logps"))
            tables.append(table)
        return pa.concat_tables(tables)

    def _window_order(self, table: pa.Table, epoch: int, window_index: int, window_start: int) -> np.ndarray:
        """The window's row order: a seeded shuffle, or with length bucketing one whose global
        batches each hold pairs of similar padded width (`batching.length_bucketed_order`)."""
        generator = np.random.default_rng([self.seed, epoch, window_index])
        if not self.length_bucketing:
            return generator.permutation(table.num_rows)
        longer = pc.max_element_wise(pc.list_value_length(table.column("chosen_ids")),
                                     pc.list_value_length(table.column("rejected_ids")))
        widths = pc.add(pc.list_value_length(table.column("prompt_ids")), longer).to_numpy()
        return np.asarray(length_bucketed_order(widths, self.global_batch_size, generator, offset=window_start))

    def _mine(self, start: int, stop: int) -> list[int]:
        """Stream positions in [start, stop) that belong to this rank (by global-batch slice)."""
        share = self.global_batch_size // self.world_size
        positions = np.arange(start, stop)
        return positions[(positions % self.global_batch_size) // share == self.rank].tolist()

    def batches(self, position: StreamPosition) -> Iterator[tuple[StreamPosition, list[dict[str, Any]]]]:
        """Endless (position after, this rank's rows) per global batch, starting at `position`."""
        epoch, offset = position.epoch, position.offset
        while True:
            usable = self.batches_per_epoch * self.global_batch_size
            pending: list[dict[str, Any]] = []
            window_start = 0
            for window_index, groups in enumerate(self._windows(epoch)):
                window_rows = sum(self.row_groups[g][2] for g in groups)
                window_stop = min(window_start + window_rows, usable)
                if window_stop > offset:
                    lo = max(offset, window_start)
                    wanted = self._mine(lo, window_stop)
                    if wanted:
                        table = self._read_window(groups)
                        permutation = self._window_order(table, epoch, window_index, window_start)
                        pending.extend(table.take(permutation[np.asarray(wanted) - window_start]).to_pylist())
                    share = self.global_batch_size // self.world_size
                    # Emit every global batch that ends inside this window.
                    batch_end = (lo // self.global_batch_size + 1) * self.global_batch_size
                    while batch_end <= window_stop:
                        yield StreamPosition(epoch, batch_end), pending[:share]
                        pending = pending[share:]
                        offset = batch_end
                        batch_end += self.global_batch_size
                window_start += window_rows
                if window_start >= usable:
                    break
            epoch, offset = epoch + 1, 0


def eval_shards(rows: int, rank: int, world_size: int, micro_batch_size: int) -> tuple[list[int], int]:
    """This rank's eval row indices (contiguous block) and the micro-batch count all ranks share.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively);
    a rank whose block is short pads with rows of weight 0.
    """
    per_rank = -(-rows // world_size)
    return list(range(*eval_block(rows, rank, world_size))), -(-per_rank // micro_batch_size)
