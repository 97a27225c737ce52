"""Benchmark: FDFO on the shapes task -- reward vs pairs sampled (train reward and held-out judge).

Usage::

    python bench/bench_shapes_fdfo.py                                  # the shapes preset, ~15 min budget
    python bench/bench_shapes_fdfo.py --minutes 5 --eval-every 10 train.lr=1e-4 --out /tmp/x   # an experiment

The loop is ``cluster.driver.run_local`` (same Sampler, reward, Learner and schedule; one process, no Ray) with
an evaluation every ``--eval-every`` epochs: plain Euler (gamma 0, guidance of the config) from fixed seeds on
``--eval-prompts`` held-out prompts (the judge, the strict ``shapes_exact`` metric, which is not trained on) and
on as many train prompts, plus a diversity measure (mean pairwise RMS distance between 4 seeds of 16
held-out prompts). Training time excludes evaluation time. Writes ``<out>.json`` (config, curve) and
``<out>.png`` (held-out and train judge vs pairs sampled and vs training minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.models import build_model  # noqa: E402
from actors.sampler import Sampler  # noqa: E402
from actors.sampling import generate_images  # noqa: E402
from cluster.evaluate import diversity  # noqa: E402
from cluster.config import Batching, load_config, to_dict  # noqa: E402
from cluster.driver import make_reward, score_pairs, setup_process  # noqa: E402
from cluster.prompts import load_prompts  # noqa: E402
from cluster.schedule import PairSchedule  # noqa: E402
from learner.learner import Learner  # noqa: E402
from rewards import build_reward  # noqa: E402


def fixed_subset(prompts: list[str], n: int, seed: int) -> list[str]:
    if n >= len(prompts):
        return list(prompts)
    idx = np.random.default_rng(seed).choice(len(prompts), n, replace=False)
    return [prompts[i] for i in sorted(idx)]


def euler_images(model, prompts: list[str], seeds: list[int], num_steps: int, guidance: float) -> np.ndarray:
    """Plain Euler (gamma 0) samples -> uint8 [B, H, W, 3] (the project's evaluation sampler)."""
    return generate_images(model, prompts, seeds, num_steps, guidance)


class Evaluator:
    def __init__(self, cfg, n_prompts: int, seed: int = 1234):
        self.cfg = cfg
        self.held = fixed_subset(load_prompts(cfg.prompts.eval_source or cfg.prompts.source), n_prompts, seed)
        self.train = fixed_subset(load_prompts(cfg.prompts.source), n_prompts, seed)
        self.div_prompts = [p for p in self.held[:16] for _ in range(4)]
        self.seed = seed
        self.judge = build_reward({"name": "shapes_judge"})
        self.exact = build_reward({"name": "shapes_exact"})

    def __call__(self, model) -> dict:
        s, w = self.cfg.sampling.num_steps, self.cfg.sampling.guidance_scale
        seeds = [self.seed + i for i in range(len(self.held))]
        held = euler_images(model, self.held, seeds, s, w)
        train = euler_images(model, self.train, seeds[: len(self.train)], s, w)
        div = euler_images(model, self.div_prompts, [self.seed + 10_000 + i for i in range(len(self.div_prompts))], s, w)
        per_prompt = div.reshape(16, 4, *div.shape[1:])
        return {
            "heldout_judge": float(self.judge.score(held, self.held).scores.mean()),
            "heldout_exact": float(self.exact.score(held, self.held).scores.mean()),
            "train_judge": float(self.judge.score(train, self.train).scores.mean()),
            "diversity": float(np.mean([diversity(g) for g in per_prompt])),
        }, held


def run(cfg, minutes: float, eval_every: int, n_eval: int, log=print) -> dict:
    setup_process(cfg)
    batching = Batching.of(cfg)
    prompts = load_prompts(cfg.prompts.source)
    reward = make_reward(cfg.reward)
    sampler = Sampler(build_model(cfg.model), cfg.sampling, cfg.lora)
    learner = Learner(build_model(cfg.model), cfg.train, batching, cfg.lora, seed=cfg.seed)
    schedule = PairSchedule(prompts, cfg.seed)
    sampler.set_weights(learner.weights())
    evaluator = Evaluator(cfg, n_eval)
    curve, pairs, train_s = [], 0, 0.0

    def evaluate(epoch, train_reward, metrics):
        m, images = evaluator(learner.model)
        row = {"epoch": epoch, "pairs": pairs, "images": 2 * pairs, "train_minutes": round(train_s / 60, 3),
               "train_reward": train_reward, **m,
               **{k: metrics.get(k) for k in ("learner/log_rho_abs_mean", "learner/log_rho_abs_max",
                                             "learner/clip_frac", "learner/grad_norm") if k in metrics}}
        curve.append(row)
        log(json.dumps(row))
        return images

    first_images = evaluate(0, None, {})
    last_images, rewards_window, metrics = first_images, [], {}
    epoch = 0
    while epoch < cfg.train.epochs and train_s < minutes * 60:
        t0 = time.perf_counter()
        batches, todo = [], batching.pairs_per_epoch
        while todo > 0:
            req = schedule.take(min(cfg.sampling.pairs_per_call, todo))
            todo -= len(req["pair_ids"])
            job, images = sampler.sample(**req)
            rewards, _, _ = score_pairs(reward, images, req["prompts"])
            rewards_window.append(rewards[np.isfinite(rewards)])
            batch, _ = sampler.complete(job=job, rewards=rewards)
            if batch is not None:
                batches.append(batch)
        metrics = learner.train_epoch(*batches)
        sampler.set_weights(learner.weights())
        pairs += batching.pairs_per_epoch
        epoch += 1
        train_s += time.perf_counter() - t0
        if epoch % eval_every == 0 or train_s >= minutes * 60 or epoch == cfg.train.epochs:
            last_images = evaluate(epoch, float(np.concatenate(rewards_window).mean()), metrics)
            rewards_window = []
    return {"curve": curve, "held_prompts": evaluator.held, "first_images": first_images, "last_images": last_images}


def plot(curve: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "pairs", "pairs sampled"), (axes[1], "train_minutes", "training minutes (2 CPU cores)")):
        x = [r[key] for r in curve]
        ax.plot(x, [r["heldout_judge"] for r in curve], "o-", label="held-out judge (Euler, fixed seeds)")
        ax.plot(x, [r["train_judge"] for r in curve], "s--", label="train-prompt judge (Euler)")
        ax.plot(x, [r["heldout_exact"] for r in curve], "^:", label="held-out exact (not trained on)")
        tr = [(r[key], r["train_reward"]) for r in curve if r["train_reward"] is not None]
        if tr:
            ax.plot(*zip(*tr), ".-", alpha=0.5, label="train reward (churned samples)")
        ax.set_xlabel(label)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("shapes judge")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def grid(before: np.ndarray, after: np.ndarray, path: Path, n: int = 16) -> None:
    """Before (top row of each pair) and after (bottom) samples of the same held-out prompts and seeds."""
    from PIL import Image

    n = min(n, len(before))
    h, w = before.shape[1:3]
    canvas = np.full((2 * (h + 2), n * (w + 2), 3), 255, np.uint8)
    for i in range(n):
        canvas[:h, i * (w + 2) : i * (w + 2) + w] = before[i]
        canvas[h + 2 : 2 * h + 2, i * (w + 2) : i * (w + 2) + w] = after[i]
    Image.fromarray(canvas).resize((canvas.shape[1] * 4, canvas.shape[0] * 4), Image.NEAREST).save(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="shapes")
    p.add_argument("--minutes", type=float, default=15.0, help="training wall-time budget (evaluation excluded)")
    p.add_argument("--eval-every", type=int, default=10, help="epochs between evaluations")
    p.add_argument("--eval-prompts", type=int, default=128)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "shapes_fdfo"), help="output stem")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.lr=1e-4")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    res = run(cfg, args.minutes, args.eval_every, args.eval_prompts)
    curve = res["curve"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "config": to_dict(cfg), "overrides": args.overrides, "minutes_budget": args.minutes,
        "heldout_before": curve[0]["heldout_judge"], "heldout_after": curve[-1]["heldout_judge"],
        "heldout_best": max(r["heldout_judge"] for r in curve), "curve": curve,
        "note": "train_minutes exclude evaluation; one process (run_local math) on 2 shared CPU cores",
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    plot(curve, out.with_suffix(".png"), f"FDFO on shapes ({args.config} {' '.join(args.overrides)})")
    grid(res["first_images"], res["last_images"], Path(str(out) + "_grid.png"))
    print(f"held-out judge {summary['heldout_before']:.3f} -> {summary['heldout_after']:.3f} "
          f"(best {summary['heldout_best']:.3f}); wrote {out}.json/.png/_grid.png")


if __name__ == "__main__":
    main()
