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
from models.device import HostCopies, autocast, to_device
from models.euler import noise_generator, seed_noise

NOISE_DEVICES = ("host", "device")


def noise_device_of(noise_device: str, model_device: torch.device) -> torch.device:
    """``sampling.noise_device`` -> where the per-seed generators draw: the CPU ("host") or the model's device."""
    if noise_device not in NOISE_DEVICES:
        raise ValueError(f"sampling.noise_device must be one of {NOISE_DEVICES}, got {noise_device!r}")
    return torch.device("cpu") if noise_device == "host" else torch.device(model_device)


def churn_start(eps: torch.Tensor, n: torch.Tensor, gamma: float) -> torch.Tensor:
    """x_0 = eps / (1+gamma) + sqrt((1+gamma)^2 - 1) / (1+gamma) * n: unit variance, pairs correlate 1/(1+gamma)^2."""
    g = 1.0 + gamma
    return eps / g + math.sqrt(g * g - 1.0) / g * n


def churn_step(
    x: torch.Tensor, v: torch.Tensor, t: float, s: float, gamma: float, n: torch.Tensor | None
) -> torch.Tensor:
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
    noise_device: str = "host",
) -> PairTrajectory:
    """Sample one pair per prompt; pair p uses only ``seeds[p]`` for its noise, so it does not depend on batching.

    The start noise eps is shared by the two branches; every churn noise n is drawn per branch. The last
    step (to sigma 0) has no churn. Both branches of all prompts run as one batch of 2P. ``precision``: the
    learner's ``train.precision``, so the recorded v is computed under the same autocast as the learner's v_theta;
    and v is computed at the state as recorded (x in ``record_dtype``), the input the learner will see.
    ``noise_device`` (``sampling.noise_device``): "host" draws each seed's noise on the CPU, "device" on the model's
    device (no copies; on a CPU the same numbers). On CUDA the host never waits inside the step loop: the recorded
    x and v are copied into pinned memory as they come (``HostCopies``) and waited for once.
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
    noise = seed_noise(seeds, (2 * num_steps + 1, C, H, W), noise_device_of(noise_device, device))  # [P, 2N+1, C, H, W]
    eps = noise[:, 0]  # [P, C, H, W]
    churn = noise[:, 1:].view(P, num_steps, 2, C, H, W)  # [P, N, 2, C, H, W]; churn[:, 0] starts the branches
    x = churn_start(eps[:, None], churn[:, 0], gamma)  # [P, 2, C, H, W]
    x = to_device(x.reshape(2 * P, C, H, W), device)
    if cond is None:
        cond = model.encode_prompts(list(prompts))
    cond2 = cond.repeat(2)  # [2P, ...], branches of a prompt adjacent
    xs, vs = HostCopies(device), HostCopies(device)
    for i in range(num_steps):
        t, s = float(sigmas[i]), float(sigmas[i + 1])
        x_rec = x.to(record_dtype)  # the state as the learner will read it
        with autocast(device, precision):
            v = model.velocity(x_rec, torch.tensor(t), cond2, guidance_scale)
        xs.add(x_rec)
        vs.add(v.to(record_dtype))
        last = i == num_steps - 1
        g_i = 0.0 if last else gamma
        # fresh churn noise for the step into sigmas[i + 1]; the start noise used churn[:, 0]
        n = None if last else to_device(churn[:, i + 1].reshape(2 * P, C, H, W), device)
        x = churn_step(x.float(), v, t, s, g_i, n)
    shape = (P, 2, num_steps, C, H, W)
    return PairTrajectory(
        xs=xs.stack(1).view(shape),
        vs=vs.stack(1).view(shape),
        sigmas=sigmas,
        x_final=x.float().cpu().view(P, 2, C, H, W),
        seeds=[int(s) for s in seeds],
    )


@dataclass
class GroupTrajectory:
    """P groups of G SDE trajectories (Flow-GRPO), the W recorded steps of each. Shapes: xs, x_next [P, G, W, C, H, W];
    log_probs [P, G, W]; steps, sigmas, sigmas_next [P, W] (a group's window: the same steps for its G members);
    x_final [P, G, C, H, W].

    xs[p, g, j] is the state member g visited before its recorded step j (the trajectory's step ``steps[p, j]``, from
    sigma ``sigmas[p, j]`` to ``sigmas_next[p, j]``), x_next[p, g, j] the state the SDE step reached, and
    log_probs[p, g, j] = log p(x_next | x) under the sampling weights (``learner.flow_grpo.sde_step``)."""

    xs: torch.Tensor
    x_next: torch.Tensor
    log_probs: torch.Tensor
    steps: torch.Tensor
    sigmas: torch.Tensor
    sigmas_next: torch.Tensor
    x_final: torch.Tensor
    seeds: list[int]
    sigma_max: float  # the schedule's sigmas[1]: the SDE's std at sigma = 1 uses it


def sde_window(num_steps: int, window: int, window_range: int | None, generator: torch.Generator) -> range:
    """The steps a group samples with the SDE and records: all of them (window 0, Flow-GRPO), or ``window`` consecutive
    steps starting uniformly in [0, window_range - window] (Flow-GRPO-Fast; window_range None = num_steps)."""
    if window <= 0:
        return range(num_steps)
    hi = num_steps if window_range is None else window_range
    if not 1 <= window <= hi <= num_steps:
        raise ValueError(
            f"grpo.sde_window = {window} must lie in [1, grpo.sde_window_range = {hi}] and the range in "
            f"[window, sampling.num_steps = {num_steps}]"
        )
    start = int(torch.randint(0, hi - window + 1, (1,), generator=generator, device=generator.device))
    return range(start, start + window)


@torch.no_grad()
def sample_groups(
    model: FlowModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    group_size: int,
    num_steps: int = 10,
    noise_level: float = 0.7,
    window: int = 0,
    window_range: int | None = None,
    guidance_scale: float = 1.0,
    cond: PromptEmbeds | None = None,
    record_dtype: torch.dtype = torch.float32,
    precision: str = "fp32",
    noise_device: str = "host",
) -> GroupTrajectory:
    """Sample G = ``group_size`` images per prompt with Flow-GRPO's SDE (``learner.flow_grpo.sde_step``, noise level
    ``noise_level``) on the window's steps and the ODE's Euler step elsewhere; group p draws everything (its window,
    start noise, step noise) from ``seeds[p]`` alone. A recorded x_next is rounded to ``record_dtype`` and the
    trajectory continues from it, and its log-probability is of that rounded state: the learner, scoring the
    recorded step with the same weights and numerics, gets the same log p (ratio 1 at lag 0). ``noise_device`` and
    the host copies: as in ``sample_pairs``."""
    from learner.flow_grpo import sde_step

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: pass one seed per prompt")
    if group_size < 2:
        raise ValueError(f"grpo.group_size must be >= 2 (advantages are relative to the group); got {group_size}")
    P, G, (C, H, W) = len(prompts), group_size, model.latent_shape
    device, sigmas = model.device, model.sigmas(num_steps)
    sigma_max = float(sigmas[1])
    windows, noise, on_device = [], [], noise_device_of(noise_device, device)
    for s in seeds:
        g = noise_generator(s, on_device)
        windows.append(sde_window(num_steps, window, window_range, g))
        noise.append(torch.randn((num_steps + 1, G, C, H, W), generator=g, device=on_device))
    noise = torch.stack(noise)  # [P, N + 1, G, C, H, W]; [:, 0] starts the trajectories
    x = to_device(noise[:, 0].reshape(P * G, C, H, W), device)
    cond = (model.encode_prompts(list(prompts)) if cond is None else cond).repeat(G)  # members of a group adjacent
    sde = torch.tensor([[i in w for w in windows] for i in range(num_steps)])  # [N, P]: SDE step of group p?
    sde_on = to_device(sde.repeat_interleave(G, 1).view(num_steps, P * G, 1, 1, 1), device)  # [N, PG, 1, 1, 1]
    xs, x_next, log_probs = HostCopies(device), HostCopies(device), HostCopies(device)
    for i in range(num_steps):
        t, s = float(sigmas[i]), float(sigmas[i + 1])
        x_rec = x.to(record_dtype)
        with autocast(device, precision):
            v = model.velocity(x_rec, torch.tensor(t), cond, guidance_scale)
        if not sde[i].any():
            x = x_rec.float() + (s - t) * v  # the ODE's Euler step
            continue
        n = to_device(noise[:, i + 1].reshape(P * G, C, H, W), device)
        step = sde_step(x_rec, v, t, s, noise_level, sigma_max, noise=n)
        nxt = step.x_next.to(record_dtype)
        scored = sde_step(x_rec, v, t, s, noise_level, sigma_max, x_next=nxt)  # log p of the recorded state
        ode = x_rec.float() + (s - t) * v
        x = torch.where(sde_on[i], nxt.float(), ode)
        xs.add(x_rec)
        x_next.add(nxt)
        log_probs.add(scored.log_prob)
    # every group records the same number of steps; gather each group's own from the steps any group took
    taken = [i for i in range(num_steps) if sde[i].any()]
    pick = torch.tensor([[taken.index(i) for i in w] for w in windows])  # [P, W]
    shape = lambda t: t.view(len(taken), P, G, *t.shape[2:]).transpose(0, 1)  # noqa: E731  [P, T, G, ...]
    take = lambda t: torch.stack([shape(t)[p, pick[p]] for p in range(P)]).transpose(1, 2)  # noqa: E731  [P, G, W, ...]
    steps = torch.tensor([list(w) for w in windows])
    return GroupTrajectory(
        xs=take(xs.stack()),
        x_next=take(x_next.stack()),
        log_probs=take(log_probs.stack()),
        steps=steps,
        sigmas=sigmas[steps].float(),
        sigmas_next=sigmas[steps + 1].float(),
        x_final=x.float().cpu().view(P, G, C, H, W),
        seeds=[int(s) for s in seeds],
        sigma_max=sigma_max,
    )
