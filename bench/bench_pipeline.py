"""Ray pipeline vs the in-process loop, side by side in one run, for the same pairs and updates: wall time, and
how busy each role is.

    python bench/bench_pipeline.py [--epochs 6] [--samplers 2] [--smoke] [key=value overrides]

Both runs use the same config (tiny-cpu unless overridden) and train on the same number of pairs; the Ray
run overlaps sampling/scoring with learner updates. ``perf/sampler_busy`` and ``perf/learner_busy`` are the
shares of each epoch's wall time the samplers (summed over the pool) and the learner computed, averaged over
the epochs after the first; the **target** is >= 0.9 for the bottleneck role (the busier one) under Ray: the
pipeline keeps its slowest stage fed. Writes bench/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--samplers", type=int, default=2)
    ap.add_argument("--config", default="tiny-cpu")
    ap.add_argument("--smoke", action="store_true", help="2 epochs, 4 steps: every path runs, nothing is judged")
    ap.add_argument("--out", default="bench/results/pipeline.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.smoke:
        args.epochs, args.overrides = 2, ["sampling.num_steps=4", *args.overrides]
    logging.disable(logging.INFO)

    import ray

    from cluster.config import load_config
    from cluster.driver import run_local
    from cluster.runtime import run_ray

    out = Path(tempfile.mkdtemp(prefix="fdfo-bench-"))
    common = [f"train.epochs={args.epochs}", f"output_dir={out}"] + args.overrides
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, args.samplers + 2),
        include_dashboard=False,
        namespace="fdfo",
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    rows = {}
    for name, extra, fn in (
        ("in_process", ["runtime.local=true"], run_local),
        ("ray_pipeline", [f"runtime.sampler.count={args.samplers}"], run_ray),
    ):
        cfg = load_config(args.config, common + extra + [f"name=bench-{name}"])
        t0 = time.perf_counter()
        res = fn(cfg)
        wall = time.perf_counter() - t0
        hist = res["history"]
        steady_pairs = sum(h.get("pairs_trained", 0) for h in hist[1:])
        rows[name] = {
            "wall_s": wall,
            # from the end of epoch 0 to the end of the run: no actor start-up, no model loading
            "steady_s_per_pair": (hist[-1]["perf/wall_s"] - hist[0]["perf/wall_s"]) / max(steady_pairs, 1),
            "pairs_trained": res["ledger"]["pairs_trained"],
            "s_per_pair": wall / max(res["ledger"]["pairs_trained"], 1),
            "sample_s_per_pair": sum(h.get("perf/sample_s", 0) for h in hist) / max(res["ledger"]["pairs_trained"], 1),
            # the Ray driver times the learner call itself (perf/learner_step_s, per update); in process the update timer
            "learner_s_per_update": (sum(h["perf/learner_step_s"] for h in hist) / len(hist))
            if "perf/learner_step_s" in hist[-1]
            else sum(h.get("perf/update_s", 0) for h in hist) / max(sum(h.get("updates", 0) for h in hist), 1),
            **{
                k: sum(h[f"perf/{k}"] for h in hist[1:]) / max(len(hist) - 1, 1)
                for k in ("sampler_busy", "learner_busy")
            },
        }
    ray.shutdown()
    rows["ratio_ray_over_in_process"] = rows["ray_pipeline"]["wall_s"] / rows["in_process"]["wall_s"]
    rows["steady_ratio_ray_over_in_process"] = (
        rows["ray_pipeline"]["steady_s_per_pair"] / rows["in_process"]["steady_s_per_pair"]
    )
    ray_row = rows["ray_pipeline"]
    rows["bottleneck_busy"] = max(ray_row["sampler_busy"], ray_row["learner_busy"])
    rows["bottleneck_target_met"] = rows["bottleneck_busy"] >= 0.9
    rows["setup"] = {
        "config": args.config,
        "epochs": args.epochs,
        "samplers": args.samplers,
        "cpus": os.cpu_count(),
        "overrides": args.overrides,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
