"""The run's Ray metrics (``ray.util.metrics``) for the dashboard and Prometheus, all tagged with the run name.

Usage::

    sink = Metrics(cfg.name)          # Book(cfg, sink=sink) exports each epoch's metrics and counts drops
    sink.export(epoch_metrics)        # the gauges EXPORTED names
"""

from __future__ import annotations


class Metrics:
    """Ray metrics (``ray.util.metrics``) for the dashboard / Prometheus, all tagged with the run name."""

    def __init__(self, run: str, images_per_unit: int = 2):
        from ray.util.metrics import Counter, Gauge, Histogram

        self.images_per_unit = images_per_unit  # images of a pair (2) or a Flow-GRPO group
        tags = ("run",)
        self.tags = {"run": run}
        gauge = lambda name, doc: Gauge(name, description=doc, tag_keys=tags)  # noqa: E731
        self.gauges = {
            "pairs_per_s": gauge("fdfo_pairs_per_s", "finished pairs per second over the last epoch"),
            "images_per_s": gauge("fdfo_images_per_s", "sampled images per second over the last epoch"),
            "reward_mean": gauge("fdfo_reward_mean", "mean combined reward of the last epoch's pairs"),
            "reward_latency_s": gauge("fdfo_reward_latency_s", "mean scorer latency per reward batch"),
            "reward_backlog": gauge("fdfo_reward_backlog", "images queued at the reward actors"),
            "learner_step_s": gauge("fdfo_learner_step_s", "learner wall time per optimizer step"),
            "loss": gauge("fdfo_learner_loss", "loss of the last epoch (FDFO or Flow-GRPO)"),
            "clip_frac": gauge(
                "fdfo_learner_clip_frac",
                "fraction of rows with |rho - 1| beyond the trust region (epsilon; Flow-GRPO: clip_range)",
            ),
            "version": gauge("fdfo_weight_version", "learner weight version"),
            "policy_lag": gauge("fdfo_policy_lag_max", "largest (learner version - sample version) trained on"),
            "samplers": gauge("fdfo_samplers", "live sampler actors"),
            "sampler_busy": gauge("fdfo_sampler_busy", "share of the last epoch's wall time the samplers computed"),
            "learner_busy": gauge("fdfo_learner_busy", "share of the last epoch's wall time the learner computed"),
            "reward_replicas": gauge("fdfo_reward_replicas", "running reward actors / Serve replicas"),
            "guard_hacking": gauge("fdfo_guard_hacking", "1 when the gold metric fell while the training reward rose"),
            "guard_gold": gauge("fdfo_guard_gold", "the held-out gold metric at the last evaluation"),
            "guard_gold_drop": gauge("fdfo_guard_gold_drop", "how far the gold metric is below its best in the window"),
        }
        self.trained_pairs = Counter("fdfo_pairs_trained", description="pairs trained on", tag_keys=tags)
        self.dropped = Counter("fdfo_pairs_dropped", description="pairs dropped, by reason", tag_keys=("run", "reason"))
        self.component = Gauge(
            "fdfo_reward_component_mean", description="raw mean per scorer", tag_keys=("run", "scorer")
        )
        # distributions: how stale the pairs an update takes are, and how long a sampler takes to load a new version
        self.policy_lag = Histogram(
            "fdfo_policy_lag",
            description="pairs by (learner version - sample version) when their epoch's update starts",
            boundaries=[0.5, 1.5, 2.5, 3.5, 5.5, 7.5, 15.5],
            tag_keys=tags,
        )
        self.weight_sync = Histogram(
            "fdfo_weight_sync_s",
            description="seconds a sampler took to load a published version",
            boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30],
            tag_keys=tags,
        )

    def set(self, name: str, value: float) -> None:
        if value == value:  # skip NaN
            self.gauges[name].set(float(value), tags=self.tags)

    def drop(self, reason: str, n: int) -> None:
        if n:
            self.dropped.inc(n, tags={**self.tags, "reason": reason})

    def trained(self, n: int) -> None:
        self.trained_pairs.inc(n, tags=self.tags)

    def lags(self, lag: int, pairs: int) -> None:
        for _ in range(pairs):
            self.policy_lag.observe(lag, tags=self.tags)

    def loaded(self, seconds: float) -> None:
        self.weight_sync.observe(seconds, tags=self.tags)

    def export(self, metrics: dict) -> None:
        """An epoch's metrics to the gauges (see ``EXPORTED``); each scorer's raw mean tagged by scorer."""
        for key, name in EXPORTED:
            if key in metrics:
                self.set(name, metrics[key])
        if "perf/pairs_per_s" in metrics:
            self.set("images_per_s", self.images_per_unit * metrics["perf/pairs_per_s"])
        for key, value in metrics.items():
            if key.startswith("reward/") and key.endswith("/mean") and key != "reward/mean":
                self.component.set(value, tags={**self.tags, "scorer": key.split("/")[1]})


EXPORTED = (  # (epoch metric, gauge name)
    ("perf/pairs_per_s", "pairs_per_s"),
    ("reward/mean", "reward_mean"),
    ("reward/latency_s", "reward_latency_s"),
    ("reward/backlog", "reward_backlog"),
    ("perf/learner_step_s", "learner_step_s"),
    ("learner/loss", "loss"),
    ("learner/clip_frac", "clip_frac"),
    ("learner/version", "version"),
    ("learner/policy_lag_max", "policy_lag"),
    ("runtime/samplers", "samplers"),
    ("perf/sampler_busy", "sampler_busy"),
    ("perf/learner_busy", "learner_busy"),
    ("runtime/reward_replicas", "reward_replicas"),
    ("guard/hacking", "guard_hacking"),
    ("guard/gold", "guard_gold"),
    ("guard/gold_drop", "guard_gold_drop"),
)
