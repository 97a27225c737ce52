"""Train the shapes task's VAE (tasks/shapes/weights/shapes_vae.*): the real diffusers ``AutoencoderKL`` at tiny size.

Usage (what built the shipped files; ~7 min on 2 CPU cores)::

    python -m tasks.shapes.pretrain_vae --out-dir tasks/shapes/weights --steps 3000

The base model of the shapes task is a latent flow model like SD3: the VAE maps a 32x32 RGB scene to an
8x8x4 latent (factor 4, 256 numbers), and the flow transformer works on those latents. Training data are
scenes rendered on the fly from the TRAIN prompts (``tasks/shapes/world.py``); loss = MSE on pixels in [-1, 1] +
``--kl`` x KL to N(0, I) (small, as in SD's VAEs, so that latents stay informative). Afterwards the latent
statistics over ``--stat-images`` encoded scenes set ``shift_factor`` (mean) and ``scaling_factor`` (1 / std),
so the flow model sees latents of unit variance (diffusers' convention: z = (latent - shift) * scale).
The shapes judge on reconstructions of held-out scenes is recorded in the safetensors metadata.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from models.images import to_uint8
from tasks.shapes.world import heldout_prompts, judge_scores, parse, render, train_prompts

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32, 32),  # two downsamplings: 32x32 -> 8x8
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=8,
    sample_size=32,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="tasks/shapes/weights")
    p.add_argument("--name", default="shapes_vae")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--max-minutes", type=float, default=30.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (cosine decay to 5%%)")
    p.add_argument("--kl", type=float, default=1e-6, help="weight of the KL term")
    p.add_argument("--latent-channels", type=int, default=VAE_CONFIG["latent_channels"])
    p.add_argument(
        "--downsamplings",
        type=int,
        default=len(VAE_CONFIG["block_out_channels"]) - 1,
        help="the latent is 32 / 2^downsamplings pixels wide",
    )
    p.add_argument("--stat-images", type=int, default=2048)
    p.add_argument("--eval-images", type=int, default=256)
    return p.parse_args(argv)


def render_batch(prompts: list[str], rng: np.random.Generator) -> torch.Tensor:
    """One rendered scene per prompt -> float [n, 3, 32, 32] in [-1, 1] (the VAE's pixel range)."""
    images = np.stack([render(parse(p), rng) for p in prompts])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def random_prompts(prompts: list[str], n: int, rng: np.random.Generator) -> list[str]:
    return [prompts[i] for i in rng.integers(len(prompts), size=n)]


def main(argv=None) -> None:
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    prompts = train_prompts()
    levels = args.downsamplings + 1
    vae = AutoencoderKL(
        **VAE_CONFIG
        | dict(
            latent_channels=args.latent_channels,
            block_out_channels=(16,) + (32,) * (levels - 1),
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
        )
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0)))),
    )
    t0, step, losses = time.perf_counter(), 0, []
    while step < args.steps and time.perf_counter() - t0 < args.max_minutes * 60:
        x = render_batch(random_prompts(prompts, args.batch_size, rng), rng)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = torch.nn.functional.mse_loss(rec, x) + args.kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        losses.append(float(loss))
        if step % 250 == 0:
            print(
                f"step {step} loss {np.mean(losses[-250:]):.5f} ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True
            )
    vae.eval()
    with torch.no_grad():
        lat = torch.cat(
            [
                vae.encode(render_batch(random_prompts(prompts, 256, rng), rng)).latent_dist.sample()
                for _ in range(max(1, args.stat_images // 256))
            ]
        )
        shift, scale = float(lat.mean()), float(1.0 / lat.std())
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        held = heldout_prompts()
        chosen = [held[i] for i in rng.choice(len(held), args.eval_images, replace=False)]
        x = render_batch(chosen, rng)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        rec_score = float(judge_scores(to_uint8((rec / 2 + 0.5).clamp(0, 1)), chosen).mean())
        rec_mse = float(torch.nn.functional.mse_loss(rec, x))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # _use_default_values would make from_config ignore the latent statistics set after construction
    config = {k: v for k, v in dict(vae.config).items() if k != "_use_default_values"}
    (out / f"{args.name}.json").write_text(
        json.dumps({"_class_name": "AutoencoderKL", **config}, indent=2, default=list)
    )
    meta = {
        "step": str(step),
        "minutes": f"{(time.perf_counter() - t0) / 60:.1f}",
        "loss": f"{np.mean(losses[-250:]):.5f}",
        "heldout_recon_judge": f"{rec_score:.4f}",
        "heldout_recon_mse": f"{rec_mse:.5f}",
        "args": json.dumps(vars(args)),
    }
    save_file(
        {k: v.contiguous() for k, v in vae.state_dict().items()}, str(out / f"{args.name}.safetensors"), metadata=meta
    )
    print(json.dumps({**meta, "shift_factor": shift, "scaling_factor": scale}))


if __name__ == "__main__":
    main()
