"""The layouts' cost model (cluster/layouts.py) against closed forms worked by hand."""

import math

import pytest

from cluster.layouts import ANCHOR_FORWARD, LAYOUTS, best_layout, compare_layouts, corrected, format_layouts
from cluster.plan import Workload

# a = 600 sampler and b = 1,200 learner GPU-seconds an epoch of 864 images; 32 GPUs, 2 of them the reward pool's
W = Workload(images=864, a=600.0, b=1200.0, k=0.0)
LEARNING = {"uncorrected": 0.6, "corrected": 0.95}


def by_layout(rows):
    return {r.layout: r for r in rows}


def test_four_layouts_at_32_gpus_by_hand():
    rows = by_layout(compare_layouts(W, gpus=32, rewards=2, updates=4, learning=LEARNING))
    assert list(rows) == list(LAYOUTS)
    # hybrid: 30 workers each sample and train 1/30: (600 + 1,200) / 30 = 60 s; 864 / (60 x 32) = 0.45 images/GPU-s
    h = rows["hybrid lock-step"]
    assert (h.samplers, h.learners, h.epoch_s) == (30, 30, pytest.approx(60.0))
    assert h.images_per_gpu_s == pytest.approx(0.45) and h.vs_reference == pytest.approx(0.9)
    assert h.learning == 1.0 and h.per_gpu_hour == pytest.approx(0.9)
    # split lock-step: S = 30 sqrt(600) / (sqrt(600) + sqrt(1,200)) = 12.43 -> 12 + 18: 50 + 66.67 = 116.67 s
    # (13 + 17: 116.74, 11 + 19: 117.70); the continuous (sqrt(a) + sqrt(b))^2 / C = 116.57
    s = rows["split lock-step"]
    assert (s.samplers, s.learners) == (12, 18) and s.epoch_s == pytest.approx(600 / 12 + 1200 / 18)
    assert s.epoch_s >= (math.sqrt(600) + math.sqrt(1200)) ** 2 / 30
    assert s.images_per_gpu_s == pytest.approx(864 / (116.6667 * 32), rel=1e-5)
    # split overlap: S = 30 x 600 / 1,800 = 10 -> 10 + 20: max(60, 60) = 60 s, learning 0.6 of lock-step's per pair
    o = rows["split overlap"]
    assert (o.samplers, o.learners, o.epoch_s) == (10, 20, pytest.approx(60.0))
    assert o.per_gpu_hour == pytest.approx(0.9 * 0.6) and o.to_reward_s == pytest.approx(100.0)
    # corrected, 4 updates an epoch: b' = 1,200 (1 + 3/4 x 40/92) = 1,591.3; S = 30 x 600 / 2,191.3 = 8.21 -> 8 + 22:
    # max(75, 72.33) = 75 s (9 + 21: max(66.7, 75.8) = 75.8); 864 / (75 x 32) = 0.36, x 0.95 learning
    c = rows["split overlap, corrected"]
    assert (c.samplers, c.learners, c.epoch_s) == (8, 22, pytest.approx(75.0))
    assert c.images_per_gpu_s == pytest.approx(0.36) and c.per_gpu_hour == pytest.approx(0.72 * 0.95)
    assert "train.staleness_correction=true" in c.overrides and "runtime.placement=hybrid" in h.overrides
    assert best_layout(list(rows.values())).layout == "hybrid lock-step"


def test_the_anchor_forward_costs_nothing_with_one_update_an_epoch():
    assert corrected(W, 1) == W
    assert corrected(W, 4).b == pytest.approx(1200 * (1 + 0.75 * 40 / 92)) and ANCHOR_FORWARD == 40 / 92
    rows = by_layout(compare_layouts(W, gpus=32, rewards=2, updates=1, learning=LEARNING))
    assert rows["split overlap, corrected"].epoch_s == rows["split overlap"].epoch_s == pytest.approx(60.0)


def test_hybrid_pays_the_all_reduce_once_per_epoch_like_one_learner_group():
    # k = 0.03 s of all-reduce an epoch: (a + b - k) / C + k
    w = Workload(images=864, a=600.0, b=1200.0, k=0.03)
    h = by_layout(compare_layouts(w, gpus=32, rewards=2, updates=4, learning=LEARNING))["hybrid lock-step"]
    assert h.epoch_s == pytest.approx((1800 - 0.03) / 30 + 0.03)


def test_overlap_wins_only_when_it_learns_more_per_pair_than_the_rounding_costs():
    # at 8 GPUs (6 compute) the overlap split 2 + 4 is exact (max(300, 300)), as fast as hybrid's 300 s: with the
    # correction at one update an epoch learning 1.0, the tie goes to hybrid (first of LAYOUTS)
    rows = compare_layouts(W, gpus=8, rewards=2, updates=1, learning={"uncorrected": 0.6, "corrected": 1.0})
    assert [r.epoch_s for r in rows] == pytest.approx([300.0, 600 / 2 + 1200 / 4, 300.0, 300.0])
    assert best_layout(rows).layout == "hybrid lock-step"
    # learning more per pair than lock-step (a hypothetical 1.1) would make the corrected overlap the best
    rows = compare_layouts(W, gpus=8, rewards=2, updates=1, learning={"uncorrected": 0.6, "corrected": 1.1})
    assert best_layout(rows).layout == "split overlap, corrected"


def test_too_few_gpus_is_explained():
    with pytest.raises(ValueError, match="3 GPUs with 2 for the reward pool leave 1 for sampling and training"):
        compare_layouts(W, gpus=3, rewards=2, updates=4)


def test_the_table_shows_every_layout():
    text = format_layouts(compare_layouts(W, gpus=32, rewards=2, updates=4, learning=LEARNING))
    assert all(name in text for name in LAYOUTS) and "30 both" in text and "12+18" in text


def test_fdfo_plan_shows_every_layout_at_the_default_rates(capsys):
    """sd35m-combined at the reference's rates (a = 864 / 1.65, b = 864 / (0.5 x 132 / 92)), LoRA all-reduce
    k = 4 updates x 2 x 75.1 MB / 25 GB/s = 24 ms, 2 reward GPUs: hybrid on 32 GPUs takes (a + b - k) / 30 + k."""
    import json

    from cluster.cli import main

    assert main(["plan", "--gpus", "4", "32", "--json"]) == 0
    (lock,) = json.loads(capsys.readouterr().out)
    a, b, k = 864 / 1.65, 864 / (0.5 * 132 / 92), 4 * 2 * 32 * 3072 * 191 * 4 / 25e9
    four, thirty_two = lock["layouts"]
    hybrid = {r["layout"]: r for r in thirty_two["rows"]}["hybrid lock-step"]
    assert hybrid["epoch_s"] == pytest.approx((a + b - k) / 30 + k) == pytest.approx(57.62, abs=0.01)
    assert hybrid["vs_reference"] == pytest.approx(864 / (57.623 * 32) / 0.5, rel=1e-4)  # 0.937: 2 of 32 GPUs score
    assert {r["layout"]: r for r in four["rows"]}["hybrid lock-step"]["vs_reference"] == pytest.approx(0.5, rel=1e-4)
    assert thirty_two["best"] == four["best"] == "hybrid lock-step"
    assert main(["plan", "--gpus", "8"]) == 0
    text = capsys.readouterr().out
    assert "hybrid lock-step" in text and "best: 8 GPUs: hybrid lock-step" in text
