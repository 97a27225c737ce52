"""The reward pool: one ``score(images, prompts) -> ref`` whether the scorers run as plain reward actors or as the
elastic Serve deployment (``runtime.reward.backend``), and its own loss handling.

Usage::

    rewards = RewardPool(cfg, book, faults)
    out_ref = rewards.score(images_ref, prompts, route=first_pair_id)   # RewardOutput [K P], in the object store
    rewards.lose(actor_id)                                             # that reward actor died: replaced once
"""

from __future__ import annotations

import logging
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayError

from cluster.build import reward_specs
from cluster.config import RunConfig
from cluster.resources import actor_threads
from cluster.runtime_config import actor_options
from cluster.serving import RewardService, uses_serve
from rewards.batcher import RewardBatcher

log = logging.getLogger("fdfo")


def reward_actor(cfg: RunConfig, index: int):
    """Reward actor ``fdfo/reward/<index>``: the run's weighted sum of scorers behind a batcher."""
    rt = cfg.runtime
    return (
        ray.remote(RewardBatcher)
        .options(
            name=f"fdfo/reward/{index}",
            **actor_options(rt.reward),
        )
        .remote(
            reward_spec={"name": "weighted_sum", "specs": reward_specs(cfg.reward)},
            max_batch_size=rt.reward.max_batch,
            max_wait_s=rt.reward.max_wait_s,
            timeout_s=rt.reward.timeout_s,
            torch_threads=actor_threads(rt, rt.reward.num_cpus),
        )
    )


def score_seconds(out) -> float:
    """This request's share of the reward actor's scorer time: each batch's latency split by images served."""
    parts = out.info.get("chunks") or [out.info]
    return sum(p["batch"]["latency_s"] * len(p["reasons"]) / p["batch"]["size"] for p in parts if "batch" in p)


class RewardPool:
    """``runtime.reward.count`` reward actors (a request goes to one by its ``route``), or the Serve deployment
    (Serve balances and replaces its replicas itself). A reward actor that dies is replaced by
    ``fdfo/reward/<next index>`` and recorded in ``faults`` (with ``book.epoch``)."""

    def __init__(
        self, cfg: RunConfig, book, faults: list[dict], spawn: Callable[[RunConfig, int], object] = reward_actor
    ):
        self.cfg, self.book, self.faults, self.spawn = cfg, book, faults, spawn  # spawn(cfg, index) -> a reward actor
        rt = cfg.runtime
        self.actors = [] if uses_serve(rt) else [spawn(cfg, i) for i in range(rt.reward.count)]
        self.next_index = len(self.actors)  # names of replacements continue from here
        self.service: RewardService | None = None
        try:
            if uses_serve(rt):
                self.service = RewardService(cfg, threads=actor_threads(rt, rt.reward.num_cpus))
        except BaseException:
            self.kill()
            raise

    def score(self, images, prompts: list[str], route: int) -> ray.ObjectRef:
        """The score stage: a ref of the RewardOutput for ``images`` (a ref or an array) of ``prompts`` (one an
        image); ``route`` picks the reward actor (a request's first pair id: requests spread over the actors)."""
        if self.service is not None:
            return self.service.score(images, prompts)
        actor = self.actors[route % len(self.actors)]
        return actor.score.remote(images=images, prompts=prompts)

    def score_now(self, images, prompts: list[str]):
        """Score and wait (held-out evaluation, on the first reward actor); one that dies meanwhile is replaced and the
        call made again."""
        if self.service is not None:
            return ray.get(self.service.score(images, prompts))
        while True:
            actor = self.actors[0]
            try:
                return ray.get(actor.score.remote(images=images, prompts=prompts))
            except RayActorError:
                self._replace(actor)

    def lose(self, actor_id: str | None) -> None:
        """The actor ``actor_id`` (from a RayActorError) died serving a request: a reward actor of the pool is replaced,
        once however many requests report its death; a Serve replica is Serve's to replace."""
        for actor in list(self.actors):
            if actor._actor_id.hex() == actor_id:
                self._replace(actor)

    def _replace(self, dead) -> None:
        if dead not in self.actors:
            return
        slot = self.actors.index(dead)
        self.actors[slot] = self.spawn(self.cfg, self.next_index)
        self.faults.append({"role": "reward", "lost": slot, "replaced_by": self.next_index, "epoch": self.book.epoch})
        log.warning("reward actor %d lost; replaced by fdfo/reward/%d", slot, self.next_index)
        self.next_index += 1

    def stats(self) -> list[dict]:
        """Each reward actor's counters (one replica's for a Serve pool); one that died since is replaced (its
        counters are gone with it)."""
        if self.service is not None:
            try:
                return [self.service.stats()]
            except RayError as e:
                log.warning("reward pool stats unavailable: %r", e)
                return [{"mean_latency_s": float("nan"), "backlog": 0, "torch_threads": None}]
        stats = []
        for actor in list(self.actors):
            try:
                stats.append(ray.get(actor.stats.remote()))
            except RayActorError:
                self._replace(actor)
        return stats or [{"mean_latency_s": float("nan"), "backlog": 0}]

    def replicas(self) -> int:
        """Running reward actors, or Serve replicas."""
        return self.service.replicas() if self.service is not None else len(self.actors)

    def kill(self) -> None:
        """Release every reward actor now, or stop the Serve deployment."""
        for actor in self.actors:
            ray.kill(actor)
        if self.service is not None:
            self.service.stop()
