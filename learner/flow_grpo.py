"""Flow-GRPO (arXiv 2505.05470) as pure functions, in the paper's symbols: the SDE step with its Gaussian
log-probability, group-normalised advantages and the PPO-clipped objective.

Usage::

    step = sde_step(x, v, sigma, sigma_next, a=0.7, sigma_max=sigmas[1])      # sampler: x_next, log p, mean, std
    A = group_advantages(rewards, group_ids)                                   # per image, within its group
    step = sde_step(x, v_theta, sigma, sigma_next, a, sigma_max, x_next=x_next)  # learner: log p_theta(x_next | x)
    loss, metrics = grpo_loss(step.log_prob, old_log_prob, A, clip_range=1e-4)

The SDE that shares the flow ODE's marginals (sigma: noise level, 1 = pure noise; dt = sigma_next - sigma < 0):

    sigma_t = a * sqrt(sigma / (1 - sigma))          (sigma = 1 uses sigma_max = the schedule's second sigma below the root)
    mean    = x * (1 + sigma_t^2 / (2 sigma) * dt) + v * (1 + sigma_t^2 (1 - sigma) / (2 sigma)) * dt
    x_next  = mean + sigma_t * sqrt(-dt) * eps,      eps ~ N(0, I)

and log p(x_next | x) is that Gaussian's log-density, averaged (not summed) over the latent's elements, as
Flow-GRPO's public code does: the ratio exp(log p_theta - log p_old) is a per-element geometric mean, which is
why its clip range is as small as 1e-4. With a = 0 the step is the ODE's Euler step and has no density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _col(t, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-row [B] value as a column [B, 1, ..., 1] broadcasting over ``like`` [B, ...]."""
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    return t.view(-1, *([1] * (like.ndim - 1))) if t.ndim else t


def sde_std(sigma, sigma_max: float, a: float) -> torch.Tensor:
    """sigma_t = a * sqrt(sigma / (1 - sigma)); at sigma = 1 (where it is infinite) the denominator uses sigma_max."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return a * torch.sqrt(sigma / (1 - torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma)))


@dataclass
class SdeStep:
    """One SDE step: x_next [B, ...]; log_prob [B] (mean over elements); mean [B, ...]; std [B] = sigma_t sqrt(-dt)."""

    x_next: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def check_descending(sigma, sigma_next) -> None:
    """Raise unless every step goes to a smaller sigma (dt < 0). Reads the values: call it on host tensors (on a GPU's
    it would wait for the device), before they move."""
    if bool((torch.as_tensor(sigma_next) >= torch.as_tensor(sigma)).any()):
        raise ValueError("sde_step goes from sigma to a smaller sigma_next (dt < 0)")


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    a: float,
    sigma_max: float,
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
) -> SdeStep:
    """The step from x at ``sigma`` to ``sigma_next`` with velocity v (x, v: [B, ...]; sigma, sigma_next: scalars
    or [B]). Pass ``noise`` (eps) to take the step, or ``x_next`` to score a step taken before (the learner's
    ratio); the log-probability is of the x_next returned. Computed in float32 whatever x and v are. Sigmas given
    on the host are checked here (``check_descending``); sigmas given on a device are the caller's to check first."""
    if (noise is None) == (x_next is None):
        raise ValueError("sde_step takes exactly one of noise (to step) or x_next (to score a step)")
    if a <= 0:
        raise ValueError(f"the SDE's noise level a must be > 0 (a = 0 is the ODE, which has no density); got {a}")
    if not any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in (sigma, sigma_next)):
        check_descending(sigma, sigma_next)  # on the host: free; a device's sigmas are checked by the caller
    x, v = x.float(), v.float()
    s, s_next = _col(sigma, x), _col(sigma_next, x)
    dt = s_next - s
    std_t = sde_std(s, sigma_max, a)
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    scale = std_t * torch.sqrt(-dt)
    if x_next is None:
        x_next = mean + scale * noise.float().to(x.device)
    log_prob = gaussian_log_prob(x_next.float(), mean, scale)
    std = scale.reshape(-1).expand(len(x)) if scale.numel() == 1 else scale.reshape(-1)
    return SdeStep(x_next, log_prob, mean, std)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, scale^2) per element, averaged over all but the first dimension: [B]."""
    lp = -((x.detach() - mean) ** 2) / (2 * scale**2) - torch.log(scale) - LOG_SQRT_2PI
    return lp.flatten(1).mean(1)


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, global_std: bool = False, eps: float = 1e-4
) -> torch.Tensor:
    """A_i = (r_i - mean of i's group) / (std + eps), std the group's own (population) std, or with ``global_std``
    the std of all ``rewards`` (Flow-GRPO's SD3 settings). rewards, group_ids: [n] -> [n] float32."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    g = torch.as_tensor(group_ids)
    if r.shape != g.shape or r.ndim != 1:
        raise ValueError(
            f"group_advantages wants rewards and group_ids of one shape [n]; got {tuple(r.shape)}, {tuple(g.shape)}"
        )
    _, inv = torch.unique(g, return_inverse=True)
    n = torch.zeros(int(inv.max()) + 1 if len(inv) else 0, dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros_like(n).index_add_(0, inv, r) / n
    dev = r - mean[inv]
    if global_std:
        std = r.std(unbiased=False).expand_as(r)
    else:
        std = (torch.zeros_like(n).index_add_(0, inv, dev**2) / n).sqrt()[inv]
    return (dev / (std + eps)).float()


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantage: torch.Tensor,
    clip_range: float = 1e-4,
    adv_clip_max: float = 5.0,
    mean: torch.Tensor | None = None,
    mean_base: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    kl_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO-clipped GRPO objective over B rows, one per (image, step).

    log_prob: [B] log p_theta(x_next | x); old_log_prob: [B] what the sampler's weights gave; advantage: [B], clamped
    to +-adv_clip_max. With ratio = exp(log_prob - old_log_prob):
        loss = mean_rows(max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range)))
    so a row whose ratio left the clip range on the side its advantage pushes contributes no gradient.
    kl_weight > 0 adds kl_weight * mean_rows(mean((mean - mean_base)^2) / (2 std^2)), the KL between the step's
    Gaussian under theta and under the frozen base (mean, mean_base: [B, ...] step means; std: [B] step scales).
    """
    if not (log_prob.shape == old_log_prob.shape == advantage.shape) or log_prob.ndim != 1:
        raise ValueError(
            f"grpo_loss wants log_prob, old_log_prob, advantage of one shape [B]; got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantage.shape)}"
        )
    A = advantage.float().clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob.float() - old_log_prob.float()
    ratio = torch.exp(log_ratio)
    policy = torch.maximum(-A * ratio, -A * ratio.clamp(1 - clip_range, 1 + clip_range))
    policy_loss = policy.mean()
    loss = policy_loss
    metrics = {
        "policy_loss": policy_loss.detach(),
        "clip_frac": ((ratio.detach() - 1).abs() > clip_range).float().mean(),
        "approx_kl": 0.5 * log_ratio.detach().pow(2).mean(),
        "log_rho_abs_mean": log_ratio.detach().abs().mean(),
        "log_rho_abs_max": log_ratio.detach().abs().max(),
    }
    if kl_weight > 0:
        if mean is None or mean_base is None or std is None:
            raise ValueError(
                "kl_weight > 0 needs mean, mean_base and std: the step's Gaussian under theta and the base"
            )
        kl = ((mean.float() - mean_base.float()).pow(2).flatten(1).mean(1) / (2 * std.float() ** 2)).mean()
        loss = loss + kl_weight * kl
        metrics["kl"] = kl.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics
