"""Which Ray cluster a run joins, what its actors ask of a node, and whether the cluster can hold them.

Usage::

    started = connect(cfg.runtime, num_cpus_needed=4)   # the cluster named, a live local one, else a new instance
    await_resources(cfg.runtime, can_scale=not started)  # fail clearly, or wait for an autoscaling cluster to grow

Ray token authentication is switched on (``RAY_AUTH_MODE=token``) unless the environment says otherwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "token")  # must precede `import ray`

import json
import logging
import time

import numpy as np
import ray

log = logging.getLogger("fdfo")
NAMESPACE = "fdfo"


def connect(runtime_cfg, num_cpus_needed: float) -> bool:
    """Join the cluster named by runtime.address / RAY_ADDRESS (or fail clearly); else a ``ray start`` cluster on this
    machine if it answers within seconds; else start a local instance (also when the last one on this machine
    stopped uncleanly and left its address behind). Returns whether it started a local instance (which cannot
    grow: what it lacks never comes)."""
    if ray.is_initialized():
        return False
    address = runtime_cfg.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, namespace=NAMESPACE)
        return False
    running = None if address == "local" else local_cluster_address()
    if running is not None:
        ray.init(address=running, namespace=NAMESPACE)
        return False
    # A laptop: logical CPUs are scheduling tokens, so give at least what the pools ask for. address="local": with no
    # address ray.init reads Ray's address file itself and would join the dead cluster it names (or any other).
    ray.init(
        address="local",
        namespace=NAMESPACE,
        num_cpus=max(os.cpu_count() or 1, int(np.ceil(num_cpus_needed))),
        dashboard_host="127.0.0.1",
        include_dashboard=True,
        # actors drop the same third-party notices the driver does (a joined cluster's jobs keep their own env)
        runtime_env={"worker_process_setup_hook": "cluster.pipeline.quiet_third_party"},
    )
    return True


ROLES = ("learner", "reward", "sampler")  # the blocks runtime.learner, runtime.reward, runtime.sampler


def role_block(rt, role: str):
    """The config block of ``role``: ``runtime.learner``, ``runtime.reward`` or ``runtime.sampler``."""
    return {"learner": rt.learner, "reward": rt.reward, "sampler": rt.sampler}[role]


def role_ask(rt, role: str) -> dict[str, float]:
    """What one actor of ``role`` asks of a node: CPU, GPU and the role's custom resources
    (``runtime.<role>.resources``, which is how roles land on their own node types)."""
    block = role_block(rt, role)
    for k, v in block.resources.items():
        if k in ("CPU", "GPU", "memory", "object_store_memory") or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(
                f"runtime.{role}.resources: {k}: {v!r} is not a custom resource amount; give names of "
                f"resources the nodes advertise (ray start --resources) with amounts >= 0, and CPUs/GPUs "
                f"as runtime.{role}.num_cpus / runtime.{role}.num_gpus"
            )
    return {"CPU": block.num_cpus, "GPU": block.num_gpus, **{k: float(v) for k, v in block.resources.items()}}


def role_counts(rt) -> dict[str, int]:
    """Actors of each role; hybrid workers (``runtime.placement: hybrid``) are the learner ranks: no sampler actors."""
    return {role: 0 if (role, rt.placement) == ("sampler", "hybrid") else role_block(rt, role).count for role in ROLES}


def resource_shortfall(rt, nodes: list[dict]) -> str | None:
    """What the run's actors ask for that ``nodes`` (each its resources: {"CPU": n, "GPU": n, ...}) cannot give,
    naming the role, its ask, what exists and the override; None when everything fits (each actor on some node,
    all of them within the totals)."""
    count = role_counts(rt)
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    largest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in ("CPU", "GPU")}
    shown = lambda r: f"{{CPU: {r['CPU']:g}, GPU: {r['GPU']:g}}}"  # noqa: E731
    each = {r: {"CPU": role_block(rt, r).num_cpus, "GPU": role_block(rt, r).num_gpus} for r in ROLES}
    for role, ask in each.items():
        short = [k for k in ask if ask[k] > largest[k]]
        if short:
            keys = " / ".join(f"runtime.{role}.num_{k.lower()}s" for k in short)
            return (
                f"the {role} actor asks for {shown(ask)} but the largest node of this cluster has {shown(largest)} "
                f"({len(nodes)} nodes, {shown(have)} in all): lower {keys} or add a node that large"
            )
    short = custom_shortfall(rt, nodes)
    if short:
        return short
    need = {k: sum(count[r] * each[r][k] for r in count) for k in ("CPU", "GPU")}
    short = [k for k in need if need[k] > have[k]]
    if short:
        parts = ", ".join(f"{count[r]} {r} x {shown(each[r])}" for r in count)
        return (
            f"the run's actors ask for {shown(need)} in all ({parts}) but this cluster has {shown(have)}: lower "
            f"runtime.sampler.count / runtime.reward.count or the per-actor asks, or add nodes"
        )
    return None


def custom_shortfall(rt, nodes: list[dict]) -> str | None:
    """The custom-resource part of ``resource_shortfall``: every role's whole ask on one node, the totals per name."""
    count, totals = role_counts(rt), {}
    for role in ROLES:
        ask = role_ask(rt, role)
        custom = {k: v for k, v in ask.items() if k not in ("CPU", "GPU")}
        for k, v in custom.items():
            totals[k] = totals.get(k, 0.0) + count[role] * v
        if custom and not any(all(n.get(k, 0.0) >= v for k, v in ask.items()) for n in nodes):
            return (
                f"the {role} actor asks for {ask} (runtime.{role}.resources and its CPUs/GPUs) but no node of this "
                f"cluster has all of that: start nodes of that type (ray start --resources="
                f"'{json.dumps({k: int(v) if float(v).is_integer() else v for k, v in custom.items()})}' with the "
                f"CPUs/GPUs), or change runtime.{role}.resources"
            )
    for k, v in totals.items():
        have = sum(n.get(k, 0.0) for n in nodes)
        if v > have:
            return (
                f"the run's actors ask for {v:g} of custom resource {k!r} in all but this cluster has {have:g}: "
                f"add nodes that advertise it, or lower runtime.sampler.count / runtime.reward.count"
            )
    return None


def await_resources(rt, can_scale: bool) -> None:
    """Fail at once if the cluster can never fit the run's actors (a local instance cannot grow); a cluster that
    may scale is asked for the bundles (``request_resources``), and waited for up to ``runtime.resource_wait_s``,
    saying what is awaited every 30 s."""
    nodes = lambda: [n["Resources"] for n in ray.nodes() if n["Alive"]]  # noqa: E731
    short = resource_shortfall(rt, nodes())
    if short is None:
        return
    if not can_scale:
        raise RuntimeError(f"{short} (a local Ray instance does not grow)")
    from ray.autoscaler.sdk import request_resources

    bundles = [role_ask(rt, role) for role, n in role_counts(rt).items() for _ in range(n)]
    request_resources(bundles=[{k: v for k, v in b.items() if v} for b in bundles])
    deadline, t_log = time.monotonic() + rt.resource_wait_s, 0.0
    while short is not None:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{short}; waited runtime.resource_wait_s = {rt.resource_wait_s:g} s for the cluster to scale"
            )
        if time.monotonic() - t_log >= 30.0:
            log.warning("waiting for the cluster to scale: %s", short)
            t_log = time.monotonic()
        time.sleep(1.0)
        short = resource_shortfall(rt, nodes())


def local_cluster_address(timeout_s: float = 3.0) -> str | None:
    """The GCS address of the Ray cluster last started on this machine (``ray start``), if it accepts a connection
    within ``timeout_s``; None if there is none or it is gone (a stale address would make ``ray.init`` retry for
    minutes)."""
    import socket

    from ray._private.utils import read_ray_address

    address = read_ray_address(None)
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return address
    except (OSError, ValueError):
        log.warning(
            "the Ray cluster last started on this machine (%s) does not answer: starting a local instance", address
        )
        return None


def actor_threads(rt, num_cpus: float) -> int:
    """Torch intra-op threads of an actor: ``runtime.torch_threads``, else its CPU reservation (at least 1), which is
    what Ray's own OMP_NUM_THREADS convention gives it."""
    return rt.torch_threads or max(1, int(num_cpus))
