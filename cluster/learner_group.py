"""The learner group: ``runtime.learner.count`` Learner ranks as Ray actors, the calls sent to every rank, save and
load, and a restart from the last checkpoint when a rank dies.

Usage::

    learners = LearnerGroup(cfg)                        # rank 0 (``lead``) publishes, checkpoints, answers for all
    ref = learners.begin_epoch(batch_refs)              # rank 0's answer; the others' in ``rank_refs``
    info_ref, weights_ref = learners.update(publish=True)
    state = learners.restart()                          # a rank died: a new group on the last checkpoint
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayError

from cluster.build import build_model
from cluster.config import Batching, RunConfig, grpo_of, learner_sharding
from cluster.resources import actor_threads
from cluster.runtime_config import actor_options
from learner.collective import LearnerGroupBroken
from learner.learner import Learner

log = logging.getLogger("fdfo")


def learner_actor(cfg: RunConfig, index: int = 0, rank: int = 0):
    """One learner rank; a replacement group for a lost one is ``fdfo/learner/<index>``, rank r > 0 of a group
    ``.../rank<r>``. Ranks spread over the nodes that can hold them."""
    rt = cfg.runtime
    name = "fdfo/learner" + (f"/{index}" if index else "") + (f"/rank{rank}" if rank else "")
    return (
        ray.remote(Learner)
        .options(
            name=name,
            scheduling_strategy="SPREAD",
            **actor_options(rt.learner),
        )
        .remote(
            model=partial(build_model, cfg.model, role="learner"),
            train=cfg.train,
            batching=Batching.of(cfg),
            lora=cfg.lora,
            seed=cfg.seed,
            threads=actor_threads(rt, rt.learner.num_cpus),
            rank=rank,
            world_size=rt.learner.count,
            grpo=grpo_of(cfg),
            sharding=learner_sharding(cfg),
            reuse_snapshots=True,
        )
    )


def form_group(cfg: RunConfig, index: int = 0, actor: Callable = learner_actor) -> list:
    """``runtime.learner.count`` learner ranks, joined into one gradient group when there are several (NCCL on GPUs,
    gloo on CPUs: the backend each rank picks from its own device); rank 0 publishes and checkpoints. actor:
    ``(cfg, index, rank) -> rank actor`` (``learner_actor``; hybrid workers: ``cluster.hybrid.worker_actor``)."""
    ranks = [actor(cfg, index, r) for r in range(cfg.runtime.learner.count)]
    if len(ranks) > 1:
        backends = ray.get([r.weight_backend.remote() for r in ranks])
        if len(set(backends)) > 1:
            raise RuntimeError(
                f"learner ranks disagree on the backend ({backends}): give every rank a GPU "
                "(runtime.learner.num_gpus) or none"
            )
        nodes = ray.get([r.node_id.remote() for r in ranks])
        addr, port = ray.get(ranks[0].learner_group_address.remote(peers_on_this_node=len(set(nodes)) == 1))
        ray.get(
            [
                r.join_learner_group.remote(
                    master_addr=addr, master_port=port, backend=backends[0], timeout_s=cfg.runtime.weight_sync_timeout_s
                )
                for r in ranks
            ]
        )
    return ranks


class LearnerGroup:
    """The learner ranks as one learner: every call goes to each rank (rank 0's answer stands for the group, the
    others' refs are ``rank_refs``); a rank that dies takes the group down, and ``restart`` forms group ``index + 1``
    on the last checkpoint this run wrote or resumed from (``checkpoint``). ``form(cfg, index) -> ranks`` builds a
    group (``form_group``; a test gives stand-ins)."""

    def __init__(self, cfg: RunConfig, form: Callable[[RunConfig, int], list] = form_group):
        self.cfg, self.form = cfg, form
        self.index = 0  # a replacement group is fdfo/learner/<index>
        self.ranks = form(cfg, 0)
        self.rank_refs: list[ray.ObjectRef] = []  # the other ranks' share of the call in flight
        self.checkpoint: str | None = None  # the last checkpoint this run wrote or resumed from

    @property
    def lead(self):
        """Rank 0: publishes, checkpoints and answers for the group."""
        return self.ranks[0]

    def begin_epoch(self, batch_refs: list) -> ray.ObjectRef:
        """Every rank takes the epoch's batches; returns rank 0's answer (its plan)."""
        lead_ref, *self.rank_refs = [r.begin_epoch.remote(*batch_refs) for r in self.ranks]
        return lead_ref

    def update(self, publish: bool) -> tuple[ray.ObjectRef, ray.ObjectRef | None]:
        """The epoch's next optimizer step on every rank; rank 0's (metrics ref, ref of its ``Weights`` if
        ``publish``, else None)."""
        info, weights = self.lead.update.options(num_returns=2).remote(publish=publish)
        self.rank_refs += [r.update.options(num_returns=2).remote(publish=False)[0] for r in self.ranks[1:]]
        return info, weights if publish else None

    def owns(self, ref) -> bool:
        return ref in self.rank_refs

    def on_rank(self, ref) -> bool:
        """Another rank finished its share of the call; False if it died (the group must ``restart``)."""
        self.rank_refs.remove(ref)
        try:
            ray.get(ref)
        except RayError as e:
            if not self.died(e):
                raise
            return False
        return True

    def died(self, e: BaseException) -> bool:
        """Whether ``e`` says a rank died (any rank: a group missing one cannot step), or a rank's collective broke
        because a peer did."""
        if isinstance(e, LearnerGroupBroken):
            return True
        return isinstance(e, RayActorError) and e.actor_id in {r._actor_id.hex() for r in self.ranks}

    def save(self, location: str, state: dict, config: dict) -> str:
        """Checkpoint under ``location`` (rank 0 writes; a sharded group's every rank takes part in gathering the
        weights and AdamW moments); it becomes the one a restart restores. Returns the folder."""
        ranks = self.ranks if learner_sharding(self.cfg) == "fsdp" else [self.lead]
        self.checkpoint = ray.get([r.save.remote(location, state, config) for r in ranks])[0]
        return self.checkpoint

    def load(self, folder: str) -> dict:
        """Restore every rank (replicated state) from a checkpoint folder; it becomes the one a restart restores.
        Returns the state the checkpoint carries (``Book.state``)."""
        state = ray.get([r.load.remote(folder) for r in self.ranks])[0]
        self.checkpoint = folder
        return state

    def restart(self) -> dict:
        """Release every rank and form a new group on the last checkpoint (the starting weights if none); returns the
        state it restored (epoch 0, nothing trained, without a checkpoint)."""
        for rank in self.ranks:
            ray.kill(rank)
        self.rank_refs = []
        self.index += 1
        self.ranks = self.form(self.cfg, self.index)
        return self.load(self.checkpoint) if self.checkpoint else {"epoch": 0, "ledger": {"pairs_trained": 0}}

    def kill(self) -> None:
        for rank in self.ranks:
            ray.kill(rank)
