"""Which Ray cluster ``fdfo train`` joins (the one named, a live one on this machine, else a new local instance, also
when the last cluster on this machine died and left its address behind), and the answers when it is too small."""

import logging
import socket

import pytest

from cluster import runtime
from cluster.config import load_config


@pytest.fixture
def init_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def last_started(monkeypatch, address):
    import ray._private.utils

    monkeypatch.setattr(ray._private.utils, "read_ray_address", lambda temp_dir=None: address)


def test_a_stale_local_address_starts_a_local_instance(monkeypatch, init_calls, caplog):
    with socket.socket() as s:  # a port nothing listens on any more
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    last_started(monkeypatch, f"127.0.0.1:{port}")
    with caplog.at_level(logging.WARNING, logger="fdfo"):
        runtime.connect(load_config("tiny-cpu").runtime, num_cpus_needed=2.5)
    (kw,) = init_calls
    assert kw["address"] == "local" and kw["num_cpus"] >= 3 and kw["dashboard_host"] == "127.0.0.1"
    assert (
        f"the Ray cluster last started on this machine (127.0.0.1:{port}) does not answer: starting a local instance"
        in caplog.text
    )


def test_a_live_local_cluster_is_joined(monkeypatch, init_calls):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        last_started(monkeypatch, f"127.0.0.1:{s.getsockname()[1]}")
        runtime.connect(load_config("tiny-cpu").runtime, num_cpus_needed=2.5)
        assert init_calls == [{"address": f"127.0.0.1:{s.getsockname()[1]}", "namespace": "fdfo"}]


def test_no_local_cluster_or_a_new_one_asked_for(monkeypatch, init_calls):
    last_started(monkeypatch, None)
    runtime.connect(load_config("tiny-cpu").runtime, num_cpus_needed=1)
    last_started(monkeypatch, "127.0.0.1:1")  # never even probed: runtime.address=local
    runtime.connect(load_config("tiny-cpu", ["runtime.address=local"]).runtime, num_cpus_needed=1)
    assert [kw["address"] for kw in init_calls] == ["local", "local"]  # a new instance, not the file's cluster


def test_an_explicit_address_is_joined_as_given(monkeypatch, init_calls):
    last_started(monkeypatch, None)
    runtime.connect(load_config("tiny-cpu", ["runtime.address=ray://head.example:10001"]).runtime, num_cpus_needed=1)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    runtime.connect(load_config("tiny-cpu").runtime, num_cpus_needed=1)
    assert init_calls == [
        {"address": "ray://head.example:10001", "namespace": "fdfo"},
        {"address": "10.0.0.5:6379", "namespace": "fdfo"},
    ]


# -- resources: what the run asks against what the cluster has -------------------------------------------------
def rt(*over):
    return load_config("tiny-cpu", list(over)).runtime


def test_a_run_that_fits_asks_nothing_more():
    # tiny-cpu: learner 1 CPU, 1 reward actor 0.5 CPU, 1 sampler 1 CPU = 2.5 CPUs
    assert runtime.resource_shortfall(rt(), [{"CPU": 2.0}, {"CPU": 1.0}]) is None


def test_an_actor_no_node_can_hold_is_named_with_the_override():
    msg = runtime.resource_shortfall(rt("runtime.sampler.num_gpus=1"), [{"CPU": 8.0}, {"CPU": 4.0}])
    assert msg == (
        "the sampler actor asks for {CPU: 1, GPU: 1} but the largest node of this cluster has {CPU: 8, GPU: 0} "
        "(2 nodes, {CPU: 12, GPU: 0} in all): lower runtime.sampler.num_gpus or add a node that large"
    )
    msg = runtime.resource_shortfall(
        rt("runtime.learner.num_cpus=16", "runtime.learner.num_gpus=2"), [{"CPU": 8.0, "GPU": 1.0}]
    )
    assert msg.startswith(
        "the learner actor asks for {CPU: 16, GPU: 2} but the largest node of this cluster has "
        "{CPU: 8, GPU: 1} (1 nodes, {CPU: 8, GPU: 1} in all): lower runtime.learner.num_cpus / "
        "runtime.learner.num_gpus"
    )


def test_a_pool_larger_than_the_cluster_is_named():
    # the case: tiny-cpu asks 2.5 CPUs; a 2-CPU head cannot hold them all
    msg = runtime.resource_shortfall(rt(), [{"CPU": 2.0}])
    assert msg == (
        "the run's actors ask for {CPU: 2.5, GPU: 0} in all (1 learner x {CPU: 1, GPU: 0}, 1 reward x "
        "{CPU: 0.5, GPU: 0}, 1 sampler x {CPU: 1, GPU: 0}) but this cluster has {CPU: 2, GPU: 0}: lower "
        "runtime.sampler.count / runtime.reward.count or the per-actor asks, or add nodes"
    )


def test_a_local_instance_short_of_resources_fails_at_once(monkeypatch):
    monkeypatch.setattr(
        runtime.ray,
        "nodes",
        lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 64.0}}],
    )
    with pytest.raises(
        RuntimeError,
        match=r"in all .* but this cluster has \{CPU: 2, GPU: 0\}.* \(a local Ray instance does not grow\)$",
    ):
        runtime.await_resources(rt(), can_scale=False)


def test_a_cluster_that_may_scale_is_asked_and_waited_for(monkeypatch):
    import ray.autoscaler.sdk

    asked, grown = [], iter([[{"CPU": 2.0}], [{"CPU": 2.0}], [{"CPU": 2.0}, {"CPU": 2.0}]])
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: asked.append(bundles))
    monkeypatch.setattr(runtime.ray, "nodes", lambda: [{"Alive": True, "Resources": r} for r in next(grown)])
    monkeypatch.setattr(runtime.time, "sleep", lambda s: None)
    runtime.await_resources(rt(), can_scale=True)  # the second node arrives on the third look
    assert asked == [[{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 1.0}]]
    monkeypatch.setattr(runtime.ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    with pytest.raises(RuntimeError, match=r"waited runtime.resource_wait_s = 0 s for the cluster to scale$"):
        runtime.await_resources(rt("runtime.resource_wait_s=0"), can_scale=True)


def test_roles_on_their_own_node_types_are_checked_by_custom_resource():
    roles = ["runtime.sampler.resources={sampler: 1}", "runtime.learner.resources={learner: 1}"]
    gpu_node, sampler_node = {"CPU": 8.0, "GPU": 1.0, "learner": 1.0}, {"CPU": 4.0, "sampler": 2.0}
    assert runtime.resource_shortfall(rt(*roles, "runtime.sampler.count=2"), [gpu_node, sampler_node]) is None
    # the sampler's CPU and its node type exist, but never on one node
    msg = runtime.resource_shortfall(rt(*roles, "runtime.sampler.num_cpus=6"), [gpu_node, sampler_node])
    assert msg == (
        "the sampler actor asks for {'CPU': 6.0, 'GPU': 0.0, 'sampler': 1.0} (runtime.sampler.resources and "
        "its CPUs/GPUs) but no node of this cluster has all of that: start nodes of that type (ray start "
        "--resources='{\"sampler\": 1}' with the CPUs/GPUs), or change runtime.sampler.resources"
    )
    msg = runtime.resource_shortfall(rt(*roles, "runtime.sampler.count=3"), [gpu_node, sampler_node])
    assert msg == (
        "the run's actors ask for 3 of custom resource 'sampler' in all but this cluster has 2: add nodes "
        "that advertise it, or lower runtime.sampler.count / runtime.reward.count"
    )
    with pytest.raises(
        ValueError,
        match=r"^runtime.reward.resources: GPU: 1 is not a custom resource amount; .* "
        r"as runtime.reward.num_cpus / runtime.reward.num_gpus$",
    ):
        runtime.resource_shortfall(rt("runtime.reward.resources={GPU: 1}"), [gpu_node])


def test_a_cluster_that_may_scale_is_asked_for_each_role_with_its_node_type(monkeypatch):
    import ray.autoscaler.sdk

    asked = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: asked.append(bundles))
    monkeypatch.setattr(runtime.ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 4.0}}])
    with pytest.raises(RuntimeError, match="waited runtime.resource_wait_s"):
        runtime.await_resources(
            rt("runtime.sampler.resources={sampler: 1}", "runtime.resource_wait_s=0"), can_scale=True
        )
    assert asked == [[{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 1.0, "sampler": 1.0}]]


# -- a real ray.init against a planted stale address file (a subprocess: this process holds the session's instance) --
STALE_RUN = """
import sys
import ray
from cluster import runtime
from cluster.config import load_config

started = runtime.connect(load_config("tiny-cpu", sys.argv[1:]).runtime, num_cpus_needed=2.5)
print("joined", started, ray.get_runtime_context().gcs_address, ray.cluster_resources()["CPU"], flush=True)
ray.shutdown()
"""


@pytest.mark.slow  # a fresh interpreter starts a Ray instance of its own: 10-15 s each
@pytest.mark.parametrize("overrides", [[], ["runtime.address=local"]], ids=["probed", "address=local"])
def test_a_stale_address_file_starts_a_fresh_local_instance_through_ray_init(overrides):
    """The issue's case end to end: ``ray start`` died uncleanly and left ``ray_current_cluster`` naming a dead GCS
    under Ray's temp folder. Without an explicit ``address="local"``, ``ray.init`` reads that file itself and tries to
    join the dead cluster with num_cpus given ("When connecting to an existing cluster, num_cpus and num_gpus must not
    be provided"); the same for ``runtime.address=local``."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with socket.socket() as s:  # a port nothing listens on any more
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with tempfile.TemporaryDirectory(prefix="fdfo-ray-", dir="/tmp") as tmp:  # short: Ray's socket paths have a limit
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text(dead + "\n")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": tmp}
        done = subprocess.run(
            [sys.executable, "-c", STALE_RUN, *overrides],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=Path(__file__).resolve().parents[2],
        )
    assert done.returncode == 0, done.stderr[-3000:]
    joined = [line.split() for line in done.stdout.splitlines() if line.startswith("joined")]
    ((_, started, gcs, cpus),) = joined  # a new instance, never the dead address
    assert started == "True" and gcs.rpartition(":")[2] != dead.rpartition(":")[2] and float(cpus) >= 3, joined
    probed = f"the Ray cluster last started on this machine ({dead}) does not answer" in done.stderr
    assert probed == (overrides == [])  # address=local never looks at the file
