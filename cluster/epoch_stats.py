"""An epoch's numbers: the reward statistics of the pairs its update takes, and, when it closes, its metrics, its log
line and the run's pace.

Usage (``Book`` holds one as ``book.stats``)::

    stats = EpochStats(batching, ledger, epochs=cfg.train.epochs)
    stats.add_rewards([reward_stats(out)])        # each request whose batch the update takes
    now = stats.close(m, epoch, timers.pop())     # reward/..., perf/..., drops/... into the epoch's metrics m
    log.info(stats.line(m, epoch, version, now))  # "epoch 3 reward 0.61 loss ... | ledger | epoch 4/60, 12s ..."
"""

from __future__ import annotations

import time

import numpy as np

from cluster.accounting import Ledger
from cluster.batching import Batching
from rewards.base import RewardOutput

STAGES = ("sample", "score", "pack", "update", "publish")  # each timed as perf/<stage>_s, summed over an epoch


def reward_stats(out: RewardOutput) -> dict[str, list[float]]:
    """A scored request's finite rewards, the weighted sum (``reward``) and each component, as plain floats."""
    finite = lambda v: [x for x in np.asarray(v, dtype=np.float64).tolist() if np.isfinite(x)]  # noqa: E731
    return {"reward": finite(out.scores), **{k: finite(v) for k, v in (out.info.get("components") or {}).items()}}


class EpochStats:
    """The reward statistics of the epoch being filled, and the metrics, log line and pace of each epoch closed.
    ``ledger`` is the run's (its counts go into each epoch's metrics); ``epochs`` is ``train.epochs``."""

    def __init__(self, batching: Batching, ledger: Ledger, epochs: int):
        self.batching, self.ledger, self.epochs = batching, ledger, epochs
        self.rewards: dict[str, list[float]] = {}  # finite branch rewards of this epoch's pairs, per scorer
        self.t_start = self.epoch_start = time.perf_counter()
        self.first_epoch = 0  # the epoch this session started at (resumed: later)

    def add_rewards(self, stats: list[dict]) -> None:
        """The reward statistics (``reward_stats``) of the requests whose batches an update takes: this epoch's
        reward/... means."""
        for st in stats:
            for k, v in st.items():
                self.rewards.setdefault(k, []).extend(v)

    def drop_rewards(self) -> None:
        """Forget the running epoch's reward statistics (its update was lost with a learner: ``Book.rollback``)."""
        self.rewards = {}

    def start(self, epoch: int) -> None:
        """The session's clock starts (``Book.start``, after the evaluation before training) at ``epoch``."""
        self.t_start = self.epoch_start = time.perf_counter()
        self.first_epoch = epoch

    def close(self, m: dict, epoch: int, stage_s: dict) -> float:
        """Fill the metrics ``m`` of the epoch just updated (``stage_s``: the stage timers' sums, ``Timers.pop``) with
        its reward means, throughput, each role's busy share and the drops so far; the reward statistics start over.
        Returns the time it closed (perf_counter)."""
        now = time.perf_counter()
        wall, self.epoch_start = now - self.epoch_start, now
        m.update({f"perf/{stage}_s": 0.0 for stage in STAGES} | stage_s)
        m.update(
            {
                "epoch": epoch,
                "reward/mean": float(np.mean(self.rewards["reward"])) if self.rewards.get("reward") else float("nan"),
                **{f"reward/{k}/mean": float(np.mean(v)) for k, v in self.rewards.items() if v and k != "reward"},
                "perf/wall_s": now - self.t_start,
                "perf/pairs_per_s": m.get("pairs_trained", 0) / wall if wall > 0 else float("nan"),
                "perf/images_sampled": self.ledger.requested * self.batching.images_per_unit,  # so far, this session
                # the share of this epoch's wall time each role computed (the samplers' summed over the pool)
                "perf/sampler_busy": (m["perf/sample_s"] + m["perf/pack_s"])
                / (max(wall, 1e-9) * m.get("runtime/samplers", 1)),
                "perf/learner_busy": m["perf/update_s"] / max(wall, 1e-9),
                **{f"drops/{k}": v for k, v in self.ledger.dropped.items()},
            }
        )
        self.rewards = {}
        return now

    def line(self, m: dict, epoch: int, version: int, now: float) -> str:
        """The log line of closed epoch ``epoch`` (metrics ``m``) after which ``epoch + 1`` epochs are done."""
        return "epoch %d reward %.4g loss %.4g clip %.3f version %d lag %s | %s | %s" % (
            epoch,
            m["reward/mean"],
            m.get("learner/loss", float("nan")),
            m.get("learner/clip_frac", float("nan")),
            version,
            m.get("learner/policy_lag_max"),
            self.ledger.line(),
            self.eta(epoch + 1, now),
        )

    def eta(self, epoch: int, now: float) -> str:
        """Progress for logs that are not a terminal (``ray job logs``): ``epoch`` epochs done, time elapsed since
        ``start`` and the time left at this session's mean pace (its evaluations included)."""
        done, elapsed = epoch - self.first_epoch, now - self.t_start
        left = elapsed / done * (self.epochs - epoch) if done else float("nan")
        return f"epoch {epoch}/{self.epochs}, {clock(elapsed)} elapsed, eta {clock(left)}"


def heldout_line(epochs_done: int, epochs: int, metrics: dict, before: dict) -> str:
    """One held-out evaluation as one log line: every ``eval/.../mean`` metric, its value and its change since the
    evaluation at the start (``Book.start``): ``held-out after epoch 25/200 (change since the start): reward 0.6880
    (+0.1670), ...``."""
    shown = [
        f"{k[len('eval/') : -len('/mean')]} {v:.4f} ({v - before[k]:+.4f})"
        for k, v in metrics.items()
        if k.startswith("eval/") and k.endswith("/mean") and k in before
    ]
    return f"held-out after epoch {epochs_done}/{epochs} (change since the start): " + ", ".join(shown)


def clock(seconds: float) -> str:
    """Seconds as a short duration: 42s, 3m05s, 2h07m (``?`` when unknown)."""
    if not np.isfinite(seconds):
        return "?"
    s = round(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"
