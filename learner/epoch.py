"""The epoch a learner is updating (``EpochState``): its rows, the updates left and the metrics running over them.

Usage (inside ``Learner``)::

    ep = EpochState(tb, keep, w, updates, rows=..., start_version=learner.version)
    ep.add_metrics(metrics, updates_per_epoch)   # after each update's micro-batches: one host sync
    ep.reduce_over(group)                         # the epoch's last update: every rank's share summed
    out.update(ep.summary())
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from learner.batch import GroupBatch, TrainBatch


def finite_mean(values: list) -> float:
    """Mean of the finite values (a skipped update's inf/nan norm left out; None counts as missing); nan when there
    are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


@dataclass
class EpochState:
    """The epoch a learner is updating, from ``begin_epoch`` to its last ``update``: the rows it trains, the updates
    left and the metrics running over them."""

    tb: TrainBatch | GroupBatch  # the epoch's table (``from_arrow``)
    keep: torch.Tensor  # indices of its rows that are not stale [R]
    w: float  # the guidance scale every row was sampled with
    updates: list[torch.Tensor]  # row indices of each update still to take (``Batching.plan``)
    rows: int  # rows over all of the epoch's updates
    sums: dict[str, float] = field(default_factory=dict)  # running metric sums (maxima for log_rho_abs_max)
    grad_norms: list[float] = field(default_factory=list)  # one per update taken
    lag_sum: float = 0.0  # policy lag summed over the rows trained
    lag_max: int = 0
    seconds: float = 0.0  # the steps' own time (``perf/update_s``), without snapshots
    start_version: int = 0  # the learner's version when the epoch's update started (the staleness correction's anchor)
    prox: torch.Tensor | None = None  # staleness correction: v_prox of stale rows of updates 2.. [S, *latent]
    prox_at: torch.Tensor | None = None  # [kept rows x steps]: each row's index into ``prox``, -1 where none

    def add_metrics(self, metrics: list, updates_per_epoch: int) -> None:
        """The micro-batches' (share, metrics) (0-dim tensors on the device) into the running sums, in micro-batch
        order and with the same float arithmetic as reading each at once, but read from the device together: one host
        sync per update, none per micro-batch."""
        if not metrics:
            return
        values = iter(torch.stack([v.detach().double() for _, m in metrics for v in m.values()]).tolist())
        for share, m in metrics:
            for k in m:
                val = next(values)
                if k == "log_rho_abs_max":
                    self.sums[k] = max(self.sums.get(k, 0.0), val)
                else:
                    self.sums[k] = self.sums.get(k, 0.0) + val * share / updates_per_epoch

    def reduce_over(self, group) -> None:
        """Every rank's share of the epoch's metrics added up (maxima maxed) over the learner group (a
        ``GradientGroup``; None: one rank, nothing to do), so each rank reports the epoch's."""
        if group is None:
            return
        sums = {k: v for k, v in self.sums.items() if k != "log_rho_abs_max"} | {"_lag_sum": self.lag_sum}
        maxima = {"_lag_max": self.lag_max} | (
            {"log_rho_abs_max": self.sums["log_rho_abs_max"]} if "log_rho_abs_max" in self.sums else {}
        )
        sums, maxima = group.reduce_metrics(sums, maxima)
        self.lag_sum, self.lag_max = sums.pop("_lag_sum"), int(maxima.pop("_lag_max"))
        self.sums = sums | maxima

    def summary(self, skipped_steps: int, lr: float) -> dict:
        """The epoch's metrics once its last update is taken (after ``reduce_over``); ``skipped_steps`` and ``lr``
        are the learner's (its run's skipped updates, the last update's learning rate)."""
        return {f"learner/{k}": v for k, v in self.sums.items()} | {
            "updates": len(self.grad_norms),
            "learner/grad_norm": finite_mean(self.grad_norms),
            "learner/skipped_steps": skipped_steps,
            "learner/lr": lr,
            "learner/policy_lag_mean": self.lag_sum / self.rows,
            "learner/policy_lag_max": self.lag_max,
            "learner/rows": self.rows,
            "perf/update_s": self.seconds,
        }
