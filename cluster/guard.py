"""The reward-hacking guard: a gold metric the run does not train on keeps ``checkpoints/best`` and watches for hacking.

Usage (``cluster/pipeline.py::Book`` does this; the config names it)::

    eval:
      every_epochs: 5
      metrics: [{name: shapes_judge}]         # scored on the held-out set, never trained on
      gold_metric: shapes_judge               # or the full key eval/metric/shapes_judge/mean
      hacking_window: 4                       # evaluations looked back over
      hacking_tolerance: 0.05                 # in the gold metric's units
      stop_on_hacking: true

Definitions (higher gold is better). Every held-out evaluation during training is one point
``(epoch, gold, train_reward)``: ``gold`` is the evaluation's gold value and ``train_reward`` the mean of the
finite ``reward/mean`` of the epochs since the previous evaluation (this one included). Over the last
``hacking_window`` points (a full window only):

    gold_drop    = max(gold in window) - gold of the newest point
    reward_slope = least-squares slope of train_reward against epoch over the window
    hacking      = gold_drop > hacking_tolerance and reward_slope > 0

i.e. the reward the run optimises still rises while the metric it should serve fell from its recent best by
more than the tolerance. Each evaluation adds ``guard/gold``, ``guard/gold_best``, ``guard/gold_drop``,
``guard/reward_slope`` and ``guard/hacking`` (0/1) to the epoch metrics. A new best gold value (strictly
higher than any before in this run, or than ``best.json`` of a resumed run) is kept as ``checkpoints/best``:
a copy of that epoch's checkpoint plus ``best.json`` (``epoch``: epochs completed, as in the checkpoint's
state; ``version``; ``value``; ``metric``; ``source``: the folder copied). ``--resume`` never picks ``best``
(``learner/checkpoint.py::latest_checkpoint``); a resumed run keeps a best that its own evaluations do not beat.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from learner.storage import Storage, is_uri

log = logging.getLogger("fdfo")

BEST = "best"  # <run_dir>/checkpoints/best: the checkpoint with the best gold value so far
BEST_INFO = "best.json"  # inside it: {"epoch", "version", "value", "metric", "source"}


def eval_metric_keys(cfg) -> dict[str, str]:
    """The held-out evaluation's metric keys by the short names a config may use: ``eval.metrics`` scorers
    (``eval/metric/<name>/mean``), the training reward's components (``eval/reward/<key>/mean``) and the total
    (``eval/reward/mean`` under ``reward``). A name that is both a metric and a component maps to None (ambiguous)."""
    from cluster.build import reward_specs

    keys: dict[str, str | None] = {"reward": "eval/reward/mean"}
    for spec in reward_specs(cfg.reward):
        name = spec.get("key") or spec.get("name")
        keys[name] = f"eval/reward/{name}/mean"
    for spec in cfg.eval.metrics:
        name = spec.get("name")
        keys[name] = None if name in keys and name != "reward" else f"eval/metric/{name}/mean"
    return keys


def gold_key(cfg) -> str | None:
    """``eval.gold_metric`` as the full eval metric key, checked with the rest of the guard's settings; None when
    no gold metric is set. Raises ValueError naming the problem and the fix."""
    ev = cfg.eval
    if ev.gold_metric is None:
        if ev.stop_on_hacking:
            raise ValueError(
                "eval.stop_on_hacking=true needs eval.gold_metric (the held-out metric that detects "
                "hacking), e.g. eval.gold_metric=shapes_exact"
            )
        return None
    if ev.every_epochs < 1:
        raise ValueError(
            f"eval.gold_metric={ev.gold_metric!r} needs evaluations during training: set "
            "eval.every_epochs to K >= 1 (evaluate every K epochs)"
        )
    if ev.hacking_window < 2:
        raise ValueError(
            f"eval.hacking_window must be >= 2 (the evaluations a trend is fitted over); got {ev.hacking_window}"
        )
    if not ev.hacking_tolerance >= 0:
        raise ValueError(
            f"eval.hacking_tolerance must be >= 0 (in the gold metric's units); got {ev.hacking_tolerance}"
        )
    keys = eval_metric_keys(cfg)
    full = {k for k in keys.values() if k is not None}
    if ev.gold_metric in full:
        return ev.gold_metric
    if keys.get(ev.gold_metric) is not None:
        return keys[ev.gold_metric]
    if ev.gold_metric in keys:
        raise ValueError(
            f"eval.gold_metric={ev.gold_metric!r} is both a reward component and an eval.metrics "
            f"scorer; give the full key: eval/metric/{ev.gold_metric}/mean or eval/reward/{ev.gold_metric}/mean"
        )
    raise ValueError(
        f"eval.gold_metric={ev.gold_metric!r} is not an eval metric of this run; one of "
        f"{sorted(full)} (or their short names {sorted(k for k, v in keys.items() if v)}); "
        "to guard with a metric the run does not train on, add it to eval.metrics, e.g. "
        "eval.metrics=[{name: shapes_exact}]"
    )


def ls_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of y against x (NaN with fewer than 2 distinct x)."""
    n = len(x)
    if n < 2:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx if sxx > 0 else float("nan")


@dataclass
class Verdict:
    """One evaluation's guard outcome: its metrics, whether its gold value is a new best, whether it is hacking."""

    metrics: dict
    new_best: bool
    hacking: bool


class HackingGuard:
    """The window test above, on the points ``observe`` is given; plain Python, no I/O."""

    def __init__(self, key: str, window: int, tolerance: float, best: float = -math.inf):
        self.key, self.window, self.tolerance = key, int(window), float(tolerance)
        self.best = best
        self.points: list[tuple[int, float, float]] = []  # (epoch, gold, train_reward)
        self.rewards: list[float] = []  # reward/mean of the epochs since the last evaluation

    def epoch_reward(self, reward_mean: float) -> None:
        """One epoch's training ``reward/mean`` (NaN when nothing was scored: skipped)."""
        if math.isfinite(reward_mean):
            self.rewards.append(float(reward_mean))

    def observe(self, epoch: int, evaluation: dict) -> Verdict:
        """The held-out evaluation closing ``epoch`` (its ``eval/...`` metrics) -> the guard's verdict."""
        gold = float(evaluation.get(self.key, float("nan")))
        reward = sum(self.rewards) / len(self.rewards) if self.rewards else float("nan")
        self.rewards = []
        if not (math.isfinite(gold) and math.isfinite(reward)):
            log.warning(
                "guard: epoch %d has no finite %s (%s) or training reward (%s); not a point of the window",
                epoch,
                self.key,
                gold,
                reward,
            )
            return Verdict({"guard/gold": gold, "guard/hacking": 0}, False, False)
        self.points = [*self.points, (epoch, gold, reward)][-self.window :]
        new_best = gold > self.best
        self.best = max(self.best, gold)
        golds = [g for _, g, _ in self.points]
        drop = max(golds) - gold
        slope = ls_slope([float(e) for e, _, _ in self.points], [r for _, _, r in self.points])
        hacking = len(self.points) == self.window and drop > self.tolerance and slope > 0
        m = {
            "guard/gold": gold,
            "guard/gold_best": self.best,
            "guard/gold_drop": drop,
            "guard/reward_slope": slope,
            "guard/hacking": int(hacking),
        }
        return Verdict(m, new_best, hacking)

    def alarm(self, epoch: int, m: dict) -> str:
        """The loud message of a hacking verdict."""
        first = self.points[0][0]
        return (
            f"REWARD HACKING SUSPECTED at epoch {epoch}: the training reward rose (slope "
            f"{m['guard/reward_slope']:+.4g} per epoch over epochs {first}-{epoch}) while the gold metric "
            f"{self.key} fell {m['guard/gold_drop']:.4g} from its best of the window to {m['guard/gold']:.4g} "
            f"(tolerance {self.tolerance:g}); the best checkpoint so far is checkpoints/{BEST}"
        )


def guard_for(cfg, checkpoints: str, resume: bool) -> HackingGuard | None:
    """The run's guard (None without ``eval.gold_metric``); a resumed run keeps the best gold value its
    ``checkpoints`` folder recorded (``best.json``), when it was of the same metric."""
    key = gold_key(cfg)
    if key is None:
        return None
    prior = read_best(checkpoints) if resume else None
    best = prior["value"] if prior and prior.get("metric") == key else -math.inf
    return HackingGuard(key, cfg.eval.hacking_window, cfg.eval.hacking_tolerance, best=best)


def read_best(checkpoints: str | Path) -> dict | None:
    """``checkpoints/best/best.json`` as a dict (``checkpoints``: a local folder or a storage URI), or None when no
    best was kept."""
    store = Storage(checkpoints)
    rel = f"{BEST}/{BEST_INFO}"
    return json.loads(store.read_text(rel)) if store.exists(rel) else None


def keep_best(source: str | Path, checkpoints: str | Path, info: dict) -> Path | str:
    """Copy the checkpoint folder ``source`` to ``<checkpoints>/best`` with ``best.json`` (``info``), replacing the
    previous best. Locally the copy is completed under a hidden name first, then renamed into place: a reader finds the
    old best or the new one, never a half-written folder (a crash between the two renames leaves ``.best.old``,
    which the next call clears). In an object store (no rename) ``best.json`` goes first and comes back last: a
    reader (``read_best``) sees no best while it is replaced. Returns the best folder."""
    if is_uri(source) or is_uri(checkpoints):
        return _keep_best_in_store(Storage(source), Storage(checkpoints), info)
    source, checkpoints = Path(source), Path(checkpoints)
    if not (source / "state.json").exists():
        raise FileNotFoundError(
            f"checkpoint {source} is not visible from the driver (no state.json there): "
            "checkpoints/best needs the run folder on a filesystem the driver and learner share, "
            "or runtime.storage_path (an object store both reach)"
        )
    best, tmp, old = checkpoints / BEST, checkpoints / f".{BEST}.tmp", checkpoints / f".{BEST}.old"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.copytree(source, tmp)
    (tmp / BEST_INFO).write_text(json.dumps({**info, "source": source.name}, indent=1))
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)
    return best


def _keep_best_in_store(source: Storage, checkpoints: Storage, info: dict) -> str:
    if not source.exists("state.json"):
        raise FileNotFoundError(f"checkpoint {source.location} has no state.json: not a complete checkpoint")
    checkpoints.remove(f"{BEST}/{BEST_INFO}")
    checkpoints.remove(BEST)
    checkpoints.copy_from(source, BEST)
    name = source.root.rstrip("/").rsplit("/", 1)[-1]
    checkpoints.write_text(f"{BEST}/{BEST_INFO}", json.dumps({**info, "source": name}, indent=1))
    return checkpoints.uri(BEST)
