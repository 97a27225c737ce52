"""The five stages of an FDFO run, and the bookkeeping around them that both drivers share.

The stages are plain methods of the role classes, each with a one-line contract::

    sample   Sampler.sample(**request)           -> (job, images uint8 [K P, H, W, 3]); trajectories stay put
    score    reward.score(images, prompts x K)   -> RewardOutput: scores [K P], NaN + reason where unscored
             (K = 2 images a pair, FDFO; grpo.group_size a group, Flow-GRPO)
    pack     Sampler.complete(job, rewards)      -> (Arrow batch of the finite pairs | None, report)
    update   Learner.train_epoch(*batches)       -> metrics, trained / stale pair ids, new checksum
             (= Learner.begin_epoch(*batches), then Learner.update() per optimizer step: the Ray runtime publishes
             after each)
    publish  Sampler.set_weights(learner.weights()) -> proof {version, checksum}, checked by ``check_proof``

``cluster/driver.py::run_local`` calls them one after the other in this process; ``cluster/runtime.py::run_ray``
schedules the same calls over actor handles and adds only what distribution needs (requests in flight,
staleness, lost actors). Everything else is ``Book``: the ledger, the stage timers, history and logging, evaluation
and checkpoint cadence, resume and the final report, written once; an epoch's reward statistics, metrics and log
line are its ``EpochStats`` (cluster/epoch_stats.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable

import numpy as np
import torch

from cluster.accounting import Ledger, Timers, drop_reasons
from cluster.config import Batching, RunConfig, redacted
from cluster.epoch_stats import EpochStats, heldout_line, reward_stats
from cluster.guard import BEST, guard_for, keep_best, read_best
from cluster.prompts import load_prompts
from cluster.runlog import HISTORY, WANDB_ID, RunLog, run_location  # noqa: F401  (re-exported)
from cluster.schedule import PairSchedule
from learner.storage import join
from rewards.base import RewardOutput

log = logging.getLogger("fdfo")


def setup_process(cfg: RunConfig) -> None:
    if cfg.runtime.torch_threads:
        torch.set_num_threads(cfg.runtime.torch_threads)
    torch.manual_seed(cfg.seed)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    quiet_third_party()


# Third-party log records that are notices, not problems, in fdfo's output: logger name -> message fragments.
NOISE = {
    # diffusers' SD3 pipeline module names SigLIP / CLIP image processors; without torchvision (never installed
    # beside the CPU torch) transformers falls back to their PIL versions, which is what fdfo wants.
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
}


class _DropNotices(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


def quiet_third_party() -> None:
    """Drop the records ``NOISE`` names (only those), and, when stderr is not a terminal (``ray job logs``, a file),
    Hugging Face's progress bars: carriage-return bars turn a log into noise. Idempotent; also a Ray
    ``worker_process_setup_hook``, so that actors are as quiet as the driver."""
    for name, fragments in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(fragments))
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
        if "transformers" in sys.modules:  # imported already: tell it directly
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        if "diffusers" in sys.modules:  # reads no variable; models/ loads quietly too
            sys.modules["diffusers"].utils.logging.disable_progress_bar()


@contextlib.contextmanager
def deferred_interrupts():
    """Ctrl-C (SIGINT) and SIGTERM (``ray job stop``, mapped to KeyboardInterrupt by the CLI) arriving inside the block
    take effect when it ends: an update and the books that record it happen whole, so the checkpoint a stop writes
    is at an epoch boundary and resumes exactly. Outside the main thread (where signals cannot be handled) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if got:
        raise KeyboardInterrupt(f"{signal.Signals(got[0]).name} during an update: stopped once it was recorded")


def score_pairs(reward, images: np.ndarray, prompts: list[str]) -> RewardOutput:
    """The score stage in process: images [K P, H, W, 3] (a pair's branches or a group's members adjacent) of P
    prompts -> RewardOutput [K P]. A scorer that raises fails these pairs only (NaN with the reason), as the Ray
    reward actors do."""
    doubled = [p for p in prompts for _ in range(len(images) // len(prompts))]
    try:
        return reward.score(images, doubled)
    except Exception as e:  # a failing scorer fails these pairs only; the run goes on
        log.warning("reward failed for %d pairs: %r", len(prompts), e)
        return RewardOutput(
            scores=np.full(len(doubled), np.nan), info={"reasons": [f"reward failed: {e!r}"] * len(doubled)}
        )


def check_proof(proof: dict, version: int, checksum: str) -> None:
    """A sampler's proof of what it loaded must match what the learner published, else the run stops."""
    if proof["version"] != version or proof["checksum"] != checksum:
        raise RuntimeError(
            f"sampler {proof['sampler']} reports version {proof['version']} checksum {proof['checksum']} but the "
            f"learner broadcast version {version} checksum {checksum}: weight sync failed"
        )


def unit_name(cfg: RunConfig) -> str:
    """What the run's ledger counts: pairs (FDFO), or groups of G images (Flow-GRPO)."""
    return f"groups of {cfg.grpo.group_size}" if cfg.train.algorithm == "flow_grpo" else "pairs"


class Book:
    """Per-run bookkeeping both drivers share. ``sink`` (the Ray runtime's metrics exporter, or None) is told of
    drops, trained pairs and each epoch's metrics. ``evaluate(png_path) -> dict`` and ``save(epoch) -> folder``
    are how this run evaluates its policy and checkpoints its learner. ``stats`` (``EpochStats``) holds the reward
    statistics of the epoch being filled (the drivers add each update's: ``stats.add_rewards``)."""

    def __init__(self, cfg: RunConfig, evaluate: Callable, save: Callable, resume: bool = False, sink=None):
        self.cfg, self.evaluate, self.save, self.sink = cfg, evaluate, save, sink
        self.batching = Batching.of(cfg)
        self.runlog, self.ledger, self.timers = RunLog(cfg, resume), Ledger(unit_name(cfg)), Timers()
        self.schedule = PairSchedule(load_prompts(cfg.prompts.source), cfg.seed)
        self.epoch, self.version, self.last_checkpoint, self.checksum = 0, 0, 0, None
        self.stats = EpochStats(self.batching, self.ledger, cfg.train.epochs)
        self.history: list[dict] = []
        self.before: dict = {}
        self.progress = None
        self.stop_reason: str | None = None  # set when the run should end early (the hacking guard); drivers check it
        self.saved: tuple[int, str] | None = None  # (version, folder) of the newest checkpoint this run wrote
        self.guard = guard_for(cfg, self.runlog.store.uri("checkpoints"), resume)

    # -- stage bookkeeping ------------------------------------------------------------------------------------
    def request(self, n: int) -> dict:
        """The next n pairs to sample (keyword arguments of ``Sampler.sample``), counted as requested."""
        req = self.schedule.take(n)
        self.ledger.request(len(req["pair_ids"]))
        return req

    def drop(self, reason: str, n: int) -> None:
        self.ledger.drop(reason, n)
        if self.sink is not None:
            self.sink.drop(reason, n)

    def record_request(self, pair_ids: list[int], out: RewardOutput, report: dict) -> tuple[int, dict]:
        """A scored and packed request: its dropped pairs counted by reason and the sampler's stage times recorded.
        Returns how many of its pairs are in the batch, and its reward statistics, which count towards the epoch
        whose update takes the batch (``stats.add_rewards``): a request whose pairs were all dropped counts at once."""
        K = self.batching.images_per_unit
        for reason, n in drop_reasons(pair_ids, report["dropped"], out.info.get("reasons"), K).items():
            self.drop(reason, n)
        self.timers.add("sample", report["sample_s"])
        self.timers.add("pack", report["pack_s"])
        self.timers.add("publish", report["load_s"])  # a sampler loading a published version
        stats = reward_stats(out)
        kept = len(pair_ids) - len(report["dropped"])
        if not kept:
            self.stats.add_rewards([stats])
        return kept, stats

    def record_update(self, m: dict) -> bool:
        """An update's outcome: trained and stale pairs counted, the new version and checksum noted. Returns
        whether any optimizer step was taken."""
        stale, trained = len(m.pop("stale_pair_ids")), len(m.pop("trained_pair_ids"))
        m["pairs_trained"] = trained
        self.drop("stale", stale)
        self.ledger.train(trained)
        if self.sink is not None and trained:
            self.sink.trained(trained)
        self.timers.add("update", m.pop("perf/update_s", 0.0))
        if m.get("updates"):
            self.version, self.checksum = m["learner/version"], m.pop("checksum")
        return bool(m.get("updates"))

    # -- per epoch ---------------------------------------------------------------------------------------------
    def end_epoch(self, m: dict) -> dict:
        """Close an epoch whose update is done and published: its metrics, held-out evaluation and checkpoint at
        their cadence, history, TensorBoard, the log line and the progress bar. Returns the metrics."""
        now = self.stats.close(m, self.epoch, self.timers.pop())
        if self.guard is not None:
            self.guard.epoch_reward(m["reward/mean"])
        verdict, every = None, self.cfg.eval.every_epochs
        if every and (self.epoch + 1) % every == 0:
            t_eval = time.perf_counter()
            m.update(self.evaluate(self.runlog.dir / "heldout_latest.png"))
            m["perf/eval_s"] = time.perf_counter() - t_eval  # inside perf/wall_s (time-to-reward benches subtract it)
            log.info(heldout_line(self.epoch + 1, self.cfg.train.epochs, m, self.before))
            self.runlog.image("eval/heldout", m.pop("grid"), self.epoch + 1)
            if self.guard is not None:
                verdict = self.guard.observe(self.epoch, m)
                m.update(verdict.metrics)
        if self.sink is not None:
            self.sink.export(m)
        self.runlog.scalars(self.epoch, m)
        self.runlog.sync()
        self.history.append(m)
        log.info(self.stats.line(m, self.epoch, self.version, now))
        self.epoch += 1
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(reward=f"{m['reward/mean']:.4g}", v=self.version)
        ckpt = self.cfg.train.checkpoint_every
        if ckpt and self.version - self.last_checkpoint >= ckpt:
            self.saved = (self.version, self.save(self.epoch))
            self.last_checkpoint = self.version
        if verdict is not None:
            self.act_on_guard(verdict)
        return m

    def act_on_guard(self, verdict) -> None:
        """Act on the hacking guard's verdict of the epoch just closed: a new best gold value is kept as
        ``checkpoints/best`` (this epoch's checkpoint, written unless the cadence just wrote it); hacking is logged
        loudly and, with ``eval.stop_on_hacking``, sets ``stop_reason``, which ends the drivers' loops."""
        m = verdict.metrics
        log.info(
            "guard: %s %.4g (best %.4g), drop in window %.4g, training reward slope %.4g per epoch",
            self.guard.key,
            m["guard/gold"],
            m.get("guard/gold_best", float("nan")),
            m.get("guard/gold_drop", float("nan")),
            m.get("guard/reward_slope", float("nan")),
        )
        if verdict.new_best:
            if self.saved is None or self.saved[0] != self.version:
                self.saved = (self.version, self.save(self.epoch))
            info = {"epoch": self.epoch, "version": self.version, "value": m["guard/gold"], "metric": self.guard.key}
            try:
                best = keep_best(self.saved[1], self.runlog.store.uri("checkpoints"), info)
                log.info(
                    "guard: new best %s = %.4g after %d epochs (version %d): %s",
                    self.guard.key,
                    m["guard/gold"],
                    self.epoch,
                    self.version,
                    best,
                )
            except FileNotFoundError as e:  # a learner on another node without a shared filesystem
                log.warning("guard: best checkpoint not kept: %s", e)
        if verdict.hacking:
            alarm = self.guard.alarm(self.epoch - 1, m)
            log.warning(
                "!" * 20
                + " "
                + alarm
                + (
                    " -- stopping (eval.stop_on_hacking)"
                    if self.cfg.eval.stop_on_hacking
                    else " -- continuing (set eval.stop_on_hacking=true to stop)"
                )
            )
            if self.cfg.eval.stop_on_hacking:
                self.stop_reason = alarm

    def rollback(self, state: dict, version: int, checksum: str) -> int:
        """Back to a checkpoint a new learner restored: ``state`` (``Book.state``: its epoch and ledger) and the
        ``version`` / ``checksum`` it holds. The pairs trained since count as dropped (``rolled_back``), the epochs
        since leave the history (they are trained again) and the running epoch's reward statistics are dropped.
        Returns the number of pairs rolled back."""
        rolled_back = self.ledger.trained - state["ledger"]["pairs_trained"]
        self.ledger.trained -= rolled_back
        self.drop("rolled_back", rolled_back)
        self.history = [h for h in self.history if h["epoch"] < state["epoch"]]
        self.epoch, self.version, self.checksum, self.last_checkpoint = state["epoch"], version, checksum, version
        self.stats.drop_rewards()
        if self.progress is not None:
            self.progress.n = self.epoch
        return rolled_back

    @property
    def running(self) -> bool:
        """Whether the drivers' loops go on: epochs left and no early stop (``stop_reason``)."""
        return self.epoch < self.cfg.train.epochs and self.stop_reason is None

    # -- start and end -----------------------------------------------------------------------------------------
    def resume(self, load: Callable[[str], dict]) -> None:
        """Restore the learner (``load(folder) -> saved state``) and the counters from the run's latest checkpoint."""
        from learner.checkpoint import latest_checkpoint

        folder = latest_checkpoint(self.runlog.location)
        if folder is None:
            raise FileNotFoundError(
                f"--resume: no checkpoint under {redacted(join(self.runlog.location, 'checkpoints'))}; "
                "run without --resume first (or check runtime.storage_path and name)"
            )
        state = load(str(folder))
        self.schedule.next_pair_id = state["next_pair_id"]
        ledger = state["ledger"]
        self.ledger.requested, self.ledger.trained = ledger["pairs_requested"], ledger["pairs_trained"]
        self.ledger.dropped.update(ledger["pairs_dropped"])
        self.ledger.drop("interrupted", self.ledger.in_flight)  # pairs in flight when the checkpoint was taken
        self.epoch = state["epoch"]
        log.info("resumed from %s at epoch %d", redacted(str(folder)), self.epoch)

    def state(self, epoch: int) -> dict:
        """The driver-side counters a checkpoint carries beside the learner's weights and optimizer."""
        return {"epoch": epoch, "next_pair_id": self.schedule.next_pair_id, "ledger": self.ledger.summary()}

    def start(self) -> None:
        """Evaluate the starting policy (the "before" of the report) and open the progress bar."""
        self.before = self.evaluate(self.runlog.dir / "heldout_before.png")
        self.runlog.image("eval/heldout", self.before["grid"], self.epoch)
        log.info("held-out reward before: %.4f", self.before["eval/reward/mean"])
        from tqdm import tqdm

        self.progress = tqdm(
            total=self.cfg.train.epochs, initial=self.epoch, desc="fdfo epochs", disable=not sys.stderr.isatty()
        )
        self.stats.start(self.epoch)

    def finish(self, **extra) -> dict:
        """The final checkpoint, the held-out evaluation after training, grids, learning curve and the summary."""
        self.progress.close()
        if self.stop_reason is not None:  # stopped early: pairs still in flight (Ray) are not trained
            self.drop("interrupted", self.ledger.in_flight)
        self.ledger.check()
        # train.epochs, unless the run stopped early; kept when this version's checkpoint was just written (nothing
        # has changed since: no pair is in flight at a run's normal end)
        kept = self.saved is not None and self.saved[0] == self.version and self.stop_reason is None
        checkpoint = self.saved[1] if kept else self.save(self.epoch)
        after = self.evaluate(self.runlog.dir / "heldout_after.png")
        report = self.runlog.report(self.before, after, self.history)
        log.info(self.ledger.line())
        last = {k: v for k, v in (self.history[-1] if self.history else {}).items() if isinstance(v, (int, float))}
        return {
            "history": self.history,
            "ledger": self.ledger.summary(),
            "version": self.version,
            "final": {**report.pop("heldout_summary"), **last},
            "paths": {
                "run_dir": str(self.runlog.dir),
                **self._storage_path(),
                "checkpoint": redacted(str(checkpoint)),
                **report["paths"],
                **self._best_paths(),
            },
            "stopped": self.stop_reason,
            **extra,
        }

    def _best_paths(self) -> dict:
        """The kept best checkpoint and its ``best.json`` (empty without a gold metric or before a first evaluation)."""
        info = read_best(self.runlog.store.uri("checkpoints")) if self.guard is not None else None
        return (
            {}
            if info is None
            else {"best_checkpoint": redacted(self.runlog.store.uri("checkpoints", BEST)), "best": info}
        )

    def _storage_path(self) -> dict:
        """The run's storage folder, when it is not the local run folder (``runtime.storage_path``)."""
        return {} if self.runlog.mirror.same else {"storage": redacted(self.runlog.location)}
