"""Plain Euler sampling on a model's own sigma schedule (no churn): inference, evaluation and pretraining.

Usage::

    images = generate_images(model, ["a cat"], seeds=[7], num_steps=40)       # uint8 [1, H, W, 3]
    latents = sample_euler(model, ["a cat"], seeds=[7], num_steps=40)         # final latents [1, C, H, W]

Sample p starts from ``seed_noise(seeds, shape)[p]``, drawn from its own generator seeded with ``seeds[p]``, so an
image does not depend on how prompts are batched. Evaluation draws it on the host (the same numbers on every device);
the sampler's training noise may be drawn on the model's device (``sampling.noise_device``, ``noise_generator``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from models.adapter import FlowModel, PromptEmbeds
from models.images import to_uint8


def noise_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one seed's noise, on ``device`` (the CPU's: the same numbers on every machine; a GPU's: other
    numbers, still a function of the seed alone, drawn where they are used)."""
    return torch.Generator(device=device).manual_seed(int(seed))


def seed_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Noise [len(seeds), *shape] on ``device``: row p from its own ``noise_generator(seeds[p], device)``."""
    return torch.stack([torch.randn(tuple(shape), generator=noise_generator(s, device), device=device) for s in seeds])


@torch.no_grad()
def euler_integrate(
    model: FlowModel, x: torch.Tensor, cond: PromptEmbeds, num_steps: int, guidance_scale: float = 1.0
) -> torch.Tensor:
    """Integrate x [B, C, H, W] from sigma 1 to 0 with plain Euler steps x + (s - t) v on the model's schedule."""
    x = x.to(model.device)
    sigmas = model.sigmas(num_steps)
    for i in range(num_steps):
        t, s = float(sigmas[i]), float(sigmas[i + 1])
        x = x.float() + (s - t) * model.velocity(x, torch.tensor(t), cond, guidance_scale)
    return x.float().cpu()


@torch.no_grad()
def sample_euler(
    model: FlowModel, prompts: Sequence[str], seeds: Sequence[int], num_steps: int = 40, guidance_scale: float = 1.0
) -> torch.Tensor:
    """One Euler sample per (prompt, seed) -> final latents [P, C, H, W]."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: pass one seed per prompt")
    noise = seed_noise(seeds, model.latent_shape)
    return euler_integrate(model, noise, model.encode_prompts(list(prompts)), num_steps, guidance_scale)


@torch.no_grad()
def euler_images(
    model: FlowModel,
    prompts: Sequence[str],
    noise: torch.Tensor,
    num_steps: int,
    guidance_scale: float = 1.0,
    batch: int = 64,
) -> torch.Tensor:
    """Decoded Euler samples [B, 3, H, W] in [0, 1] from given start noise [B, C, H, W], ``batch`` at a time."""
    out = []
    for i in range(0, len(prompts), batch):
        cond = model.encode_prompts(list(prompts[i : i + batch]))
        out.append(model.decode(euler_integrate(model, noise[i : i + batch], cond, num_steps, guidance_scale)).cpu())
    return torch.cat(out)


def generate_images(
    model: FlowModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_steps: int,
    guidance_scale: float = 1.0,
    batch: int = 64,
) -> np.ndarray:
    """uint8 images [len(prompts), H, W, 3], one per (prompt, seed): what ``fdfo generate`` and evaluation show."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: pass one seed per prompt")
    return to_uint8(
        euler_images(model, prompts, seed_noise(seeds, model.latent_shape), num_steps, guidance_scale, batch)
    )
