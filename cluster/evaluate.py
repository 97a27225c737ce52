"""Evaluation, generation and plots: ``fdfo eval``, ``fdfo generate`` and the learning curve of a run.

Usage::

    fdfo eval --config shapes                                   # the base model on the held-out prompts
    fdfo eval --checkpoint runs/shapes/checkpoints/latest       # a trained policy
    fdfo generate --checkpoint runs/shapes/checkpoints/latest --prompt "a red circle" --seed 0 1 2

Evaluation samples with plain Euler (no churn) on fixed seeds, so before/after numbers are paired. It reports
the training reward(s), every ``eval.metrics`` scorer (metrics the run did not train on) and a diversity
measure: the mean pairwise RMS pixel distance between images of the same prompt with different seeds.
The paper's evaluation protocol (``fdfo eval --suite paper|quick``) is ``cluster/eval_suite.py``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from cluster.build import build_model, make_reward, metric_scorers
from cluster.config import RunConfig, load_config
from cluster.prompts import load_prompts
from cluster.schedule import pair_seed
from models.euler import generate_images
from models.images import save_grid
from models.lora import make_trainable


def checkpoint_config(checkpoint: str | Path, overrides: list[str] = ()) -> tuple[Path, RunConfig]:
    """A checkpoint folder (or a run folder / its ``checkpoints/latest``) -> (the checkpoint folder, its run config
    with ``overrides`` applied). Overrides of ``model.*`` and ``lora.*`` are refused: they describe its weights."""
    from cluster.config import upgraded, with_overrides
    from cluster.config_build import build
    from learner.checkpoint import latest_checkpoint

    fixed = [o for o in overrides if o.split("=", 1)[0].split(".")[0] in ("model", "lora")]
    if fixed:
        raise ValueError(
            f"override {fixed[0]!r}: a checkpoint's model and LoRA settings describe its weights and "
            "cannot change; evaluate the base model with --config instead"
        )
    folder = Path(checkpoint)
    if folder.name == "latest" or (folder / "checkpoints").is_dir():
        run_dir = folder.parent.parent if folder.name == "latest" else folder
        folder = latest_checkpoint(run_dir)
        if folder is None:
            raise FileNotFoundError(f"no checkpoint under {run_dir}/checkpoints")
    if not (folder / "state.json").exists():
        raise FileNotFoundError(f"{folder} is not an fdfo checkpoint folder (no state.json)")
    cfg = build(RunConfig, upgraded(json.loads((folder / "state.json").read_text())["config"]))
    # the checkpoint's weights supersede the run's starting point: its source is not loaded again (nor needed)
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, init_from=None))
    return folder, with_overrides(cfg, list(overrides))


def checkpoint_weights(folder: str | Path):
    """The trained tensors of a checkpoint folder as a verified ``Weights`` (what a sampler actor loads)."""
    from safetensors.torch import load_file

    from learner.weights import Weights

    state = json.loads((Path(folder) / "state.json").read_text())
    weights = Weights(
        version=int(state["version"]),
        tensors=load_file(str(Path(folder) / "trainable.safetensors")),
        checksum=state["checksum"],
    )
    weights.verify()
    return weights


def load_policy(checkpoint: str | Path):
    """A checkpoint folder (or a run folder / its ``checkpoints/latest``) -> (FlowModel with the trained weights,
    its config, the checkpoint folder)."""
    folder, cfg = checkpoint_config(checkpoint)
    model = build_model(cfg.model)
    make_trainable(model.transformer, cfg.lora)
    checkpoint_weights(folder).load_into(model.transformer)
    model.transformer.requires_grad_(False)
    return model, cfg, folder


def eval_set(cfg: RunConfig, num_prompts: int | None = None, seeds_per_prompt: int | None = None):
    """The fixed held-out evaluation set: (distinct prompts, prompts repeated per seed, seeds)."""
    ev = cfg.eval
    num_prompts, seeds_per_prompt = num_prompts or ev.num_prompts, seeds_per_prompt or ev.seeds_per_prompt
    all_prompts = load_prompts(cfg.prompts.eval_source or cfg.prompts.source)
    rng = np.random.default_rng(ev.seed)
    chosen = [all_prompts[i] for i in rng.permutation(len(all_prompts))[:num_prompts]]
    prompts = [p for p in chosen for _ in range(seeds_per_prompt)]
    seeds = [pair_seed(ev.seed, p, k) for p in chosen for k in range(seeds_per_prompt)]
    return chosen, prompts, seeds


def heldout_reward(cfg: RunConfig, generate_fn, score_fn, out_png: str | Path | None = None) -> dict:
    """Training reward (total and per component) and every ``eval.metrics`` scorer on Euler samples of the
    held-out set. ``generate_fn(prompts, seeds, num_steps)`` -> uint8 images; ``score_fn(images, prompts)`` ->
    RewardOutput (in process, or through Ray actors)."""
    chosen, prompts, seeds = eval_set(cfg)
    images = generate_fn(prompts, seeds, cfg.eval.num_steps or cfg.sampling.num_steps)
    out = score_fn(images, prompts)
    result = {"eval/reward/mean": float(np.nanmean(out.scores))}
    for k, v in (out.info.get("components") or {}).items():
        result[f"eval/reward/{k}/mean"] = float(np.nanmean(v))
    for k, scorer in metric_scorers(cfg.eval).items():
        result[f"eval/metric/{k}/mean"] = float(np.nanmean(scorer.score(images, prompts).scores))
    if out_png is not None:
        k, rows = cfg.eval.seeds_per_prompt, min(len(chosen), 8)  # a row per prompt, captioned with it
        save_grid(images[: rows * k], k, out_png, labels=chosen[:rows])
        result["grid"] = str(out_png)
    return result


def diversity(images: np.ndarray) -> float:
    """Mean pairwise RMS distance (pixels in [0, 1]) between S images [S, H, W, 3] of one prompt."""
    x = images.reshape(images.shape[0], -1).astype(np.float64) / 255.0
    d = [np.sqrt(np.mean((x[i] - x[j]) ** 2)) for i in range(len(x)) for j in range(i + 1, len(x))]
    return float(np.mean(d)) if d else float("nan")


def best_of_seeds(scores: np.ndarray, seeds_per_prompt: int) -> float:
    """Mean over prompts of the best score among each prompt's seeds (scores [P * S], a prompt's seeds adjacent):
    how good the policy's images of a prompt can be, against the mean's how good they are. A wide gap is
    headroom a reward-driven fine-tune can reach by making the good seeds the common case."""
    per_prompt = np.asarray(scores, dtype=np.float64).reshape(-1, seeds_per_prompt)
    return float(np.nanmean(np.nanmax(per_prompt, axis=1)))


def evaluate(
    model,
    cfg: RunConfig,
    out_dir: str | Path,
    num_prompts: int | None = None,
    seeds_per_prompt: int | None = None,
    tag: str = "eval",
) -> dict:
    """Held-out evaluation; writes ``<tag>.json`` and ``<tag>_grid.png`` (rows = prompts, each captioned with
    its prompt; columns = seeds)."""
    ev = cfg.eval
    chosen, prompts, seeds = eval_set(cfg, num_prompts, seeds_per_prompt)
    seeds_per_prompt = len(prompts) // len(chosen)
    source = cfg.prompts.eval_source or cfg.prompts.source
    steps = ev.num_steps or cfg.sampling.num_steps
    images = generate_images(model, prompts, seeds, steps, cfg.sampling.guidance_scale)
    reward = make_reward(cfg.reward)
    out = reward.score(images, prompts)
    summary = {
        "prompts_source": source,
        "num_prompts": len(chosen),
        "seeds_per_prompt": seeds_per_prompt,
        "num_steps": steps,
        "reward/mean": float(np.nanmean(out.scores)),
        **{f"reward/{k}/mean": float(np.nanmean(v)) for k, v in out.info.get("components", {}).items()},
        **{
            f"reward/{k}/best_of_seeds": best_of_seeds(v, seeds_per_prompt)
            for k, v in out.info.get("components", {}).items()
        },
    }
    for k, scorer in metric_scorers(cfg.eval).items():
        scores = scorer.score(images, prompts).scores
        summary[f"metric/{k}/mean"] = float(np.nanmean(scores))
        summary[f"metric/{k}/best_of_seeds"] = best_of_seeds(scores, seeds_per_prompt)
    per_prompt = images.reshape(len(chosen), seeds_per_prompt, *images.shape[1:])
    summary["diversity/pixel_rms"] = float(np.nanmean([diversity(g) for g in per_prompt]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid_n = min(len(chosen), 8)
    save_grid(
        per_prompt[:grid_n].reshape(-1, *images.shape[1:]),
        seeds_per_prompt,
        out_dir / f"{tag}_grid.png",
        labels=chosen[:grid_n],
    )
    (out_dir / f"{tag}_prompts.txt").write_text("\n".join(chosen[:grid_n]) + "\n")
    summary["grid"] = str(out_dir / f"{tag}_grid.png")
    (out_dir / f"{tag}.json").write_text(json.dumps(summary, indent=2))
    return summary


def plot_learning_curve(history: list[dict], path: str | Path) -> str:
    """Reward vs pairs trained and vs wall time -> PNG: the train reward every epoch, and every held-out series
    (total reward, its components, the ``eval.metrics``) where evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = np.cumsum([h.get("pairs_trained", 0) for h in history])
    wall = [h.get("perf/wall_s", np.nan) / 60 for h in history]
    train = [h.get("reward/mean", np.nan) for h in history]
    eval_keys = sorted({k for h in history for k in h if k.startswith("eval/") and k.endswith("/mean")})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, xs, label in ((axes[0], pairs, "pairs trained"), (axes[1], wall, "wall time (min)")):
        ax.plot(xs, train, label="train reward (sampled pairs)", alpha=0.7)
        for key in eval_keys:
            pts = [(x, h[key]) for x, h in zip(xs, history) if key in h]
            name = "reward" if key == "eval/reward/mean" else key[len("eval/") : -len("/mean")]
            ax.plot(*zip(*pts), "o-", label=f"held-out {name} (Euler, fixed seeds)")
        ax.set_xlabel(label)
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def base_model(config: str | None, overrides: list[str]):
    """The untrained model of a config (what a run starts from)."""
    cfg = load_config(config, overrides)
    model = build_model(cfg.model)
    model.transformer.requires_grad_(False)
    return model, cfg
