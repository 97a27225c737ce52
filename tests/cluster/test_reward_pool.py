"""The reward pool on stand-in reward actors: requests routed by pair id, a dead actor replaced once however many
requests report it, evaluation retried on a replacement, counters of the live actors."""

import pytest

from cluster.config import load_config

pytestmark = pytest.mark.ray_unit  # stand-in actors on the session's Ray instance: the fast tier


class FakeBook:
    epoch = 7


@pytest.fixture
def rewards(ray_local):
    """A RewardPool of two stand-in reward actors (``spawn``), and the actors made (killed after the test)."""
    import ray

    from cluster.reward_pool import RewardPool

    @ray.remote(num_cpus=0)
    class StubReward:
        def __init__(self, index: int):
            self.index = index

        def score(self, images, prompts) -> tuple:
            return self.index, list(images), list(prompts)

        def stats(self) -> dict:
            return {"mean_latency_s": 0.1 * (self.index + 1), "backlog": self.index, "torch_threads": 1}

    made = []

    def spawn(cfg, index):
        made.append(StubReward.remote(index))
        return made[-1]

    pool = RewardPool(load_config("tiny-cpu", ["runtime.reward.count=2"]), FakeBook(), faults=[], spawn=spawn)
    yield pool, made
    for actor in made:
        ray.kill(actor)


def test_requests_are_routed_by_their_first_pair_id(rewards):
    import ray

    pool, made = rewards
    refs = [pool.score([route], ["a", "a"], route=route) for route in (0, 1, 2, 5)]
    assert [ray.get(r)[0] for r in refs] == [0, 1, 0, 1] and pool.replicas() == 2
    assert ray.get(refs[0]) == (0, [0], ["a", "a"])


def test_a_dead_actor_is_replaced_once(rewards):
    import ray

    pool, made = rewards
    dead = made[0]._actor_id.hex()
    ray.kill(made[0])
    pool.lose(dead)
    pool.lose(dead)  # a second request reporting the same death
    pool.lose("a Serve replica's or a sampler's id")  # not one of the pool's actors: nothing to replace
    assert pool.faults == [{"role": "reward", "lost": 0, "replaced_by": 2, "epoch": 7}]
    assert pool.actors == [made[2], made[1]] and pool.next_index == 3
    assert ray.get(pool.score([1], ["b"], route=0))[0] == 2


def test_evaluation_and_counters_replace_a_dead_actor(rewards):
    import ray

    pool, made = rewards
    ray.kill(made[0])
    assert pool.score_now([9], ["c"]) == (2, [9], ["c"])  # retried on fdfo/reward/2
    ray.kill(made[1])
    stats = pool.stats()  # actor 1's counters are gone with it: replaced
    assert [s["backlog"] for s in stats] == [2] and pool.actors == [made[2], made[3]]
    assert [f["replaced_by"] for f in pool.faults] == [2, 3]


def test_score_seconds_splits_each_batch_by_the_images_it_served():
    from types import SimpleNamespace

    from cluster.reward_pool import score_seconds

    # 4 of a batch of 8 images in 2.0 s, then 2 of a batch of 2 in 0.5 s: 1.0 + 0.5
    out = SimpleNamespace(
        info={
            "chunks": [
                {"batch": {"latency_s": 2.0, "size": 8}, "reasons": [None] * 4},
                {"batch": {"latency_s": 0.5, "size": 2}, "reasons": [None] * 2},
            ]
        }
    )
    assert score_seconds(out) == pytest.approx(1.5)
    assert score_seconds(SimpleNamespace(info={"reasons": [None] * 2})) == 0.0  # scored without a batcher
