"""Benchmark: FDFO on the shapes task through the Ray runtime -- held-out judge vs pairs sampled and wall time.

Usage::

    python bench/bench_shapes_fdfo.py                               # the default preset, seeds 0 and 1 (~20 min)
    python bench/bench_shapes_fdfo.py --seeds 0 train.lr=5e-4 --out /tmp/x    # an experiment

Each seed is one ``fdfo train`` run (``cluster.runtime.run_ray`` on a fresh local Ray instance: sampler, reward
and learner actors) with a held-out evaluation every ``eval.every_epochs`` epochs: plain Euler from fixed seeds
on the preset's held-out prompts, scored by the training reward's components (``shapes_judge``,
``shapes_clean``) and by ``shapes_exact``, which the run does not train on. Writes ``<out>.json`` (config, one
curve per seed) and ``<out>.png`` (held-out judge and exact accuracy vs pairs trained and vs wall time).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.config import load_config, to_dict  # noqa: E402

KEYS = ("eval/reward/shapes_judge/mean", "eval/metric/shapes_exact/mean", "eval/reward/shapes_clean/mean")


def curve_of(result: dict, before: dict) -> list[dict]:
    """One row per evaluation: pairs trained so far, wall minutes, the held-out numbers (the first row is before)."""
    rows = [{"epoch": -1, "pairs": 0, "minutes": 0.0, **{k: before[k] for k in KEYS}}]
    pairs = 0
    for h in result["history"]:
        pairs += h.get("pairs_trained", 0)
        if KEYS[0] in h:
            rows.append(
                {
                    "epoch": h["epoch"],
                    "pairs": pairs,
                    "minutes": round(h["perf/wall_s"] / 60, 3),
                    **{k: h[k] for k in KEYS},
                }
            )
    return rows


def plot(curves: dict[int, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x, label in ((axes[0], "pairs", "pairs trained"), (axes[1], "minutes", "wall time (min, 2 CPU cores)")):
        for seed, rows in curves.items():
            ax.plot([r[x] for r in rows], [r[KEYS[0]] for r in rows], "o-", label=f"held-out judge, seed {seed}")
            ax.plot(
                [r[x] for r in rows],
                [r[KEYS[1]] for r in rows],
                "^:",
                label=f"held-out exact (not trained on), seed {seed}",
            )
        ax.set_xlabel(label)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    import logging

    from cluster.runtime import run_ray

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="shapes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "shapes_fdfo"), help="output stem")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.lr=1e-4")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    curves, summary = {}, {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(
                args.config, [*args.overrides, f"seed={seed}", f"output_dir={tmp}", "runtime.address=local"]
            )
            result = run_ray(cfg)
        before = {f"eval/{k}": v["before"] for k, v in result["final"]["heldout"].items()}
        curves[seed] = curve_of(result, before)
        summary[seed] = result["final"]["heldout"]
        first, last = curves[seed][0][KEYS[0]], curves[seed][-1][KEYS[0]]
        print(
            f"seed {seed}: held-out judge {first:.3f} -> {last:.3f} ({last - first:+.3f}) in "
            f"{curves[seed][-1]['minutes']:.1f} min, {curves[seed][-1]['pairs']} pairs",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "config": to_dict(cfg),
                "overrides": args.overrides,
                "seeds": args.seeds,
                "heldout": summary,
                "curves": curves,
                "note": "fdfo train through Ray (local instance, 2 CPU cores); minutes are the run's wall time "
                "including its held-out evaluations",
            },
            indent=1,
        )
    )
    plot(curves, out.with_suffix(".png"), f"FDFO on shapes through Ray ({args.config} {' '.join(args.overrides)})")
    print(f"wrote {out}.json and {out}.png")


if __name__ == "__main__":
    main()
