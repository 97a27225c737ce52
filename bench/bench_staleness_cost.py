"""What ``train.staleness_correction`` costs per update: the learner's CPU seconds with it off and on.

Usage::

    python bench/bench_staleness_cost.py                       # shapes, 1 and 4 updates an epoch, 3 repeats each
    python bench/bench_staleness_cost.py --updates 4 --repeats 5

A 64-pair batch of the ``shapes`` preset sampled at version 0 is trained, in process on one torch thread, by a learner
at version 1: every row is stale, the correction's worst case. Off and on alternate, so that a busy machine slows
both alike; the time is this process's CPU time (``time.process_time``), which other processes on a shared machine
change far less than the wall time. With one update an epoch the correction adds no forward (the update's own
forward is the anchor); with U updates the rows of updates 2..U get one no-grad forward each (docs/algorithms.md).
Writes ``bench/results/staleness_cost.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch


def batches(cfg) -> list:
    """64 pairs (two sampler calls of 32) at the base weights, with random rewards."""
    from actors.sampler import Sampler
    from cluster.build import build_model

    sampler = Sampler(partial(build_model, cfg.model), cfg.sampling, cfg.lora, precision=cfg.train.precision)
    out = []
    for start in (0, 32):
        ids = list(range(start, start + 32))
        job, _ = sampler.sample(prompts=[f"a red circle {i}" for i in ids], prompt_ids=ids, pair_ids=ids, seeds=ids)
        batch, _ = sampler.complete(job=job, rewards=np.random.default_rng(start).random((32, 2)))
        out.append(batch)
    return out


def cpu_s_per_update(config: str, updates: int, correct: bool, data: list) -> float:
    from cluster.build import build_model
    from cluster.config import Batching, load_config
    from learner.learner import Learner

    cfg = load_config(
        config,
        [
            f"train.updates_per_epoch={updates}",
            "train.max_policy_lag=7",
            f"train.staleness_correction={str(correct).lower()}",
        ],
    )
    learner = Learner(partial(build_model, cfg.model, role="learner"), cfg.train, Batching.of(cfg), cfg.lora, seed=0)
    learner.version = 1  # the batch was sampled at version 0: every row one version old
    learner.prompts.prefetch([f"a red circle {i}" for i in range(64)])
    t0 = time.process_time()
    learner.train_epoch(*data)
    return (time.process_time() - t0) / updates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="shapes")
    ap.add_argument("--updates", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/staleness_cost.json")
    args = ap.parse_args()
    logging.disable(logging.INFO)
    torch.set_num_threads(1)
    from cluster.config import load_config

    report = {"config": args.config, "torch_threads": 1, "repeats": args.repeats, "updates": {}}
    for updates in args.updates:
        data = batches(load_config(args.config, [f"train.updates_per_epoch={updates}"]))
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for correct in (False, True):
                times[correct].append(cpu_s_per_update(args.config, updates, correct, data))
        off, on = statistics.median(times[False]), statistics.median(times[True])
        report["updates"][updates] = {
            "off_cpu_s_per_update": times[False],
            "on_cpu_s_per_update": times[True],
            "on_over_off_median": on / off,
            "on_over_off_min": min(times[True]) / min(times[False]),
        }
        print(
            f"{updates} updates an epoch: off {off:.3f} s, on {on:.3f} s CPU per update ({on / off:.2f}x)", flush=True
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
