"""A worker's endless, resumable stream of packed batches from its Ray Data iterator.

Every worker iterates the whole (order-preserving) window dataset and keeps every
``world``-th window: a deterministic shard, so an epoch's batches on a rank are the same
on every run and the data position (epoch, rows taken) restores exactly. The alternative,
Ray Data's streaming split, hands blocks to whichever worker asks first and starts an
epoch only when every split finished the last, while packing gives each worker a different
number of rows: lock-step training steps would then deadlock at epoch ends. The price is
that each worker reads every token row (a few KB per chunk; negligible next to training).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from voxtral.layout import Layout
from voxtral.stages.train.data import Packed, collate, pack, rank_slice, shuffled, window_from_bytes

READ_BATCH = 64


@dataclass
class Position:
    """Where a rank's stream is: ``rows`` packed rows already taken in ``epoch``."""

    epoch: int = 0
    rows: int = 0


def iter_windows(iterator) -> Iterator[np.ndarray]:
    """Windows from a Ray Data iterator of ``window`` rows (int32 bytes)."""
    for batch in iterator.iter_batches(
        batch_size=READ_BATCH, batch_format="numpy", prefetch_batches=2
    ):
        for b in batch["window"]:
            yield window_from_bytes(b)


class TrainStream:
    """``next_batch()`` → ``[micro_batch, seq_len]`` arrays, epoch after epoch."""

    def __init__(
        self,
        iterator,
        layout: Layout,
        seq_len: int,
        micro_batch: int,
        rank: int,
        world: int,
        seed: int,
        buffer: int,
        start: Position | None = None,
    ):
        self.iterator, self.layout, self.seq_len = iterator, layout, seq_len
        self.micro_batch, self.rank, self.world = micro_batch, rank, world
        self.seed, self.buffer = seed, buffer
        self.position = Position(**vars(start)) if start else Position()
        self._rows = self._generate()

    def epoch_rows(self, epoch: int) -> Iterator[Packed]:
        """Packed rows of one epoch (the same every time for the same inputs)."""
        rng = np.random.default_rng([self.seed, self.rank, epoch])
        windows = rank_slice(iter_windows(self.iterator), self.rank, self.world)
        windows = shuffled(windows, self.buffer, rng)
        return pack(windows, self.layout, self.seq_len, self.layout.vocab.text_pad)

    def _generate(self) -> Iterator[Packed]:
        skip = self.position.rows
        while True:
            n = 0
            for row in self.epoch_rows(self.position.epoch):
                n += 1
                if n <= skip:
                    continue
                self.position.rows = n
                yield row
            if n == 0:
                raise RuntimeError(
                    f"worker {self.rank} of {self.world} got no training windows: the "
                    "train split has fewer windows than workers (add data, lower "
                    "train.num_workers or train.eval_fraction)"
                )
            skip = 0
            self.position = Position(self.position.epoch + 1, 0)

    def next_batch(self) -> dict[str, np.ndarray]:
        return collate([next(self._rows) for _ in range(self.micro_batch)])


def eval_rows(
    iterator, layout: Layout, seq_len: int, rank: int, world: int, limit: int
) -> list[Packed]:
    """This rank's share of the held-out rows: the first ``limit * world`` packed rows of
    the (deterministic) eval split, dealt round-robin."""
    rows: list[Packed] = []
    for row in pack(iter_windows(iterator), layout, seq_len, layout.vocab.text_pad):
        rows.append(row)
        if len(rows) >= limit * world:
            break
    return rows[rank::world]
