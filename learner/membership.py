"""A learner's memberships: the learner group (``runtime.learner.count`` ranks: gradients all-reduced, or the
weights sharded with FSDP2) and the weight group (full-weight broadcast to the samplers over gloo on CPU, NCCL on
GPU; LoRA uses the object store). The group machinery itself is ``learner.collective``.

Usage: ``Learner`` takes ``GroupMember`` as a base; the Ray runtime calls, on every rank at once::

    addr, port = rank0.learner_group_address(peers_on_this_node)
    learner.join_learner_group(addr, port, backend)

It reads the learner's ``model``, ``rank``, ``world_size``, ``sharding``, ``version`` and ``_dtype`` and sets its
``_grads`` (the learner group), ``_group`` (the weight group) and, sharding, ``params``, ``masters`` and ``opt``.
"""

from __future__ import annotations

from learner.sharded import init_default_group, shard_transformer


class GroupMember:
    """The group-membership side of a ``Learner`` (its state lives on the learner)."""

    def learner_group_address(self, peers_on_this_node: bool) -> tuple[str, int]:
        """Rank 0: where the other ranks meet it (loopback when they all run on this node)."""
        from learner.collective import rendezvous_address

        return rendezvous_address(peers_on_this_node)

    def join_learner_group(self, master_addr: str, master_port: int, backend: str, timeout_s: float = 120.0) -> int:
        """Form the learner group with the other ranks (each calls this at once); returns this rank. Sharded
        (fsdp), the group's store also hosts this process's default group, and the transformer is sharded over it."""
        from learner.collective import GradientGroup

        self._grads = GradientGroup(self.rank, self.world_size, master_addr, master_port, backend, timeout_s)
        if self.sharding == "fsdp":
            self._shard(backend, timeout_s)
        return self.rank

    def _shard(self, backend: str, timeout_s: float) -> None:
        """FSDP2 over the learner group: the transformer sharded in place (its fp32 shards are the masters, stepped
        by a new AdamW with the same settings), then the first publication gathered."""
        group = init_default_group(self.rank, self.world_size, self._grads._store, backend, timeout_s)
        tr = shard_transformer(self.model.transformer, group, self.model.device, param_dtype=self._dtype)
        self.params = [p for p in tr.parameters() if p.requires_grad]
        self.masters = None
        self.opt = self._adamw(self.params)
        self.gather_weights()

    # -- full-weight broadcast over a collective group (gloo on CPU, NCCL on GPU); LoRA uses the object store
    def weight_backend(self) -> str:
        """The collective backend this actor's weights can travel over: NCCL from a GPU, gloo from a CPU."""
        return "nccl" if self.model.device.type == "cuda" else "gloo"

    def node_id(self) -> str | None:
        """The Ray node this learner runs on (None outside Ray); the runtime compares it with the samplers'."""
        from learner.collective import node_id

        return node_id()

    def weight_group_address(self, peers_on_this_node: bool) -> tuple[str, int]:
        """(host, free port) for a new weight-group generation with this learner as rank 0: 127.0.0.1 when every
        sampler of the group runs on this learner's node, else this node's cluster address (``rendezvous_address``)."""
        from learner.collective import rendezvous_address

        return rendezvous_address(peers_on_this_node)

    def join_weight_group(
        self, *, world_size: int, master_addr: str, master_port: int, backend: str = "gloo", timeout_s: float = 120.0
    ) -> None:
        from learner.collective import WeightGroup

        if getattr(self, "_group", None) is not None:
            self._group.close()
        self._group = WeightGroup(0, world_size, master_addr, master_port, backend=backend, timeout_s=timeout_s)

    def send_weights(self) -> dict:
        """Broadcast the trainable tensors to every sampler of the group; returns {version, checksum}."""
        sent = self._group.send(self._published()[0], version=self.version)
        return {"version": self.version, "checksum": sent}

    def leave_weight_group(self) -> None:
        if getattr(self, "_group", None) is not None:
            self._group.close()
            self._group = None
