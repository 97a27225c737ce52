"""The replicated learner group's faults on a gloo group of two ranks in threads (``GradientGroup``, no Ray): a
non-finite gradient on one rank makes every rank's summed gradient non-finite, so every rank skips that update
together (the learner skips on a non-finite ``clip_grad_norm``), and a rank whose peer left gets
``LearnerGroupBroken`` from its next collective, not a hang."""

import math
import threading

import torch

from learner.collective import GradientGroup, LearnerGroupBroken, free_port
from learner.sharded import clip_grad_norm


def in_threads(fn, world: int = 2) -> list:
    """fn(rank) on ``world`` threads at once; their results (an exception is returned, not raised)."""
    out = [None] * world

    def main(rank):
        try:
            out[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out[rank] = e

    threads = [threading.Thread(target=main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def test_a_non_finite_gradient_on_one_rank_is_skipped_on_every_rank():
    # rank 0's gradients are finite (1, 2 | 3), rank 1's hold one NaN: after the sum every rank's gradient norm is
    # NaN, so every rank skips the update and the replicas stay equal. The finite entries are summed by hand.
    port = free_port()

    def rank_main(rank):
        group = GradientGroup(rank, 2, "127.0.0.1", port, timeout_s=30)
        try:
            a, b = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)
            a.grad = torch.tensor([1.0, 2.0]) if rank == 0 else torch.tensor([float("nan"), 5.0])
            b.grad = torch.tensor([3.0]) if rank == 0 else torch.tensor([4.0])
            group.all_reduce_grads([a, b])
            return a.grad.clone(), b.grad.clone(), float(clip_grad_norm([a, b], 1.0))
        finally:
            group.close()

    results = in_threads(rank_main)
    for r in results:
        assert not isinstance(r, BaseException), r
    for a, b, norm in results:
        assert math.isnan(float(a[0])) and float(a[1]) == 7.0 and float(b[0]) == 7.0
        assert not math.isfinite(norm)  # the learner's skip condition, on every rank


def test_a_rank_whose_peer_left_gets_learner_group_broken():
    # rank 1 leaves the group after it formed; rank 0's next all-reduce fails with LearnerGroupBroken naming it
    port, left = free_port(), threading.Event()

    def rank_main(rank):
        group = GradientGroup(rank, 2, "127.0.0.1", port, timeout_s=5)
        if rank == 1:
            group.close()
            left.set()
            return "left"
        left.wait(30)
        p = torch.zeros(3, requires_grad=True)
        p.grad = torch.ones(3)
        try:
            group.all_reduce_grads([p])
        finally:
            group.close()

    out = in_threads(rank_main)
    assert out[1] == "left" and isinstance(out[0], LearnerGroupBroken), out
    assert str(out[0]).startswith("learner group all-reduce failed on rank 0 of 2 (")
    assert "a rank died or timed out; the runtime restarts the group from the last checkpoint" in str(out[0])
