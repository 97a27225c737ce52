"""The elastic reward pool: the run's scorer as a Ray Serve deployment whose replicas follow its queue.

Usage::

    pool = RewardService(cfg)                       # serve.run of the reward deployment (no HTTP proxy)
    out_ref = pool.score(images_ref, prompts)       # an ObjectRef of the RewardOutput: a sampler's ``complete`` takes it
    pool.replicas(), pool.stats()                   # running replicas; one replica's batcher counters
    pool.stop()                                     # the application deleted with its replicas

Each replica is the same ``RewardBatcher`` a reward actor is (its own batching in front of the scorer), so the
two backends score identically. Serve's autoscaler keeps between ``runtime.reward.count`` and
``runtime.reward.max_count`` replicas, aiming at ``runtime.reward.target_ongoing`` requests in flight per replica
(a request is one sampler call's images); a replica that dies is replaced by Serve's controller, and the requests
it held fail their pairs (``actor_lost``, counted by the runtime). Selected by ``runtime.reward.backend`` ("auto":
Serve when ``max_count`` exceeds ``count``, plain actors for a fixed pool).
"""

from __future__ import annotations

import logging

import ray

from cluster.build import reward_specs
from cluster.config import RunConfig
from rewards.batcher import RewardBatcher

log = logging.getLogger("fdfo")


def uses_serve(rt) -> bool:
    """Whether the reward pool is a Serve deployment (``runtime.reward.backend``; "auto": when it may grow)."""
    pool = rt.reward
    if pool.backend == "auto":
        return (pool.max_count or pool.count) > pool.count
    return pool.backend == "serve"


def check_reward_pool(rt) -> None:
    """The pool's bounds, before any resource is taken."""
    pool = rt.reward
    top = pool.max_count or pool.count
    if not 1 <= pool.count <= top:
        raise ValueError(f"need 1 <= runtime.reward.count ({pool.count}) <= runtime.reward.max_count ({top})")
    if top > pool.count and pool.backend == "actors":
        raise ValueError(
            f"runtime.reward.max_count={top} > runtime.reward.count={pool.count} needs an "
            "elastic pool: set runtime.reward.backend=serve (or auto), or max_count to the pool size"
        )


class RewardService:
    """The reward deployment of one run (application ``fdfo-<run name>``) and its handle."""

    def __init__(self, cfg: RunConfig, threads: int):
        from ray import serve

        pool = cfg.runtime.reward
        self.app = f"fdfo-{cfg.name}"
        serve.start(proxy_location="Disabled")  # handles only: no HTTP server is opened
        options = {
            "autoscaling_config": {
                "min_replicas": pool.count,
                "max_replicas": pool.max_count or pool.count,
                "target_ongoing_requests": pool.target_ongoing,
                "upscale_delay_s": pool.upscale_delay_s,
                "downscale_delay_s": pool.downscale_delay_s,
                "look_back_period_s": pool.look_back_s,
            },
            # requests queue inside each replica's batcher, not in the handle: the driver is never held up
            "max_ongoing_requests": 1024,
            "ray_actor_options": {
                "num_cpus": pool.num_cpus,
                "num_gpus": pool.num_gpus,
                "resources": dict(pool.resources),
            },
        }
        app = (
            serve.deployment(RewardBatcher, name="reward")
            .options(**options)
            .bind(
                reward_spec={"name": "weighted_sum", "specs": reward_specs(cfg.reward)},
                max_batch_size=pool.max_batch,
                max_wait_s=pool.max_wait_s,
                timeout_s=pool.timeout_s,
                torch_threads=threads,
            )
        )
        self.handle = serve.run(app, name=self.app, route_prefix=None)
        log.info(
            "reward pool: Serve application %s, %d-%d replicas",
            self.app,
            pool.count,
            pool.max_count or pool.count,
        )

    def score(self, images, prompts: list[str]) -> ray.ObjectRef:
        """Queue a request (``images`` may be an ObjectRef: the replica resolves it); its result as an ObjectRef."""
        return self.handle.score.remote(images=images, prompts=prompts)._to_object_ref_sync()

    def stats(self) -> dict:
        """The counters of whichever replica answers (the pool's latency and backlog as one replica sees them)."""
        return self.handle.stats.remote().result(timeout_s=30.0)

    def replicas(self) -> int:
        from ray import serve

        app = serve.status().applications.get(self.app)
        return 0 if app is None else app.deployments["reward"].replica_states.get("RUNNING", 0)

    def stop(self) -> None:
        from ray import serve

        try:
            serve.delete(self.app)
        except Exception as e:  # noqa: BLE001 - the run is ending; a failed clean-up must not hide why
            log.warning("could not delete Serve application %s: %r", self.app, e)
