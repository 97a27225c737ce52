"""FDFO against Flow-GRPO on the shapes task, in one tool: held-out judge against images sampled and wall time.

Usage::

    python bench/bench_fdfo_vs_grpo.py                                  # the sweep below, ~2 h on 2 cores
    python bench/bench_fdfo_vs_grpo.py --cfg 1.0 --seeds 0              # one slice of it
    python bench/bench_fdfo_vs_grpo.py --smoke                          # tiny budgets (CI): every path runs
    python bench/bench_fdfo_vs_grpo.py --report bench/results/fdfo_vs_grpo.json   # the table of a finished run

Both methods run the same model, reward, prompts, held-out set and images per epoch, in one process
(``runtime.local``: no scheduling in the comparison), at a constant learning rate: FDFO from the ``shapes`` preset
(64 pairs = 128 images an epoch), Flow-GRPO from ``shapes-flow-grpo`` (16 groups of 8 = 128 images, 2 updates an
epoch, noise level 0.7, clip range 1e-4). Each method sweeps ``--fdfo-lrs`` / ``--grpo-lrs`` (3 values each; the
best per method and guidance scale is the lr with the highest held-out judge at its last evaluation, seeds
averaged), over ``--seeds`` and ``--cfg`` guidance scales (1.0 = none). Every run records the held-out judge
(``eval/reward/shapes_judge/mean``, the fraction of prompt clauses the image satisfies) every ``--eval-every``
epochs against images sampled and training seconds (evaluations subtracted), and at its end the strict accuracy
(every clause) and diversity (mean pairwise RMS pixel distance between a prompt's seeds).

The headline, per guidance scale and seed, with each method at its best lr: Flow-GRPO's best held-out judge over
its run, the images Flow-GRPO sampled to first reach it, the images FDFO needed to reach the same judge (linear
between evaluations; inf if it never did), and their ratio: the project's target is FDFO <= 1/5 of Flow-GRPO's.
Writes ``bench/results/fdfo_vs_grpo.json`` (``--out``) and a plot beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

JUDGE = "eval/reward/shapes_judge/mean"
STRICT = "eval/metric/shapes_exact/mean"
METHODS = {"fdfo": "shapes", "flow_grpo": "shapes-flow-grpo"}
COMMON = [
    "runtime.local=true",
    "runtime.torch_threads=2",
    "train.lr_schedule=constant",
    "eval.num_prompts=32",
    "eval.seeds_per_prompt=4",
    "train.checkpoint_every=0",
]
SMOKE = {
    "fdfo": ["train.pairs_per_epoch=4", "sampling.pairs_per_call=4"],
    "flow_grpo": ["train.pairs_per_epoch=2", "sampling.pairs_per_call=2", "grpo.group_size=4"],
}


def curve(history: list[dict], before: dict) -> list[dict]:
    """(images sampled, training seconds, held-out judge and total reward) at the start and every evaluation."""
    points, eval_s = [{"images": 0, "train_s": 0.0, "judge": before[JUDGE], "reward": before["eval/reward/mean"]}], 0.0
    for h in history:
        eval_s += h.get("perf/eval_s", 0.0)
        if JUDGE in h:
            points.append(
                {
                    "images": h["perf/images_sampled"],
                    "train_s": h["perf/wall_s"] - eval_s,
                    "judge": h[JUDGE],
                    "reward": h["eval/reward/mean"],
                }
            )
    return points


def first_reach(points: list[dict], level: float, axis: str) -> float:
    """``axis`` (images or train_s) at which the judge first reaches ``level``, linear between evaluations."""
    if points[0]["judge"] >= level:
        return 0.0
    for a, b in zip(points, points[1:]):
        if b["judge"] >= level:
            f = (level - a["judge"]) / (b["judge"] - a["judge"])
            return a[axis] + f * (b[axis] - a[axis])
    return float("inf")


def run_one(method: str, overrides: list[str]) -> dict:
    import numpy as np

    from cluster.config import load_config
    from cluster.driver import run_local
    from cluster.evaluate import diversity, eval_set

    cfg = load_config(METHODS[method], overrides)
    t0 = time.perf_counter()
    res = run_local(cfg)
    wall = time.perf_counter() - t0
    final = res["final"]["heldout"]
    before = {"eval/" + k: v["before"] for k, v in final.items()}
    points = curve(res["history"], before)
    after = {"eval/" + k: v["after"] for k, v in final.items()}
    points[-1].update(judge=after[JUDGE], reward=after["eval/reward/mean"])  # the last evaluation is the "after"
    _, prompts, seeds = eval_set(cfg)
    images = res["sampler"].generate(prompts, seeds, cfg.eval.num_steps or cfg.sampling.num_steps)
    k = cfg.eval.seeds_per_prompt
    div = float(np.mean([diversity(images[i : i + k]) for i in range(0, len(images), k)]))
    return {
        "method": method,
        "overrides": overrides,
        "points": points,
        "total_wall_s": wall,
        "strict_before": before[STRICT],
        "strict_after": after[STRICT],
        "diversity_after": div,
        "images": res["ledger"]["pairs_requested"] * (cfg.grpo.group_size if method == "flow_grpo" else 2),
        "dropped": res["ledger"]["pairs_dropped"],
        "clip_frac_last": res["history"][-1].get("learner/clip_frac"),
    }


def reward_spread(images: int = 512, seed: int = 0) -> dict:
    """How often each method's unit carries a judge signal at the shipped base: the share of FDFO pairs whose two
    branches the judge scores differently, and of Flow-GRPO groups whose members it does not score all alike, on
    ``images`` images of training prompts each (the presets' sampling: churn 0.03 / SDE noise 0.7, 6 steps)."""
    import numpy as np

    from actors.sampler import Sampler
    from cluster.build import build_model
    from cluster.config import grpo_of, load_config
    from cluster.prompts import load_prompts
    from cluster.schedule import PairSchedule
    from tasks.shapes import world

    out = {}
    for method, preset in METHODS.items():
        cfg = load_config(preset, [f"seed={seed}"])
        sampler = Sampler(
            build_model(cfg.model), cfg.sampling, cfg.lora, precision=cfg.train.precision, grpo=grpo_of(cfg)
        )
        k = sampler.images_per_unit
        req = PairSchedule(load_prompts(cfg.prompts.source), seed).take(images // k)
        _, imgs = sampler.sample(**req)
        judged = world.clause_fraction(world.judge(imgs, [p for p in req["prompts"] for _ in range(k)]))
        per_unit = np.asarray(judged).reshape(-1, k)
        out[method] = {
            "units": len(per_unit),
            "images_per_unit": k,
            "share_with_signal": float(np.mean(per_unit.max(1) > per_unit.min(1))),
            "mean_spread": float(np.mean(per_unit.max(1) - per_unit.min(1))),
        }
    return out


def judge_at(points: list[dict], images: float) -> float:
    """The held-out judge at ``images`` sampled (linear between evaluations; the last one past the end)."""
    for a, b in zip(points, points[1:]):
        if a["images"] <= images <= b["images"]:
            f = (images - a["images"]) / max(b["images"] - a["images"], 1)
            return a["judge"] + f * (b["judge"] - a["judge"])
    return points[-1]["judge"]


def best_lr(runs: list[dict], method: str, cfg_w: float) -> float | None:
    """The lr whose runs (seeds averaged) have the highest held-out judge at the image budget every run of the sweep
    reached (so a longer run at one lr does not win by its length)."""
    mine = [r for r in runs if r["method"] == method and r["cfg"] == cfg_w]
    if not mine:
        return None
    budget = min(r["points"][-1]["images"] for r in mine)
    by_lr: dict[float, list[float]] = {}
    for r in mine:
        by_lr.setdefault(r["lr"], []).append(judge_at(r["points"], budget))
    return max(by_lr, key=lambda lr: sum(by_lr[lr]) / len(by_lr[lr]))


def longest(runs: list[dict], method: str, cfg_w: float, seed: int, lr: float) -> dict | None:
    """The run of ``method`` at this guidance, seed and lr that sampled the most images (None if there is none)."""
    mine = [r for r in runs if (r["method"], r["cfg"], r["seed"], r["lr"]) == (method, cfg_w, seed, lr)]
    return max(mine, key=lambda r: r["points"][-1]["images"], default=None)


def headline(runs: list[dict]) -> list[dict]:
    """Per guidance scale and seed, both methods at their best lr: the images (and seconds) each needs to reach
    Flow-GRPO's best held-out judge."""
    rows = []
    for w in sorted({r["cfg"] for r in runs}):
        lrs = {m: best_lr(runs, m, w) for m in METHODS}
        if None in lrs.values():
            continue  # one method not run at this guidance
        for seed in sorted({r["seed"] for r in runs if r["cfg"] == w}):
            pick = {m: longest(runs, m, w, seed, lrs[m]) for m in METHODS}
            if None in pick.values():
                continue  # a seed not run at both best lrs
            g, f = pick["flow_grpo"]["points"], pick["fdfo"]["points"]
            target = max(p["judge"] for p in g)
            row = {
                "cfg": w,
                "seed": seed,
                "fdfo_lr": lrs["fdfo"],
                "grpo_lr": lrs["flow_grpo"],
                "grpo_best_judge": target,
                "judge_before": g[0]["judge"],
                "fdfo_final_judge": f[-1]["judge"],
                "grpo_final_judge": g[-1]["judge"],
                "fdfo_best_judge": max(p["judge"] for p in f),
                "grpo_images_to_best": first_reach(g, target, "images"),
                "fdfo_images_to_it": first_reach(f, target, "images"),
                "grpo_s_to_best": first_reach(g, target, "train_s"),
                "fdfo_s_to_it": first_reach(f, target, "train_s"),
                **{f"{m}_strict_after": pick[m]["strict_after"] for m in METHODS},
                **{f"{m}_diversity_after": pick[m]["diversity_after"] for m in METHODS},
            }
            row["image_ratio"] = row["fdfo_images_to_it"] / max(row["grpo_images_to_best"], 1e-9)
            row["time_ratio"] = row["fdfo_s_to_it"] / max(row["grpo_s_to_best"], 1e-9)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        f"{'cfg':>4} {'seed':>4} {'lr fdfo':>8} {'lr grpo':>8} {'before':>6} {'grpo best':>9} {'fdfo best':>9} "
        f"{'grpo img':>8} {'fdfo img':>8} {'img ratio':>9} {'s ratio':>7} {'strict f/g':>11} {'div f/g':>11}"
    ]
    for r in rows:
        lines.append(
            f"{r['cfg']:>4} {r['seed']:>4} {r['fdfo_lr']:>8.0e} {r['grpo_lr']:>8.0e} {r['judge_before']:>6.3f} "
            f"{r['grpo_best_judge']:>9.3f} {r['fdfo_best_judge']:>9.3f} {r['grpo_images_to_best']:>8.0f} "
            f"{r['fdfo_images_to_it']:>8.0f} {r['image_ratio']:>9.3f} {r['time_ratio']:>7.3f} "
            f"{r['fdfo_strict_after']:>5.3f}/{r['flow_grpo_strict_after']:<5.3f} "
            f"{r['fdfo_diversity_after']:>5.3f}/{r['flow_grpo_diversity_after']:<5.3f}"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = sorted({r["cfg"] for r in runs})
    fig, axes = plt.subplots(len(ws), 2, figsize=(11, 4 * len(ws)), squeeze=False)
    for row, w in zip(axes, ws):
        lrs = {m: best_lr(runs, m, w) for m in METHODS}
        for r in runs:
            if r["cfg"] != w or r is not longest(runs, r["method"], w, r["seed"], lrs[r["method"]]):
                continue
            style = {"color": "C0" if r["method"] == "fdfo" else "C3", "alpha": 0.8}
            label = f"{r['method']} lr {r['lr']:g} seed {r['seed']}"
            for ax, axis in zip(row, ("images", "train_s")):
                ax.plot(
                    [p[axis] for p in r["points"]], [p["judge"] for p in r["points"]], marker=".", label=label, **style
                )
        for ax, axis in zip(row, ("images sampled", "training seconds (2 cores)")):
            ax.set_xlabel(axis)
            ax.set_ylabel("held-out judge")
            ax.set_title(f"shapes, guidance {w:g}, best lr per method")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0], help="guidance scales (1.0 = no CFG)")
    ap.add_argument("--fdfo-lrs", type=float, nargs="+", default=[5e-5, 1e-4, 2e-4])
    ap.add_argument("--grpo-lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    ap.add_argument("--fdfo-epochs", type=int, default=20)
    ap.add_argument("--grpo-epochs", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        help="run only these (a slice whose runs --report pools with the others)",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny budgets: 2 epochs, 1 seed, 1 lr each, no CFG")
    ap.add_argument("--out", default="bench/results/fdfo_vs_grpo.json")
    ap.add_argument(
        "--report",
        metavar="JSON",
        nargs="+",
        help="print the table of finished runs' JSON files (their "
        "runs pooled, e.g. the CFG and no-CFG slices run apart; recomputed) and write --out from them",
    )
    args = ap.parse_args()
    if args.report:
        parts = [json.loads(Path(p).read_text()) for p in args.report]
        runs = [r for part in parts for r in part["runs"]]
        logging.disable(logging.INFO)
        write(
            Path(args.out),
            {
                "setup": [part["setup"] for part in parts],
                "signal": reward_spread(),
                "headline": headline(runs),
                "runs": runs,
            },
        )
        return
    if args.smoke:
        args.seeds, args.cfg, args.fdfo_lrs, args.grpo_lrs = [0], [1.0], [1e-4], [3e-4]
        args.fdfo_epochs = args.grpo_epochs = 2
        args.eval_every = 1
    logging.disable(logging.INFO)
    out_dir, runs = Path(tempfile.mkdtemp(prefix="fdfo-vs-grpo-")), []
    epochs = {"fdfo": args.fdfo_epochs, "flow_grpo": args.grpo_epochs}
    for w in args.cfg:
        for seed in args.seeds:
            for method, lrs in (("fdfo", args.fdfo_lrs), ("flow_grpo", args.grpo_lrs)):
                for lr in lrs if method in args.methods else []:
                    name = f"{method}-w{w:g}-s{seed}-lr{lr:g}"
                    over = [
                        *COMMON,
                        f"train.epochs={epochs[method]}",
                        f"eval.every_epochs={args.eval_every}",
                        f"seed={seed}",
                        f"train.lr={lr}",
                        f"sampling.guidance_scale={w}",
                        f"output_dir={out_dir}",
                        f"name={name}",
                        *(SMOKE[method] + ["eval.num_prompts=4", "eval.seeds_per_prompt=2"] if args.smoke else []),
                    ]
                    r = run_one(method, over) | {"cfg": w, "seed": seed, "lr": lr}
                    runs.append(r)
                    print(
                        f"{name}: judge {r['points'][0]['judge']:.4f} -> {r['points'][-1]['judge']:.4f} "
                        f"(best {max(p['judge'] for p in r['points']):.4f}) in {r['images']} images, "
                        f"{r['points'][-1]['train_s']:.0f} s",
                        flush=True,
                    )
    setup = {
        "methods": args.methods,
        "epochs": epochs,
        "eval_every": args.eval_every,
        "seeds": args.seeds,
        "cfg": args.cfg,
        "lrs": {"fdfo": args.fdfo_lrs, "flow_grpo": args.grpo_lrs},
        "common": COMMON,
        "smoke": args.smoke,
    }
    write(
        Path(args.out),
        {"setup": setup, "signal": reward_spread(64 if args.smoke else 512), "headline": headline(runs), "runs": runs},
    )


def write(out: Path, report: dict) -> None:
    """The report as JSON at ``out``, its curves as a PNG beside it, and the headline table printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report["runs"], out.with_suffix(".png"))
    print(table(report["headline"]))
    for method, sig in report["signal"].items():
        print(
            f"{method}: {sig['share_with_signal']:.0%} of {sig['units']} units of {sig['images_per_unit']} images carry a "
            f"judge difference at the base (mean max-min spread {sig['mean_spread']:.3f})"
        )


if __name__ == "__main__":
    main()
