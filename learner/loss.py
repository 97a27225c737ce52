"""The FDFO pair signal and loss (ALGORITHM.md §3-4), as pure functions.

Usage::

    dR, d = pair_signal(rewards, x_final)                      # per pair -> per branch
    loss, metrics = fdfo_loss(v_theta, v, d, dR, epsilon=0.03)  # per (branch, step) row
    loss, metrics = fdfo_loss(v_theta, v, d, dR, v_prox=v_prox)  # the staleness correction (docs/algorithms.md)
"""

from __future__ import annotations

import torch

# exp(log_rho) overflows float32 near 88; a ratio this far from 1 is far outside any trust region anyway.
MAX_LOG_RHO = 30.0
# The staleness correction's behaviour weight w = pi_prox / pi_mu is truncated at this value (truncated importance
# sampling, as verl's rollout correction does by default): a row's weight is min(w, WEIGHT_CAP), never more.
WEIGHT_CAP = 2.0
STALENESS_FDFO_ONLY = (
    "train.staleness_correction corrects FDFO's SPO ratio; train.algorithm = {algorithm!r} has its own ratio against "
    "the sampler's log-probabilities: set train.staleness_correction=false"
)


def pair_signal(rewards: torch.Tensor, x_final: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite-difference signal of each branch against its partner.

    rewards: [P, 2] (r_1, r_2); x_final: [P, 2, *latent] final latents.
    Returns dR: [P, 2] with dR_k = (r_k - r_k') / 2, and d: [P, 2, *latent] with
    d_k = dx_k / (mean(dx_k^2) + eps), dx_k = (x_k - x_k') / 2 (mean over the latent elements of one sample).
    No reward normalisation and no baseline: only dx is normalised.
    """
    if rewards.ndim != 2 or rewards.shape[1] != 2 or x_final.shape[:2] != rewards.shape:
        raise ValueError(
            f"pair_signal wants rewards [P, 2] and x_final [P, 2, ...]; got {tuple(rewards.shape)} and {tuple(x_final.shape)}"
        )
    r = rewards.double()
    dR = (r - r.flip(1)) / 2  # [P, 2], dR_2 = -dR_1
    x = x_final.double()
    dx = (x - x.flip(1)) / 2  # [P, 2, *latent], dx_2 = -dx_1
    ms = dx.pow(2).flatten(2).mean(-1)  # [P, 2] squared RMS
    d = dx / (ms + eps).view(*ms.shape, *([1] * (dx.ndim - 2)))
    return dR.float(), d.float()


def fdfo_loss(
    v_theta: torch.Tensor,
    v: torch.Tensor,
    d: torch.Tensor,
    dR: torch.Tensor,
    epsilon: float = 0.03,
    v_base: torch.Tensor | None = None,
    kl_weight: float = 0.0,
    v_prox: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SPO surrogate over B rows, one row per (branch, recorded step).

    v_theta: [B, *latent] the trained model's velocity at (x_i, t_i, prompt); v: [B, *latent] the velocity the
    sampler used there; d: [B, *latent] the branch's normalised direction; dR: [B] its reward difference;
    v_base: [B, *latent] the frozen base model's velocity (only for kl_weight > 0).

    With v_target = v - d, l = -mean((v_theta - v_target)^2), l_ref = -mean(d^2):
        rho = exp(l - l_ref);  loss = mean_rows(-dR * rho + |dR| / (2 epsilon) * (rho - 1)^2)
    l - l_ref is computed as -mean(dv^2) - 2 mean(dv * d), dv = v_theta - v (algebraically identical, but it
    does not subtract two large numbers, which loses most of log rho in float32 when d is large).
    At rho = 1 the gradient w.r.t. v_theta of one row's loss is 2 dR d / M, M = elements per sample.

    The staleness correction (``v_prox``: [B, *latent], the velocity of the policy the learner held when the epoch's
    update started, no gradient): the trust region is anchored at that policy and the behaviour policy that sampled
    the row (its velocity v) is corrected for by a truncated importance weight. With dp = v_prox - v:
        log w = -mean(dp^2) - 2 mean(dp * d)                      (= today's log rho at v_theta = v_prox)
        log rho_p = -mean(dv_p^2) - 2 mean(dv_p * (dp + d)),  dv_p = v_theta - v_prox
        loss = mean_rows(min(w, WEIGHT_CAP) * (-dR * rho_p + |dR| / (2 epsilon) * (rho_p - 1)^2))
    With v_prox equal to v (a row sampled with the weights the update starts from) dp is 0, w is 1 and rho_p is rho:
    the same floats as without the correction, bit for bit.
    """
    if not (v_theta.shape == v.shape == d.shape) or dR.shape != v.shape[:1]:
        raise ValueError(
            f"fdfo_loss wants v_theta, v, d of one shape [B, ...] and dR [B]; got {tuple(v_theta.shape)}, "
            f"{tuple(v.shape)}, {tuple(d.shape)}, {tuple(dR.shape)}"
        )
    v_theta, v, d, dR = v_theta.float(), v.float(), d.float(), dR.float()
    d = d.flatten(1)  # [B, M]
    weight = None
    if v_prox is not None:  # anchor at the policy the update starts from; weigh the behaviour policy's row
        if v_prox.shape != v.shape:
            raise ValueError(f"fdfo_loss wants v_prox of v's shape {tuple(v.shape)}; got {tuple(v_prox.shape)}")
        v_prox = v_prox.detach().float()
        dp = (v_prox - v).flatten(1)  # [B, M]: how far the policy moved on this row since it was sampled
        log_w = -dp.pow(2).mean(1) - 2 * (dp * d).mean(1)  # [B] = l(v_prox) - l_ref
        weight = torch.exp(log_w.clamp(max=MAX_LOG_RHO)).clamp(max=WEIGHT_CAP)  # [B], no gradient
        d = dp + d  # [B, M] = v_prox - v_target: the target seen from the anchor
        v = v_prox
    dv = (v_theta - v).flatten(1)  # [B, M]
    log_rho = -dv.pow(2).mean(1) - 2 * (dv * d).mean(1)  # [B] = l - l_ref (corrected: l - l(v_prox))
    rho = torch.exp(log_rho.clamp(max=MAX_LOG_RHO))  # [B]
    policy = -dR * rho + dR.abs() / (2 * epsilon) * (rho - 1).pow(2)  # [B]
    if weight is not None:
        policy = weight * policy  # [B]
    policy_loss = policy.mean()
    loss = policy_loss
    metrics = {
        "policy_loss": policy_loss.detach(),
        "clip_frac": ((rho.detach() - 1).abs() > epsilon).float().mean(),
        "log_rho_abs_mean": log_rho.detach().abs().mean(),
        "log_rho_abs_max": log_rho.detach().abs().max(),
    }
    if weight is not None:
        metrics["behaviour_weight_mean"] = weight.mean()
        metrics["behaviour_weight_capped"] = (weight == WEIGHT_CAP).float().mean()
    if kl_weight > 0:
        if v_base is None:
            raise ValueError("kl_weight > 0 needs v_base, the frozen base model's velocity")
        kl = (v_theta - v_base.float()).pow(2).flatten(1).mean(1).mean()
        loss = loss + kl_weight * kl
        metrics["kl"] = kl.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics
