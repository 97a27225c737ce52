"""The loss of one micro-batch of an epoch's rows, the only part of an update that differs between algorithms: FDFO's
``learner.loss.fdfo_loss`` on (branch, step) rows (with the staleness correction's anchor ``v_prox``), or Flow-GRPO's
``learner.flow_grpo.grpo_loss`` on (image, SDE step) rows, and the KL term's base velocity.

Usage: ``Learner`` takes ``MicroLoss`` as a base; an update calls ``self._micro_loss(ep, mb)`` per micro-batch::

    loss, metrics, lag = self._micro_loss(ep, mb)   # mb: indices into the epoch's kept rows x steps

It reads the learner's ``model``, ``cfg`` (``TrainConfig``), ``grpo``, ``prompts``, ``lora``, ``base``, ``version``,
``batching``, ``rank``, ``world_size`` and ``sharding``.
"""

from __future__ import annotations

import torch

from learner.epoch import EpochState
from learner.flow_grpo import check_descending, grpo_loss, sde_step
from learner.loss import fdfo_loss
from models.device import autocast, to_device


class MicroLoss:
    """The per-micro-batch loss computations of a ``Learner`` (a part of it, no state of its own)."""

    def _micro_loss(self, ep: EpochState, mb: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """The run's algorithm on one micro-batch of rows ``mb``: (loss, its metrics, each row's lag [B])."""
        if self.grpo is not None:
            return self._grpo_loss(ep, mb)
        x, v, sigma, d, dR, cond, lag = self._rows(ep.tb, ep.keep, mb)
        with autocast(self.model.device, self.cfg.precision):
            v_theta = self.model.velocity(x, sigma, cond, ep.w)
            v_base = self._base_velocity(x, sigma, cond, ep.w) if self.cfg.kl_weight > 0 else None
        v_prox = self._v_prox(ep, mb, v, v_theta) if self.cfg.staleness_correction else None
        loss, m = fdfo_loss(v_theta, v, d, dR, self.cfg.epsilon, v_base, self.cfg.kl_weight, v_prox)
        return loss, m, lag

    def _grpo_loss(self, ep: EpochState, mb: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """Flow-GRPO on (image, SDE step) rows: log p_theta of the recorded step under v_theta, against the sampler's."""
        tb, g, dev, w = ep.tb, self.grpo, self.model.device, ep.w
        W = tb.x.shape[1]
        r, i = ep.keep[mb // W], mb % W  # row of the table, recorded step
        cond = self.prompts([tb.prompt[j] for j in r.tolist()])
        x, x_next = to_device(tb.x[r, i], dev), to_device(tb.x_next[r, i], dev)
        check_descending(tb.sigmas[r, i], tb.sigmas_next[r, i])  # on the host, before they move
        sigma, sigma_next = to_device(tb.sigmas[r, i], dev), to_device(tb.sigmas_next[r, i], dev)
        sigma_max = float(tb.sigma_max[r[0]])
        with autocast(dev, self.cfg.precision):
            v_theta = self.model.velocity(x, sigma, cond, w)
            v_base = self._base_velocity(x, sigma, cond, w) if self.cfg.kl_weight > 0 else None
        step = sde_step(x, v_theta, sigma, sigma_next, g.noise_level, sigma_max, x_next=x_next)
        base = (
            None if v_base is None else sde_step(x, v_base, sigma, sigma_next, g.noise_level, sigma_max, x_next=x_next)
        )
        old_log_prob, advantage = to_device(tb.log_prob[r, i], dev), to_device(tb.advantage[r], dev)
        loss, m = grpo_loss(
            step.log_prob,
            old_log_prob,
            advantage,
            g.clip_range,
            g.adv_clip_max,
            step.mean,
            None if base is None else base.mean,
            step.std,
            self.cfg.kl_weight,
        )
        return loss, m, self.version - tb.policy_version[r]

    def _rows(self, tb, keep: torch.Tensor, mb: torch.Tensor):
        """One micro-batch of (branch, step) rows ``mb`` (indices into kept rows x steps) on the learner's device:
        x, v [B, C, H, W], sigma [B], d [B, C, H, W], dR [B], the prompts' conditioning, and each row's lag [B] (on
        the host). To a GPU the rows go through pinned memory without a host sync (``to_device``)."""
        N, dev = tb.x.shape[1], self.model.device
        r, i = keep[mb // N], mb % N  # row of the table, step index
        cond = self.prompts([tb.prompt[j] for j in r.tolist()])
        x, v, sigma, d, dR = (to_device(t, dev) for t in (tb.x[r, i], tb.v[r, i], tb.sigmas[r, i], tb.d[r], tb.dR[r]))
        return x, v, sigma, d, dR, cond, self.version - tb.policy_version[r]

    def _base_velocity(self, x, sigma, cond, w) -> torch.Tensor:
        with torch.no_grad():
            if self.lora:
                self.model.transformer.disable_adapters()
                try:
                    return self.model.velocity(x, sigma, cond, w)
                finally:
                    self.model.transformer.enable_adapters()
            trained, self.model.transformer = self.model.transformer, self.base
            try:
                return self.model.velocity(x, sigma, cond, w)
            finally:
                self.model.transformer = trained

    def _anchor_later_updates(self, ep: EpochState) -> None:
        """The staleness correction's anchor for this rank's rows of the epoch's updates 2.. that were sampled before
        the epoch's weights: their velocity under those weights, no gradient (one forward per such row, before the
        first step moves the weights). The first update's rows take it from their own forward (the same weights), and
        rows sampled with the epoch's weights need none (their v is it). Sharded (fsdp), every rank runs as many
        forwards as the busiest (forwards are collectives)."""
        N = ep.tb.x.shape[1]

        def stale_share(rank: int) -> torch.Tensor:  # a rank's rows of updates 2.. (_accumulate's split), stale ones
            rows = torch.cat([torch.tensor_split(u, self.world_size)[rank] for u in ep.updates[1:]])
            return rows[ep.tb.policy_version[ep.keep[rows // N]] < ep.start_version]

        chunks = [
            [mb for mb in torch.split(stale_share(rank), self.batching.micro_batch_rows) if len(mb)]
            for rank in range(self.world_size)
        ]
        mine = chunks[self.rank]
        pad = max(map(len, chunks)) - len(mine) if self.sharding == "fsdp" else 0
        prox = []
        with torch.no_grad(), autocast(self.model.device, self.cfg.precision):
            for i, mb in enumerate(mine + [ep.updates[-1][:1]] * pad):
                x, _, sigma, _, _, cond, _ = self._rows(ep.tb, ep.keep, mb)
                v_prox = self.model.velocity(x, sigma, cond, ep.w)
                if i < len(mine):
                    prox.append(v_prox.cpu())
        if prox:
            rows = torch.cat(mine)
            ep.prox = torch.cat(prox)
            ep.prox_at = torch.full((len(ep.keep) * N,), -1, dtype=torch.long)
            ep.prox_at[rows] = torch.arange(len(rows))

    def _v_prox(self, ep: EpochState, mb: torch.Tensor, v: torch.Tensor, v_theta: torch.Tensor) -> torch.Tensor:
        """The anchor of micro-batch ``mb`` [B, *latent]: v where the row was sampled with the weights the epoch's
        update started from, else the velocity under those weights: this forward's own (detached) in the first
        update, the one ``_anchor_later_updates`` computed in the later ones."""
        v_prox = v.float().clone()
        stale = torch.nonzero(ep.tb.policy_version[ep.keep[mb // ep.tb.x.shape[1]]] < ep.start_version).squeeze(1)
        if len(stale) == 0:
            return v_prox
        at = stale.to(v.device)
        if not ep.grad_norms:  # the first update: the weights are still the epoch's
            v_prox[at] = v_theta.detach()[at].float()
        else:
            where = ep.prox_at[mb[stale]] if ep.prox_at is not None else torch.tensor([-1])
            if bool(where.lt(0).any()):
                raise RuntimeError("staleness correction: a stale row of a later update has no anchor; this is a bug")
            v_prox[at] = to_device(ep.prox[where], v.device).float()
        return v_prox
