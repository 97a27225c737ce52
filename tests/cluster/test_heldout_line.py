"""A run that talks: each held-out evaluation during training is one log line, with every metric's value and its
change since the evaluation at the start."""

import logging

import numpy as np
from PIL import Image

from cluster.config import load_config
from cluster.epoch_stats import heldout_line
from cluster.pipeline import Book


def test_heldout_line_text():
    before = {
        "eval/reward/mean": 0.521,
        "eval/reward/shapes_judge/mean": 0.55,
        "eval/metric/shapes_exact/mean": 0.043,
        "grid": "b.png",
    }
    now = {
        "eval/reward/mean": 0.688,
        "eval/reward/shapes_judge/mean": 0.7,
        "eval/metric/shapes_exact/mean": 0.123,
        "reward/mean": 0.9,
        "perf/eval_s": 3.0,
        "eval/diversity": 0.2,
        "grid": "n.png",
    }
    assert heldout_line(25, 200, now, before) == (
        "held-out after epoch 25/200 (change since the start): reward 0.6880 (+0.1670), reward/shapes_judge 0.7000 "
        "(+0.1500), metric/shapes_exact 0.1230 (+0.0800)"
    )


def test_each_evaluation_during_training_logs_its_line(tmp_path, caplog):
    """Book.end_epoch at the eval cadence (every 2 epochs here) logs the line; the epochs between log none."""
    png = tmp_path / "g.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png)
    values = iter([0.5, 0.625, 0.25])
    cfg = load_config(
        "tiny-cpu", [f"output_dir={tmp_path}", "train.epochs=4", "eval.every_epochs=2", "train.checkpoint_every=0"]
    )
    book = Book(cfg, evaluate=lambda out: {"eval/reward/mean": next(values), "grid": str(png)}, save=None)
    book.start()
    with caplog.at_level(logging.INFO, logger="fdfo"):
        for _ in range(4):
            book.end_epoch({})
    book.runlog.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("held-out after")]
    assert lines == [
        "held-out after epoch 2/4 (change since the start): reward 0.6250 (+0.1250)",
        "held-out after epoch 4/4 (change since the start): reward 0.2500 (-0.2500)",
    ]
