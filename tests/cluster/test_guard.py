"""The reward-hacking guard (cluster/guard.py): the window test on constructed curves, checkpoints/best kept by hand,
the config checks' exact messages, and the in-process driver stopping on hacking."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from PIL import Image

from cluster.config import load_config
from cluster.guard import HackingGuard, keep_best, ls_slope, read_best
from cluster.pipeline import Book
from learner.checkpoint import LATEST, latest_checkpoint

GOLD = "eval/metric/shapes_exact/mean"


def run_guard(rewards, golds, window=3, tolerance=0.05, every=5):
    """Feed one epoch reward per evaluation (epochs every-1, 2*every-1, ...) -> the verdicts."""
    guard = HackingGuard(GOLD, window, tolerance)
    out = []
    for k, (r, g) in enumerate(zip(rewards, golds)):
        guard.epoch_reward(r)
        out.append(guard.observe(every * (k + 1) - 1, {GOLD: g}))
    return out


def test_least_squares_slope_by_hand():
    assert ls_slope([9, 14, 19], [0.6, 0.7, 0.8]) == pytest.approx(0.02)
    assert ls_slope([0, 1, 2, 3], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)  # sxy 4 / sxx 5
    assert math.isnan(ls_slope([3], [1.0])) and math.isnan(ls_slope([2, 2], [1.0, 2.0]))


def test_fires_when_reward_rises_and_gold_falls_beyond_tolerance():
    v = run_guard([0.5, 0.6, 0.7, 0.8], [0.60, 0.62, 0.58, 0.55])
    assert [x.hacking for x in v] == [False, False, False, True]
    assert [x.new_best for x in v] == [True, True, False, False]
    m = v[3].metrics
    # window = evaluations at epochs 9, 14, 19: gold best 0.62 -> 0.55, reward 0.6, 0.7, 0.8 (slope 0.1 / 5 epochs)
    assert m["guard/gold_drop"] == pytest.approx(0.07) and m["guard/reward_slope"] == pytest.approx(0.02)
    assert m["guard/hacking"] == 1 and m["guard/gold"] == 0.55 and m["guard/gold_best"] == 0.62
    assert v[2].metrics["guard/gold_drop"] == pytest.approx(0.04) and v[2].metrics["guard/hacking"] == 0


@pytest.mark.parametrize(
    "rewards, golds",
    [
        ([0.5, 0.6, 0.7, 0.8], [0.60, 0.62, 0.60, 0.58]),  # gold drop 0.04 <= tolerance 0.05
        ([0.8, 0.7, 0.6, 0.5], [0.60, 0.62, 0.58, 0.40]),  # gold falls, but so does the training reward
        ([0.5, 0.6, 0.7, 0.8], [0.50, 0.40, 0.45, 0.55]),  # gold recovered to the newest best: no drop
        ([0.5, 0.6], [0.60, 0.40]),  # a window not yet full
    ],
)
def test_does_not_fire(rewards, golds):
    assert not any(x.hacking for x in run_guard(rewards, golds))


def test_training_reward_point_is_the_mean_since_the_last_evaluation():
    guard = HackingGuard(GOLD, window=2, tolerance=0.0)
    for r in (1.0, float("nan"), 2.0, 3.0):  # NaN: an epoch with nothing scored, skipped
        guard.epoch_reward(r)
    guard.observe(3, {GOLD: 0.5})
    assert guard.points == [(3, 0.5, 2.0)] and guard.rewards == []
    v = guard.observe(7, {GOLD: float("nan")})  # a NaN gold is no point of the window
    assert v.metrics["guard/hacking"] == 0 and len(guard.points) == 1


def cfg_for(tmp_path, *extra):
    return load_config(
        "tiny-cpu",
        [
            f"output_dir={tmp_path}",
            "eval.every_epochs=1",
            "eval.num_prompts=2",
            "eval.metrics=[{name: shapes_exact}]",
            *extra,
        ],
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["eval.gold_metric=shapes_judge"],
            (
                "eval.gold_metric='shapes_judge' is not an eval metric of this run; one of ['eval/metric/shapes_exact/mean', "
                "'eval/reward/jpeg_compressibility/mean', 'eval/reward/mean'] (or their short names ['jpeg_compressibility', "
                "'reward', 'shapes_exact']); to guard with a metric the run does not train on, add it to eval.metrics, e.g. "
                "eval.metrics=[{name: shapes_exact}]"
            ),
        ),
        (
            ["eval.gold_metric=shapes_exact", "eval.every_epochs=0"],
            (
                "eval.gold_metric='shapes_exact' needs evaluations during training: set eval.every_epochs to K >= 1 "
                "(evaluate every K epochs)"
            ),
        ),
        (
            ["eval.gold_metric=shapes_exact", "eval.hacking_window=1"],
            "eval.hacking_window must be >= 2 (the evaluations a trend is fitted over); got 1",
        ),
        (
            ["eval.gold_metric=shapes_exact", "eval.hacking_tolerance=-0.1"],
            "eval.hacking_tolerance must be >= 0 (in the gold metric's units); got -0.1",
        ),
        (
            ["eval.stop_on_hacking=true"],
            (
                "eval.stop_on_hacking=true needs eval.gold_metric (the held-out metric that detects hacking), e.g. "
                "eval.gold_metric=shapes_exact"
            ),
        ),
        (
            ["eval.gold_metric=jpeg_compressibility", "eval.metrics=[{name: jpeg_compressibility}]"],
            (
                "eval.gold_metric='jpeg_compressibility' is both a reward component and an eval.metrics scorer; give the full "
                "key: eval/metric/jpeg_compressibility/mean or eval/reward/jpeg_compressibility/mean"
            ),
        ),
    ],
)
def test_config_errors_are_exact(tmp_path, overrides, message):
    with pytest.raises(ValueError) as e:
        cfg_for(tmp_path, *overrides)
    assert str(e.value) == message


def test_gold_metric_forms_resolve(tmp_path):
    from cluster.guard import gold_key

    assert gold_key(cfg_for(tmp_path, "eval.gold_metric=shapes_exact")) == GOLD
    assert gold_key(cfg_for(tmp_path, f"eval.gold_metric={GOLD}")) == GOLD
    assert gold_key(cfg_for(tmp_path, "eval.gold_metric=reward")) == "eval/reward/mean"
    assert gold_key(load_config("shapes-hacking")) == "eval/metric/shapes_judge/mean"
    assert gold_key(load_config("shapes")) is None  # the default preset is unchanged


class FakeRun:
    """What a driver gives the Book: ``evaluate`` with a scripted gold curve, ``save`` writing checkpoint folders
    the way learner/checkpoint.py does (v<version>, state.json, the latest marker)."""

    def __init__(self, tmp_path, golds):
        self.golds, self.png = list(golds), tmp_path / "grid.png"
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(self.png)
        self.book = None

    def evaluate(self, png):
        return {"eval/reward/mean": 0.0, GOLD: self.golds.pop(0), "grid": str(self.png)}

    def save(self, epoch):
        folder = self.book.runlog.dir / "checkpoints" / f"v{self.book.version:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "state.json").write_text(json.dumps({"version": self.book.version, "state": {"epoch": epoch}}))
        (folder.parent / LATEST).write_text(folder.name)
        return str(folder)


def drive(book, rewards):
    """Close one epoch per training reward, one optimizer step each (version = epochs done)."""
    for r in rewards:
        book.stats.add_rewards([{"reward": [r, r]}])
        book.version += 1
        book.end_epoch({"pairs_trained": 1})
        if not book.running:
            break


def test_book_keeps_the_best_checkpoint_and_stops_on_hacking(tmp_path, caplog):
    cfg = cfg_for(
        tmp_path,
        "eval.gold_metric=shapes_exact",
        "eval.hacking_window=3",
        "eval.hacking_tolerance=0.05",
        "eval.stop_on_hacking=true",
        "train.epochs=10",
    )
    run = FakeRun(tmp_path, [0.30, 0.50, 0.46, 0.48, 0.40, 0.20])
    run.book = book = Book(cfg, evaluate=run.evaluate, save=run.save)
    with caplog.at_level(logging.WARNING, logger="fdfo"):
        drive(book, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    # evaluations after epochs 0..4: gold 0.30, 0.50 (best, version 2), 0.46, 0.48, 0.40; at epoch 4 the window
    # (0.46, 0.48, 0.40) dropped 0.08 > 0.05 from its best while the reward rose: stop after 5 epochs
    assert book.epoch == 5 and not book.running and "REWARD HACKING SUSPECTED at epoch 4" in book.stop_reason
    assert [h["guard/hacking"] for h in book.history] == [0, 0, 0, 0, 1]
    assert book.history[4]["guard/gold_drop"] == pytest.approx(0.08)
    assert any("REWARD HACKING SUSPECTED" in r.message and "stopping" in r.message for r in caplog.records)
    checkpoints = book.runlog.dir / "checkpoints"
    assert read_best(checkpoints) == {"epoch": 2, "version": 2, "value": 0.5, "metric": GOLD, "source": "v000002"}
    assert json.loads((checkpoints / "best" / "state.json").read_text())["version"] == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "latest", "v000001", "v000002"]
    assert latest_checkpoint(book.runlog.dir).name == "v000002"  # the newest versioned folder, never best


def test_hacking_without_stop_only_warns(tmp_path):
    cfg = cfg_for(tmp_path, "eval.gold_metric=shapes_exact", "eval.hacking_window=2", "train.epochs=3")
    run = FakeRun(tmp_path, [0.5, 0.3, 0.6])
    run.book = book = Book(cfg, evaluate=run.evaluate, save=run.save)
    drive(book, [0.1, 0.2, 0.3])
    assert book.epoch == 3 and book.stop_reason is None
    assert [h["guard/hacking"] for h in book.history] == [0, 1, 0]
    assert read_best(book.runlog.dir / "checkpoints")["version"] == 3


def test_resumed_book_keeps_a_better_best(tmp_path):
    cfg = cfg_for(tmp_path, "eval.gold_metric=shapes_exact", "train.epochs=2")
    run = FakeRun(tmp_path, [0.9, 0.4, 0.5])
    run.book = Book(cfg, evaluate=run.evaluate, save=run.save)
    drive(run.book, [0.1])
    run.book = book = Book(cfg, evaluate=run.evaluate, save=run.save, resume=True)
    book.epoch = book.version = 1
    drive(book, [0.2])  # 0.4 < 0.9 of the first run's best: best stays
    assert read_best(book.runlog.dir / "checkpoints")["value"] == 0.9


def test_keep_best_replaces_whole_folders(tmp_path):
    ck = tmp_path / "checkpoints"
    for v in (1, 2):
        (ck / f"v{v}").mkdir(parents=True)
        (ck / f"v{v}" / "state.json").write_text(str(v))
    (ck / "v1" / "only_in_v1").write_text("x")
    (ck / ".best.tmp").mkdir()  # left by a crash mid-copy: cleared, never visible as best
    keep_best(ck / "v1", ck, {"value": 1})
    keep_best(ck / "v2", ck, {"value": 2})
    assert sorted(p.name for p in (ck / "best").iterdir()) == ["best.json", "state.json"]
    assert (ck / "best" / "state.json").read_text() == "2" and read_best(ck) == {"value": 2, "source": "v2"}
    assert sorted(p.name for p in ck.iterdir()) == ["best", "v1", "v2"]
    with pytest.raises(FileNotFoundError, match="not visible from the driver"):
        keep_best(tmp_path / "elsewhere", ck, {})


def test_latest_checkpoint_never_resumes_from_best(tmp_path):
    ck = tmp_path / "checkpoints"
    (ck / "v000004").mkdir(parents=True)
    (ck / LATEST).write_text("best")
    with pytest.raises(ValueError) as e:
        latest_checkpoint(tmp_path)
    assert str(e.value) == (
        f"{ck / LATEST} names 'best', not a versioned checkpoint folder (v<version>): --resume "
        "continues only from the run's newest checkpoint, never from 'best'; write 'v000004' into it"
    )


class Rising:
    """A training reward that rises with every call (the proxy a hacking run climbs)."""

    def __init__(self):
        self.calls = 0

    def score(self, images, prompts):
        from rewards.base import RewardOutput

        self.calls += 1
        return RewardOutput(scores=self.calls + 0.01 * np.arange(len(prompts), dtype=np.float64))


class Falling(Rising):
    """A held-out metric that falls with every call: 0.9, 0.8, ... (the gold the run is hurting)."""

    def score(self, images, prompts):
        from rewards.base import RewardOutput

        self.calls += 1
        return RewardOutput(scores=np.full(len(prompts), 1.0 - 0.1 * self.calls))


def test_in_process_run_stops_on_hacking_and_finishes(tmp_path):
    from cluster.driver import run_local
    from rewards.base import REGISTRY, register

    for name, cls in (("guard_test_rising", Rising), ("guard_test_falling", Falling)):
        if name not in REGISTRY:
            register(name)(cls)
    logging.disable(logging.INFO)
    cfg = load_config(
        "tiny-cpu",
        [
            "runtime.local=true",
            f"output_dir={tmp_path}",
            "train.epochs=6",
            "train.pairs_per_epoch=4",
            "sampling.num_steps=2",
            "train.updates_per_epoch=1",
            "reward.preset=null",
            "reward.components=[{name: guard_test_rising, weight: 1.0}]",
            "eval.every_epochs=1",
            "eval.num_prompts=2",
            "eval.seeds_per_prompt=1",
            "eval.metrics=[{name: guard_test_falling}]",
            "eval.gold_metric=guard_test_falling",
            "eval.hacking_window=2",
            "eval.stop_on_hacking=true",
        ],
    )
    try:
        out = run_local(cfg)
    finally:
        logging.disable(logging.NOTSET)
    # gold 0.9 before training, 0.8 after epoch 0 (the best), 0.7 after epoch 1: a 0.1 drop as the reward rose
    assert out["stopped"].startswith("REWARD HACKING SUSPECTED at epoch 1") and len(out["history"]) == 2
    assert out["ledger"] == {"pairs_requested": 8, "pairs_trained": 8, "pairs_dropped": {}, "pairs_in_flight": 0}
    assert out["paths"]["best"] == {
        "epoch": 1,
        "version": 1,
        "value": pytest.approx(0.8),
        "metric": "eval/metric/guard_test_falling/mean",
        "source": "v000001",
    }
    run_dir = tmp_path / "tiny-cpu"
    assert out["paths"]["checkpoint"] == str(run_dir / "checkpoints" / "v000002")  # Book.finish ran
    assert json.loads((run_dir / "checkpoints" / "v000002" / "state.json").read_text())["state"]["epoch"] == 2
    assert latest_checkpoint(run_dir).name == "v000002"
