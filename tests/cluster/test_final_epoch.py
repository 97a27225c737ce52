"""The run's last epoch takes every pair left, so a request that lands in it is judged by its lag there: a run whose
drops left more than one epoch's worth ready at its final epoch still requests the pairs it lacks (it stalled)."""

from cluster.config import Batching
from cluster.runtime import worst_lag

# tiny-cpu's overlapped shape: 8 pairs an epoch in 2 updates, pairs at most 3 versions old when trained
B = Batching(
    pairs_per_epoch=8,
    rows_per_epoch=64,
    updates_per_epoch=2,
    timestep_fraction=1.0,
    micro_batch_rows=64,
    max_policy_lag=3,
)


def test_a_request_past_the_final_epoch_lands_in_it():
    # version 298, no update running, 16 pairs ready (two epochs' worth after drops) and only the final epoch left:
    # the pair joins the final epoch (versions 298 -> 300, worst lag 1), not a third epoch that will never run
    assert worst_lag(298, None, 16, B, epochs_to_start=1) == 1
    # with no end in sight the same queue position is two epochs further on: sampled at 298, trained up to 303
    assert worst_lag(298, None, 16, B) == 5
    # two epochs left: the queue's second epoch is the last, so ahead 16 and ahead 24 both land there (lag 3)
    assert [worst_lag(298, None, ahead, B, epochs_to_start=2) for ahead in (0, 8, 16, 24)] == [1, 3, 3, 3]
    # an update running with one step left (version 299): the next epoch starts at 300; its last update is 301
    assert worst_lag(299, 1, 40, B, epochs_to_start=1) == 2


def test_the_final_epoch_is_never_out_of_reach_of_the_lag_bound():
    # whatever is ready, a request while the final epoch waits is within the bound of every lag setting the
    # schedule allows (max_policy_lag >= updates_per_epoch - 1), so the run can always complete its pairs
    for ahead in range(0, 200, 8):
        assert worst_lag(10, None, ahead, B, epochs_to_start=1) == B.updates_per_epoch - 1 <= B.max_policy_lag
