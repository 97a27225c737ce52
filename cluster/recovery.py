"""The learner group's checkpoints and its recovery: a lost group is restarted from the last checkpoint and the run
goes on from there.

Usage (``RayRun`` holds one)::

    recovery = LearnerRecovery(cfg, book, learners, published, samplers, ready, sync, faults, drop_update)
    recovery.save(epoch)              # Book's hook: a checkpoint of the group, or a restart if it dies meanwhile
    recovery.lose_learner()           # the group died: restore, roll the books back, bring the samplers along
    recovery.final_checkpoint()       # the last epoch's checkpoint; False when the group was lost writing it

The last checkpoint bounds what a loss costs: the epochs trained since are trained again with new pairs.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import ray
from ray.exceptions import RayActorError

from cluster.config import RunConfig, to_dict
from cluster.hybrid import workers_of
from learner.collective import LearnerGroupBroken

log = logging.getLogger("fdfo")


class LearnerRecovery:
    """Checkpoints of the learner group, and its restart when it is lost. It acts on the run's parts: the group
    (``LearnerGroup``), the books (``Book``: rolled back), the register of published versions (``Published``), the
    ready batches (those sampled with a lost version go) and the sampler pool (every sampler on the restored version).

    Args:
        cfg: the run's config (written into each checkpoint, secrets redacted).
        book: the run's ``Book``; learners: its ``LearnerGroup``; published: its ``Published``;
        samplers: its ``SamplerPool``; ready: its ``ReadyBatches``; sync: its ``WeightSync``.
        faults: the run's fault records; a restart appends one.
        drop_update: the scheduler's hook that forgets the epoch being updated (lost with the group) and returns
            how many pairs it held (None: no epoch was being updated).
    """

    def __init__(
        self,
        cfg: RunConfig,
        book,
        learners,
        published,
        samplers,
        ready,
        sync,
        faults: list[dict],
        drop_update: Callable[[], int | None],
    ):
        self.cfg, self.book, self.learners, self.published = cfg, book, learners, published
        self.samplers, self.ready, self.sync, self.faults = samplers, ready, sync, faults
        self.drop_update = drop_update
        self.finishing = False  # the final checkpoint and evaluation are being written: a loss now fails the run

    def lose_learner(self) -> None:
        """The learner died: a new group restores the last checkpoint this run wrote or resumed from (the starting
        weights if none), and the run goes on from there: the epochs since are trained again with new pairs (the
        pairs they had trained count ``rolled_back``), the epoch being updated is lost with its pairs
        (``actor_lost``), every sampler loads the restored version, and pairs sampled with a version the lost
        learner published are dropped as ``stale`` (ready, or when they land)."""
        book, group = self.book, self.learners
        t0, lost_epoch, lost_version = time.perf_counter(), book.epoch, book.version
        in_update = self.drop_update()
        if in_update is not None:
            book.drop("actor_lost", in_update)
        state = group.restart()
        version, checksum = ray.get(group.lead.weights_info.remote())
        self.published.restore(version, checksum)
        rolled_back = book.rollback(state, version, checksum)
        for batch in self.ready.remove_sampled_with(self.published.orphaned):
            book.drop("stale", batch.pairs)
        self.sync.learner, self.sync.members_changed = group.lead, True
        if self.cfg.runtime.placement == "hybrid":  # the new group's workers are the pool (the lost ones' calls go)
            self.samplers.adopt(workers_of(group))
        self.samplers.broadcast(version, checksum)  # every sampler on the restored version
        self.samplers.replace_lost()
        fault = {
            "role": "learner",
            "lost": group.index - 1,
            "replaced_by": group.index,
            "epoch": lost_epoch,
            "lost_version": lost_version,
            "restored_from": group.checkpoint,
            "restored_version": version,
            "restored_epoch": book.epoch,
            "rolled_back_pairs": rolled_back,
            "recover_s": round(time.perf_counter() - t0, 3),
        }
        self.faults.append(fault)
        log.warning(
            "learner lost at epoch %d (version %d); fdfo/learner/%d restored version %d (epoch %d) from %s in "
            "%.1f s; %d trained pairs rolled back",
            lost_epoch,
            lost_version,
            group.index,
            version,
            book.epoch,
            group.checkpoint or "the starting weights",
            fault["recover_s"],
            rolled_back,
        )

    def save(self, epoch: int) -> str:
        """Checkpoint the learner group (``Book``'s hook); one that dies meanwhile is restored from the previous
        checkpoint (the epochs since are trained again: ``final_checkpoint`` too), except once the run is finishing
        (a graceful stop's checkpoint, or an early stop's), which fails the run (``--resume`` continues it)."""
        state, config = self.book.state(epoch), to_dict(self.cfg)
        try:
            return self.learners.save(self.book.runlog.location, state, config)
        except (RayActorError, LearnerGroupBroken) as e:
            if self.finishing or not self.learners.died(e):
                raise
            self.lose_learner()
        return self.learners.checkpoint

    def final_checkpoint(self) -> bool:
        """The last epoch's checkpoint, written before the report (``Book.finish`` then keeps it) unless the epoch's
        cadence wrote it. A learner lost meanwhile (its node removed as the run ends) is restored from the previous
        checkpoint as one lost mid-run (``save``): False, and the run trains the epochs since again."""
        book, group = self.book, self.learners.index
        if book.saved is not None and book.saved[0] == book.version:
            return True
        folder = self.save(book.epoch)
        if self.learners.index != group:
            return False
        book.saved = (book.version, folder)
        return True
