"""Time to reward: the in-process loop vs the Ray runtime (overlapped and lock-step), side by side in one run.

Usage::

    python bench/bench_time_to_reward.py                       # shapes preset, 40 epochs, seeds 0 1, 1 and 4 updates
    python bench/bench_time_to_reward.py --epochs 20 --seeds 0 --updates 1 train.lr=2e-4
    python bench/bench_time_to_reward.py --smoke               # tiny budgets (CI): every mode runs, nothing timed
    python bench/bench_time_to_reward.py --modes ray_lockstep ray_overlap ray_overlap_corrected --lags 1 3 7

Each mode trains the same preset (``--config``, default ``shapes``) with the held-out judge evaluated every
``--eval-every`` epochs, and each row records the held-out reward against pairs trained and against training wall
time (``perf/wall_s`` minus the held-out evaluations, which are the same work in every mode; the total wall time
with actor start-up and the before/after evaluations is reported beside it). Modes::

    in_process     runtime.local=true: one process, torch on every core
    in_process_1t  the same on one torch thread (the loop as the single-process reference scripts run it)
    ray_overlap    samplers keep sampling while the learner trains (runtime.overlap=true), 1 sampler, 1-CPU learner
    ray_lockstep   the reference's lag (runtime.overlap=false), 2 samplers sampling each epoch in parallel, 2-CPU learner
    ray_overlap_corrected  ray_overlap with train.staleness_correction=true (docs/algorithms.md; not run by default)

``--lags K ...`` runs each overlapped mode once per lag bound (``train.max_policy_lag=K``, rows named ``mode@lagK``;
lock-step runs once: its bound is updates_per_epoch - 1 whatever K). Each row is also compared with ``ray_lockstep``
of the same seed and updates: its held-out gain per pair over lock-step's, at the pairs both trained
(``per_pair_vs_lockstep``) and averaged over lock-step's evaluations (``per_pair_curve_vs_lockstep``: less noisy).

Per seed and ``train.updates_per_epoch`` it prints each mode's final held-out gain, the gain at equal pairs, and
the **time-to-reward ratio** against each in-process row: the training wall time a mode needs to first reach
that row's final held-out reward (linear interpolation between evaluations; ``inf`` if it never does), over that
row's time to its end. Writes ``bench/results/time_to_reward.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")

MODES = {
    "in_process": ["runtime.local=true"],
    "in_process_1t": ["runtime.local=true", "runtime.torch_threads=1"],
    "ray_overlap": ["runtime.overlap=true", "runtime.sampler.count=1", "runtime.learner.num_cpus=1"],
    "ray_lockstep": ["runtime.overlap=false", "runtime.sampler.count=2", "runtime.learner.num_cpus=2"],
    "ray_overlap_corrected": [
        "runtime.overlap=true",
        "runtime.sampler.count=1",
        "runtime.learner.num_cpus=1",
        "train.staleness_correction=true",
    ],
}
# overlap's staleness emulated in one process: the sampler holds the weights K versions behind the learner (K from
# --lags), held-out evaluations use the learner's current weights (``delayed_publish``)
MODES["in_process_lag"] = ["runtime.local=true"]
MODES["in_process_lag_corrected"] = ["runtime.local=true", "train.staleness_correction=true"]
OVERLAPPED = ("ray_overlap", "ray_overlap_corrected", "in_process_lag", "in_process_lag_corrected")
SMOKE = ["train.pairs_per_epoch=8", "sampling.pairs_per_call=4", "eval.num_prompts=4", "eval.seeds_per_prompt=1"]


def curve(history: list[dict], before: float) -> list[dict]:
    """(pairs trained, training seconds, held-out reward) at the start and at every evaluation of a run."""
    points, pairs, eval_s = [{"pairs": 0, "train_s": 0.0, "heldout": before}], 0, 0.0
    for h in history:
        pairs += h.get("pairs_trained", 0)
        eval_s += h.get("perf/eval_s", 0.0)
        if "eval/reward/mean" in h:
            points.append({"pairs": pairs, "train_s": h["perf/wall_s"] - eval_s, "heldout": h["eval/reward/mean"]})
    return points


def time_to(points: list[dict], level: float) -> float:
    """Training seconds at which the held-out reward first reaches ``level`` (linear between evaluations)."""
    for a, b in zip(points, points[1:]):
        if b["heldout"] >= level:
            if a["heldout"] >= level:
                return a["train_s"]
            f = (level - a["heldout"]) / (b["heldout"] - a["heldout"])
            return a["train_s"] + f * (b["train_s"] - a["train_s"])
    return float("inf")


def at_pairs(points: list[dict], pairs: int) -> float:
    """Held-out reward at ``pairs`` trained (linear between evaluations)."""
    for a, b in zip(points, points[1:]):
        if a["pairs"] <= pairs <= b["pairs"]:
            f = (pairs - a["pairs"]) / max(b["pairs"] - a["pairs"], 1)
            return a["heldout"] + f * (b["heldout"] - a["heldout"])
    return points[-1]["heldout"]


@contextmanager
def delayed_publish(lag: int | None):
    """``run_local`` with its sampler ``lag`` versions behind the learner (None: as it is): every pair of an epoch is
    sampled with the weights of ``lag`` updates ago, as an overlapped run whose learner is the bottleneck samples them
    at its lag bound, while the held-out evaluations load the learner's current weights."""
    import cluster.driver as driver

    if lag is None:
        yield
        return
    publish, heldout, held, now = driver.publish, driver.heldout_reward, deque(), {}

    def stale_publish(learner, sampler) -> None:
        held.append(learner.weights())
        while len(held) > lag + 1:
            held.popleft()
        now["learner"] = learner
        sampler.set_weights(held[0])  # the oldest kept: lag versions behind once the run is lag updates in

    def current_heldout(cfg, generate, score, png):
        sampler = generate.__self__
        sampler.set_weights(now["learner"].weights())
        try:
            return heldout(cfg, generate, score, png)
        finally:
            sampler.set_weights(held[0])

    driver.publish, driver.heldout_reward = stale_publish, current_heldout
    try:
        yield
    finally:
        driver.publish, driver.heldout_reward = publish, heldout


def run_one(config: str, overrides: list[str], lag: int | None = None) -> dict:
    from cluster.config import load_config
    from cluster.driver import run_local
    from cluster.runtime import run_ray

    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    with delayed_publish(lag):
        res = (run_local if cfg.runtime.local else run_ray)(cfg)
    wall = time.perf_counter() - t0
    hist, final = res["history"], res["final"]
    points = curve(hist, final["heldout_reward_before"])
    points[-1]["heldout"] = final["heldout_reward_after"]  # the last epoch's evaluation is the "after"
    busy = lambda k: sum(h.get(k, 0.0) for h in hist[1:]) / max(len(hist) - 1, 1)  # noqa: E731  (epoch 0 warms up)
    lags = [(h["learner/policy_lag_mean"], h.get("learner/rows", 1)) for h in hist if "learner/policy_lag_mean" in h]
    weights = [h["learner/behaviour_weight_mean"] for h in hist if "learner/behaviour_weight_mean" in h]
    return {
        "overrides": overrides,
        "total_wall_s": wall,
        "points": points,
        "pairs_trained": res["ledger"]["pairs_trained"],
        "dropped": res["ledger"]["pairs_dropped"],
        "gain": final["heldout_reward_gain"],
        "policy_lag_max": max((h.get("learner/policy_lag_max", 0) for h in hist), default=0),
        "sampler_busy": busy("perf/sampler_busy"),
        "learner_busy": busy("perf/learner_busy"),
        "update_s": busy("perf/update_s"),  # the learner's own time per epoch (its updates), after epoch 0
        "policy_lag_mean": sum(m * n for m, n in lags) / max(sum(n for _, n in lags), 1),
        "behaviour_weight_mean": sum(weights) / len(weights) if weights else None,  # staleness correction only
        "clip_frac_mean": busy("learner/clip_frac"),
    }


def vs_lockstep(rows: dict[str, dict]) -> dict:
    """Each row's held-out gain per pair over ``ray_lockstep``'s (same seed and updates): at the pairs both trained,
    and averaged over lock-step's evaluations (each gain at lock-step's pairs, as far as the row trained)."""
    name = "ray_lockstep" if "ray_lockstep" in rows else "in_process"  # lock-step Ray learns what in process does
    if name not in rows:
        return {}
    ref = rows[name]["points"]
    gain = lambda points, n: at_pairs(points, n) - points[0]["heldout"]  # noqa: E731
    out = {}
    for mode, r in rows.items():
        pts, pairs = r["points"], min(r["points"][-1]["pairs"], ref[-1]["pairs"])
        shared = [p["pairs"] for p in ref[1:] if p["pairs"] <= pts[-1]["pairs"]]
        out[mode] = {
            "per_pair": gain(pts, pairs) / gain(ref, pairs),
            "per_pair_curve": sum(gain(pts, n) for n in shared) / sum(gain(ref, n) for n in shared),
        }
    return out


def compare(rows: dict[str, dict]) -> dict:
    """Each mode against the in-process rows of the same seed and updates: gain at equal pairs, time-to-reward."""
    refs = {m: rows[m] for m in ("in_process", "in_process_1t") if m in rows}
    lockstep = vs_lockstep(rows)
    out = {}
    for mode, r in rows.items():
        pairs = min([r["points"][-1]["pairs"]] + [ref["points"][-1]["pairs"] for ref in refs.values()])
        base = r["points"][0]["heldout"]
        out[mode] = {
            "gain": r["gain"],
            "gain_at_equal_pairs": at_pairs(r["points"], pairs) - base,
            "train_s": r["points"][-1]["train_s"],
            "total_wall_s": r["total_wall_s"],
            **{
                f"ttr_vs_{m}": time_to(r["points"], ref["points"][-1]["heldout"]) / ref["points"][-1]["train_s"]
                for m, ref in refs.items()
            },
            # the same for 90 % of that row's gain: robust to the last evaluation's seed noise
            **{
                f"ttr90_vs_{m}": time_to(
                    r["points"],
                    ref["points"][0]["heldout"] + 0.9 * (ref["points"][-1]["heldout"] - ref["points"][0]["heldout"]),
                )
                / ref["points"][-1]["train_s"]
                for m, ref in refs.items()
            },
            "sampler_busy": r["sampler_busy"],
            "learner_busy": r["learner_busy"],
            "policy_lag_max": r["policy_lag_max"],
            "policy_lag_mean": r.get("policy_lag_mean", float("nan")),
            "update_s": r.get("update_s", float("nan")),
            "dropped": r["dropped"],
            **{f"{k}_vs_lockstep": v for k, v in lockstep.get(mode, {}).items()},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="shapes")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--updates", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--modes", nargs="+", default=[m for m in MODES if m not in OVERLAPPED[1:]], choices=list(MODES))
    ap.add_argument("--lags", type=int, nargs="+", help="train.max_policy_lag bounds for the overlapped modes")
    ap.add_argument("--smoke", action="store_true", help="tiny budgets: 2 epochs, 8 pairs, 1 seed, 1 update")
    ap.add_argument("--out", default="bench/results/time_to_reward.json")
    ap.add_argument(
        "--report", metavar="JSON", nargs="+", help="print the table of finished runs' JSONs (comparisons recomputed)"
    )
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.report:
        merged = {}  # runs of the same updates and seed from several files compared together
        for path in args.report:
            for r in json.loads(Path(path).read_text())["results"]:
                key = (r["updates_per_epoch"], r["seed"])
                merged.setdefault(key, {"updates_per_epoch": key[0], "seed": key[1], "runs": {}})["runs"].update(
                    r["runs"]
                )
        results = [r | {"vs_in_process": compare(r["runs"])} for r in merged.values()]
        if args.out != ap.get_default("out"):  # the merged comparison, written where --out says
            Path(args.out).write_text(json.dumps({"sources": args.report, "results": results}, indent=2))
        print(table(results))
        return
    if not args.lags and any(m.startswith("in_process_lag") for m in args.modes):
        ap.error("the in_process_lag modes emulate a lag: give it with --lags K ...")
    if args.smoke:
        args.epochs, args.eval_every, args.seeds, args.updates = 2, 1, [0], [1]
    logging.disable(logging.INFO)
    import ray

    if any("runtime.local=true" not in MODES[m] for m in args.modes):  # in-process modes need no Ray
        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, 5),
            include_dashboard=False,
            namespace="fdfo",
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
    out_dir = Path(tempfile.mkdtemp(prefix="fdfo-ttr-"))
    results = []
    try:
        for updates in args.updates:
            for seed in args.seeds:
                rows = {}
                for mode, lag in [
                    (m, k) for m in args.modes for k in (args.lags if m in OVERLAPPED and args.lags else [None])
                ]:
                    name = mode if lag is None else f"{mode}@lag{lag}"
                    over = [
                        f"train.epochs={args.epochs}",
                        f"eval.every_epochs={args.eval_every}",
                        f"seed={seed}",
                        f"train.updates_per_epoch={updates}",
                        f"output_dir={out_dir}",
                        f"name={mode}-s{seed}-u{updates}" + ("" if lag is None else f"-lag{lag}"),
                        *(SMOKE if args.smoke else []),
                        *args.overrides,
                        *MODES[mode],
                        *([] if lag is None else [f"train.max_policy_lag={lag}"]),
                    ]
                    rows[name] = run_one(args.config, over, lag if mode.startswith("in_process_lag") else None)
                    print(
                        f"updates {updates} seed {seed} {name}: gain {rows[name]['gain']:+.4f} in "
                        f"{rows[name]['points'][-1]['train_s']:.0f} s of training, lag mean "
                        f"{rows[name]['policy_lag_mean']:.2f} max {rows[name]['policy_lag_max']}, "
                        f"updates {rows[name]['update_s']:.2f} s an epoch",
                        flush=True,
                    )
                results.append(
                    {"updates_per_epoch": updates, "seed": seed, "runs": rows, "vs_in_process": compare(rows)}
                )
    finally:
        ray.shutdown()
    report = {
        "setup": {
            "config": args.config,
            "epochs": args.epochs,
            "eval_every": args.eval_every,
            "cpus": os.cpu_count(),
            "modes": {m: MODES[m] for m in args.modes},
            "lags": args.lags,
            "overrides": args.overrides,
            "smoke": args.smoke,
        },
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(table(results))


def table(results: list[dict]) -> str:
    """One line per run; ttr columns: time-to-reward ratio against in_process / in_process_1t (to its final held-out
    reward; ttr90: to 90 % of its gain); nan: row absent."""
    lines = [
        f"{'updates':>7} {'seed':>4} {'mode':<27} {'gain':>7} {'@pairs':>7} {'train s':>8} {'total s':>8} "
        f"{'ttr/ip':>7} {'ttr/ip1t':>8} {'ttr90/ip':>8} {'ttr90/1t':>8} {'smp busy':>8} {'lrn busy':>8} {'lag':>3} "
        f"{'lag avg':>7} {'upd s':>6} {'/lock':>6} {'/lock~':>6}"
    ]
    for r in results:
        for mode, c in r["vs_in_process"].items():
            lines.append(
                f"{r['updates_per_epoch']:>7} {r['seed']:>4} {mode:<27} {c['gain']:>+7.4f} "
                f"{c['gain_at_equal_pairs']:>+7.4f} {c['train_s']:>8.1f} {c['total_wall_s']:>8.1f} "
                f"{c.get('ttr_vs_in_process', float('nan')):>7.3f} {c.get('ttr_vs_in_process_1t', float('nan')):>8.3f} "
                f"{c.get('ttr90_vs_in_process', float('nan')):>8.3f} {c.get('ttr90_vs_in_process_1t', float('nan')):>8.3f} "
                f"{c['sampler_busy']:>8.2f} {c['learner_busy']:>8.2f} {c['policy_lag_max']:>3} "
                f"{c.get('policy_lag_mean', float('nan')):>7.2f} {c.get('update_s', float('nan')):>6.2f} "
                f"{c.get('per_pair_vs_lockstep', float('nan')):>6.2f} {c.get('per_pair_curve_vs_lockstep', float('nan')):>6.2f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
