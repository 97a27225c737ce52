"""The full-weight broadcast path: a learner and samplers as real Ray actors in one gloo ``WeightGroup``."""

from __future__ import annotations

import os

os.environ["RAY_AUTH_MODE"] = "token"  # the project always runs Ray with token auth; must precede `import ray`

import pytest
import ray
import torch

from learner.collective import WeightGroup, node_ip, plan_buckets, rendezvous_address
from learner.weights import Weights, checksum

# Small enough that the test's fp32 weight matrix (8*16*4 = 512 bytes) is a bucket on its own (received straight
# into the parameter) while the biases share buckets (received through the staging buffer): both paths run.
BUCKET_BYTES = 256


class TinyMLP(torch.nn.Module):
    """fc1 in float32, fc2 in bfloat16: a transfer must keep both bit-exact."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4).to(torch.bfloat16)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


class CorruptingGroup(WeightGroup):
    """Flips one payload byte after it arrives, once, when asked: what a bad link or a partial write looks like."""

    corrupt_next = False

    def _broadcast(self, t: torch.Tensor) -> None:
        super()._broadcast(t)
        if self.corrupt_next and t.dtype == torch.uint8 and t.numel():
            t[:1].bitwise_xor_(torch.ones(1, dtype=torch.uint8))
            self.corrupt_next = False


# num_cpus=0: three actors must run at once on the fixture's 2-CPU Ray instance (they only wait on sockets).
@ray.remote(num_cpus=0)
class LearnerActor:
    def __init__(self):
        self.model = TinyMLP(seed=0)
        self.group = None

    def address(self, peers_on_this_node: bool) -> tuple[str, int]:
        return rendezvous_address(peers_on_this_node)

    def join(self, world_size: int, addr: str, port: int) -> None:
        self.group = WeightGroup(0, world_size, addr, port, timeout_s=30, bucket_bytes=BUCKET_BYTES)

    def update(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))

    def send(self, version: int) -> str:
        return self.group.send(params(self.model), version=version)

    def snapshot(self, version: int) -> Weights:
        return Weights.of(self.model, version=version)

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def close(self) -> None:
        self.group.close()


@ray.remote(num_cpus=0)
class SamplerActor:
    def __init__(self, seed: int):
        self.model = TinyMLP(seed=seed)
        self.group = None

    def join(self, rank: int, world_size: int, addr: str, port: int) -> None:
        self.group = CorruptingGroup(rank, world_size, addr, port, timeout_s=30)

    def receive(self, corrupt: bool = False, drop: str | None = None) -> tuple[int, str]:
        self.group.corrupt_next = corrupt
        tensors = params(self.model)
        if drop is not None:
            del tensors[drop]
        return self.group.receive(tensors)

    def load(self, weights: Weights) -> str:
        return weights.load_into(self.model)

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def close(self) -> None:
        self.group.close()


def form_group(learner, samplers, peers_on_this_node: bool = True) -> None:
    """All joins in flight before waiting on any: group formation blocks until every rank is in. The rendezvous is
    on loopback (every actor here shares the machine) unless ``peers_on_this_node=False`` asks for the node's
    cluster address, the path a multi-node run takes."""
    addr, port = ray.get(learner.address.remote(peers_on_this_node))
    world = 1 + len(samplers)
    refs = [learner.join.remote(world, addr, port)]
    refs += [s.join.remote(rank, world, addr, port) for rank, s in enumerate(samplers, start=1)]
    ray.get(refs, timeout=60)


def assert_identical(learner, samplers) -> str:
    want = ray.get(learner.state.remote())
    for s in samplers:
        got = ray.get(s.state.remote())
        assert checksum(got) == checksum(want)
        for name in want:
            assert got[name].dtype == want[name].dtype
            assert torch.equal(got[name], want[name]), name
    return checksum(want)


@pytest.fixture(scope="module")
def actors(ray_local):
    learner = LearnerActor.remote()
    samplers = [SamplerActor.remote(seed=1), SamplerActor.remote(seed=2)]
    form_group(learner, samplers)
    yield learner, samplers
    ray.get([a.close.remote() for a in [learner, *samplers]])


def test_plan_buckets_groups_by_dtype_and_caps_size():
    tensors = {
        "b": torch.zeros(10),  # 40 bytes
        "a": torch.zeros(20),  # 80 bytes
        "c": torch.zeros(100),  # 400 bytes: larger than a bucket, alone
        "h": torch.zeros(4, dtype=torch.bfloat16),  # 8 bytes
        "d": torch.zeros(1),  # 4 bytes
    }
    buckets = plan_buckets(tensors, bucket_bytes=128)
    assert [(str(b.dtype), b.names, b.nbytes) for b in buckets] == [
        ("torch.bfloat16", ("h",), 8),
        ("torch.float32", ("a", "b"), 120),
        ("torch.float32", ("c",), 400),
        ("torch.float32", ("d",), 4),
    ]


def test_broadcast_is_bit_identical(actors):
    learner, samplers = actors
    ray.get(learner.update.remote(seed=10))
    refs = [learner.send.remote(version=1)] + [s.receive.remote() for s in samplers]
    sent, *received = ray.get(refs, timeout=30)
    assert received == [(1, sent)] * len(samplers)
    assert assert_identical(learner, samplers) == sent


def test_later_versions_reuse_the_group(actors):
    learner, samplers = actors
    for version, seed in [(2, 20), (3, 30)]:
        ray.get(learner.update.remote(seed=seed))
        refs = [learner.send.remote(version=version)] + [s.receive.remote() for s in samplers]
        sent, *received = ray.get(refs, timeout=30)
        assert received == [(version, sent)] * len(samplers)
        assert assert_identical(learner, samplers) == sent


def test_corrupted_payload_is_detected_and_the_group_stays_in_step(actors):
    learner, samplers = actors
    ray.get(learner.update.remote(seed=40))
    send = learner.send.remote(version=4)
    bad = samplers[0].receive.remote(corrupt=True)
    good = samplers[1].receive.remote()
    sent = ray.get(send, timeout=30)
    with pytest.raises(RuntimeError, match=r"version 4 failed its checksum .*" + sent):
        ray.get(bad, timeout=30)
    assert ray.get(good, timeout=30) == (4, sent)

    ray.get(learner.update.remote(seed=50))  # the next version heals the corrupted sampler
    refs = [learner.send.remote(version=5)] + [s.receive.remote() for s in samplers]
    sent, *received = ray.get(refs, timeout=30)
    assert received == [(5, sent)] * len(samplers)
    assert assert_identical(learner, samplers) == sent


def test_layout_mismatch_is_named_and_the_group_stays_in_step(actors):
    learner, samplers = actors
    ray.get(learner.update.remote(seed=60))
    before = ray.get(samplers[0].state.remote())
    send = learner.send.remote(version=6)
    bad = samplers[0].receive.remote(drop="fc2.bias")
    good = samplers[1].receive.remote()
    sent = ray.get(send, timeout=30)
    with pytest.raises(RuntimeError, match="do not match the learner's layout"):
        ray.get(bad, timeout=30)
    assert ray.get(good, timeout=30) == (6, sent)
    after = ray.get(samplers[0].state.remote())
    assert all(torch.equal(before[n], after[n]) for n in before)  # refused before writing anything

    refs = [learner.send.remote(version=7)] + [s.receive.remote() for s in samplers]
    sent, *received = ray.get(refs, timeout=30)
    assert received == [(7, sent)] * len(samplers)


def test_late_sampler_loads_via_object_store_then_the_group_reforms(actors):
    learner, samplers = actors
    late = SamplerActor.remote(seed=3)
    # The late sampler gets the current version through the object store once (verified), so it can sample now.
    current = learner.snapshot.remote(version=7)
    assert ray.get(late.load.remote(current)) == ray.get(current).checksum
    assert_identical(learner, [late])

    # At the next broadcast the driver closes the old generation everywhere and forms a new one with a new port
    # (here on the node's cluster address, as when a member is on another node).
    ray.get([a.close.remote() for a in [learner, *samplers]])
    everyone = [*samplers, late]
    form_group(learner, everyone, peers_on_this_node=False)
    ray.get(learner.update.remote(seed=80))
    refs = [learner.send.remote(version=8)] + [s.receive.remote() for s in everyone]
    sent, *received = ray.get(refs, timeout=30)
    assert received == [(8, sent)] * len(everyone)
    assert assert_identical(learner, everyone) == sent
    ray.get(late.close.remote())


def test_rendezvous_is_loopback_for_one_node_and_the_node_address_otherwise(ray_local):
    host, port = rendezvous_address(peers_on_this_node=True)
    assert host == "127.0.0.1" and 1024 <= port < 65536
    host, port = rendezvous_address(peers_on_this_node=False)
    assert host == node_ip() == ray.util.get_node_ip_address() and 1024 <= port < 65536


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::", ""])
def test_a_wildcard_rendezvous_is_refused(wildcard):
    # master_addr is what rank 0 binds and what the others dial: a wildcard would listen on every interface
    with pytest.raises(ValueError, match="is a wildcard: rank 0 would listen on every interface"):
        WeightGroup(0, 2, wildcard, 29500, timeout_s=1)
