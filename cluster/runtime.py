"""The Ray runtime: sampler, reward and learner actors around the same classes ``run_local`` uses.

Usage::

    fdfo train --config tiny-cpu                     # connects to a running cluster, else starts a local one
    ray job submit --working-dir . -- python -m cluster.cli train --config sd35m-combined

Dataflow of one sampler call (the driver only ever holds object refs and small scalars)::

    sampler.sample      -> (job, images)         images go straight to a reward actor
    reward.score        -> RewardOutput          scores [2P] (+ per-scorer components, reasons)
    sampler.complete    -> (Arrow batch, dropped) the batch stays in the object store until the learner takes it
    learner.train_epoch(*batches) -> metrics     then learner.weights() is put once and every sampler loads it

Samplers keep sampling the next epoch while the learner trains (at most one epoch ahead: beyond that they
wait), so a pair is at most ``2 * updates_per_epoch - 1`` versions old when trained; the learner drops whole
pairs that would exceed ``train.max_policy_lag`` and they are counted as ``stale``.
Ray token authentication is switched on (``RAY_AUTH_MODE=token``) unless the environment says otherwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "token")  # must precede `import ray`

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import RayActorError, RayError

from actors.sampler import Sampler
from cluster.accounting import Ledger, Timers, reward_drop_reason
from cluster.config import Batching, RunConfig, to_dict
from cluster.driver import RunLog, checkpoint_state, finish_report, resume_state, reward_specs, setup_process
from cluster.evaluate import heldout_reward
from cluster.prompts import load_prompts
from cluster.schedule import PairSchedule
from learner.learner import Learner
from rewards.batcher import RewardBatcher

log = logging.getLogger("fdfo")
NAMESPACE = "fdfo"


def connect(runtime_cfg, num_cpus_needed: float) -> None:
    """Join the cluster named by runtime.address / RAY_ADDRESS / a running ``ray start``; else start a local one."""
    if ray.is_initialized():
        return
    address = runtime_cfg.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, namespace=NAMESPACE)
        return
    try:
        if address == "local":
            raise ConnectionError("asked for a new local instance")
        ray.init(address="auto", namespace=NAMESPACE)
    except ConnectionError:
        # A laptop: logical CPUs are scheduling tokens, so give at least what the pools ask for.
        ray.init(
            namespace=NAMESPACE,
            num_cpus=max(os.cpu_count() or 1, int(np.ceil(num_cpus_needed))),
            dashboard_host="127.0.0.1",
            include_dashboard=True,
        )


class Metrics:
    """Ray metrics (``ray.util.metrics``) for the dashboard / Prometheus, all tagged with the run name."""

    def __init__(self, run: str):
        from ray.util.metrics import Counter, Gauge

        tags = ("run",)
        self.tags = {"run": run}
        g = lambda n, d: Gauge(n, description=d, tag_keys=tags)  # noqa: E731
        self.gauges = {
            "pairs_per_s": g("fdfo_pairs_per_s", "finished pairs per second over the last epoch"),
            "images_per_s": g("fdfo_images_per_s", "sampled images per second over the last epoch"),
            "reward_mean": g("fdfo_reward_mean", "mean combined reward of the last epoch's pairs"),
            "reward_latency_s": g("fdfo_reward_latency_s", "mean scorer latency per reward batch"),
            "reward_backlog": g("fdfo_reward_backlog", "images queued at the reward actors"),
            "learner_step_s": g("fdfo_learner_step_s", "learner wall time per optimizer step"),
            "loss": g("fdfo_learner_loss", "FDFO loss of the last epoch"),
            "clip_frac": g("fdfo_learner_clip_frac", "fraction of rows with |rho - 1| > epsilon"),
            "version": g("fdfo_weight_version", "learner weight version"),
            "policy_lag": g("fdfo_policy_lag_max", "largest (learner version - sample version) trained on"),
            "samplers": g("fdfo_samplers", "live sampler actors"),
        }
        self.trained = Counter("fdfo_pairs_trained", description="pairs trained on", tag_keys=tags)
        self.dropped = Counter("fdfo_pairs_dropped", description="pairs dropped, by reason", tag_keys=("run", "reason"))
        self.component = Gauge("fdfo_reward_component_mean", description="raw mean per scorer", tag_keys=("run", "scorer"))

    def set(self, name: str, value: float) -> None:
        if value == value:  # skip NaN
            self.gauges[name].set(float(value), tags=self.tags)

    def drop(self, reason: str, n: int) -> None:
        if n:
            self.dropped.inc(n, tags={**self.tags, "reason": reason})


@dataclass
class Job:
    """One sampler call in flight: its pairs and the refs of its stages."""

    sampler: int
    pair_ids: list[int]
    job_ref: ray.ObjectRef
    out_ref: ray.ObjectRef
    batch_ref: ray.ObjectRef
    dropped_ref: ray.ObjectRef


@dataclass
class Pool:
    """Live sampler actors by index, with their in-flight job count; indices are never reused."""

    actors: dict[int, object] = field(default_factory=dict)
    busy: dict[int, int] = field(default_factory=dict)
    next_index: int = 0


def _sampler_actor(cfg: RunConfig, index: int):
    rt = cfg.runtime
    return (
        ray.remote(Sampler)
        .options(name=f"fdfo/sampler/{index}", num_cpus=rt.sampler_num_cpus, num_gpus=rt.sampler_num_gpus, max_restarts=0)
        .remote(model=cfg.model, sampling=cfg.sampling, lora=cfg.lora, index=index)
    )


def run_ray(cfg: RunConfig, resume: bool = False) -> dict:
    """Train through Ray actors until ``train.epochs`` epochs are done; returns history, ledger and paths."""
    setup_process(cfg)
    rt = cfg.runtime
    batching = Batching.of(cfg)
    prompts = load_prompts(cfg.prompts.source)
    specs = reward_specs(cfg.reward)                   # bad reward config fails before any actor starts
    max_samplers = rt.max_samplers or rt.num_samplers
    if not 1 <= rt.num_samplers <= max_samplers:
        raise ValueError(f"need 1 <= runtime.num_samplers ({rt.num_samplers}) <= runtime.max_samplers ({max_samplers})")
    connect(rt, max_samplers * rt.sampler_num_cpus + rt.num_reward_actors * rt.reward_num_cpus + rt.learner_num_cpus)
    runlog, metrics, timers, ledger = RunLog(cfg, resume), Metrics(cfg.name), Timers(), Ledger()

    learner = (
        ray.remote(Learner)
        .options(name="fdfo/learner", num_cpus=rt.learner_num_cpus, num_gpus=rt.learner_num_gpus, max_restarts=0)
        .remote(model=cfg.model, train=cfg.train, batching=batching, lora=cfg.lora, seed=cfg.seed)
    )
    rewards = [
        ray.remote(RewardBatcher)
        .options(name=f"fdfo/reward/{i}", num_cpus=rt.reward_num_cpus, num_gpus=rt.reward_num_gpus, max_restarts=0)
        .remote(
            reward_spec={"name": "weighted_sum", "specs": specs},
            max_batch_size=rt.reward_max_batch,
            max_wait_s=rt.reward_max_wait_s,
            timeout_s=rt.reward_timeout_s,
        )
        for i in range(rt.num_reward_actors)
    ]
    schedule, epoch = PairSchedule(prompts, cfg.seed), 0
    if resume:
        epoch = resume_state(learner, runlog.dir, schedule, ledger, load=lambda f: ray.get(learner.load.remote(f)))

    pool = Pool()
    sync = WeightSync(learner, collective=_use_collective(cfg))
    weights_ref = learner.weights.remote()             # put once: every sampler reads this same object
    version, checksum = ray.get(learner.weights_info.remote())

    def add_sampler() -> None:
        i = pool.next_index
        pool.next_index += 1
        actor = _sampler_actor(cfg, i)
        # a late joiner loads the current version through the object store before it samples
        if weights_ref is not None:               # the object of the current version: check against it
            _check_proof(ray.get(actor.set_weights.remote(weights=weights_ref)), version, checksum)
        else:  # collective mode keeps no copy: take the learner's newest (load_into verifies its checksum)
            proof = ray.get(actor.set_weights.remote(weights=learner.weights.remote()))
            if proof["version"] < version:
                raise RuntimeError(f"late sampler {i} loaded version {proof['version']}, older than {version}")
        pool.actors[i], pool.busy[i] = actor, 0
        sync.members_changed = True

    for _ in range(rt.num_samplers):
        add_sampler()

    def gen(prompts, seeds, steps):               # held-out evaluation runs on a sampler and a reward actor
        return ray.get(next(iter(pool.actors.values())).generate.remote(prompts=prompts, seeds=seeds, num_steps=steps))

    def score(images, prompts):
        return ray.get(rewards[0].score.remote(images=images, prompts=prompts))

    before = heldout_reward(cfg, gen, score, runlog.dir / "heldout_before.png")
    runlog.image("eval/heldout", before["grid"], epoch)
    log.info("held-out reward before: %.4f", before["eval/reward/mean"])

    jobs: dict[ray.ObjectRef, Job] = {}
    ready: list[tuple[ray.ObjectRef, int]] = []       # (Arrow batch ref, pairs in it)
    train_ref, train_started, waited_for_data = None, 0.0, 0.0
    target = cfg.train.epochs * batching.pairs_per_epoch
    history, t_start, epoch_start = [], time.perf_counter(), time.perf_counter()
    comp_sums: dict[str, list[float]] = {}
    progress = _progress(cfg.train.epochs, epoch)
    last_ckpt = version

    def lose_sampler(i: int) -> None:
        sync.members_changed = True
        pool.actors.pop(i, None)
        pool.busy.pop(i, None)
        for ref, job in list(jobs.items()):
            if job.sampler == i:
                jobs.pop(ref)
                ledger.drop("actor_lost", len(job.pair_ids))
                metrics.drop("actor_lost", len(job.pair_ids))
        log.warning("sampler %d lost; %d samplers left", i, len(pool.actors))
        while len(pool.actors) < rt.num_samplers:
            add_sampler()

    while epoch < cfg.train.epochs:
        # 1. Start an update when an epoch's worth of pairs is ready. The last epoch waits until everything
        #    requested has landed and takes all of it, so a run never ends with pairs in flight.
        have = sum(n for _, n in ready)
        final = epoch == cfg.train.epochs - 1
        landed = ledger.requested - sum(ledger.dropped.values()) >= target and not jobs
        if train_ref is None and ready and ((have >= batching.pairs_per_epoch and not final) or (final and landed)):
            take, n_take = [], 0
            while ready and (final or n_take < batching.pairs_per_epoch):
                ref, n = ready.pop(0)
                take.append(ref)
                n_take += n
            train_ref, train_started, train_pairs = learner.train_epoch.remote(*take), time.perf_counter(), n_take
        if train_ref is None and not ready and landed:
            break  # everything requested was dropped: nothing left to train on

        # 2. Keep samplers busy, at most one epoch of pairs ahead of the learner (beyond that they wait).
        ahead = sum(n for _, n in ready) + sum(len(j.pair_ids) for j in jobs.values())
        for i, actor in list(pool.actors.items()):
            # requested - dropped = trained + ahead: what the run still needs is target minus that
            room = min(batching.pairs_per_epoch - ahead, target - (ledger.requested - sum(ledger.dropped.values())))
            if train_ref is not None and final:
                room = 0                          # the last epoch is training: nothing more will be trained
            if room <= 0 or pool.busy[i] >= 2:
                continue
            req = schedule.take(min(cfg.sampling.pairs_per_call, room))
            n = len(req["pair_ids"])
            ledger.request(n)
            ahead += n
            job_ref, images_ref = actor.sample.options(num_returns=2).remote(**req)
            reward = rewards[req["pair_ids"][0] % len(rewards)]
            out_ref = reward.score.remote(images=images_ref, prompts=[p for p in req["prompts"] for _ in range(2)])
            batch_ref, dropped_ref = actor.complete.options(num_returns=2).remote(job=job_ref, rewards=out_ref)
            jobs[dropped_ref] = Job(i, req["pair_ids"], job_ref, out_ref, batch_ref, dropped_ref)
            pool.busy[i] += 1

        # 3. Wait for whatever finishes first.
        waiting = list(jobs) + ([train_ref] if train_ref is not None else [])
        if not waiting:
            raise RuntimeError(f"driver stalled with nothing in flight: {ledger.line()}, {len(ready)} batches ready, "
                               f"{len(pool.actors)} samplers; this is a bug, please report it with the config")
        t_wait = time.perf_counter()
        done, _ = ray.wait(waiting, num_returns=1, timeout=60.0)
        if train_ref is None:
            waited_for_data += time.perf_counter() - t_wait
        for ref in done:
            if ref is train_ref:
                with timers("update"):
                    try:
                        m = ray.get(train_ref)
                    except RayError as e:  # an input batch was lost with its node, or the learner died
                        if isinstance(e, RayActorError):
                            raise
                        log.warning("epoch lost its inputs (%r); %d pairs counted as actor_lost", e, train_pairs)
                        ledger.drop("actor_lost", train_pairs)
                        metrics.drop("actor_lost", train_pairs)
                        train_ref = None
                        continue
                train_ref = None
                stale, trained = len(m.pop("stale_pair_ids")), len(m.pop("trained_pair_ids"))
                m["pairs_trained"] = trained
                ledger.drop("stale", stale)
                metrics.drop("stale", stale)
                ledger.train(trained)
                if trained:
                    metrics.trained.inc(trained, tags=metrics.tags)
                step_s = time.perf_counter() - train_started
                if not m.get("updates"):          # every pair was stale: no update, not an epoch
                    log.info("all %d pairs of the batch were stale (max_policy_lag %d); sampling again", stale, batching.max_policy_lag)
                    continue
                version, checksum = m["learner/version"], m.pop("checksum")
                with timers("broadcast"):
                    weights_ref = sync.broadcast(pool, version, checksum)
                # -- log the epoch
                wall = time.perf_counter() - epoch_start
                epoch_start = time.perf_counter()
                stats = ray.get([r.stats.remote() for r in rewards])
                m.update(timers.pop())
                m.update(
                    {
                        "epoch": epoch,
                        "perf/pairs_per_s": trained / wall if wall > 0 else float("nan"),
                        "perf/learner_step_s": step_s / max(m.get("updates", 1), 1),
                        "perf/learner_waited_for_data_s": waited_for_data,
                        "perf/wall_s": time.perf_counter() - t_start,
                        "reward/latency_s": float(np.nanmean([s["mean_latency_s"] for s in stats])),
                        "reward/backlog": float(sum(s["backlog"] for s in stats)),
                        "runtime/samplers": len(pool.actors),
                        **{f"reward/{k}/mean": float(np.mean(v)) for k, v in comp_sums.items()},
                        **{f"drops/{k}": v for k, v in ledger.dropped.items()},
                    }
                )
                comp_sums.clear()
                if cfg.eval.every_epochs and (epoch + 1) % cfg.eval.every_epochs == 0:
                    m.update(heldout_reward(cfg, gen, score, runlog.dir / "heldout_latest.png"))
                    runlog.image("eval/heldout", m.pop("grid"), epoch + 1)
                _export(metrics, m)
                runlog.scalars(epoch, m)
                history.append(m)
                epoch += 1
                progress.update(1)
                progress.set_postfix(reward=f"{m.get('reward/mean', float('nan')):.4g}", v=version, samplers=len(pool.actors))
                log.info("epoch %d reward %.4g loss %.4g clip %.3f version %d lag %s | %s", epoch - 1,
                         m.get("reward/mean", float("nan")), m.get("learner/loss", float("nan")),
                         m.get("learner/clip_frac", float("nan")), version, m.get("learner/policy_lag_max"), ledger.line())
                # -- checkpoint, autoscale
                every = cfg.train.checkpoint_every
                if every and version - last_ckpt >= every:
                    _save(learner, runlog.dir, cfg, epoch, schedule, ledger)
                    last_ckpt = version
                waited_for_data = _autoscale(pool, waited_for_data, step_s, max_samplers, rt.num_samplers, add_sampler, jobs)
                continue
            job = jobs.pop(ref)
            if job.sampler in pool.busy:
                pool.busy[job.sampler] -= 1
            try:
                dropped = ray.get(job.dropped_ref)
            except RayActorError:
                ledger.drop("actor_lost", len(job.pair_ids))
                metrics.drop("actor_lost", len(job.pair_ids))
                lose_sampler(job.sampler)
                continue
            except RayError as e:  # the reward actor failed this request: the pairs' trajectories are gone
                log.warning("reward request failed for %d pairs: %s", len(job.pair_ids), e)
                ledger.drop("reward_failure", len(job.pair_ids))
                metrics.drop("reward_failure", len(job.pair_ids))
                _forget(pool, job)
                continue
            out = ray.get(job.out_ref)
            if dropped:
                reason = reward_drop_reason(out.info.get("reasons", []))
                ledger.drop(reason, len(dropped))
                metrics.drop(reason, len(dropped))
            for k, v in (out.info.get("components") or {}).items():
                v = np.asarray(v, dtype=np.float64)
                comp_sums.setdefault(k, []).extend(v[np.isfinite(v)].tolist())
            kept = len(job.pair_ids) - len(dropped)
            if kept:
                ready.append((job.batch_ref, kept))

    progress.close()
    ledger.check()
    final = _save(learner, runlog.dir, cfg, epoch, schedule, ledger)
    after = heldout_reward(cfg, gen, score, runlog.dir / "heldout_after.png")
    samplers = ray.get([a.status.remote() for a in pool.actors.values()])   # final proof of what each holds
    sync.close(pool)
    for handle in [learner, *rewards, *pool.actors.values()]:
        ray.kill(handle)                          # free the resources now, not at garbage collection
    report = finish_report(runlog, history, before, after)
    paths = report.pop("paths")
    log.info(ledger.line())
    summary = {
        "history": history,
        "ledger": ledger.summary(),
        "version": version,
        "final": {**report, **{k: v for k, v in (history[-1] if history else {}).items() if isinstance(v, (int, float))}},
        "paths": {"run_dir": str(runlog.dir), "checkpoint": final, **paths},
        "samplers": samplers,
    }
    return summary


def _use_collective(cfg: RunConfig) -> bool:
    mode = cfg.runtime.weight_sync
    return mode == "collective" or (mode == "auto" and not cfg.lora.enabled)


class WeightSync:
    """Versioned weight broadcast. LoRA (tens of MB): ``ray.put`` once via ``learner.weights()``, every sampler
    loads the same object. Full weights: a gloo (CPU) / NCCL (GPU) group between the learner and the samplers,
    re-formed as a new generation whenever the sampler set changed. Either way each sampler returns the
    version and checksum it now holds, and a mismatch stops the run."""

    def __init__(self, learner, collective: bool):
        self.learner = learner
        self.collective = collective
        self.members_changed = True
        self.members: list[int] = []

    def _form(self, pool: Pool) -> None:
        import torch

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        addr, port = ray.get(self.learner.weight_group_address.remote())
        self.members = sorted(pool.actors)
        world = 1 + len(self.members)
        joins = [self.learner.join_weight_group.remote(world_size=world, master_addr=addr, master_port=port, backend=backend)]
        joins += [pool.actors[i].join_weight_group.remote(rank=r + 1, world_size=world, master_addr=addr,
                                                          master_port=port, backend=backend)
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
                    _check_proof(p, version, checksum)
                return None
            except RayError as e:  # a member died mid-transfer: re-form next time, deliver this version by object store
                log.warning("collective weight broadcast failed (%s); falling back to the object store", e)
                self.members_changed = True
        ref = self.learner.weights.remote()
        proofs = ray.get([a.set_weights.remote(weights=ref) for a in pool.actors.values()])
        for p in proofs:
            _check_proof(p, version, checksum)
        return ref

    def close(self, pool: Pool) -> None:
        if self.collective and self.members:
            ray.get([self.learner.leave_weight_group.remote()] +
                    [pool.actors[i].leave_weight_group.remote() for i in self.members if i in pool.actors])


def _check_proof(proof: dict, version: int, checksum: str) -> None:
    if proof["version"] != version or proof["checksum"] != checksum:
        raise RuntimeError(
            f"sampler {proof['sampler']} reports version {proof['version']} checksum {proof['checksum']} but the "
            f"learner broadcast version {version} checksum {checksum}: weight sync failed"
        )


def _forget(pool: Pool, job: Job) -> None:
    """Free the trajectories a sampler holds for a job whose rewards will never come."""
    actor = pool.actors.get(job.sampler)
    if actor is not None:
        actor.forget.remote(job=job.job_ref)


def _save(learner, run_dir: Path, cfg: RunConfig, epoch: int, schedule: PairSchedule, ledger: Ledger) -> str:
    return ray.get(learner.save.remote(str(run_dir), checkpoint_state(epoch, schedule, ledger), to_dict(cfg)))


def _export(metrics: Metrics, m: dict) -> None:
    for key, name in (
        ("perf/pairs_per_s", "pairs_per_s"),
        ("reward/mean", "reward_mean"),
        ("reward/latency_s", "reward_latency_s"),
        ("reward/backlog", "reward_backlog"),
        ("perf/learner_step_s", "learner_step_s"),
        ("learner/loss", "loss"),
        ("learner/clip_frac", "clip_frac"),
        ("learner/version", "version"),
        ("learner/policy_lag_max", "policy_lag"),
        ("runtime/samplers", "samplers"),
    ):
        if key in m:
            metrics.set(name, m[key])
    if "perf/pairs_per_s" in m:
        metrics.set("images_per_s", 2 * m["perf/pairs_per_s"])
    for k, v in m.items():
        if k.startswith("reward/") and k.endswith("/mean") and k != "reward/mean":
            metrics.component.set(v, tags={**metrics.tags, "scorer": k.split("/")[1]})


def _autoscale(pool: Pool, waited_for_data: float, step_s: float, max_samplers: int, min_samplers: int, add, jobs) -> float:
    """Add a sampler when the learner waited for data longer than it trained; release an idle one when the
    learner is the bottleneck (it never waited). Returns the reset wait counter."""
    if waited_for_data > step_s and len(pool.actors) < max_samplers:
        add()
        log.info("autoscale: learner waited %.1fs for data (step %.1fs): %d samplers", waited_for_data, step_s, len(pool.actors))
    elif waited_for_data == 0.0 and len(pool.actors) > min_samplers:
        idle = [i for i, b in pool.busy.items() if b == 0 and not any(j.sampler == i for j in jobs.values())]
        if idle:
            i = idle[-1]
            ray.kill(pool.actors.pop(i))
            pool.busy.pop(i)
            sync.members_changed = True
            log.info("autoscale: learner is the bottleneck: released sampler %d, %d left", i, len(pool.actors))
    return 0.0


def _progress(total: int, start: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="fdfo epochs", disable=not sys.stderr.isatty())
