"""The ready batches: an epoch takes the oldest, in request order; batches of a lost learner's versions are removed."""

from cluster.ready import ReadyBatch, ReadyBatches


def batch(first: int, pairs: int, version: int = 0) -> ReadyBatch:
    return ReadyBatch(
        batch_ref=f"ref{first}", pairs=pairs, stats={}, first_pair_id=first, sampled_with=(version, f"c{version}")
    )


def test_an_epoch_takes_the_oldest_batches_in_request_order():
    ready = ReadyBatches()
    for first, pairs in ((8, 4), (0, 4), (4, 2), (12, 4)):  # arrival order: a later request finished first
        ready.add(batch(first, pairs))
    assert ready.pairs() == 14 and len(ready) == 4
    # 8 pairs: the first two arrivals hold 8, sorted by their first pair id
    assert [b.first_pair_id for b in ready.take(8)] == [0, 8]
    # the last epoch takes everything left
    assert [b.first_pair_id for b in ready.take(None)] == [4, 12] and len(ready) == 0 and ready.pairs() == 0


def test_a_take_may_overshoot_by_the_last_batch():
    ready = ReadyBatches()
    for first, pairs in ((0, 3), (3, 3), (6, 3)):
        ready.add(batch(first, pairs))
    assert sum(b.pairs for b in ready.take(4)) == 6 and ready.pairs() == 3


def test_batches_sampled_with_orphaned_versions_are_removed():
    ready = ReadyBatches()
    for first, version in ((0, 2), (4, 3), (8, 2), (12, 4)):
        ready.add(batch(first, 4, version))
    removed = ready.remove_sampled_with({(3, "c3"), (4, "c4"), (2, "other")})
    assert [b.first_pair_id for b in removed] == [4, 12]
    assert [b.first_pair_id for b in ready.batches] == [0, 8]
