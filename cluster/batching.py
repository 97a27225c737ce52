"""The batch arithmetic of an epoch, derived and checked in this one place.

Usage::

    batching = Batching.of(cfg)          # raises, showing the arithmetic, when the numbers do not fit
    for rows in batching.plan(batching.rows_per_epoch, generator): ...

``cluster.config`` checks every config with ``Batching.of`` before any resource is taken, and re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Batching:
    """The batch arithmetic of an epoch, derived and checked once; the learner takes its updates from ``plan``.
    A unit is what one schedule entry samples: a pair (FDFO, 2 images) or a group (Flow-GRPO, grpo.group_size
    images). Rows are (image, step) training rows: an epoch of P units of K images recording N steps has K * P * N."""

    pairs_per_epoch: int
    rows_per_epoch: int
    updates_per_epoch: int
    timestep_fraction: float
    micro_batch_rows: int
    max_policy_lag: int
    algorithm: str = "fdfo"
    images_per_unit: int = 2  # K: 2 (a pair) or grpo.group_size (a group)
    recorded_steps: int = 0  # N: steps each image records (FDFO: all; Flow-GRPO: its SDE window)

    @classmethod
    def of(cls, cfg) -> Batching:
        """The arithmetic of run config ``cfg`` (a ``RunConfig``: this module imports nothing of the config's, which
        imports it), checked; raises showing the arithmetic when the numbers do not fit."""
        t, g = cfg.train, cfg.grpo
        if t.pairs_per_epoch < 1 or t.updates_per_epoch < 1 or t.micro_batch_rows < 1:
            raise ValueError("train.pairs_per_epoch, train.updates_per_epoch and train.micro_batch_rows must be >= 1")
        if not 0.0 < t.timestep_fraction <= 1.0:
            raise ValueError(
                f"train.timestep_fraction must be in (0, 1] (the share of rows trained on); got {t.timestep_fraction}"
            )
        if not 0.0 <= t.lr_final <= t.lr:
            raise ValueError(
                f"train.lr_final must lie in [0, train.lr = {t.lr}] (where the schedule ends); got {t.lr_final}"
            )
        K, N, unit, each = 2, cfg.sampling.num_steps, "pairs", "branches"
        if t.algorithm == "flow_grpo":
            K, N, unit, each = g.group_size, g.sde_window or cfg.sampling.num_steps, "groups", "images"
            _check_grpo(cfg)
        rows = K * t.pairs_per_epoch * N
        if rows % t.updates_per_epoch:
            raise ValueError(
                f"an epoch has {K} {each} x {t.pairs_per_epoch} {unit} x {N} steps = {rows} rows, which "
                f"train.updates_per_epoch = {t.updates_per_epoch} does not divide; choose pairs_per_epoch so that "
                f"{K} * pairs_per_epoch * {N} is a multiple of updates_per_epoch"
            )
        lag = 2 * t.updates_per_epoch - 1 if t.max_policy_lag is None else t.max_policy_lag
        if lag < t.updates_per_epoch - 1:
            raise ValueError(
                f"train.max_policy_lag = {lag} is below updates_per_epoch - 1 = {t.updates_per_epoch - 1}: even pairs "
                "sampled with the current weights reach that lag by the last update of an epoch; raise it"
            )
        return cls(
            t.pairs_per_epoch,
            rows,
            t.updates_per_epoch,
            t.timestep_fraction,
            t.micro_batch_rows,
            lag,
            t.algorithm,
            K,
            N,
        )

    def plan(self, rows: int, generator) -> list:
        """The reference's arithmetic over the ``rows`` (branch, step) rows an epoch brought: one global random
        permutation, its first ``timestep_fraction`` share, split as evenly as possible into ``updates_per_epoch``
        updates. Returns the row indices of each update (a torch.LongTensor each; empty updates left out)."""
        import torch

        order = torch.randperm(rows, generator=generator)
        order = order[: max(1, round(self.timestep_fraction * rows))]
        return [chunk for chunk in torch.tensor_split(order, self.updates_per_epoch) if len(chunk)]

    def micro_batches(self, update_rows) -> tuple:
        """One update's rows in micro-batches of at most ``micro_batch_rows`` (gradients accumulate over them)."""
        import torch

        return torch.split(update_rows, self.micro_batch_rows)


def _check_grpo(cfg) -> None:
    """Flow-GRPO's settings, checked with the fix named (train.algorithm flow_grpo)."""
    g, N = cfg.grpo, cfg.sampling.num_steps
    if g.group_size < 2:
        raise ValueError(f"grpo.group_size must be >= 2 (advantages are relative to the group); got {g.group_size}")
    if g.noise_level <= 0:
        raise ValueError(
            f"grpo.noise_level must be > 0 (0 is the ODE, which has no log-probability); got {g.noise_level}"
        )
    if g.clip_range <= 0 or g.adv_clip_max <= 0:
        raise ValueError("grpo.clip_range and grpo.adv_clip_max must be > 0")
    hi = N if g.sde_window_range is None else g.sde_window_range
    if g.sde_window < 0 or (g.sde_window and not g.sde_window <= hi <= N):
        raise ValueError(
            f"grpo.sde_window = {g.sde_window} must be 0 (every step) or lie in [1, grpo.sde_window_range "
            f"= {hi}], and the range in [sde_window, sampling.num_steps = {N}]"
        )
