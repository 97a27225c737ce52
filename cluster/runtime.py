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
gloo/NCCL group once an epoch instead (every sampler must take part in a transfer). With ``runtime.placement: hybrid``
the learner ranks are hybrid workers (cluster/hybrid.py) and the sampler pool's members: nothing is published to them
(``InPlace``), and a lost worker is a lost learner rank (the group restarts; the pool takes its new workers).
Ray token authentication is switched on (``RAY_AUTH_MODE=token``) unless the environment says otherwise.

The parts ``RayRun`` schedules, each with one job: ``SamplerPool`` (cluster/sampler_pool.py), ``RewardPool``
(cluster/reward_pool.py), ``LearnerGroup`` (cluster/learner_group.py), ``LearnerRecovery`` (its checkpoints and
restart, cluster/recovery.py), ``Published`` and ``WeightSync`` (cluster/weight_sync.py), ``ReadyBatches``
(cluster/ready.py); ``connect`` and the resource checks are
cluster/resources.py, metrics cluster/metrics.py. The records it keeps are dataclasses: ``Job`` (a call in flight),
``ReadyBatch``, ``EpochUpdate``.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "token")  # must precede `import ray`

import logging
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError, RayError

from cluster.build import check_run
from cluster.config import Batching, RunConfig
from cluster.evaluate import heldout_reward
from cluster.hybrid import form_workers, workers_of
from cluster.learner_group import LearnerGroup, form_group
from cluster.metrics import Metrics
from cluster.pipeline import Book, deferred_interrupts, setup_process
from cluster.ready import ReadyBatch, ReadyBatches
from cluster.recovery import LearnerRecovery
from cluster.resources import await_resources, connect, resource_shortfall
from cluster.reward_pool import RewardPool, score_seconds
from cluster.sampler_pool import Job, SamplerPool, check_sampler_count, with_auto_samplers
from cluster.serving import check_reward_pool
from cluster.weight_sync import start_publishing
from learner.learner import finite_mean

# resource_shortfall: tests/cluster/test_connect.py reads the resource checks through this module, as before the split
__all__ = ["run_ray", "worst_lag", "RayRun", "EpochUpdate", "connect", "await_resources", "resource_shortfall"]

log = logging.getLogger("fdfo")


def run_ray(cfg: RunConfig, resume: bool = False) -> dict:
    """Train through Ray actors until ``train.epochs`` epochs are done; returns history, ledger and paths."""
    setup_process(cfg)
    check_run(cfg)  # a bad reward or model config fails before any actor starts
    rt = cfg.runtime
    rates = check_sampler_count(rt)
    check_reward_pool(rt)
    if rt.learner.count < 1:
        raise ValueError(f"runtime.learner.count must be >= 1, got {rt.learner.count}")
    max_rewards = rt.reward.max_count or rt.reward.count
    samplers = 1 if rt.sampler.count == "auto" else (rt.sampler.max_count or rt.sampler.count)
    samplers *= rt.placement == "split"  # hybrid: the learner ranks sample
    started = connect(
        rt, samplers * rt.sampler.num_cpus + max_rewards * rt.reward.num_cpus + rt.learner.count * rt.learner.num_cpus
    )
    if rt.sampler.count == "auto":
        cfg = with_auto_samplers(cfg, ray.cluster_resources(), rates)
        rt = cfg.runtime
    await_resources(rt, can_scale=not started)
    run = RayRun(cfg, resume)
    try:
        run.book.start()
        while True:
            while run.book.running:  # epochs left, and no early stop (the hacking guard's)
                if not run.start_update():
                    break  # everything requested was dropped: nothing left to train on
                run.request_pairs()
                for ref in run.wait():
                    if ref is run.learner_ref:
                        run.on_learner()
                    elif run.learners.owns(ref):
                        if not run.learners.on_rank(ref):
                            run.recovery.lose_learner()
                    elif run.samplers.is_joining(ref):
                        run.samplers.on_joined(ref)
                    else:
                        run.on_job(ref)
            if run.book.stop_reason is not None or run.recovery.final_checkpoint():
                break  # else the learner was lost writing it: train the epochs since
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from `ray job stop` (cluster/cli.py)
        run.stop()
        raise
    else:
        run.recovery.finishing = True
        summary = run.book.finish()
        summary["samplers"] = run.samplers.close()
        summary["sampled_versions"] = dict(sorted(run.published.sampled.items()))
        summary["torch_threads"] = run.threads
        summary["learner_ranks"] = len(run.learners.ranks)
        summary["faults"] = run.faults
        for fault in run.faults:
            log.info(
                "fault: %s %s lost at epoch %d, replaced by %s",
                fault["role"],
                fault["lost"],
                fault["epoch"],
                fault["replaced_by"],
            )
        return summary
    finally:
        run.kill()  # free the actors now, also when the run failed


def worst_lag(
    version: int, steps_left: int | None, ahead: int, batching: Batching, epochs_to_start: int | None = None
) -> int:
    """The largest lag a pair requested now reaches when trained: it is sampled with ``version`` (the newest
    published) and lands in the epoch that pair number ``ahead`` (counting the pairs ready or in flight before it)
    falls into, but never past the last of the ``epochs_to_start`` epochs not yet started (the final epoch takes
    every pair left: after drops it can hold more than one epoch's worth; None: no end in sight); the next epoch
    starts once the running epoch's ``steps_left`` updates are done (None: none runs)."""
    start = version + (steps_left or 0)
    later = ahead // batching.pairs_per_epoch  # epochs after the next one
    if epochs_to_start is not None:
        later = min(later, max(epochs_to_start - 1, 0))
    return start + (later + 1) * batching.updates_per_epoch - 1 - version


@dataclass
class EpochUpdate:
    """The epoch being updated: ``begin_epoch``, then one learner call per optimizer step."""

    pairs: int  # the pairs its batches hold
    steps_left: int  # optimizer steps still to answer (the planned count once begin_epoch answers)
    started: float  # perf_counter when it began
    metrics: dict = field(default_factory=dict)  # what the learner answered so far (empty until begin_epoch's plan)
    weights: ray.ObjectRef | None = None  # the Weights of the step in flight, published when it answers


class RayRun:
    """The scheduler: it sends the pipeline's stages to its parts (``samplers``, ``rewards``, ``learners``,
    ``published``, ``sync``) and reacts to whatever finishes first; ``book`` keeps the books, ``ready`` holds the
    scored batches that wait for their epoch and ``update`` is the epoch being updated."""

    def __init__(self, cfg: RunConfig, resume: bool):
        self.cfg, self.rt = cfg, cfg.runtime
        self.faults: list[dict] = []  # what was lost and what replaced it (the faults report)
        self.hybrid = self.rt.placement == "hybrid"  # the learner ranks are workers, the sampler pool's members too
        self.learners = LearnerGroup(cfg, form=form_workers if self.hybrid else form_group)
        self.rewards = self.samplers = None
        try:
            sink = Metrics(cfg.name, Batching.of(cfg).images_per_unit)

            def save(epoch: int) -> str:  # Book's hook; the recovery part is built once the parts it acts on are
                return self.recovery.save(epoch)

            self.book = Book(cfg, evaluate=self.evaluate, save=save, resume=resume, sink=sink)
            self.rewards = RewardPool(cfg, self.book, self.faults)
            if resume:
                self.book.resume(self.learners.load)
            self.sync, self.published, nbytes = start_publishing(self.learners.lead, self.rt, self.hybrid)
            self.book.version = self.book.last_checkpoint = self.published.version
            self.samplers = SamplerPool(cfg, self.book, self.published, self.sync, self.faults)
            self.ready = ReadyBatches()
            self.recovery = LearnerRecovery(
                cfg,
                self.book,
                self.learners,
                self.published,
                self.samplers,
                self.ready,
                self.sync,
                self.faults,
                drop_update=self.drop_update,
            )
            self.update: EpochUpdate | None = None
            self.learner_ref: ray.ObjectRef | None = None  # rank 0's call in flight (begin_epoch or update)
            self.waited_for_data = 0.0
            self.target = cfg.train.epochs * self.book.batching.pairs_per_epoch
            if self.hybrid:
                self.samplers.adopt(workers_of(self.learners))
            for _ in range(0 if self.hybrid else self.rt.sampler.count):
                self.samplers.add()
            self.threads = {
                "learner": ray.get(self.learners.lead.torch_threads.remote()),
                "reward": [s["torch_threads"] for s in self.rewards.stats()],
            }
            log.info(
                "weights: %.1f MiB per version via %s; torch threads: %s",
                nbytes / 2**20,
                self.sync.path,
                self.threads,
            )
        except BaseException:
            self.kill()
            raise

    # -- the stages, scheduled ---------------------------------------------------------------------------------
    def start_update(self) -> bool:
        """Start an epoch's update when its pairs are ready. The last epoch waits until everything requested has
        landed and takes all of it, so a run never ends with pairs in flight. False: nothing left to train."""
        book, per_epoch = self.book, self.book.batching.pairs_per_epoch
        final = book.epoch == self.cfg.train.epochs - 1
        landed = book.ledger.requested - sum(book.ledger.dropped.values()) >= self.target and not self.samplers.jobs
        have = self.ready.pairs()
        if self.update is None and self.ready and ((have >= per_epoch and not final) or (final and landed)):
            taken = self.ready.take(None if final else per_epoch)  # the final epoch takes every batch
            book.stats.add_rewards([batch.stats for batch in taken])
            for batch in taken:  # staleness of each pair as its epoch's update starts
                book.sink.lags(book.version - batch.sampled_with[0], batch.pairs)
            self.learner_ref = self.learners.begin_epoch([batch.batch_ref for batch in taken])  # update
            self.update = EpochUpdate(
                sum(batch.pairs for batch in taken), book.batching.updates_per_epoch, started=time.perf_counter()
            )
        return not (self.update is None and not self.ready and landed)

    def request_pairs(self) -> None:
        """Keep samplers busy (two calls queued each) with pairs that will not be stale when trained: a request
        joins the epoch its queue position lands in, and is made only if that epoch's last update stays within
        ``train.max_policy_lag`` of the version it is sampled with (lock-step, ``runtime.overlap=false``: within
        ``updates_per_epoch - 1``, so nothing is sampled while the learner trains)."""
        ledger, batching = self.book.ledger, self.book.batching
        lag_bound = batching.max_policy_lag if self.rt.overlap else batching.updates_per_epoch - 1
        ahead = self.ready.pairs() + self.samplers.pairs_in_flight()
        for index, sampler in self.samplers.with_room():
            # requested - dropped = trained + ahead: what the run still needs is target minus that; a request never
            # straddles two epochs (its batch goes to one update)
            room = min(
                self.cfg.sampling.pairs_per_call,
                batching.pairs_per_epoch - ahead % batching.pairs_per_epoch,
                self.target - (ledger.requested - sum(ledger.dropped.values())),
            )
            steps_left = self.update.steps_left if self.update else None
            to_start = self.cfg.train.epochs - self.book.epoch - (self.update is not None)
            lag = worst_lag(self.published.version, steps_left, ahead, batching, to_start)
            if room <= 0 or lag > lag_bound:
                continue
            req = self.book.request(room)
            ahead += len(req["pair_ids"])
            job_ref, images_ref = sampler.sample.options(num_returns=2).remote(**req, newest=self.published.to_load())
            prompts = [p for p in req["prompts"] for _ in range(batching.images_per_unit)]  # sample
            out_ref = self.rewards.score(images_ref, prompts, route=req["pair_ids"][0])  # score
            batch_ref, report_ref = sampler.complete.options(num_returns=2, concurrency_group="pack").remote(
                job=job_ref, rewards=out_ref
            )  # pack
            self.samplers.track(Job(index, req["pair_ids"], job_ref, out_ref, batch_ref, report_ref))

    def wait(self) -> list:
        """Whatever finishes first: a sampler call's report, a joining sampler's first load or a learner call."""
        waiting = (
            self.samplers.pending()
            + self.learners.rank_refs
            + ([self.learner_ref] if self.learner_ref is not None else [])
        )
        if not waiting:
            raise RuntimeError(
                f"driver stalled with nothing in flight: {self.book.ledger.line()}, {len(self.ready)} "
                f"batches ready, {self.samplers.size()} samplers; this is a bug, please report it "
                "with the config"
            )
        t_wait = time.perf_counter()
        done, _ = ray.wait(waiting, num_returns=1, timeout=60.0)
        if self.update is None:
            self.waited_for_data += time.perf_counter() - t_wait
        return done

    def on_learner(self) -> None:
        """The learner answered: the epoch's plan (then its first step starts), or a step (then its weights are
        published and the next step starts, or the epoch closes)."""
        update, ref, self.learner_ref = self.update, self.learner_ref, None
        try:
            out = ray.get(ref)
        except RayError as e:  # an input batch was lost with its node, or the learner died
            if self.learners.died(e):
                self.recovery.lose_learner()
                return
            if isinstance(e, RayActorError) or update.metrics:
                raise
            log.warning("epoch lost its inputs (%r); %d pairs counted as actor_lost", e, update.pairs)
            self.book.drop("actor_lost", update.pairs)
            self.update = None
            return
        first = not update.metrics
        self.book.timers.add("publish", out.pop("perf/publish_s", 0.0))  # the learner's snapshot of a version
        update.metrics.update(out)
        if first:
            update.steps_left = out["updates"]
        else:
            update.steps_left -= 1
            self.published.record(out["learner/version"], out["checksum"])
            if not self.sync.collective:  # publish: the samplers' next calls load it (hybrid workers hold it)
                self.published.publish(out["learner/version"], update.weights)
        if update.steps_left:
            self.learner_ref, update.weights = self.learners.update(publish=self.sync.ships)
        else:
            with deferred_interrupts():  # the epoch is recorded whole before a stop takes effect
                self.end_epoch()

    def end_epoch(self) -> None:
        """The epoch's last step is done: count it, broadcast it on the collective path, close the epoch."""
        update, self.update = self.update, None
        metrics = update.metrics
        step_s = time.perf_counter() - update.started
        if not self.book.record_update(metrics):  # every pair was stale: no update, not an epoch
            log.info(
                "all pairs of the batch were stale (max_policy_lag %d); sampling again",
                self.book.batching.max_policy_lag,
            )
            return
        if self.sync.collective:
            self.published.version = self.book.version
            with self.book.timers("publish"):
                self.samplers.broadcast(self.published.version, self.book.checksum)  # publish
            self.samplers.replace_lost()
        stats = self.rewards.stats()
        metrics.update(
            {
                "perf/learner_step_s": step_s / max(metrics.get("updates", 1), 1),
                "perf/learner_waited_for_data_s": self.waited_for_data,
                "reward/latency_s": finite_mean([s["mean_latency_s"] for s in stats]),  # NaN: a pool just replaced
                "reward/backlog": float(sum(s["backlog"] for s in stats)),
                "runtime/samplers": self.samplers.size(),  # working or still joining
                "runtime/samplers_joining": len(self.samplers.members.joining),
                "runtime/reward_replicas": self.rewards.replicas(),
            }
        )
        self.book.end_epoch(metrics)
        if self.book.running:  # the pool changes only while there is sampling left to do
            self.samplers.autoscale(waited_s=self.waited_for_data, step_s=step_s)
            self.waited_for_data = 0.0

    def on_job(self, ref) -> None:
        """A sampler call finished (scored and packed, or lost): its pairs join the ready batches or are dropped."""
        job = self.samplers.finish(ref)
        try:
            report = ray.get(job.report_ref)
        except RayError as e:  # its sampler or reward actor died, the reward failed, or an input was lost
            if self.learners.died(e):  # a hybrid worker: a lost sampler and a lost learner rank at once
                self.book.drop("actor_lost", len(job.pair_ids))
                self.recovery.lose_learner()
            else:
                self.samplers.fail(job, e, reward_lost=self.rewards.lose)
            return
        sampled_with = (report["version"], report["checksum"])
        orphan = self.published.is_orphaned(*sampled_with)  # sampled with a version a lost learner published
        if not orphan:
            self.published.count_call(report | {"sampler": job.sampler})
        if report["load_s"] > 0:  # this call loaded a newly published version
            self.book.sink.loaded(report["load_s"])
        out = ray.get(job.out_ref)
        self.book.timers.add("score", score_seconds(out))
        kept, stats = self.book.record_request(job.pair_ids, out, report)
        if orphan:
            self.book.drop("stale", kept)  # its policy is gone with the learner: not trained on
        elif kept:
            self.ready.add(ReadyBatch(job.batch_ref, kept, stats, job.pair_ids[0], sampled_with))

    # -- a lost learner, checkpoints and the end (cluster/recovery.py) ---------------------------------------------
    def drop_update(self) -> int | None:
        """Forget the epoch being updated and the learner call in flight (lost with the learner group): the pairs it
        held, or None when none was being updated. ``LearnerRecovery`` counts them ``actor_lost``."""
        pairs = None if self.update is None else self.update.pairs
        self.update = self.learner_ref = None
        return pairs

    def evaluate(self, png) -> dict:
        """Held-out evaluation (``Book``'s hook) on a sampler with the newest weights and the first reward actor."""
        return heldout_reward(self.cfg, self.samplers.generate, self.rewards.score_now, png)

    def stop(self) -> None:
        """A graceful stop: the epoch being updated is finished (half an epoch's steps would not resume exactly),
        then a checkpoint is written and the accounting line logged; pairs still in flight are counted
        ``interrupted`` when the run resumes."""
        while self.update is not None and self.learner_ref is not None:
            ray.wait([self.learner_ref])
            self.on_learner()
        folder = self.recovery.save(self.book.epoch)
        log.warning(
            "stopped at epoch %d (version %d): checkpoint %s; %s",
            self.book.epoch,
            self.book.version,
            folder,
            self.book.ledger.line(),
        )

    def kill(self) -> None:
        """Release every actor now, not at garbage collection (their names and resources free at once)."""
        for part in filter(None, (self.learners, self.rewards, self.samplers)):  # those built so far
            part.kill()
