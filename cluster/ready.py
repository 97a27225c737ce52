"""The scored batches that wait for their epoch's update: the driver holds their refs, the Arrow batches stay in the
object store until the learner takes them.

Usage::

    ready = ReadyBatches()
    ready.add(ReadyBatch(batch_ref, pairs=4, stats=stats, first_pair_id=8, sampled_with=(3, checksum)))
    epoch = ready.take(pairs=8)         # the oldest batches holding 8 pairs, in request order
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReadyBatch:
    """A scored and packed sampler call whose pairs wait for their epoch's update."""

    batch_ref: object  # ray.ObjectRef of the Arrow batch
    pairs: int  # the pairs kept in it
    stats: dict  # its reward statistics (``EpochStats.add_rewards`` once its epoch takes it)
    first_pair_id: int  # an epoch's batches are taken in request order, by this
    sampled_with: tuple[int, str]  # (version, checksum) it was sampled with


class ReadyBatches:
    """The ready batches in the order they arrived."""

    def __init__(self):
        self.batches: list[ReadyBatch] = []

    def __len__(self) -> int:
        return len(self.batches)

    def add(self, batch: ReadyBatch) -> None:
        self.batches.append(batch)

    def pairs(self) -> int:
        """The pairs they hold."""
        return sum(batch.pairs for batch in self.batches)

    def take(self, pairs: int | None) -> list[ReadyBatch]:
        """The oldest batches until they hold at least ``pairs`` pairs (None: every batch), in request order, not
        arrival order: an epoch's update does not depend on which sampler finished first."""
        taken, held = [], 0
        while self.batches and (pairs is None or held < pairs):
            taken.append(self.batches.pop(0))
            held += taken[-1].pairs
        return sorted(taken, key=lambda batch: batch.first_pair_id)

    def remove_sampled_with(self, versions: set[tuple[int, str]]) -> list[ReadyBatch]:
        """Remove and return the batches sampled with one of ``versions`` ((version, checksum) pairs)."""
        removed = [batch for batch in self.batches if batch.sampled_with in versions]
        self.batches = [batch for batch in self.batches if batch.sampled_with not in versions]
        return removed
