"""The learning-rate schedule: values worked out by hand, and held at the end (a resumed run continues it)."""

import math

from cluster.config import load_config
from learner.learner import scheduled_lr


def train(schedule: str, epochs: int = 5, updates: int = 1):
    return load_config(
        "tiny-cpu",
        [
            f"train.lr_schedule={schedule}",
            "train.lr=1e-4",
            "train.lr_final=1e-5",
            f"train.epochs={epochs}",
            f"train.updates_per_epoch={updates}",
            "train.pairs_per_epoch=4",
        ],
    ).train


def test_constant_ignores_the_version_and_lr_final():
    assert [scheduled_lr(train("constant"), v) for v in (0, 3, 99)] == [1e-4, 1e-4, 1e-4]


def test_linear_and_cosine_run_from_lr_to_lr_final_over_the_last_update():
    # 5 epochs x 1 update: versions 0..4 make the updates; version 4 is the last one and gets lr_final
    lin = [scheduled_lr(train("linear"), v) for v in range(5)]
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(lin, [1e-4, 7.75e-5, 5.5e-5, 3.25e-5, 1e-5]))
    cos = [scheduled_lr(train("cosine"), v) for v in range(5)]
    # 1e-5 + 9e-5 * (1 + cos(pi k / 4)) / 2: k = 1 -> 1e-5 + 9e-5 * 0.853553...
    expected = [1e-4, 1e-5 + 9e-5 * (1 + math.sqrt(0.5)) / 2, 5.5e-5, 1e-5 + 9e-5 * (1 - math.sqrt(0.5)) / 2, 1e-5]
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(cos, expected))
    assert scheduled_lr(train("cosine"), 50) == scheduled_lr(train("linear"), 50) == 1e-5  # held after the end


def test_updates_per_epoch_count_toward_the_length():
    # 2 epochs x 2 updates = 4 updates: version 3 is the last
    assert math.isclose(scheduled_lr(train("linear", epochs=2, updates=2), 3), 1e-5)
    assert math.isclose(scheduled_lr(train("linear", epochs=2, updates=2), 1), 1e-4 - 9e-5 / 3)
