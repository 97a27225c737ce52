"""A learner group (runtime.learner.count): M ranks in one gloo group take the update one learner takes on the same
rows. Two ranks run in threads of this process (each its own standalone group object), against one learner."""

import threading

import pytest
import torch

from cluster.config import Batching, load_config
from learner.collective import free_port
from learner.learner import Learner
from models.adapter import SD3Adapter
from tests.helpers import three_pair_batch


def cfg(*extra):
    # 3 pairs x 2 branches x 3 steps = 18 rows in 2 updates of 9 rows, micro-batches of 2 (uneven shares per rank)
    return load_config(
        "tiny-cpu",
        [
            "sampling.num_steps=3",
            "train.pairs_per_epoch=3",
            "train.updates_per_epoch=2",
            "train.micro_batch_rows=2",
            "train.lr=1e-2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def batch():
    return three_pair_batch(cfg())


def learner(rank=0, world=1, *extra):
    c = cfg(*extra)
    return Learner(SD3Adapter.tiny(seed=0), c.train, Batching.of(c), c.lora, seed=0, rank=rank, world_size=world)


def run_group(world: int, batch, epochs: int = 2, *extra) -> tuple[list[Learner], list[dict]]:
    ranks = [learner(r, world, *extra) for r in range(world)]
    port, outs, errors = free_port(), [None] * world, []

    def rank_main(r):
        try:
            ranks[r].join_learner_group("127.0.0.1", port, "gloo", timeout_s=60)
            for _ in range(epochs):
                outs[r] = ranks[r].train_epoch(batch)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert not errors and not any(t.is_alive() for t in threads), errors
    return ranks, outs


def weights(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.weights().tensors.items()}


def test_two_ranks_make_the_update_of_one_learner_on_the_same_rows(batch):
    one = learner()
    start = weights(one)
    for _ in range(2):
        single = one.train_epoch(batch)
    ranks, outs = run_group(2, batch)
    w1, w_a, w_b = weights(one), weights(ranks[0]), weights(ranks[1])
    # the ranks stay replicated bit for bit (the same summed gradient, the same step) ...
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert ranks[0].weights_info() == ranks[1].weights_info()
    # ... and equal the single learner's weights up to the order of float sums (AdamW divides each gradient by its
    # own size, so summation-order differences in near-zero components show, by how much depends on the CPU's
    # vector kernels: 6.8e-6 of a 0.040 move on one, under 4e-6 on another): bounded by 1e-3 of the steps taken; rows
    # trained twice or left out would differ by the order of the move itself, a mis-scaled sum shows in grad_norm
    moved = max(float((w1[k] - start[k]).abs().max()) for k in w1)
    assert moved > 0.01 and max(float((w_a[k] - w1[k]).abs().max()) for k in w1) < 1e-3 * moved
    assert outs[0]["learner/grad_norm"] == pytest.approx(single["learner/grad_norm"], rel=1e-5)
    # the epoch's metrics cover every rank's rows: each rank reports the single learner's numbers
    for key in ("learner/loss", "learner/clip_frac", "learner/policy_lag_mean", "learner/rows"):
        assert outs[0][key] == pytest.approx(single[key], rel=1e-5, abs=1e-9) == outs[1][key]


def test_a_group_checkpoint_resumes_into_one_learner(batch, tmp_path):
    ranks, _ = run_group(2, batch, epochs=1)
    folder = ranks[0].save(str(tmp_path), {"epoch": 1}, {"train": {"keep_checkpoints": 0}})
    solo = learner()
    assert solo.load(folder) == {"epoch": 1}
    assert solo.weights_info() == ranks[0].weights_info() and solo.version == 2
    a, b = solo.opt.state_dict()["state"], ranks[1].opt.state_dict()["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])  # AdamW moments replicated too
