"""Collective weight-sync failures: a sampler refuses to sample after a failed transfer; at run level a member
that dies between broadcasts sends the version through the object store and the next broadcast re-forms the
group without it."""

import time

import pytest
import torch

from actors.sampler import Sampler
from cluster.build import build_model
from cluster.config import Batching, load_config
from learner.learner import Learner

REQ = {"prompts": ["a red circle"], "prompt_ids": [0], "pair_ids": [0], "seeds": [0]}


class FailingGroup:
    """A WeightGroup whose transfer breaks halfway: it scribbles on the receiver's tensors, then raises."""

    def receive(self, tensors):
        next(iter(tensors.values())).add_(1.0)
        raise RuntimeError("weight group broadcast failed on rank 1 of 2: a peer died")

    def close(self):
        pass


def test_sampler_refuses_to_sample_after_a_failed_transfer_until_a_verified_version():
    cfg = load_config("tiny-cpu", ["sampling.num_steps=2"])
    learner = Learner(build_model(cfg.model), cfg.train, Batching.of(cfg), cfg.lora, seed=0)
    sampler = Sampler(build_model(cfg.model), cfg.sampling, cfg.lora, index=0)
    sampler.sample(**REQ)  # holds verified (initial) weights: samples
    sampler._group = FailingGroup()
    with pytest.raises(RuntimeError, match="a peer died"):
        sampler.receive_weights()
    assert sampler.status()["version"] == -1
    with pytest.raises(RuntimeError) as err:
        sampler.sample(**REQ)
    assert str(err.value) == "sampler 0 holds no verified weights (the last transfer failed); refusing to sample"

    learner.version = 3  # a later version, verified through the object-store path
    proof = sampler.set_weights(learner.weights())
    assert proof == {"version": 3, "checksum": learner.weights_info()[1], "sampler": 0}
    job, images = sampler.sample(**REQ)
    assert images.shape[0] == 2 and sampler.status()["version"] == 3


@pytest.fixture
def weight_sync(ray_local):
    """A real Learner actor and two real Sampler actors (tiny SD3, full weights) behind a collective WeightSync;
    yields (sync, pool, samplers, bump, proofs) and kills the actors after the test."""
    import ray

    from cluster.learner_group import learner_actor
    from cluster.sampler_pool import Pool, sampler_actor
    from cluster.weight_sync import WeightSync

    cfg = load_config(
        "tiny-cpu",
        [
            "lora.enabled=false",
            "runtime.weight_sync=collective",
            "runtime.sampler.num_cpus=1",
            "runtime.learner.num_cpus=1",
        ],
    )
    learner = learner_actor(cfg)
    samplers = {i: sampler_actor(cfg, i) for i in range(2)}

    def step(self, version):  # runs inside the learner actor: an update's effect
        with torch.no_grad():
            for p in self.params:
                p.add_(0.01)
        self.version = version

    def bump(version):
        """A new learner version with different weights; returns (version, checksum)."""
        ray.get(learner.__ray_call__.remote(step, version), timeout=30)
        return ray.get(learner.weights_info.remote(), timeout=30)

    def proofs(indices):
        return [
            tuple(ray.get(samplers[i].status.remote(), timeout=30)[k] for k in ("version", "checksum")) for i in indices
        ]

    try:  # actors up (model built) before the timed part starts
        ray.get([learner.weights_info.remote()] + [a.status.remote() for a in samplers.values()], timeout=180)
        pool = Pool(actors=dict(samplers), busy={0: 0, 1: 0}, next_index=2)
        yield (
            WeightSync(learner, collective=True, timeout_s=15.0),
            pool,
            samplers,
            bump,
            proofs,
        )  # a dead member stalls a transfer 15 s
    finally:
        for a in [learner, *samplers.values()]:
            ray.kill(a)


def healthy_broadcast(sync, pool, bump, proofs):
    version, digest = bump(1)
    assert sync.broadcast(pool, version, digest) is None  # the collective path: no object-store ref
    assert sync.members == [0, 1] and not sync.members_changed
    assert proofs([0, 1]) == [(1, digest)] * 2
    return sync.address


def test_a_dead_member_dropped_from_the_pool_is_left_out_of_the_next_generation(weight_sync):
    import ray

    sync, pool, samplers, bump, proofs = weight_sync
    t0 = time.monotonic()
    first = healthy_broadcast(sync, pool, bump, proofs)
    # sampler 1 died and the driver dropped it (what RayRun.lose_sampler does, marking members_changed)
    ray.kill(samplers[1])
    pool.actors.pop(1)
    pool.busy.pop(1)
    version, digest = bump(2)
    assert sync.broadcast(pool, version, digest) is None  # a new generation, collective again
    assert sync.members == [0] and not sync.members_changed and sync.address != first
    assert proofs([0]) == [(2, digest)]
    assert time.monotonic() - t0 < 60


def test_member_killed_before_a_broadcast_falls_back_for_the_survivors(weight_sync):
    import ray

    sync, pool, samplers, bump, proofs = weight_sync
    t0 = time.monotonic()
    healthy_broadcast(sync, pool, bump, proofs)

    # sampler 1 dies; the driver has not noticed yet (it is still in the pool), as when it dies mid-transfer
    ray.kill(samplers[1])
    version, digest = bump(2)
    ref = sync.broadcast(pool, version, digest)
    assert ref is not None and ray.get(ref, timeout=30).checksum == digest
    assert sync.members_changed and sync.lost == [1]  # reported for the runtime to replace
    assert proofs([0]) == [(2, digest)]
    # the runtime drops it (RayRun.lose_sampler); the next broadcast re-forms the group without it
    pool.actors.pop(sync.lost.pop())
    version, digest = bump(3)
    assert sync.broadcast(pool, version, digest) is None
    assert sync.members == [0] and proofs([0]) == [(3, digest)]
    assert time.monotonic() - t0 < 60
