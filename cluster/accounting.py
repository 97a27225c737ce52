"""Where every pair went: ``requested = trained + dropped (by reason) + in_flight``; nothing disappears silently."""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager

# interrupted: in flight when a run stopped (a resumed run reports them instead of forgetting them); rolled_back:
# trained by updates a lost learner took with it (the run restarted from the checkpoint before them)
DROP_REASONS = ("stale", "reward_failure", "non_finite_reward", "actor_lost", "interrupted", "rolled_back")


def ledger_line(summary: dict, unit: str = "pairs") -> str:
    """The accounting identity of a ledger ``summary`` in one line; ``unit``: what a run counts (pairs, or a
    Flow-GRPO run's groups)."""
    drops = ", ".join(f"{k} {n}" for k, n in sorted(summary["pairs_dropped"].items())) or "none"
    return (
        f"{unit} requested {summary['pairs_requested']} = trained {summary['pairs_trained']} + dropped "
        f"{sum(summary['pairs_dropped'].values())} ({drops}) + in flight {summary['pairs_in_flight']}"
    )


class Ledger:
    def __init__(self, unit: str = "pairs"):
        self.unit = unit  # what a unit is called in the log line: pairs, or groups (Flow-GRPO)
        self.requested = 0
        self.trained = 0
        self.dropped: Counter[str] = Counter()

    def request(self, n: int) -> None:
        self.requested += n

    def train(self, n: int) -> None:
        self.trained += n

    def drop(self, reason: str, n: int) -> None:
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}; one of {DROP_REASONS}")
        if n:
            self.dropped[reason] += n

    @property
    def in_flight(self) -> int:
        return self.requested - self.trained - sum(self.dropped.values())

    def check(self, in_flight: int = 0) -> None:
        """Raise unless requested == trained + dropped + in_flight."""
        if self.in_flight != in_flight:
            raise AssertionError(f"accounting broken: {self.summary()} but {in_flight} pairs are in flight")

    def summary(self) -> dict:
        return {
            "pairs_requested": self.requested,
            "pairs_trained": self.trained,
            "pairs_dropped": dict(sorted(self.dropped.items())),
            "pairs_in_flight": self.in_flight,
        }

    def line(self) -> str:
        return ledger_line(self.summary(), self.unit)


class Timers:
    """Named wall-clock timers: ``with timers("sample"): ...``; ``timers.pop()`` -> {"perf/sample_s": ...}."""

    def __init__(self):
        self.totals: Counter[str] = Counter()

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        """Count time measured elsewhere (inside an actor) under ``name``."""
        self.totals[name] += seconds

    def pop(self) -> dict[str, float]:
        out = {f"perf/{k}_s": v for k, v in self.totals.items()}
        self.totals.clear()
        return out


def reward_drop_reason(reasons: list) -> str:
    """Why a pair's reward is unusable, from its images' reasons: the scorer failed (raised / timed out) or it
    returned a non-finite value."""
    text = " ".join(str(r) for r in reasons if r)
    return "non_finite_reward" if (not text or "non-finite" in text) else "reward_failure"


def drop_reasons(pair_ids: list[int], dropped: list[int], reasons: list | None, images_per_unit: int = 2) -> Counter:
    """Reason -> count for the ``dropped`` pairs (groups) of a request of ``pair_ids`` (``images_per_unit`` images
    each, adjacent), from the reward's per-image ``reasons`` (None when it gave none)."""
    out: Counter[str] = Counter()
    K = images_per_unit
    for pid in dropped:
        k = pair_ids.index(pid)
        out[reward_drop_reason((reasons or [None] * K * len(pair_ids))[K * k : K * k + K])] += 1
    return out
