"""The elastic reward pool: a Ray Serve deployment of the run's scorer whose replicas follow its queue."""

import time

import numpy as np
import pytest

from cluster.config import load_config

ELASTIC = [
    "runtime.reward.count=1",
    "runtime.reward.max_count=2",
    "runtime.reward.target_ongoing=1",
    "runtime.reward.upscale_delay_s=0.5",
    "runtime.reward.downscale_delay_s=2",
    "runtime.reward.look_back_s=1",
    "runtime.reward.num_cpus=0.5",
]


def test_pool_bounds_are_checked_before_anything_starts():
    from cluster.serving import check_reward_pool, uses_serve

    rt = lambda *o: load_config("tiny-cpu", list(o)).runtime  # noqa: E731
    assert (
        not uses_serve(rt())
        and uses_serve(rt("runtime.reward.max_count=3"))
        and uses_serve(rt("runtime.reward.backend=serve"))
    )
    with pytest.raises(ValueError, match=r"^need 1 <= runtime.reward.count \(3\) <= runtime.reward.max_count \(2\)$"):
        check_reward_pool(rt("runtime.reward.count=3", "runtime.reward.max_count=2"))
    with pytest.raises(
        ValueError,
        match=r"^runtime.reward.max_count=2 > runtime.reward.count=1 needs an elastic "
        r"pool: set runtime.reward.backend=serve",
    ):
        check_reward_pool(rt("runtime.reward.max_count=2", "runtime.reward.backend=actors"))


def until(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.25)


def scorer_pids(out) -> set[int]:
    """The processes that scored a RewardOutput (its chunks when the request was split over batches)."""
    return {p["batch"]["pid"] for p in (out.info.get("chunks") or [out.info])}


def test_reward_pool_grows_under_load_and_shrinks_when_idle(ray_local):
    # one replica at rest; requests kept in flight (more than target_ongoing=1 per replica) bring a second,
    # which answers too (each answer tagged with the pid of the replica that scored it) and scores like the run's
    # scorer in this process; idle again, the pool goes back to its minimum
    import asyncio
    import os

    import ray

    from cluster.build import reward_specs
    from cluster.serving import RewardService
    from rewards.batcher import RewardBatcher

    cfg = load_config("tiny-cpu", ELASTIC)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 96, 3), dtype=np.uint8)
    prompts = ["a"] * 64
    svc = RewardService(cfg, threads=1)
    try:
        assert svc.replicas() == 1
        images = ray.put(pixels)
        inflight, answered = [], []

        def loaded(replicas: int, pids: int = 0):
            inflight.extend(svc.score(images, prompts) for _ in range(8 - len(inflight)))
            done, rest = ray.wait(inflight, num_returns=len(inflight), timeout=0.2)
            inflight[:] = rest
            answered.extend(ray.get(done))
            return svc.replicas() == replicas and len(set().union(*map(scorer_pids, answered))) >= pids

        until(lambda: loaded(2), 90.0, "a second replica under load")
        grown = len(answered)
        until(lambda: loaded(2, pids=2), 60.0, "answers from both replicas")
        answered.extend(ray.get(inflight))
        inflight.clear()
        pids = set().union(*map(scorer_pids, answered[grown:]))
        assert len(pids) == 2 and os.getpid() not in pids, pids  # two replicas answered, neither this one
        local = RewardBatcher(
            reward_spec={"name": "weighted_sum", "specs": reward_specs(cfg.reward)},
            max_batch_size=cfg.runtime.reward.max_batch,
        )
        expected = asyncio.run(local.score(images=pixels, prompts=prompts))
        assert scorer_pids(expected) == {os.getpid()}
        assert all(np.array_equal(o.scores, expected.scores) for o in answered)  # every replica scores as in process
        until(lambda: svc.replicas() == 1, 90.0, "the pool to shrink back to one replica when idle")
    finally:
        svc.stop()


def test_a_run_through_the_elastic_reward_pool(ray_local, tmp_path, monkeypatch):
    import ray

    import cluster.reward_pool
    from cluster.runtime import run_ray
    from cluster.serving import RewardService

    made, requests = [], []  # the deployments the run started; each request sent to one, with its answer

    class Recorded(RewardService):
        def __init__(self, cfg, threads):
            super().__init__(cfg, threads)
            made.append((self.app, self.replicas()))

        def score(self, images, prompts):
            ref = super().score(images, prompts)
            requests.append((len(prompts), ref))
            return ref

    monkeypatch.setattr(cluster.reward_pool, "RewardService", Recorded)
    asked = {"score": [], "score_now": []}  # images the run asked its reward pool to score: pairs, held-out

    def counted(name, method):
        def call(self, images, prompts, *args, **kwargs):
            asked[name].append(len(prompts))
            return method(self, images, prompts, *args, **kwargs)

        return call

    for name in asked:
        monkeypatch.setattr(
            cluster.reward_pool.RewardPool, name, counted(name, getattr(cluster.reward_pool.RewardPool, name))
        )
    cfg = load_config(
        "tiny-cpu",
        ELASTIC
        + [
            f"output_dir={tmp_path}",
            "train.epochs=3",
            "train.pairs_per_epoch=8",
            "sampling.pairs_per_call=4",
            "sampling.num_steps=4",
            "name=elastic",
        ],
    )
    out = run_ray(cfg)
    assert out["ledger"] == {"pairs_requested": 24, "pairs_trained": 24, "pairs_dropped": {}, "pairs_in_flight": 0}
    # the run went through Serve: one deployment, running when made, and every image the run had scored (the pairs'
    # and the held-out evaluations') was a request to it (plain reward actors would have taken none), each answered
    # with one score an image
    assert made == [("fdfo-elastic", 1)]
    assert sum(asked["score"]) == out["history"][-1]["perf/images_sampled"] == 24 * 2 and sum(asked["score_now"]) > 0
    assert sum(n for n, _ in requests) == sum(asked["score"]) + sum(asked["score_now"])
    assert all(len(ray.get(ref).scores) == n for n, ref in requests)
    assert all(1 <= h["runtime/reward_replicas"] <= 2 for h in out["history"])
    assert out["torch_threads"]["reward"] == [1]
