"""The pair books (requested = trained + dropped + in flight), drop reasons per pair, and the named timers."""

import re
from collections import Counter
from types import SimpleNamespace

import pytest

from cluster import accounting
from cluster.accounting import (
    DROP_REASONS,
    Ledger,
    Timers,
    drop_reasons,
    reward_drop_reason,
)


def ledger(requested=10, trained=6, **dropped) -> Ledger:
    book = Ledger()
    book.request(requested)
    book.train(trained)
    for reason, n in dropped.items():
        book.drop(reason, n)
    return book


# -- Ledger ---------------------------------------------------------------------------------------------------
def test_books_balance_with_the_pairs_in_flight():
    book = ledger(10, 6, stale=1, reward_failure=2)
    assert book.in_flight == 10 - 6 - 3 == 1
    book.check(in_flight=1)  # balanced: no error
    assert book.summary() == {
        "pairs_requested": 10,
        "pairs_trained": 6,
        "pairs_dropped": {"reward_failure": 2, "stale": 1},
        "pairs_in_flight": 1,
    }
    assert book.line() == "pairs requested 10 = trained 6 + dropped 3 (reward_failure 2, stale 1) + in flight 1"


def test_check_fails_when_pairs_go_missing():
    # 10 requested, 6 trained, 1 dropped: the books say 3 are in flight, the caller knows of none
    book = ledger(10, 6, stale=1)
    msg = (
        "accounting broken: {'pairs_requested': 10, 'pairs_trained': 6, 'pairs_dropped': {'stale': 1}, "
        "'pairs_in_flight': 3} but 0 pairs are in flight"
    )
    with pytest.raises(AssertionError, match="^" + re.escape(msg) + "$"):
        book.check()
    with pytest.raises(AssertionError, match=re.escape("but 2 pairs are in flight")):
        book.check(in_flight=2)
    book.check(in_flight=3)


def test_check_fails_when_more_pairs_are_counted_than_requested():
    book = ledger(4, 4, actor_lost=1)  # a pair counted twice
    assert book.in_flight == -1
    with pytest.raises(AssertionError, match=re.escape("'pairs_in_flight': -1} but 0 pairs are in flight")):
        book.check()


def test_drop_refuses_an_unknown_reason_and_ignores_zero():
    book = ledger(6, 0)
    msg = (
        "unknown drop reason 'timeout'; one of ('stale', 'reward_failure', 'non_finite_reward', 'actor_lost', "
        "'interrupted', 'rolled_back')"
    )
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        book.drop("timeout", 2)
    book.drop("interrupted", 0)  # counted as nothing, not listed as a reason
    assert book.dropped == Counter() and book.in_flight == 6
    assert book.line() == "pairs requested 6 = trained 0 + dropped 0 (none) + in flight 6"
    for reason in DROP_REASONS:
        book.drop(reason, 1)
    assert book.in_flight == 0 and dict(book.dropped) == {r: 1 for r in DROP_REASONS}
    book.check()


# -- drop reasons per pair ------------------------------------------------------------------------------------
FAILED = "reward/mean_pixel: RuntimeError: model exploded"
TIMED_OUT = "reward/jpeg: timed out after 300.0s on a batch of 6"
NON_FINITE = "reward/jpeg: non-finite score nan"


@pytest.mark.parametrize(
    "reasons, expected",
    [
        ([FAILED, FAILED], "reward_failure"),
        ([TIMED_OUT, None], "reward_failure"),
        ([None, NON_FINITE], "non_finite_reward"),
        ([NON_FINITE, NON_FINITE], "non_finite_reward"),
        ([None, None], "non_finite_reward"),  # a NaN with no reason given: the score itself
        (["", None], "non_finite_reward"),
        ([f"{FAILED}; non-finite score nan", None], "non_finite_reward"),  # a combined reward's joined reasons
    ],
)
def test_reward_drop_reason_of_one_pair(reasons, expected):
    assert reward_drop_reason(reasons) == expected


def test_drop_reasons_reads_each_pair_from_its_own_two_images():
    pair_ids = [10, 11, 12, 13]
    # images 2k, 2k+1 are pair k's branches; pair 10 is fine, 11 NaN, 12 failed, 13 timed out on one branch
    reasons = [None, None, NON_FINITE, None, FAILED, FAILED, None, TIMED_OUT]
    assert drop_reasons(pair_ids, [11, 12, 13], reasons) == Counter(non_finite_reward=1, reward_failure=2)
    assert drop_reasons(pair_ids, [13], reasons) == Counter(reward_failure=1)
    assert drop_reasons(pair_ids, [11], reasons) == Counter(non_finite_reward=1)
    assert drop_reasons(pair_ids, [], reasons) == Counter()
    # no reasons at all (a plain reward): every dropped pair had a non-finite score
    assert drop_reasons(pair_ids, [10, 12], None) == Counter(non_finite_reward=2)


def test_drop_reasons_feed_the_ledger_to_a_balance():
    pair_ids = [0, 1, 2]
    reasons = [FAILED, None, None, None, None, NON_FINITE]
    book = ledger(3, 1)  # pair 1 trained
    for reason, n in drop_reasons(pair_ids, [0, 2], reasons).items():
        book.drop(reason, n)
    book.check()
    assert book.summary()["pairs_dropped"] == {"non_finite_reward": 1, "reward_failure": 1}


# -- Timers ---------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_timers_add_up_per_name_and_pop_clears(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(accounting, "time", SimpleNamespace(perf_counter=clock))
    timers = Timers()
    with timers("sample"):
        clock.now += 2.5
    with timers("sample"):
        clock.now += 0.5
    with timers("update"):
        clock.now += 4.0
    timers.add("reward", 1.25)
    timers.add("reward", 0.75)
    assert timers.pop() == {"perf/sample_s": 3.0, "perf/update_s": 4.0, "perf/reward_s": 2.0}
    assert timers.pop() == {}  # popped: the next epoch starts from zero
    with timers("sample"):
        clock.now += 1.0
    assert timers.pop() == {"perf/sample_s": 1.0}


def test_a_timer_counts_the_time_of_a_block_that_raises(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(accounting, "time", SimpleNamespace(perf_counter=clock))
    timers = Timers()
    with pytest.raises(KeyError), timers("publish"):
        clock.now += 0.25
        raise KeyError("lost")
    assert timers.pop() == {"perf/publish_s": 0.25}


def test_timers_measure_real_time():
    timers = Timers()
    with timers("spin"):
        sum(range(10_000))
    t = timers.pop()["perf/spin_s"]
    assert 0.0 < t < 5.0
