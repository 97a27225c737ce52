"""How published weights reach the samplers, and the register of what the learner published.

Usage::

    published = Published(version, checksum, weights_ref)     # every proof a sampler returns is checked against it
    sync = WeightSync(learner, collective=use_collective(rt.weight_sync, nbytes), timeout_s=rt.weight_sync_timeout_s)
    ref = sync.broadcast(pool, version, checksum)              # every sampler of ``pool`` (``pool.actors``) on it

The learner publishes after every optimizer step on the object-store path (the step's ``Weights`` are put once and
each sampler loads them at the start of its next call) and once an epoch on the collective path (a broadcast).
"""

from __future__ import annotations

import logging

import ray
from ray.exceptions import RayActorError, RayError

from cluster.pipeline import check_proof

log = logging.getLogger("fdfo")


class Published:
    """The register of published versions: ``version`` is what the samplers' next calls sample with and
    ``weights_ref`` the object-store ref of its weights (None on the collective path: samplers hold what the last
    broadcast sent); ``checksums`` what the learner computed for every version, against which each sampler's proof is
    checked; ``orphaned`` the (version, checksum) a learner since lost published (never trained on); ``sampled`` how
    many sampler calls proved each version."""

    def __init__(self, version: int, checksum: str, weights_ref=None):
        self.version, self.weights_ref = version, weights_ref
        self.checksums: dict[int, str] = {version: checksum}
        self.orphaned: set[tuple[int, str]] = set()
        self.sampled: dict[int, int] = {}

    def to_load(self) -> tuple[int, str, list] | None:
        """What a sample call carries: the newest published version and (inside a list, unresolved) the ref of its
        weights; None on the collective path."""
        return None if self.weights_ref is None else (self.version, self.checksums[self.version], [self.weights_ref])

    def record(self, version: int, checksum: str) -> None:
        """The learner computed ``checksum`` for ``version`` (an optimizer step)."""
        self.checksums[version] = checksum

    def publish(self, version: int, weights_ref) -> None:
        """The samplers' next calls load ``version`` from ``weights_ref``."""
        self.version, self.weights_ref = version, weights_ref

    def is_orphaned(self, version: int, checksum: str) -> bool:
        return (version, checksum) in self.orphaned

    def check(self, proof: dict) -> None:
        """A sampler's proof of the version it holds must match what the learner computed for it, else the run stops."""
        check_proof(proof, proof["version"], self.checksums.get(proof["version"]))

    def count_call(self, proof: dict) -> None:
        """A sampler call's proof of the version it sampled with: checked, and counted under that version."""
        self.check(proof)
        self.sampled[proof["version"]] = self.sampled.get(proof["version"], 0) + 1

    def restore(self, version: int, checksum: str) -> None:
        """A new learner restored ``version`` (a checkpoint): what the lost one published after it, or under its
        number with another checksum, is orphaned, and ``version`` is the newest again."""
        self.orphaned |= {(v, c) for v, c in self.checksums.items() if v > version or (v == version and c != checksum)}
        self.checksums = {v: c for v, c in self.checksums.items() if v < version} | {version: checksum}
        self.version = version


# "auto" sends weights of this size or more through a collective group: every sampler reading its own copy out of the
# object store stays cheap for LoRA factors and small full models (bench/bench_broadcast.py), not for GBs.
AUTO_COLLECTIVE_BYTES = 512 * 2**20


def use_collective(mode: str, nbytes: int) -> bool:
    """runtime.weight_sync: "collective", "object_store", or "auto" (collective from ``AUTO_COLLECTIVE_BYTES``)."""
    return mode == "collective" or (mode == "auto" and nbytes >= AUTO_COLLECTIVE_BYTES)


def start_publishing(learner, rt, hybrid: bool = False) -> tuple[WeightSync | InPlace, Published, int]:
    """The weight path for ``learner``'s weights (``runtime.weight_sync``; ``InPlace`` for ``hybrid`` workers) and the
    register opened with the version it holds; returns them and the bytes of one version. On the object-store path the
    weights are put once: every sampler reads that same object (the collective and in-place paths keep no copy)."""
    nbytes = ray.get(learner.trainable_bytes.remote())
    if hybrid:
        sync = InPlace(learner)
    else:
        sync = WeightSync(learner, use_collective(rt.weight_sync, nbytes), timeout_s=rt.weight_sync_timeout_s)
    version, checksum = ray.get(learner.weights_info.remote())
    return sync, Published(version, checksum, learner.weights.remote() if sync.ships else None), nbytes


class InPlace:
    """The weight path of hybrid workers (``runtime.placement: hybrid``, cluster/hybrid.py): nothing travels. Each
    worker samples with the weights its own learner rank stepped, so a step publishes a version and checksum (the
    register's) but no ``Weights``; ``broadcast`` only collects every worker's proof of the version it holds (after a
    restart from a checkpoint), checked against what the group computed."""

    collective = False  # no once-an-epoch broadcast either
    ships = False  # an update snapshots nothing: no copy of the weights leaves a worker
    path = "nothing (hybrid workers sample with their own weights)"

    def __init__(self, learner):
        self.learner = learner  # rank 0 (the runtime sets it after a restart, as for WeightSync)
        self.members_changed = True
        self.lost: list[int] = []  # workers a broadcast found dead

    def broadcast(self, pool, version: int, checksum: str) -> None:
        """Every worker of ``pool`` (``pool.actors``) proves it holds ``version``; one found dead is listed in ``lost``."""
        calls = {i: a.proof.remote() for i, a in pool.actors.items()}
        for i, call in calls.items():
            try:
                check_proof(ray.get(call), version, checksum)
            except RayActorError:
                self.lost.append(i)

    def close(self, pool) -> None:
        """Nothing to close: no group was formed for weights."""


class WeightSync:
    """Versioned weight broadcast. LoRA (tens of MB): ``ray.put`` once via ``learner.weights()``, every sampler
    loads the same object. Full weights: a gloo (CPU) / NCCL (GPU) group between the learner and the samplers,
    re-formed as a new generation whenever the sampler set changed. Either way each sampler returns the
    version and checksum it now holds, and a mismatch stops the run."""

    def __init__(self, learner, collective: bool, timeout_s: float = 120.0):
        self.learner = learner
        self.collective = collective
        self.timeout_s = timeout_s  # of every collective call: how long a dead member can stall it
        self.members_changed = True
        self.members: list[int] = []
        self.address: tuple[str, int] | None = None  # (host, port) of the current generation's rendezvous
        self.lost: list[int] = []  # samplers a broadcast found dead, for the pool to replace

    @property
    def ships(self) -> bool:
        """Whether every optimizer step's ``Weights`` go into the object store for the samplers to load."""
        return not self.collective

    @property
    def path(self) -> str:
        return "a collective group" if self.collective else "the object store"

    def _form(self, pool) -> None:
        """A new generation of the group: the learner and every sampler of ``pool`` (its ``actors``: index -> actor)."""
        self.members = sorted(pool.actors)
        # each member picks its backend from its own device (NCCL on a GPU, gloo on a CPU); they must agree
        picks = ray.get(
            [self.learner.weight_backend.remote()] + [pool.actors[i].weight_backend.remote() for i in self.members]
        )
        if len(set(picks)) > 1:
            raise RuntimeError(
                f"weight group members disagree on the backend (learner {picks[0]}, samplers "
                f"{picks[1:]}): put the learner and every sampler on GPUs (NCCL) or all on CPUs "
                "(gloo), or set runtime.weight_sync=object_store"
            )
        backend = picks[0]
        world = 1 + len(self.members)
        # The rendezvous store has no authentication of its own: it listens on loopback when every member shares
        # the learner's machine, and on the node's cluster address only when some member is elsewhere.
        nodes = ray.get([self.learner.node_id.remote()] + [pool.actors[i].node_id.remote() for i in self.members])
        addr, port = ray.get(self.learner.weight_group_address.remote(peers_on_this_node=len(set(nodes)) == 1))
        self.address = (addr, port)
        log.info("weight group: %d ranks, rendezvous at %s:%d", world, addr, port)
        joins = [
            self.learner.join_weight_group.remote(
                world_size=world, master_addr=addr, master_port=port, backend=backend, timeout_s=self.timeout_s
            )
        ]
        joins += [
            pool.actors[i].join_weight_group.remote(
                rank=r + 1,
                world_size=world,
                master_addr=addr,
                master_port=port,
                backend=backend,
                timeout_s=self.timeout_s,
            )
            for r, i in enumerate(self.members)
        ]
        ray.get(joins)  # every rank must be joining at once
        self.members_changed = False

    def broadcast(self, pool, version: int, checksum: str):
        """Bring every sampler to ``version``; returns the object-store ref of the weights if that path was used."""
        if self.collective and pool.actors:
            try:
                if self.members_changed or sorted(pool.actors) != self.members:
                    self._form(pool)
                sent = self.learner.send_weights.remote()
                proofs = ray.get([pool.actors[i].receive_weights.remote() for i in self.members] + [sent])
                for p in proofs[:-1]:
                    check_proof(p, version, checksum)
                return None
            except RayError as e:  # a member died mid-transfer: re-form next time, deliver this version by object store
                log.warning("collective weight broadcast failed (%s); falling back to the object store", e)
                self.members_changed = True
        ref = self.learner.weights.remote()
        calls = {i: a.set_weights.remote(weights=ref) for i, a in pool.actors.items()}
        for i, call in calls.items():
            try:
                check_proof(ray.get(call), version, checksum)
            except RayActorError:  # gone before the driver noticed: the runtime replaces it (``lost``)
                self.lost.append(i)
                self.members_changed = True
        return ref

    def close(self, pool) -> None:
        if self.collective and self.members:
            ray.get(
                [self.learner.leave_weight_group.remote()]
                + [pool.actors[i].leave_weight_group.remote() for i in self.members if i in pool.actors]
            )
