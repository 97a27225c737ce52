"""The fdfo driver: sample -> score -> pack -> update -> broadcast.

Usage::

    python -m cluster.driver --config tiny-cpu runtime.local=true     # one process, breakpoint() works
    fdfo train --config tiny-cpu                                      # the Ray runtime (cluster/runtime.py)

``run_local`` is the whole algorithm in one process: the same Sampler, reward scorers and Learner classes
that the Ray runtime wraps in actors. Three hops to the math: this loop -> ``Learner.train_epoch`` ->
``learner.loss.fdfo_loss``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from actors.models import build_model
from actors.sampler import Sampler
from cluster.accounting import Ledger, Timers
from cluster.config import Batching, RunConfig, to_dict
from cluster.evaluate import heldout_reward, plot_learning_curve
from cluster.prompts import load_prompts
from cluster.schedule import PairSchedule
from learner.learner import Learner
from rewards.base import RewardOutput

log = logging.getLogger("fdfo")


def reward_specs(reward_cfg) -> list[dict]:
    """The run's weighted scorer list, from explicit components or a preset; every name is checked here."""
    from rewards import REGISTRY
    from rewards.combined import PRESETS

    if reward_cfg.components:
        specs = [dict(c) for c in reward_cfg.components]
    elif reward_cfg.preset in PRESETS:
        specs = [dict(c) for c in PRESETS[reward_cfg.preset]]
    else:
        raise ValueError(f"unknown reward.preset {reward_cfg.preset!r}; presets: {sorted(PRESETS)}, or list reward.components")
    for spec in specs:
        if spec.get("name") not in REGISTRY:
            raise ValueError(f"unknown reward {spec.get('name')!r} in reward config; known: {sorted(REGISTRY)}")
    return specs


def make_reward(reward_cfg):
    """The run's reward: a ``CombinedReward`` (weighted sum, raw components kept in info)."""
    from rewards.combined import CombinedReward

    return CombinedReward(specs=reward_specs(reward_cfg))


def score_pairs(reward, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, RewardOutput | None, str | None]:
    """images [2P, H, W, 3] (branches adjacent) -> (rewards [P, 2] with NaN where unscored, the output, the error)."""
    P = len(prompts)
    try:
        out = reward.score(images, [p for p in prompts for _ in range(2)])
    except Exception as e:  # a failing scorer fails these pairs only; the run goes on
        log.warning("reward failed for %d pairs: %r", P, e)
        return np.full((P, 2), np.nan), None, repr(e)
    return np.asarray(out.scores, dtype=np.float64).reshape(P, 2), out, None


def count_bad_rewards(ledger: Ledger, rewards: np.ndarray, error: str | None) -> None:
    bad = int((~np.isfinite(rewards).all(1)).sum())
    ledger.drop("reward_failure" if error else "non_finite_reward", bad)


def setup_process(cfg: RunConfig) -> None:
    torch.set_num_threads(cfg.runtime.torch_threads)
    torch.manual_seed(cfg.seed)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


class RunLog:
    """Scalars and image grids to TensorBoard (``<output_dir>/<name>/tb``) and, with ``wandb_project`` set, to
    Weights & Biases; a JSON-lines history (appended to on resume)."""

    def __init__(self, cfg: RunConfig, resume: bool = False):
        self.dir = Path(cfg.output_dir) / cfg.name
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.dir / "tb"))
        self.history = self.dir / "history.jsonl"
        if not resume:
            self.history.write_text("")
        self.wandb = None
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError(f"wandb_project={cfg.wandb_project!r} needs `pip install wandb`") from e
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.name, config=to_dict(cfg), resume="allow")

    def scalars(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        for k, v in row.items():
            if k != "step":
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        with self.history.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def image(self, tag: str, png: str | Path, step: int) -> None:
        """Log a PNG (an image grid) under ``tag``."""
        import numpy as np
        from PIL import Image

        arr = np.asarray(Image.open(png).convert("RGB"))
        self.tb.add_image(tag, arr, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(str(png))}, step=step)

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def run_local(cfg: RunConfig, resume: bool = False) -> dict:
    """One process, no Ray: each epoch samples pairs_per_epoch pairs with the current weights, then updates."""
    setup_process(cfg)
    batching = Batching.of(cfg)
    prompts = load_prompts(cfg.prompts.source)
    reward = make_reward(cfg.reward)
    sampler = Sampler(build_model(cfg.model), cfg.sampling, cfg.lora)
    learner = Learner(build_model(cfg.model), cfg.train, batching, cfg.lora, seed=cfg.seed)
    schedule, ledger, timers, runlog = PairSchedule(prompts, cfg.seed), Ledger(), Timers(), RunLog(cfg, resume)
    start_epoch = 0
    if resume:
        start_epoch = resume_state(learner, runlog.dir, schedule, ledger)
    sampler.set_weights(learner.weights())        # both sides start from the same adapter (version 0 or resumed)
    gen = lambda prompts, seeds, steps: sampler.generate(prompts, seeds, steps)  # noqa: E731
    before = heldout_reward(cfg, gen, reward.score, runlog.dir / "heldout_before.png")
    runlog.image("eval/heldout", before["grid"], start_epoch)
    log.info("held-out reward before: %.4f", before["eval/reward/mean"])
    t_start, history = time.perf_counter(), []
    for epoch in range(start_epoch, cfg.train.epochs):
        batches, raw = [], []
        todo = batching.pairs_per_epoch
        while todo > 0:
            req = schedule.take(min(cfg.sampling.pairs_per_call, todo))
            todo -= len(req["pair_ids"])
            ledger.request(len(req["pair_ids"]))
            with timers("sample"):
                job, images = sampler.sample(**req)
            with timers("score"):
                rewards, out, error = score_pairs(reward, images, req["prompts"])
            count_bad_rewards(ledger, rewards, error)
            raw.append(rewards[np.isfinite(rewards)])
            with timers("pack"):
                batch, _ = sampler.complete(job=job, rewards=rewards)
            if batch is not None:
                batches.append(batch)
        with timers("update"):
            metrics = learner.train_epoch(*batches) if batches else {"stale_pair_ids": [], "trained_pair_ids": []}
        ledger.drop("stale", len(metrics.pop("stale_pair_ids")))
        metrics["pairs_trained"] = len(metrics.pop("trained_pair_ids"))
        ledger.train(metrics["pairs_trained"])
        with timers("broadcast"):
            sampler.set_weights(learner.weights())
        ledger.check()
        flat = np.concatenate(raw) if raw else np.array([np.nan])
        metrics.update(timers.pop())
        metrics.update({"epoch": epoch, "reward/mean": float(flat.mean()), "perf/wall_s": time.perf_counter() - t_start})
        if cfg.eval.every_epochs and (epoch + 1) % cfg.eval.every_epochs == 0:
            metrics.update(heldout_reward(cfg, gen, reward.score, runlog.dir / "heldout_latest.png"))
            runlog.image("eval/heldout", metrics.pop("grid"), epoch + 1)
        runlog.scalars(epoch, metrics)
        history.append(metrics)
        log.info("epoch %d reward %.4f loss %.4g clip %.3f version %d", epoch, metrics["reward/mean"],
                 metrics.get("learner/loss", float("nan")), metrics.get("learner/clip_frac", float("nan")), learner.version)
    final = learner.save(str(runlog.dir), checkpoint_state(cfg.train.epochs, schedule, ledger), to_dict(cfg))
    after = heldout_reward(cfg, gen, reward.score, runlog.dir / "heldout_after.png")
    report = finish_report(runlog, history, before, after)
    log.info(ledger.line())
    return {"history": history, "ledger": ledger.summary(), "version": learner.version, "learner": learner,
            "sampler": sampler, "final": report, "paths": {"run_dir": str(runlog.dir), "checkpoint": final, **report["paths"]}}


def finish_report(runlog: RunLog, history: list[dict], before: dict, after: dict) -> dict:
    """Held-out reward before/after, the grids and the learning curve, logged and returned."""
    if history:
        history[-1].update({k: v for k, v in after.items() if k.startswith("eval/")})
        runlog.image("eval/heldout", after["grid"], history[-1]["epoch"] + 1)
    start = {"pairs_trained": 0, "perf/wall_s": 0.0, **{k: v for k, v in before.items() if k.startswith("eval/")}}
    curve = plot_learning_curve([start, *history], runlog.dir / "learning_curve.png") if history else None
    runlog.close()
    gains = {k: (before[k], after[k]) for k in before if k.startswith("eval/") and k in after}
    for k, (b, a) in gains.items():
        log.info("held-out %s before %.4f -> after %.4f (%+.4f)", k[len("eval/"):-len("/mean")], b, a, a - b)
    log.info("grids %s, %s; learning curve %s", before.get("grid"), after.get("grid"), curve)
    b, a = before["eval/reward/mean"], after["eval/reward/mean"]
    return {"heldout_reward_before": b, "heldout_reward_after": a, "heldout_reward_gain": a - b,
            "heldout": {k[len("eval/"):]: {"before": b, "after": a, "gain": a - b} for k, (b, a) in gains.items()},
            "paths": {"grid_before": before.get("grid"), "grid_after": after.get("grid"), "learning_curve": curve}}


def checkpoint_state(epoch: int, schedule: PairSchedule, ledger: Ledger) -> dict:
    """The driver-side counters a checkpoint carries beside the learner's weights and optimizer."""
    return {"epoch": epoch, "next_pair_id": schedule.next_pair_id, "ledger": ledger.summary()}


def resume_state(learner, run_dir: Path, schedule: PairSchedule, ledger: Ledger, load=None) -> int:
    """Restore the learner and the counters from the run's latest checkpoint; returns the epoch to continue at.
    ``load`` is how to call ``learner.load`` (the Ray runtime passes a remote call)."""
    from learner.checkpoint import latest_checkpoint

    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {run_dir}/checkpoints; run without --resume first")
    state = (load or learner.load)(str(folder))
    schedule.next_pair_id = state["next_pair_id"]
    ledger.requested, ledger.trained = state["ledger"]["pairs_requested"], state["ledger"]["pairs_trained"]
    ledger.dropped.update(state["ledger"]["pairs_dropped"])
    ledger.drop("interrupted", ledger.in_flight)     # pairs in flight when the checkpoint was taken
    log.info("resumed from %s at epoch %d", folder, state["epoch"])
    return state["epoch"]
