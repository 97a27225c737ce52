"""The sampler pool: sampler actors by index, the calls in flight on each, joining, loss and replacement, release.

Usage::

    pool = SamplerPool(cfg, book, published, sync, faults)
    pool.add()                                    # joins once its first load of the newest version is proven
    for index, actor in pool.with_room(): ...     # the scheduler sends a call: pool.track(Job(...))
    job = pool.finish(report_ref)                 # its report came back (or its sampler died: pool.lose(index))

Indices are never reused: a replacement for sampler 1 is sampler ``next_index``, and its actor ``fdfo/sampler/<n>``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import ray
from ray.exceptions import ObjectLostError, OwnerDiedError, RayActorError, RayError

from actors.sampler import Sampler
from cluster.build import build_model
from cluster.config import RunConfig, grpo_of
from cluster.pipeline import check_proof
from cluster.plan import Rates, auto_samplers, load_rates
from cluster.resources import actor_threads
from cluster.runtime_config import actor_options

log = logging.getLogger("fdfo")


@dataclass
class Job:
    """One sampler call in flight: its pairs and the refs of its stages (sample -> score -> pack)."""

    sampler: int  # the sampler's index in the pool
    pair_ids: list[int]
    job_ref: ray.ObjectRef  # the sampler's handle of the trajectories it keeps until pack
    out_ref: ray.ObjectRef  # the reward's RewardOutput
    batch_ref: ray.ObjectRef  # the packed Arrow batch
    report_ref: ray.ObjectRef  # what the pack stage reports (drops, stage times, the version it sampled with)


@dataclass
class Pool:
    """Live sampler actors by index, with their in-flight call count; a new sampler is ``joining`` (by the ref of its
    first weight load) until it has proven that it holds a published version."""

    actors: dict[int, object] = field(default_factory=dict)
    busy: dict[int, int] = field(default_factory=dict)
    joining: dict = field(default_factory=dict)  # ref of the first set_weights -> (index, actor)
    next_index: int = 0

    def size(self) -> int:
        return len(self.actors) + len(self.joining)


def sampler_actor(cfg: RunConfig, index: int):
    """A sampler actor. ``complete`` runs in its own concurrency group ("pack"): packing a job whose reward is still
    being computed never holds up the next ``sample`` call (sampling stays one call at a time). Samplers spread
    over the nodes that can hold them, so losing one node costs a share of the pool, not all of it."""
    rt = cfg.runtime
    return (
        ray.remote(concurrency_groups={"pack": 1})(Sampler)
        .options(
            name=f"fdfo/sampler/{index}",
            scheduling_strategy="SPREAD",
            **actor_options(rt.sampler),
        )
        .remote(
            model=partial(build_model, cfg.model),
            sampling=cfg.sampling,
            lora=cfg.lora,
            index=index,
            precision=cfg.train.precision,
            threads=actor_threads(rt, rt.sampler.num_cpus),
            grpo=grpo_of(cfg),
        )
    )


def check_sampler_count(rt) -> Rates | None:
    """The sampler pool's bounds, checked before anything starts; for ``runtime.sampler.count: auto`` the per-role
    rates it will be resolved with (``runtime.throughput``'s, else the reference's)."""
    pool = rt.sampler
    if pool.count == "auto":
        if pool.max_count is not None and pool.max_count < 1:
            raise ValueError(f"runtime.sampler.max_count must be >= 1, got {pool.max_count}")
        return load_rates(rt.throughput)
    if rt.throughput is not None:
        raise ValueError(
            f"runtime.throughput ({rt.throughput}) is read only by runtime.sampler.count=auto, but "
            f"runtime.sampler.count is {pool.count}: set runtime.sampler.count=auto or drop runtime.throughput"
        )
    ceiling = pool.max_count or pool.count
    if not 1 <= pool.count <= ceiling:
        raise ValueError(f"need 1 <= runtime.sampler.count ({pool.count}) <= runtime.sampler.max_count ({ceiling})")
    return None


def with_auto_samplers(cfg: RunConfig, resources: dict, rates: Rates) -> RunConfig:
    """``cfg`` with ``runtime.sampler.count: auto`` resolved on the cluster as it is now (``auto_samplers``); logged."""
    start, ceiling, why = auto_samplers(cfg, resources, rates)
    log.info("runtime.sampler.count=auto: %d sampler(s) at start, up to %d: %s", start, ceiling, why)
    pool = dataclasses.replace(cfg.runtime.sampler, count=start, max_count=ceiling)
    return dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, sampler=pool))


class SamplerPool:
    """The sampler actors and their calls in flight. Between ``runtime.sampler.count`` (a lost one is replaced up
    to it) and ``runtime.sampler.max_count`` (``autoscale`` grows the pool up to it). ``book`` counts the pairs lost
    with a sampler, ``published`` (``Published``) is what a new sampler must prove it loaded, ``sync`` (``WeightSync``)
    brings samplers to a version and re-forms its group when the members change; ``faults`` gets one record a loss.
    Args: cfg, book, published, sync, faults as above; spawn: ``(cfg, index) -> actor`` (``sampler_actor``)."""

    def __init__(
        self,
        cfg: RunConfig,
        book,
        published,
        sync,
        faults: list[dict],
        spawn: Callable[[RunConfig, int], object] = sampler_actor,
    ):
        self.cfg, self.book, self.published, self.sync, self.faults = cfg, book, published, sync, faults
        self.spawn = spawn  # (cfg, index) -> a sampler actor (a test gives stand-ins)
        self.minimum = cfg.runtime.sampler.count
        self.maximum = cfg.runtime.sampler.max_count or cfg.runtime.sampler.count
        self.members = Pool()
        self.jobs: dict[ray.ObjectRef, Job] = {}  # by the ref of the call's report

    def size(self) -> int:
        """Samplers working or still joining."""
        return self.members.size()

    def pending(self) -> list[ray.ObjectRef]:
        """What the pool waits on: the calls' reports, then the joining samplers' first loads."""
        return list(self.jobs) + list(self.members.joining)

    def is_joining(self, ref) -> bool:
        return ref in self.members.joining

    def pairs_in_flight(self) -> int:
        return sum(len(job.pair_ids) for job in self.jobs.values())

    # -- calls ---------------------------------------------------------------------------------------------------
    def with_room(self) -> list[tuple[int, object]]:
        """The samplers with room for another call (fewer than two queued), as (index, actor)."""
        return [(i, actor) for i, actor in list(self.members.actors.items()) if self.members.busy[i] < 2]

    def track(self, job: Job) -> None:
        """A call sent to sampler ``job.sampler``."""
        self.jobs[job.report_ref] = job
        self.members.busy[job.sampler] += 1

    def finish(self, report_ref) -> Job:
        """The call whose report ``report_ref`` is came back (done or failed): it no longer counts as queued."""
        job = self.jobs.pop(report_ref)
        if job.sampler in self.members.busy:
            self.members.busy[job.sampler] -= 1
        return job

    def fail(self, job: Job, error: RayError, reward_lost: Callable[[str | None], None]) -> None:
        """A call whose report is ``error``: its pairs are dropped. Its sampler died (``actor_lost``: the sampler is
        lost), or the reward actor serving it did (``actor_lost``: ``reward_lost(actor id)``, the sampler lives and
        frees the trajectories), or the reward failed this request (``reward_failure``) or an input was lost with its
        node (``actor_lost``): the sampler frees the trajectories."""
        if isinstance(error, RayActorError):
            self.book.drop("actor_lost", len(job.pair_ids))
            sampler = self.members.actors.get(job.sampler)
            if sampler is None or error.actor_id == sampler._actor_id.hex():
                self.lose(job.sampler)
            else:  # the reward actor (or Serve replica, which Serve replaces) died: the sampler lives
                reward_lost(error.actor_id)
                self.free_trajectories(job)
            return
        lost = isinstance(error, (ObjectLostError, OwnerDiedError))
        log.warning(
            "%s for %d pairs: %s",
            "an input was lost with its node" if lost else "reward request failed",
            len(job.pair_ids),
            error,
        )
        self.book.drop("actor_lost" if lost else "reward_failure", len(job.pair_ids))
        self.free_trajectories(job)

    def free_trajectories(self, job: Job) -> None:
        """Free the trajectories a sampler holds for a job whose rewards will never come."""
        actor = self.members.actors.get(job.sampler)
        if actor is not None:
            actor.forget.remote(job=job.job_ref)

    def generate(self, prompts: list[str], seeds: list[int], steps: int) -> np.ndarray:
        """Held-out images on a sampler with the newest published weights; one that dies meanwhile is replaced and the
        call made again on another."""
        while True:
            while not self.members.actors:  # at the start (or after a loss) every sampler may be joining
                self.on_joined(ray.wait(list(self.members.joining), num_returns=1)[0][0])
            index, sampler = next(iter(self.members.actors.items()))
            try:
                return ray.get(
                    sampler.generate.remote(
                        prompts=prompts, seeds=seeds, num_steps=steps, newest=self.published.to_load()
                    )
                )
            except RayActorError:
                self.lose(index)

    # -- members -------------------------------------------------------------------------------------------------
    def add(self) -> None:
        """A new sampler actor. On the object-store path it joins without blocking the driver: it gets work once its
        first load of the newest version is proven (``on_joined``), so a slow start (a model loading, a node being
        provisioned) holds up nobody and no pairs. On the collective path it loads the learner's current weights
        first (a formed group cannot take a late member; the next broadcast re-forms it)."""
        members, published = self.members, self.published
        index = members.next_index
        members.next_index += 1
        actor = self.spawn(self.cfg, index)
        if not self.sync.collective:
            members.joining[actor.set_weights.remote(weights=published.weights_ref)] = (index, actor)
            return
        proof = ray.get(actor.set_weights.remote(weights=self.sync.learner.weights.remote()))
        if proof["version"] < published.version:
            raise RuntimeError(
                f"late sampler {index} loaded version {proof['version']}, older than {published.version}"
            )
        published.checksums.setdefault(proof["version"], proof["checksum"])
        members.actors[index], members.busy[index] = actor, 0
        self.sync.members_changed = True

    def on_joined(self, ref) -> None:
        """A joining sampler answered its first load: it joins the pool (proof checked), or it died and is replaced."""
        index, actor = self.members.joining.pop(ref)
        try:
            proof = ray.get(ref)
        except RayActorError as e:
            log.warning("sampler %d died while starting (%s)", index, e)
            self.lose(index)
            return
        if self.published.is_orphaned(proof["version"], proof["checksum"]):  # what a lost learner published
            self.members.joining[actor.set_weights.remote(weights=self.published.weights_ref)] = (index, actor)
            return
        self.published.check(proof)
        self.members.actors[index], self.members.busy[index] = actor, 0
        self.sync.members_changed = True

    def adopt(self, actors: dict[int, object]) -> None:
        """Take ``actors`` (pool index -> actor) as the whole pool, for good: hybrid workers (cluster/hybrid.py), which
        hold the learner group's weights by construction (nothing to load or prove first). The members they replace (a
        lost group's workers, all released by its restart) take their calls in flight with them (``actor_lost``). A
        pool of adopted members never spawns a sampler: it neither replaces a lost one (the learner group's restart
        brings the next members) nor autoscales."""
        for ref, job in list(self.jobs.items()):
            if job.sampler not in actors:
                self.jobs.pop(ref)
                self.book.drop("actor_lost", len(job.pair_ids))
        self.members = Pool(dict(actors), {i: 0 for i in actors}, next_index=max(actors) + 1)
        self.spawn, self.minimum = None, 0
        self.maximum = len(actors)
        self.sync.members_changed = True

    def lose(self, index: int) -> None:
        """Sampler ``index`` died: its other requests in flight are lost with it; replace it up to the pool's
        minimum."""
        self.sync.members_changed = True
        self.members.actors.pop(index, None)
        self.members.busy.pop(index, None)
        for ref, job in list(self.jobs.items()):
            if job.sampler == index:
                self.jobs.pop(ref)
                self.book.drop("actor_lost", len(job.pair_ids))
        log.warning("sampler %d lost; %d samplers left", index, len(self.members.actors))
        replaced = []
        while self.size() < self.minimum:
            replaced.append(self.members.next_index)
            self.add()
        self.faults.append({"role": "sampler", "lost": index, "replaced_by": replaced, "epoch": self.book.epoch})

    def broadcast(self, version: int, checksum: str) -> None:
        """Every sampler brought to ``version`` now (``WeightSync.broadcast``); on the object-store path later calls and
        new samplers load the same copy. Those found dead are replaced by ``replace_lost``."""
        ref = self.sync.broadcast(self.members, version, checksum)
        if not self.sync.collective:
            self.published.weights_ref = ref

    def replace_lost(self) -> None:
        """Replace the samplers the last broadcast found dead."""
        while self.sync.lost:
            self.lose(self.sync.lost.pop())

    def autoscale(self, waited_s: float, step_s: float) -> None:
        """Add a sampler when the learner waited for data (``waited_s`` this epoch) longer than it trained; release an
        idle one when the learner is the bottleneck (it never waited). Adopted members (``adopt``) stay as they are."""
        members = self.members
        if self.spawn is None:
            return
        if waited_s > step_s and members.size() < self.maximum:
            self.add()
            log.info(
                "autoscale: learner waited %.1fs for data (step %.1fs): %d samplers", waited_s, step_s, members.size()
            )
        elif waited_s == 0.0 and len(members.actors) > self.minimum:
            queued = {job.sampler for job in self.jobs.values()}
            idle = [i for i, calls in members.busy.items() if calls == 0 and i not in queued]
            if idle:
                index = idle[-1]
                ray.kill(members.actors.pop(index))
                members.busy.pop(index)
                self.sync.members_changed = True
                log.info(
                    "autoscale: learner is the bottleneck: released sampler %d, %d left", index, len(members.actors)
                )

    # -- end -----------------------------------------------------------------------------------------------------
    def close(self) -> list[dict]:
        """Every sampler brought to the final version (on the object-store path samplers load versions lazily) and
        its proof of what it holds; the weight group closed. Returns each sampler's status."""
        members, published = self.members, self.published
        if members.joining:  # one the pool grew by at the end: take it in if it has started
            ready, pending = ray.wait(list(members.joining), num_returns=len(members.joining), timeout=30.0)
            for ref in ready:
                self.on_joined(ref)
            for ref in pending:  # never placed (no node for it): it never did any work
                index, actor = members.joining.pop(ref)
                log.warning("sampler %d never started (no node could hold it); released", index)
                ray.kill(actor)
        for index, actor in list(members.actors.items()):  # a sampler lost at the very end (its node gone) is let go:
            try:  # its work is done and accounted; the others prove their weights
                if published.weights_ref is not None:
                    check_proof(
                        ray.get(actor.set_weights.remote(weights=published.weights_ref)),
                        published.version,
                        published.checksums[published.version],
                    )
            except RayActorError:
                log.warning("sampler %d was lost after the last epoch; the run's books are complete without it", index)
                del members.actors[index]
        statuses = ray.get([members.actors[i].status.remote() for i in sorted(members.actors)])
        self.sync.close(members)
        return statuses

    def kill(self) -> None:
        """Release every sampler now (working or joining)."""
        for actor in [*self.members.actors.values(), *(a for _, a in self.members.joining.values())]:
            ray.kill(actor)
