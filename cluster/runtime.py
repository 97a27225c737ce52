"""The Ray runtime: sampler, reward and learner actors around the same classes ``run_local`` uses.

Usage::

    fdfo train --config tiny-cpu                     # connects to a running cluster, else starts a local one
    ray job submit --working-dir . -- python -m cluster.cli train --config sd35m-combined

Dataflow of one sampler call (the driver only ever holds object refs and small scalars)::

    sampler.sample(newest=...) -> (job, images)    loads the newest published version first; images go straight
                                                    to a reward actor
    reward.score               -> RewardOutput     scores [2P] (+ per-scorer components, reasons)
    sampler.complete           -> (Arrow batch, report)  in the sampler's "pack" concurrency group, so a job waiting
                                                    for its reward never holds up the next sample call; the batch
                                                    stays in the object store until the learner takes it
    learner.begin_epoch(*batches), then learner.update() per optimizer step -> (metrics, Weights)
                                                    each step's weights are put once; the next sample calls load them

Samplers keep sampling while the learner trains, but only pairs that stay within ``train.max_policy_lag`` when
trained (``worst_lag``): a request is made only if the last update of the epoch it will land in is within the
bound of the version it is sampled with, so nothing is sampled to be thrown away. With ``runtime.overlap=false``
(lock-step) the bound is ``updates_per_epoch - 1``: samplers wait while the learner trains and a run computes
exactly what ``run_local`` computes. Each job's report carries the version and checksum it sampled with, checked
against what the learner published. Full weights of 512 MiB or more (``runtime.weight_sync=auto``) go through a
gloo/NCCL group once an epoch instead (every sampler must take part in a transfer).
Ray token authentication is switched on (``RAY_AUTH_MODE=token``) unless the environment says otherwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "token")  # must precede `import ray`

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from functools import partial

import ray
from ray.exceptions import ObjectLostError, OwnerDiedError, RayActorError, RayError

from actors.sampler import Sampler
from cluster.build import build_model, check_run, reward_specs
from cluster.config import Batching, RunConfig, grpo_of, learner_sharding, to_dict
from cluster.evaluate import heldout_reward
from cluster.pipeline import Book, check_proof, deferred_interrupts, setup_process
from cluster.plan import Rates, auto_samplers, load_rates
from cluster.serving import RewardService, check_reward_pool, uses_serve
from cluster.metrics import Metrics
# connect, local_cluster_address and the resource checks live in cluster/resources.py (re-exported: cluster.runtime.connect)
from cluster.resources import (NAMESPACE, ROLE_KEYS, actor_threads, await_resources, connect,  # noqa: F401
                               custom_shortfall, local_cluster_address, resource_shortfall, role_ask, role_counts)
from learner.collective import LearnerGroupBroken
from learner.learner import Learner, finite_mean
from rewards.batcher import RewardBatcher

log = logging.getLogger("fdfo")


@dataclass
class Job:
    """One sampler call in flight: its pairs and the refs of its stages."""

    sampler: int
    pair_ids: list[int]
    reward: object                    # the reward actor's handle
    job_ref: ray.ObjectRef
    out_ref: ray.ObjectRef
    batch_ref: ray.ObjectRef
    report_ref: ray.ObjectRef


@dataclass
class Pool:
    """Live sampler actors by index, with their in-flight job count; indices are never reused. A new sampler is
    ``joining`` (by the ref of its first weight load) until it has proven that it holds a published version."""

    actors: dict[int, object] = field(default_factory=dict)
    busy: dict[int, int] = field(default_factory=dict)
    joining: dict = field(default_factory=dict)      # ref of the first set_weights -> (index, actor)
    next_index: int = 0

    def size(self) -> int:
        return len(self.actors) + len(self.joining)



def _learner_actor(cfg: RunConfig, index: int = 0, rank: int = 0):
    """One learner rank; a replacement group for a lost one is ``fdfo/learner/<index>``, rank r > 0 of a group
    ``.../rank<r>``. Ranks spread over the nodes that can hold them."""
    rt = cfg.runtime
    name = "fdfo/learner" + (f"/{index}" if index else "") + (f"/rank{rank}" if rank else "")
    return (
        ray.remote(Learner)
        .options(name=name, num_cpus=rt.learner_num_cpus, num_gpus=rt.learner_num_gpus,
                 resources=dict(rt.learner_resources), scheduling_strategy="SPREAD", max_restarts=0)
        .remote(model=partial(build_model, cfg.model, role="learner"), train=cfg.train, batching=Batching.of(cfg), lora=cfg.lora,
                seed=cfg.seed, threads=actor_threads(rt, rt.learner_num_cpus), rank=rank, world_size=rt.num_learners,
                grpo=grpo_of(cfg), sharding=learner_sharding(cfg), reuse_snapshots=True)
    )


def _learner_group(cfg: RunConfig, index: int = 0) -> list:
    """``runtime.num_learners`` learner ranks, joined into one gradient group when there are several (NCCL on GPUs,
    gloo on CPUs: the backend each rank picks from its own device); rank 0 publishes and checkpoints."""
    ranks = [_learner_actor(cfg, index, r) for r in range(cfg.runtime.num_learners)]
    if len(ranks) > 1:
        backends = ray.get([r.weight_backend.remote() for r in ranks])
        if len(set(backends)) > 1:
            raise RuntimeError(f"learner ranks disagree on the backend ({backends}): give every rank a GPU "
                               "(runtime.learner_num_gpus) or none")
        nodes = ray.get([r.node_id.remote() for r in ranks])
        addr, port = ray.get(ranks[0].learner_group_address.remote(peers_on_this_node=len(set(nodes)) == 1))
        ray.get([r.join_learner_group.remote(master_addr=addr, master_port=port, backend=backends[0],
                                             timeout_s=cfg.runtime.weight_sync_timeout_s) for r in ranks])
    return ranks


def _reward_actor(cfg: RunConfig, index: int):
    rt = cfg.runtime
    return (
        ray.remote(RewardBatcher)
        .options(name=f"fdfo/reward/{index}", num_cpus=rt.reward_num_cpus, num_gpus=rt.reward_num_gpus,
                 resources=dict(rt.reward_resources), max_restarts=0)
        .remote(reward_spec={"name": "weighted_sum", "specs": reward_specs(cfg.reward)}, max_batch_size=rt.reward_max_batch,
                max_wait_s=rt.reward_max_wait_s, timeout_s=rt.reward_timeout_s,
                torch_threads=actor_threads(rt, rt.reward_num_cpus))
    )


def _sampler_actor(cfg: RunConfig, index: int):
    """A sampler actor. ``complete`` runs in its own concurrency group ("pack"): packing a job whose reward is still
    being computed never holds up the next ``sample`` call (sampling stays one call at a time). Samplers spread
    over the nodes that can hold them, so losing one node costs a share of the pool, not all of it."""
    rt = cfg.runtime
    return (
        ray.remote(concurrency_groups={"pack": 1})(Sampler)
        .options(name=f"fdfo/sampler/{index}", num_cpus=rt.sampler_num_cpus, num_gpus=rt.sampler_num_gpus,
                 resources=dict(rt.sampler_resources), scheduling_strategy="SPREAD", max_restarts=0)
        .remote(model=partial(build_model, cfg.model), sampling=cfg.sampling, lora=cfg.lora, index=index,
                precision=cfg.train.precision, threads=actor_threads(rt, rt.sampler_num_cpus), grpo=grpo_of(cfg))
    )


def check_sampler_count(rt) -> Rates | None:
    """The sampler pool's bounds, checked before anything starts; for ``num_samplers: auto`` the per-role rates it
    will be resolved with (``runtime.throughput``'s, else the reference's)."""
    if rt.num_samplers == "auto":
        if rt.max_samplers is not None and rt.max_samplers < 1:
            raise ValueError(f"runtime.max_samplers must be >= 1, got {rt.max_samplers}")
        return load_rates(rt.throughput)
    if rt.throughput is not None:
        raise ValueError(f"runtime.throughput ({rt.throughput}) is read only by runtime.num_samplers=auto, but "
                         f"num_samplers is {rt.num_samplers}: set num_samplers=auto or drop runtime.throughput")
    max_samplers = rt.max_samplers or rt.num_samplers
    if not 1 <= rt.num_samplers <= max_samplers:
        raise ValueError(f"need 1 <= runtime.num_samplers ({rt.num_samplers}) <= runtime.max_samplers ({max_samplers})")
    return None


def with_auto_samplers(cfg: RunConfig, resources: dict, rates: Rates) -> RunConfig:
    """``cfg`` with ``runtime.num_samplers: auto`` resolved on the cluster as it is now (``auto_samplers``); logged."""
    start, ceiling, why = auto_samplers(cfg, resources, rates)
    log.info("runtime.num_samplers=auto: %d sampler(s) at start, up to %d: %s", start, ceiling, why)
    return dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, num_samplers=start, max_samplers=ceiling))


def run_ray(cfg: RunConfig, resume: bool = False) -> dict:
    """Train through Ray actors until ``train.epochs`` epochs are done; returns history, ledger and paths."""
    setup_process(cfg)
    check_run(cfg)                                     # a bad reward or model config fails before any actor starts
    rt = cfg.runtime
    rates = check_sampler_count(rt)
    check_reward_pool(rt)
    if rt.num_learners < 1:
        raise ValueError(f"runtime.num_learners must be >= 1, got {rt.num_learners}")
    max_rewards = rt.max_reward_actors or rt.num_reward_actors
    samplers = 1 if rt.num_samplers == "auto" else (rt.max_samplers or rt.num_samplers)
    started = connect(rt, samplers * rt.sampler_num_cpus + max_rewards * rt.reward_num_cpus
                      + rt.num_learners * rt.learner_num_cpus)
    if rt.num_samplers == "auto":
        cfg = with_auto_samplers(cfg, ray.cluster_resources(), rates)
        rt = cfg.runtime
    await_resources(rt, can_scale=not started)
    run = RayRun(cfg, resume)
    try:
        run.book.start()
        while True:
            while run.book.running:                    # epochs left, and no early stop (the hacking guard's)
                if not run.start_update():
                    break                              # everything requested was dropped: nothing left to train on
                run.fill()
                for ref in run.wait():
                    if ref is run.learner_ref:
                        run.on_learner()
                    elif ref in run.rank_refs:
                        run.on_rank(ref)
                    elif ref in run.pool.joining:
                        run.on_joined(ref)
                    else:
                        run.on_job(ref)
            if run.book.stop_reason is not None or run.final_checkpoint():
                break                                  # else the learner was lost writing it: train the epochs since
    except KeyboardInterrupt:                          # Ctrl-C, or SIGTERM from `ray job stop` (cluster/cli.py)
        run.stop()
        raise
    else:
        run.finishing = True
        summary = run.book.finish()
        summary["samplers"] = run.close()
        summary["sampled_versions"] = dict(sorted(run.sampled.items()))
        summary["torch_threads"] = run.threads
        summary["learner_ranks"] = len(run.learner_ranks)
        summary["faults"] = run.faults
        for f in run.faults:
            log.info("fault: %s %s lost at epoch %d, replaced by %s", f["role"], f["lost"], f["epoch"], f["replaced_by"])
        return summary
    finally:
        run.kill()                                     # free the actors now, also when the run failed


def worst_lag(version: int, steps_left: int | None, ahead: int, b: Batching) -> int:
    """The largest lag a pair requested now reaches when trained: it is sampled with ``version`` (the newest
    published) and lands in the epoch that pair number ``ahead`` (counting the pairs ready or in flight before it)
    falls into; the next epoch starts once the running epoch's ``steps_left`` updates are done (None: none runs)."""
    start = version + (steps_left or 0)
    return start + (ahead // b.pairs_per_epoch + 1) * b.updates_per_epoch - 1 - version


class RayRun:
    """The Ray runtime's state: the actors, the requests in flight, the batches ready and the update running.
    Its methods are the distribution around the pipeline's stages; ``self.book`` keeps the books.

    Versions: the learner publishes after every optimizer step (object-store path: the step's ``Weights`` are put
    once and each sampler loads them at the start of its next call; collective path: one broadcast at the end of
    each epoch). ``self.version`` is the version the samplers' next calls sample with, ``self.checksums`` what
    the learner computed for every version, against which each job's proof is checked."""

    def __init__(self, cfg: RunConfig, resume: bool):
        self.cfg, self.rt = cfg, cfg.runtime
        self.max_samplers = self.rt.max_samplers or self.rt.num_samplers
        self.learner_ranks = _learner_group(cfg)          # rank 0 publishes, checkpoints and answers for the group
        self.learner = self.learner_ranks[0]
        self.rank_refs: list[ray.ObjectRef] = []         # the other ranks' share of the learner call in flight
        self.learner_index = 0                           # a replacement learner is fdfo/learner/<n>
        self.checkpoint: str | None = None               # the last checkpoint this run wrote or resumed from
        self.orphaned: set[tuple[int, str]] = set()      # (version, checksum) published by a learner since lost
        self.finishing = False                           # the final checkpoint and evaluation are being written
        self.service: RewardService | None = None       # the elastic reward pool (Serve), or fixed reward actors
        self.rewards = [] if uses_serve(self.rt) else [_reward_actor(cfg, i) for i in range(self.rt.num_reward_actors)]
        self.reward_index = len(self.rewards)            # names of replacements continue from here
        self.faults: list[dict] = []                     # what was lost and what replaced it (the faults report)
        self.pool = Pool()
        try:
            if uses_serve(self.rt):
                self.service = RewardService(cfg, threads=actor_threads(self.rt, self.rt.reward_num_cpus))
            sink = Metrics(cfg.name, Batching.of(cfg).images_per_unit)
            self.book = Book(cfg, evaluate=self.evaluate, save=self.save, resume=resume, sink=sink)
            if resume:
                self.book.resume(self._load)
            nbytes = ray.get(self.learner.trainable_bytes.remote())
            self.sync = WeightSync(self.learner, collective=use_collective(self.rt.weight_sync, nbytes),
                                   timeout_s=self.rt.weight_sync_timeout_s)
            self.version, checksum = ray.get(self.learner.weights_info.remote())
            self.checksums = {self.version: checksum}
            self.sampled: dict[int, int] = {}           # version -> sampler calls proven to have sampled with it
            # put once: every sampler reads this same object (the collective path keeps no copy)
            self.weights_ref = None if self.sync.collective else self.learner.weights.remote()
            self.book.version = self.book.last_checkpoint = self.version
            self.jobs: dict[ray.ObjectRef, Job] = {}
            # (Arrow batch ref, pairs, reward stats, first pair id, (version, checksum) it was sampled with)
            self.ready: list[tuple[ray.ObjectRef, int, dict, int, tuple[int, str]]] = []
            self.update: dict | None = None             # the epoch being updated: pairs, steps left, metrics so far
            self.learner_ref: ray.ObjectRef | None = None  # the learner call in flight (begin_epoch or update)
            self.waited_for_data = 0.0
            self.target = cfg.train.epochs * self.book.batching.pairs_per_epoch
            for _ in range(self.rt.num_samplers):
                self.add_sampler()
            self.threads = {"learner": ray.get(self.learner.torch_threads.remote()),
                            "reward": [s["torch_threads"] for s in self.reward_stats()]}
            log.info("weights: %.1f MiB per version via %s; torch threads: %s", nbytes / 2**20,
                     "a collective group" if self.sync.collective else "the object store", self.threads)
        except BaseException:
            self.kill()
            raise

    # -- the stages, scheduled ---------------------------------------------------------------------------------
    def start_update(self) -> bool:
        """Start an epoch's update when its pairs are ready. The last epoch waits until everything requested has
        landed and takes all of it, so a run never ends with pairs in flight. False: nothing left to train."""
        ledger, per_epoch = self.book.ledger, self.book.batching.pairs_per_epoch
        final = self.book.epoch == self.cfg.train.epochs - 1
        landed = ledger.requested - sum(ledger.dropped.values()) >= self.target and not self.jobs
        have = sum(r[1] for r in self.ready)
        if self.update is None and self.ready and ((have >= per_epoch and not final) or (final and landed)):
            take, n_take = [], 0
            while self.ready and (final or n_take < per_epoch):
                take.append(self.ready.pop(0))
                n_take += take[-1][1]
            # in request order, not arrival order: an epoch's update does not depend on which sampler finished first
            take.sort(key=lambda r: r[3])
            self.book.taken([r[2] for r in take])
            for r in take:                                   # staleness of each pair as its epoch's update starts
                self.book.sink.lags(self.book.version - r[4][0], r[1])
            refs = [ref for ref, *_ in take]
            self.learner_ref, *self.rank_refs = [r.begin_epoch.remote(*refs) for r in self.learner_ranks]  # update
            self.update = {"pairs": n_take, "left": self.book.batching.updates_per_epoch, "m": {},
                           "started": time.perf_counter(), "weights": None}
        return not (self.update is None and not self.ready and landed)

    def fill(self) -> None:
        """Keep samplers busy (two calls queued each) with pairs that will not be stale when trained: a request
        joins the epoch its queue position lands in, and is made only if that epoch's last update stays within
        ``train.max_policy_lag`` of the version it is sampled with (lock-step, ``runtime.overlap=false``: within
        ``updates_per_epoch - 1``, so nothing is sampled while the learner trains)."""
        ledger, b = self.book.ledger, self.book.batching
        lag_bound = b.max_policy_lag if self.rt.overlap else b.updates_per_epoch - 1
        ahead = sum(r[1] for r in self.ready) + sum(len(j.pair_ids) for j in self.jobs.values())
        for i, actor in list(self.pool.actors.items()):
            # requested - dropped = trained + ahead: what the run still needs is target minus that; a request never
            # straddles two epochs (its batch goes to one update)
            room = min(self.cfg.sampling.pairs_per_call, b.pairs_per_epoch - ahead % b.pairs_per_epoch,
                       self.target - (ledger.requested - sum(ledger.dropped.values())))
            lag = worst_lag(self.version, self.update["left"] if self.update else None, ahead, b)
            if room <= 0 or self.pool.busy[i] >= 2 or lag > lag_bound:
                continue
            req = self.book.request(room)
            ahead += len(req["pair_ids"])
            job_ref, images_ref = actor.sample.options(num_returns=2).remote(**req, newest=self.newest())  # sample
            prompts = [p for p in req["prompts"] for _ in range(b.images_per_unit)]
            if self.service is not None:                                                                # score
                reward, out_ref = None, self.service.score(images_ref, prompts)
            else:
                reward = self.rewards[req["pair_ids"][0] % len(self.rewards)]
                out_ref = reward.score.remote(images=images_ref, prompts=prompts)
            batch_ref, report_ref = actor.complete.options(num_returns=2, concurrency_group="pack").remote(
                job=job_ref, rewards=out_ref)                                                           # pack
            self.jobs[report_ref] = Job(i, req["pair_ids"], reward, job_ref, out_ref, batch_ref, report_ref)
            self.pool.busy[i] += 1

    def newest(self):
        """What a sample call carries: the newest published version and (inside a list, unresolved) the ref of its
        weights; None on the collective path (samplers hold what the last broadcast sent)."""
        return None if self.weights_ref is None else (self.version, self.checksums[self.version], [self.weights_ref])

    def wait(self) -> list:
        """Whatever finishes first: a sampler call's report or the learner's call."""
        waiting = list(self.jobs) + list(self.pool.joining) + self.rank_refs + (
            [self.learner_ref] if self.learner_ref is not None else [])
        if not waiting:
            raise RuntimeError(f"driver stalled with nothing in flight: {self.book.ledger.line()}, {len(self.ready)} "
                               f"batches ready, {len(self.pool.actors)} samplers; this is a bug, please report it with the config")
        t_wait = time.perf_counter()
        done, _ = ray.wait(waiting, num_returns=1, timeout=60.0)
        if self.update is None:
            self.waited_for_data += time.perf_counter() - t_wait
        return done

    def on_learner(self) -> None:
        """The learner answered: the epoch's plan (then its first step starts), or a step (then its weights are
        published and the next step starts, or the epoch closes)."""
        u, ref = self.update, self.learner_ref
        self.learner_ref = None
        try:
            out = ray.get(ref)
        except RayError as e:  # an input batch was lost with its node, or the learner died
            if self.learner_rank_died(e):
                self.lose_learner()
                return
            if isinstance(e, RayActorError) or u["m"]:
                raise
            log.warning("epoch lost its inputs (%r); %d pairs counted as actor_lost", e, u["pairs"])
            self.book.drop("actor_lost", u["pairs"])
            self.update = None
            return
        first = not u["m"]
        self.book.timers.add("publish", out.pop("perf/publish_s", 0.0))   # the learner's snapshot of a version
        u["m"].update(out)
        if first:
            u["left"] = out["updates"]
        else:
            u["left"] -= 1
            self.checksums[out["learner/version"]] = out["checksum"]
            if not self.sync.collective:                       # publish: the samplers' next calls load it
                self.version, self.weights_ref = out["learner/version"], u["weights"]
        if u["left"]:
            info, u["weights"] = self.learner.update.options(num_returns=2).remote(publish=not self.sync.collective)
            self.learner_ref = info
            self.rank_refs += [r.update.options(num_returns=2).remote(publish=False)[0] for r in self.learner_ranks[1:]]
        else:
            with deferred_interrupts():              # the epoch is recorded whole before a stop takes effect
                self.end_epoch()

    def end_epoch(self) -> None:
        """The epoch's last step is done: count it, broadcast it on the collective path, close the epoch."""
        u, self.update = self.update, None
        m = u["m"]
        step_s = time.perf_counter() - u["started"]
        if not self.book.updated(m):          # every pair was stale: no update, not an epoch
            log.info("all pairs of the batch were stale (max_policy_lag %d); sampling again", self.book.batching.max_policy_lag)
            return
        if self.sync.collective:
            self.version = self.book.version
            with self.book.timers("publish"):
                self.sync.broadcast(self.pool, self.version, self.book.checksum)           # publish
            while self.sync.lost:
                self.lose_sampler(self.sync.lost.pop())
        stats = self.reward_stats()
        m.update({
            "perf/learner_step_s": step_s / max(m.get("updates", 1), 1),
            "perf/learner_waited_for_data_s": self.waited_for_data,
            "reward/latency_s": finite_mean([s["mean_latency_s"] for s in stats]),   # NaN: a pool just replaced
            "reward/backlog": float(sum(s["backlog"] for s in stats)),
            "runtime/samplers": self.pool.size(),                  # working or still joining
            "runtime/samplers_joining": len(self.pool.joining),
            "runtime/reward_replicas": self.service.replicas() if self.service is not None else len(self.rewards),
        })
        self.book.end_epoch(m)
        if self.book.running:                          # the pool changes only while there is sampling left to do
            self.autoscale(step_s)

    def on_job(self, ref) -> None:
        """A sampler call finished (scored and packed, or lost): its pairs join the ready batches or are dropped."""
        job = self.jobs.pop(ref)
        if job.sampler in self.pool.busy:
            self.pool.busy[job.sampler] -= 1
        try:
            report = ray.get(job.report_ref)
        except RayActorError as e:
            self.book.drop("actor_lost", len(job.pair_ids))
            sampler = self.pool.actors.get(job.sampler)
            if sampler is None or e.actor_id == sampler._actor_id.hex():
                self.lose_sampler(job.sampler)
            else:                  # the reward actor (or Serve replica, which Serve replaces) died: the sampler lives
                if job.reward is not None:
                    self.lose_reward(job.reward)
                self.forget(job)
            return
        except RayError as e:  # the reward actor failed this request, or an input was lost with its node
            lost = isinstance(e, (ObjectLostError, OwnerDiedError))
            log.warning("%s for %d pairs: %s", "an input was lost with its node" if lost else "reward request failed",
                        len(job.pair_ids), e)
            self.book.drop("actor_lost" if lost else "reward_failure", len(job.pair_ids))
            self.forget(job)
            return
        sampled_with = (report["version"], report["checksum"])
        orphan = sampled_with in self.orphaned         # sampled with a version a lost learner published
        if not orphan:
            check_proof(report | {"sampler": job.sampler}, report["version"], self.checksums.get(report["version"]))
            self.sampled[report["version"]] = self.sampled.get(report["version"], 0) + 1
        if report["load_s"] > 0:                       # this call loaded a newly published version
            self.book.sink.loaded(report["load_s"])
        out = ray.get(job.out_ref)
        self.book.timers.add("score", _score_seconds(out))
        kept, stats = self.book.packed(job.pair_ids, out, report)
        if orphan:
            self.book.drop("stale", kept)              # its policy is gone with the learner: not trained on
        elif kept:
            self.ready.append((job.batch_ref, kept, stats, job.pair_ids[0], sampled_with))

    # -- lost actors and the sampler pool ----------------------------------------------------------------------------
    def lose_reward(self, dead) -> None:
        """A reward actor died: its requests in flight fail their pairs (``actor_lost``, each as its job reports);
        a replacement takes its place (once, however many jobs report the death)."""
        if dead not in self.rewards:
            return
        k = self.rewards.index(dead)
        self.rewards[k] = _reward_actor(self.cfg, self.reward_index)
        self.faults.append({"role": "reward", "lost": k, "replaced_by": self.reward_index, "epoch": self.book.epoch})
        log.warning("reward actor %d lost; replaced by fdfo/reward/%d", k, self.reward_index)
        self.reward_index += 1

    def learner_rank_died(self, e: BaseException) -> bool:
        """Whether ``e`` says a learner rank died (any rank: a group missing one cannot step), or a rank's collective
        broke because a peer did."""
        if isinstance(e, LearnerGroupBroken):
            return True
        return isinstance(e, RayActorError) and e.actor_id in {r._actor_id.hex() for r in self.learner_ranks}

    def on_rank(self, ref) -> None:
        """Another rank finished its share of the learner call (rank 0's answer stands for the group); a rank that
        died takes the group down: it restarts from the last checkpoint."""
        self.rank_refs.remove(ref)
        try:
            ray.get(ref)
        except RayError as e:
            if not self.learner_rank_died(e):
                raise
            self.lose_learner()

    def lose_learner(self) -> None:
        """The learner died: a new one restores the last checkpoint this run wrote or resumed from (the starting
        weights if none), and the run goes on from there: the epochs since are trained again with new pairs (the
        pairs they had trained count ``rolled_back``), the epoch being updated is lost with its pairs
        (``actor_lost``), every sampler loads the restored version, and pairs sampled with a version the lost
        learner published are dropped as ``stale`` (ready, or when they land)."""
        t0, lost_epoch, lost_version = time.perf_counter(), self.book.epoch, self.book.version
        u, self.update, self.learner_ref = self.update, None, None
        if u is not None:
            self.book.drop("actor_lost", u["pairs"])
        for rank in self.learner_ranks:
            ray.kill(rank)
        self.rank_refs = []
        self.learner_index += 1
        self.learner_ranks = _learner_group(self.cfg, self.learner_index)
        self.learner = self.learner_ranks[0]
        state = self._load(self.checkpoint) if self.checkpoint else {"epoch": 0, "ledger": {"pairs_trained": 0}}
        version, checksum = ray.get(self.learner.weights_info.remote())
        self.orphaned |= {(v, c) for v, c in self.checksums.items() if v > version or (v == version and c != checksum)}
        self.checksums = {v: c for v, c in self.checksums.items() if v < version} | {version: checksum}
        b = self.book
        rolled_back = b.ledger.trained - state["ledger"]["pairs_trained"]
        b.ledger.trained -= rolled_back
        b.drop("rolled_back", rolled_back)
        b.history = [h for h in b.history if h["epoch"] < state["epoch"]]
        b.epoch, b.version, b.checksum, b.last_checkpoint, b.rewards = state["epoch"], version, checksum, version, {}
        if b.progress is not None:
            b.progress.n = b.epoch
        for r in [r for r in self.ready if r[4] in self.orphaned]:
            self.ready.remove(r)
            b.drop("stale", r[1])
        self.version = version
        self.sync.learner, self.sync.members_changed = self.learner, True
        ref = self.sync.broadcast(self.pool, version, checksum)             # every sampler on the restored version
        if not self.sync.collective:
            self.weights_ref = ref
        while self.sync.lost:
            self.lose_sampler(self.sync.lost.pop())
        fault = {"role": "learner", "lost": self.learner_index - 1, "replaced_by": self.learner_index,
                 "epoch": lost_epoch, "lost_version": lost_version, "restored_from": self.checkpoint,
                 "restored_version": version, "restored_epoch": b.epoch, "rolled_back_pairs": rolled_back,
                 "recover_s": round(time.perf_counter() - t0, 3)}
        self.faults.append(fault)
        log.warning("learner lost at epoch %d (version %d); fdfo/learner/%d restored version %d (epoch %d) from %s in "
                    "%.1f s; %d trained pairs rolled back", lost_epoch, lost_version, self.learner_index, version,
                    b.epoch, self.checkpoint or "the starting weights", fault["recover_s"], rolled_back)

    def reward_stats(self) -> list[dict]:
        """Each reward actor's counters (one replica's for a Serve pool); one that died since is replaced (its
        counters are gone with it)."""
        if self.service is not None:
            try:
                return [self.service.stats()]
            except RayError as e:
                log.warning("reward pool stats unavailable: %r", e)
                return [{"mean_latency_s": float("nan"), "backlog": 0, "torch_threads": None}]
        stats = []
        for r in list(self.rewards):
            try:
                stats.append(ray.get(r.stats.remote()))
            except RayActorError:
                self.lose_reward(r)
        return stats or [{"mean_latency_s": float("nan"), "backlog": 0}]

    def add_sampler(self) -> None:
        """A new sampler actor. On the object-store path it joins without blocking the driver: it gets work once its
        first load of the newest version is proven (``on_joined``), so a slow start (a model loading, a node being
        provisioned) holds up nobody and no pairs. On the collective path it loads the learner's current weights
        first (a formed group cannot take a late member; the next broadcast re-forms it)."""
        i = self.pool.next_index
        self.pool.next_index += 1
        actor = _sampler_actor(self.cfg, i)
        if not self.sync.collective:
            self.pool.joining[actor.set_weights.remote(weights=self.weights_ref)] = (i, actor)
            return
        proof = ray.get(actor.set_weights.remote(weights=self.learner.weights.remote()))
        if proof["version"] < self.version:
            raise RuntimeError(f"late sampler {i} loaded version {proof['version']}, older than {self.version}")
        self.checksums.setdefault(proof["version"], proof["checksum"])
        self.pool.actors[i], self.pool.busy[i] = actor, 0
        self.sync.members_changed = True

    def on_joined(self, ref) -> None:
        """A joining sampler answered its first load: it joins the pool (proof checked), or it died and is replaced."""
        i, actor = self.pool.joining.pop(ref)
        try:
            proof = ray.get(ref)
        except RayActorError as e:
            log.warning("sampler %d died while starting (%s)", i, e)
            self.lose_sampler(i)
            return
        if (proof["version"], proof["checksum"]) in self.orphaned:   # it loaded what a lost learner published
            self.pool.joining[actor.set_weights.remote(weights=self.weights_ref)] = (i, actor)
            return
        check_proof(proof, proof["version"], self.checksums.get(proof["version"]))
        self.pool.actors[i], self.pool.busy[i] = actor, 0
        self.sync.members_changed = True

    def lose_sampler(self, i: int) -> None:
        """Sampler i died: its other requests in flight are lost with it; replace it up to the pool's minimum."""
        self.sync.members_changed = True
        self.pool.actors.pop(i, None)
        self.pool.busy.pop(i, None)
        for ref, job in list(self.jobs.items()):
            if job.sampler == i:
                self.jobs.pop(ref)
                self.book.drop("actor_lost", len(job.pair_ids))
        log.warning("sampler %d lost; %d samplers left", i, len(self.pool.actors))
        replaced = []
        while self.pool.size() < self.rt.num_samplers:
            replaced.append(self.pool.next_index)
            self.add_sampler()
        self.faults.append({"role": "sampler", "lost": i, "replaced_by": replaced, "epoch": self.book.epoch})

    def autoscale(self, step_s: float) -> None:
        """Add a sampler when the learner waited for data longer than it trained; release an idle one when the
        learner is the bottleneck (it never waited)."""
        pool = self.pool
        if self.waited_for_data > step_s and pool.size() < self.max_samplers:
            self.add_sampler()
            log.info("autoscale: learner waited %.1fs for data (step %.1fs): %d samplers", self.waited_for_data, step_s,
                     pool.size())
        elif self.waited_for_data == 0.0 and len(pool.actors) > self.rt.num_samplers:
            busy = {j.sampler for j in self.jobs.values()}
            idle = [i for i, b in pool.busy.items() if b == 0 and i not in busy]
            if idle:
                i = idle[-1]
                ray.kill(pool.actors.pop(i))
                pool.busy.pop(i)
                self.sync.members_changed = True
                log.info("autoscale: learner is the bottleneck: released sampler %d, %d left", i, len(pool.actors))
        self.waited_for_data = 0.0

    def forget(self, job: Job) -> None:
        """Free the trajectories a sampler holds for a job whose rewards will never come."""
        actor = self.pool.actors.get(job.sampler)
        if actor is not None:
            actor.forget.remote(job=job.job_ref)

    # -- what the book calls -------------------------------------------------------------------------------------
    def evaluate(self, png) -> dict:
        """Held-out evaluation on a sampler (the current weights) and the first reward actor; one that dies meanwhile
        is replaced and its call made again on another."""
        def gen(prompts, seeds, steps):
            while True:
                while not self.pool.actors:            # at the start (or after a loss) every sampler may be joining
                    self.on_joined(ray.wait(list(self.pool.joining), num_returns=1)[0][0])
                i, sampler = next(iter(self.pool.actors.items()))
                try:
                    return ray.get(sampler.generate.remote(prompts=prompts, seeds=seeds, num_steps=steps, newest=self.newest()))
                except RayActorError:
                    self.lose_sampler(i)

        def score(images, prompts):
            if self.service is not None:
                return ray.get(self.service.score(images, prompts))
            while True:
                reward = self.rewards[0]
                try:
                    return ray.get(reward.score.remote(images=images, prompts=prompts))
                except RayActorError:
                    self.lose_reward(reward)

        return heldout_reward(self.cfg, gen, score, png)

    def save(self, epoch: int) -> str:
        """Checkpoint the learner (rank 0 writes; a sharded group's every rank takes part in gathering the weights and
        AdamW moments); one that dies meanwhile is restored from the previous checkpoint (the epochs since are trained
        again: ``final_checkpoint`` too), except once the run is finishing (a graceful stop's checkpoint, or an early
        stop's), which fails the run (``--resume`` continues it)."""
        ranks = self.learner_ranks if learner_sharding(self.cfg) == "fsdp" else [self.learner]
        state, config = self.book.state(epoch), to_dict(self.cfg)
        try:
            self.checkpoint = ray.get([r.save.remote(self.book.runlog.location, state, config) for r in ranks])[0]
        except (RayActorError, LearnerGroupBroken) as e:
            if self.finishing or not self.learner_rank_died(e):
                raise
            self.lose_learner()
        return self.checkpoint

    def final_checkpoint(self) -> bool:
        """The last epoch's checkpoint, written before the report (``Book.finish`` then keeps it) unless the epoch's
        cadence wrote it. A learner lost meanwhile (its node removed as the run ends) is restored from the previous
        checkpoint as one lost mid-run (``save``): False, and the run trains the epochs since again."""
        b, learner = self.book, self.learner_index
        if b.saved is not None and b.saved[0] == b.version:
            return True
        folder = self.save(b.epoch)
        if self.learner_index != learner:
            return False
        b.saved = (b.version, folder)
        return True

    def _load(self, folder: str) -> dict:
        """Restore the learner from a checkpoint folder; it becomes the one a lost learner restarts from."""
        state = ray.get([r.load.remote(folder) for r in self.learner_ranks])[0]     # every rank: replicated state
        self.checkpoint = folder
        return state

    def close(self) -> list[dict]:
        """Every sampler brought to the final version (on the object-store path samplers load versions lazily) and
        its proof of what it holds; the weight group closed."""
        if self.pool.joining:                         # one the pool grew by at the end: take it in if it has started
            ready, pending = ray.wait(list(self.pool.joining), num_returns=len(self.pool.joining), timeout=30.0)
            for ref in ready:
                self.on_joined(ref)
            for ref in pending:                       # never placed (no node for it): it never did any work
                i, actor = self.pool.joining.pop(ref)
                log.warning("sampler %d never started (no node could hold it); released", i)
                ray.kill(actor)
        for i, actor in list(self.pool.actors.items()):   # a sampler lost at the very end (its node gone) is let go:
            try:                                          # its work is done and accounted; the others prove their weights
                if self.weights_ref is not None:
                    check_proof(ray.get(actor.set_weights.remote(weights=self.weights_ref)), self.version,
                                self.checksums[self.version])
            except RayActorError:
                log.warning("sampler %d was lost after the last epoch; the run's books are complete without it", i)
                del self.pool.actors[i]
        samplers = ray.get([self.pool.actors[i].status.remote() for i in sorted(self.pool.actors)])
        self.sync.close(self.pool)
        return samplers

    def stop(self) -> None:
        """A graceful stop: the epoch being updated is finished (half an epoch's steps would not resume exactly),
        then a checkpoint is written and the accounting line logged; pairs still in flight are counted
        ``interrupted`` when the run resumes."""
        while self.update is not None and self.learner_ref is not None:
            ray.wait([self.learner_ref])
            self.on_learner()
        folder = self.save(self.book.epoch)
        log.warning("stopped at epoch %d (version %d): checkpoint %s; %s", self.book.epoch, self.book.version, folder,
                    self.book.ledger.line())

    def kill(self) -> None:
        """Release every actor now, not at garbage collection (their names and resources free at once)."""
        for handle in [*self.learner_ranks, *self.rewards, *self.pool.actors.values(), *(a for _, a in self.pool.joining.values())]:
            ray.kill(handle)
        if self.service is not None:
            self.service.stop()


def _score_seconds(out) -> float:
    """This request's share of the reward actor's scorer time: each batch's latency split by images served."""
    parts = out.info.get("chunks") or [out.info]
    return sum(p["batch"]["latency_s"] * len(p["reasons"]) / p["batch"]["size"] for p in parts if "batch" in p)


# "auto" sends weights of this size or more through a collective group: every sampler reading its own copy out of the
# object store stays cheap for LoRA factors and small full models (bench/bench_broadcast.py), not for GBs.
AUTO_COLLECTIVE_BYTES = 512 * 2**20


def use_collective(mode: str, nbytes: int) -> bool:
    """runtime.weight_sync: "collective", "object_store", or "auto" (collective from ``AUTO_COLLECTIVE_BYTES``)."""
    return mode == "collective" or (mode == "auto" and nbytes >= AUTO_COLLECTIVE_BYTES)


class WeightSync:
    """Versioned weight broadcast. LoRA (tens of MB): ``ray.put`` once via ``learner.weights()``, every sampler
    loads the same object. Full weights: a gloo (CPU) / NCCL (GPU) group between the learner and the samplers,
    re-formed as a new generation whenever the sampler set changed. Either way each sampler returns the
    version and checksum it now holds, and a mismatch stops the run."""

    def __init__(self, learner, collective: bool, timeout_s: float = 120.0):
        self.learner = learner
        self.collective = collective
        self.timeout_s = timeout_s                       # of every collective call: how long a dead member can stall it
        self.members_changed = True
        self.members: list[int] = []
        self.address: tuple[str, int] | None = None    # (host, port) of the current generation's rendezvous
        self.lost: list[int] = []                        # samplers found dead by a broadcast, for the runtime to replace

    def _form(self, pool: Pool) -> None:
        self.members = sorted(pool.actors)
        # each member picks its backend from its own device (NCCL on a GPU, gloo on a CPU); they must agree
        picks = ray.get([self.learner.weight_backend.remote()] + [pool.actors[i].weight_backend.remote() for i in self.members])
        if len(set(picks)) > 1:
            raise RuntimeError(f"weight group members disagree on the backend (learner {picks[0]}, samplers {picks[1:]}): "
                               "put the learner and every sampler on GPUs (NCCL) or all on CPUs (gloo), or set "
                               "runtime.weight_sync=object_store")
        backend = picks[0]
        world = 1 + len(self.members)
        # The rendezvous store has no authentication of its own: it listens on loopback when every member shares
        # the learner's machine, and on the node's cluster address only when some member is elsewhere.
        nodes = ray.get([self.learner.node_id.remote()] + [pool.actors[i].node_id.remote() for i in self.members])
        addr, port = ray.get(self.learner.weight_group_address.remote(peers_on_this_node=len(set(nodes)) == 1))
        self.address = (addr, port)
        log.info("weight group: %d ranks, rendezvous at %s:%d", world, addr, port)
        joins = [self.learner.join_weight_group.remote(world_size=world, master_addr=addr, master_port=port, backend=backend,
                                                       timeout_s=self.timeout_s)]
        joins += [pool.actors[i].join_weight_group.remote(rank=r + 1, world_size=world, master_addr=addr,
                                                          master_port=port, backend=backend, timeout_s=self.timeout_s)
                  for r, i in enumerate(self.members)]
        ray.get(joins)                              # every rank must be joining at once
        self.members_changed = False

    def broadcast(self, pool: Pool, version: int, checksum: str):
        """Bring every sampler to ``version``; returns the object-store ref of the weights if that path was used."""
        if self.collective and pool.actors:
            try:
                if self.members_changed or sorted(pool.actors) != self.members:
                    self._form(pool)
                sent = self.learner.send_weights.remote()
                proofs = ray.get([pool.actors[i].receive_weights.remote() for i in self.members] + [sent])
                for p in proofs[:-1]:
                    check_proof(p, version, checksum)
                return None
            except RayError as e:  # a member died mid-transfer: re-form next time, deliver this version by object store
                log.warning("collective weight broadcast failed (%s); falling back to the object store", e)
                self.members_changed = True
        ref = self.learner.weights.remote()
        calls = {i: a.set_weights.remote(weights=ref) for i, a in pool.actors.items()}
        for i, call in calls.items():
            try:
                check_proof(ray.get(call), version, checksum)
            except RayActorError:     # gone before the driver noticed: the runtime replaces it (``lost``)
                self.lost.append(i)
                self.members_changed = True
        return ref

    def close(self, pool: Pool) -> None:
        if self.collective and self.members:
            ray.get([self.learner.leave_weight_group.remote()] +
                    [pool.actors[i].leave_weight_group.remote() for i in self.members if i in pool.actors])
