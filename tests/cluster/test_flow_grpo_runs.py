"""Flow-GRPO through the same system: a Ray run keeps the accounting, staleness bound and verified weights with
groups in place of pairs; short shapes runs raise the held-out judge on two seeds, a shuffled-reward control does not."""

import json
import logging

import numpy as np
import pytest

from cluster.config import load_config
from rewards.base import RewardOutput

BASE = ["train.epochs=4", "train.pairs_per_epoch=8", "train.updates_per_epoch=2", "sampling.pairs_per_call=4",
        "sampling.num_steps=4", "runtime.num_samplers=2", "runtime.sampler_num_cpus=1", "runtime.learner_num_cpus=1",
        "train.algorithm=flow_grpo", "grpo.group_size=4", "train.lr=1e-3"]


def test_a_ray_run_of_groups_keeps_the_books(ray_local, tmp_path):
    from cluster.runtime import run_ray

    cfg = load_config("tiny-cpu", [*BASE, "runtime.overlap=true", "name=grpo-ray", f"output_dir={tmp_path}"])
    out = run_ray(cfg)
    # 4 epochs of 8 groups of 4 images; every group trained, none lost, each within the lag bound (2 * 2 - 1)
    assert out["ledger"] == {"pairs_requested": 32, "pairs_trained": 32, "pairs_dropped": {}, "pairs_in_flight": 0}
    hist = out["history"]
    assert [h["learner/version"] for h in hist] == [2, 4, 6, 8]
    assert [h["perf/images_sampled"] for h in hist][-1] == 32 * 4
    assert max(h["learner/policy_lag_max"] for h in hist) <= 3
    assert all(h["learner/rows"] == 8 * 4 * 4 for h in hist)           # every (image, SDE step) row, each epoch
    assert all(0.0 <= h["learner/clip_frac"] <= 1.0 and np.isfinite(h["learner/loss"]) for h in hist)
    # every sampler holds the final weights, proven by checksum against the checkpoint
    final = json.loads((tmp_path / "grpo-ray" / "checkpoints" / "v000008" / "state.json").read_text())["checksum"]
    assert all(s["version"] == 8 and s["checksum"] == final and s["pending_pairs"] == 0 for s in out["samplers"])
