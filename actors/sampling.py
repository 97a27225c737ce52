"""Churned paired sampling (ALGORITHM.md §2): two trajectories per prompt from almost the same start noise.

Usage::

    traj = sample_pairs(model, ["a cat"], seeds=[7], num_steps=40, gamma=0.0025)
    traj.xs   # [P, 2, N, C, H, W] states visited, traj.vs the velocities used there

The churn step departs from diffusers' ``FlowMatchEulerDiscreteScheduler.step`` on purpose: it overshoots
to r = s / (1 + gamma - gamma*s) and re-noises back to sigma s, so that two branches drift apart slightly.
With gamma = 0 it is exactly that scheduler's Euler step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from models.adapter import FlowModel, PromptEmbeds
from models.device import autocast


def churn_start(eps: torch.Tensor, n: torch.Tensor, gamma: float) -> torch.Tensor:
    """x_0 = eps / (1+gamma) + sqrt((1+gamma)^2 - 1) / (1+gamma) * n: unit variance, pairs correlate 1/(1+gamma)^2."""
    g = 1.0 + gamma
    return eps / g + math.sqrt(g * g - 1.0) / g * n


def churn_step(x: torch.Tensor, v: torch.Tensor, t: float, s: float, gamma: float, n: torch.Tensor | None) -> torch.Tensor:
    """One churned Euler step from sigma t to sigma s with fresh noise n (ignored when gamma == 0)."""
    if gamma == 0.0:
        return x + (s - t) * v
    r = s / (1.0 + gamma - gamma * s)  # overshoot target, below s
    x_r = x + (r - t) * v
    g = 1.0 + gamma
    return x_r / (1.0 + gamma * r) + r * math.sqrt(g * g - 1.0) / (1.0 + gamma * r) * n


@dataclass
class PairTrajectory:
    """P pairs of churned trajectories. Shapes: xs, vs [P, 2, N, C, H, W]; sigmas [N + 1]; x_final [P, 2, C, H, W].

    xs[p, k, i] is the state branch k visited before step i (at sigma sigmas[i]); vs[p, k, i] the (guided)
    velocity used there. x_final is the last state, at sigma 0.
    """

    xs: torch.Tensor
    vs: torch.Tensor
    sigmas: torch.Tensor
    x_final: torch.Tensor
    seeds: list[int]


@torch.no_grad()
def sample_pairs(
    model: FlowModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_steps: int = 40,
    gamma: float = 0.0025,
    guidance_scale: float = 1.0,
    cond: PromptEmbeds | None = None,
    record_dtype: torch.dtype = torch.float32,
    precision: str = "fp32",
) -> PairTrajectory:
    """Sample one pair per prompt; pair p uses only ``seeds[p]`` for its noise, so it does not depend on batching.

    The start noise eps is shared by the two branches; every churn noise n is drawn per branch. The last
    step (to sigma 0) has no churn. Both branches of all prompts run as one batch of 2P. ``precision``: the
    learner's ``train.precision``, so the recorded v is computed under the same autocast as the learner's v_theta;
    and v is computed at the state as recorded (x in ``record_dtype``), the input the learner will see.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: pass one seed per prompt")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if gamma < 0:
        raise ValueError(f"churn gamma must be >= 0, got {gamma}")
    P, (C, H, W) = len(prompts), model.latent_shape
    device = model.device
    sigmas = model.sigmas(num_steps)
    # All noise for pair p from one generator: eps, n_1, n_2 at the start, then n for each branch per step.
    noise = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        noise.append(torch.randn((2 * num_steps + 1, C, H, W), generator=g))
    noise = torch.stack(noise)                              # [P, 2N + 1, C, H, W]
    eps = noise[:, 0]                                       # [P, C, H, W]
    churn = noise[:, 1:].view(P, num_steps, 2, C, H, W)     # [P, N, 2, C, H, W]; churn[:, 0] starts the branches
    x = churn_start(eps[:, None], churn[:, 0], gamma)       # [P, 2, C, H, W]
    x = x.reshape(2 * P, C, H, W).to(device)
    if cond is None:
        cond = model.encode_prompts(list(prompts))
    cond2 = cond.repeat(2)                                  # [2P, ...], branches of a prompt adjacent
    xs, vs = [], []
    for i in range(num_steps):
        t, s = float(sigmas[i]), float(sigmas[i + 1])
        x_rec = x.to(record_dtype)                          # the state as the learner will read it
        with autocast(device, precision):
            v = model.velocity(x_rec, torch.tensor(t), cond2, guidance_scale)
        xs.append(x_rec.cpu())
        vs.append(v.to(record_dtype).cpu())
        last = i == num_steps - 1
        g_i = 0.0 if last else gamma
        # fresh churn noise for the step into sigmas[i + 1]; the start noise used churn[:, 0]
        n = None if last else churn[:, i + 1].reshape(2 * P, C, H, W).to(device)
        x = churn_step(x.float(), v, t, s, g_i, n)
    shape = (P, 2, num_steps, C, H, W)
    return PairTrajectory(
        xs=torch.stack(xs, 1).view(shape),
        vs=torch.stack(vs, 1).view(shape),
        sigmas=sigmas,
        x_final=x.float().cpu().view(P, 2, C, H, W),
        seeds=[int(s) for s in seeds],
    )
