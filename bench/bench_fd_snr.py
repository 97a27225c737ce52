"""Benchmark: how much signal one FDFO pair carries -- split-half agreement of the finite-difference gradient.

Usage::

    python bench/bench_fd_snr.py                                     # shapes base model, gammas 0.003-0.1
    python bench/bench_fd_snr.py --checkpoint runs/shapes --gammas 0.01 0.03   # a trained policy
    python bench/bench_fd_snr.py --config my.yaml --pairs 256 model.path=...   # any preset (GPU: model.device)

At rho = 1 (fresh samples) the FDFO loss of one pair has the parameter gradient g_p = dR_p * w_p, with
w_p = sum over both branches and all steps of J^T d (J = d v_theta / d theta, d the pair's normalised direction;
ALGORITHM.md section 4; dR_2 d_2 = dR_1 d_1, so both branches share d_1 and dR_1). This script samples N pairs
with the run's sampler settings, scores them with every component of the run's reward (and its eval metrics),
and for random halves A, B of the pairs compares G_A = sum_A g_p with G_B. The split-half cosine c estimates
the per-pair signal-to-noise ratio s = |E g|^2 / Var g through c = n s / (n s + 1) (n = N / 2 pairs per half);
``pairs_for_half`` = 1 / s is the batch whose summed gradient has cosine 1/2 with its expectation's direction
when compared with an equal independent batch -- fewer is better. ``cos_vs_target`` compares one scorer's G_A
with the target scorer's G_B: how well training on that scorer follows the target's gradient.

Nothing is stored per pair: each w_p is folded into running sums, one per (scorer, split, half).
Writes ``<out>.json``.
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

from actors.sampling import sample_pairs  # noqa: E402
from cluster.build import reward_specs  # noqa: E402
from cluster.config import to_dict  # noqa: E402
from cluster.evaluate import base_model, load_policy  # noqa: E402
from cluster.prompts import load_prompts  # noqa: E402
from learner.loss import pair_signal  # noqa: E402
from models.lora import make_trainable  # noqa: E402
from rewards import build_reward, to_uint8  # noqa: E402


def trainable_params(model, lora: bool) -> list[torch.nn.Parameter]:
    """The parameters a run trains: the LoRA factors, or every transformer weight."""
    named = list(model.transformer.named_parameters())
    params = [p for n, p in named if "lora_" in n] if lora else [p for _, p in named]
    for p in params:
        p.requires_grad_(True)
    return params


def scorers(cfg, also: list[str] = ()) -> dict:
    """Each reward component, eval metric and extra scorer by name (the run's weighted sum is added as ``reward``)."""
    specs = reward_specs(cfg.reward) + [dict(m) for m in cfg.eval.metrics] + [{"name": n} for n in also]
    return {spec["name"]: build_reward({k: v for k, v in spec.items() if k != "weight"}) for spec in specs}


def probe(
    model, cfg, params, gamma: float, num_pairs: int, splits: int, target: str, seed: int, also: list[str] = ()
) -> dict:
    dev = params[0].device
    rng = np.random.default_rng(seed)
    prompts = load_prompts(cfg.prompts.source)
    chosen = [prompts[i] for i in rng.integers(0, len(prompts), num_pairs)]
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, num_pairs)]
    call = cfg.sampling.pairs_per_call
    scs = scorers(cfg, also)
    weights = {spec["name"]: spec["weight"] for spec in reward_specs(cfg.reward)}
    if target not in scs:
        raise ValueError(f"--target {target!r} is not among the run's scorers {sorted(scs)}")

    # 1. sample and score every pair (the rewards must be known before the gradients are folded in)
    trajs, dR = [], {name: [] for name in [*scs, "reward"]}
    t0 = time.perf_counter()
    for s in range(0, num_pairs, call):
        p = chosen[s : s + call]
        traj = sample_pairs(
            model,
            p,
            seeds[s : s + call],
            num_steps=cfg.sampling.num_steps,
            gamma=gamma,
            guidance_scale=cfg.sampling.guidance_scale,
        )
        images = to_uint8(model.decode(traj.x_final.flatten(0, 1).to(dev)))
        both = [q for q in p for _ in range(2)]
        total = np.zeros((len(p), 2))
        for name, sc in scs.items():
            r = np.asarray(sc.score(images, both).scores, dtype=np.float64).reshape(len(p), 2)
            dR[name].append((r[:, 0] - r[:, 1]) / 2)
            total += weights.get(name, 0.0) * r
        dR["reward"].append((total[:, 0] - total[:, 1]) / 2)
        trajs.append((p, traj))
    sample_s = time.perf_counter() - t0
    dR = {k: torch.tensor(np.concatenate(v), dtype=torch.float32) for k, v in dR.items()}
    names = list(dR)

    # 2. per-pair gradient directions w_p, folded into G[scorer, split, half]
    halves = torch.zeros(splits, num_pairs, dtype=torch.long)
    g = torch.Generator().manual_seed(seed + 1)
    for k in range(splits):
        halves[k, torch.randperm(num_pairs, generator=g)[num_pairs // 2 :]] = 1
    numel = sum(p.numel() for p in params)
    G = torch.zeros(len(names), splits, 2, numel, device=dev)
    coef_all = torch.stack([dR[n] for n in names])  # [S, N]
    dx_rms, w_norm, idx = [], [], 0
    for p, traj in trajs:
        cond = model.encode_prompts(p)
        _, d = pair_signal(torch.ones(len(p), 2), traj.x_final)  # [P, 2, C, H, W]
        steps = traj.xs.shape[2]
        dx_rms.extend(((traj.x_final[:, 0] - traj.x_final[:, 1]) / 2).pow(2).flatten(1).mean(1).sqrt().tolist())
        for j in range(len(p)):
            x = traj.xs[j].reshape(2 * steps, *traj.xs.shape[3:]).to(dev)
            sigma = traj.sigmas[:steps].repeat(2).to(dev)
            v = model.velocity(x, sigma, cond.index([j]).repeat(2 * steps), cfg.sampling.guidance_scale)
            grads = torch.autograd.grad((v * d[j, 0].to(dev)).sum(), params)
            w = torch.cat([gr.flatten() for gr in grads])
            w_norm.append(float(w.norm()))
            cw = coef_all[:, idx].to(dev)[:, None] * w  # [S, D]: g_p for every scorer
            for k in range(splits):
                G[:, k, int(halves[k, idx])] += cw
            idx += 1
    n = num_pairs // 2
    cos = torch.nn.functional.cosine_similarity
    out = {
        "gamma": gamma,
        "pairs": num_pairs,
        "sample_and_score_s": round(sample_s, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "dx_rms_quantiles_10_50_90": np.quantile(dx_rms, [0.1, 0.5, 0.9]).round(3).tolist(),
        "w_norm_median": float(np.median(w_norm)),
        "scorers": {},
    }
    ti = names.index(target)
    for i, name in enumerate(names):
        c = np.array([float(cos(G[i, k, 0], G[i, k, 1], 0)) for k in range(splits)])
        x = np.array([float(cos(G[i, k, 0], G[ti, k, 1], 0)) for k in range(splits)])
        cm = float(c.mean())
        snr = cm / (n * (1 - cm)) if 0 < cm < 1 else float("nan")
        out["scorers"][name] = {
            "split_half_cos": round(cm, 4),
            "split_half_cos_sd": round(float(c.std()), 4),
            "cos_vs_target": round(float(x.mean()), 4),
            "pairs_for_half": round(1 / snr) if snr == snr and snr > 0 else None,
            "frac_pairs_with_dR": round(float((dR[name] != 0).float().mean()), 3),
        }
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="shapes", help="preset or YAML (ignored with --checkpoint: its own config)")
    p.add_argument("--checkpoint", default=None, help="a run folder or checkpoint folder: probe the trained policy")
    p.add_argument("--gammas", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1])
    p.add_argument("--pairs", type=int, default=768)
    p.add_argument("--splits", type=int, default=8, help="random half-splits to average the cosine over")
    p.add_argument("--target", default="shapes_judge", help="the scorer the others are compared with")
    p.add_argument("--also", nargs="*", default=[], help="more scorers to probe, e.g. shapes_judge_soft")
    p.add_argument(
        "--label", default=None, help="name of the policy in the results (default: base / the checkpoint path)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fd_snr"), help="output stem")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.device=cuda")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        model, cfg, folder = load_policy(args.checkpoint)
        label = args.label or str(folder)
    else:
        model, cfg = base_model(args.config, args.overrides)
        label = args.label or "base"
        if cfg.lora.enabled:  # the adapter a run would start from
            make_trainable(model.transformer, cfg.lora)
    params = trainable_params(model, cfg.lora.enabled)
    path = Path(args.out + ".json")
    results = json.loads(path.read_text()) if path.exists() else {"runs": []}
    for gamma in args.gammas:
        row = {
            "policy": label,
            **probe(model, cfg, params, gamma, args.pairs, args.splits, args.target, args.seed, args.also),
        }
        print(json.dumps(row), flush=True)
        results["runs"] = [r for r in results["runs"] if (r["policy"], r["gamma"]) != (label, gamma)] + [row]
    results["config"] = to_dict(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
