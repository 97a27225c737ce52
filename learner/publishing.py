"""Publishing a learner's weights: the trainable tensors as samplers load them, snapshotted as a versioned
``Weights``, with their checksum and size.

Usage: ``Learner`` takes ``Publisher`` as a base::

    weights = learner.weights()                  # a Weights of the current version
    version, digest = learner.weights_info()     # without copying the tensors

It reads the learner's ``model``, ``version``, ``sharding``, ``_dtype``, ``_gathered`` (fsdp), ``reuse_snapshots``,
``_snapshot_buffer`` and ``_last_snapshot``.
"""

from __future__ import annotations

import weakref

import torch

from learner.sharded import full_state
from learner.weights import Weights, checksum
from models.lora import trainable


class Publisher:
    """The publication side of a ``Learner`` (its state lives on the learner)."""

    def _published(self) -> tuple[dict[str, torch.Tensor], str | None]:
        """(the trainable tensors by name as samplers load them, their checksum or None when not yet computed):
        views of the live parameters, or (fsdp) the full tensors every rank gathered after the last step or load
        with their checksum, so rank 0 reads them alone, starting no collective."""
        if self.sharding == "replicate":
            return trainable(self.model.transformer), None
        if self._gathered is None:
            raise RuntimeError("a sharded learner publishes once its group is formed: call join_learner_group first")
        return self._gathered

    def gather_weights(self) -> None:
        """Sharded (fsdp), every rank at once (a collective), after each step and each load: the full trainable
        tensors gathered in the trained dtype, and their checksum, which ``weights``, ``weights_info``,
        ``trainable_bytes``, ``send_weights`` and ``update(publish=True)`` read on rank 0 alone."""
        tr = self.model.transformer
        full = full_state(tr, dtype=self._dtype)
        tensors = {n: full[n] for n, p in tr.named_parameters() if p.requires_grad}
        self._gathered = (tensors, checksum(tensors))

    def weights(self) -> Weights:
        return self._snapshot(self.version, self._published()[1])

    def _snapshot(self, version: int, digest: str | None) -> Weights:
        """The published tensors as ``version``; with ``reuse_snapshots``, packed into the last snapshot's buffer when
        no one holds that ``Weights`` any more."""
        last = self._last_snapshot() if self._last_snapshot is not None else None
        buffer = self._snapshot_buffer if (self.reuse_snapshots and last is None) else None
        w = Weights.of(self._published()[0], version, digest, buffer=buffer)
        self._snapshot_buffer = w.packed if self.reuse_snapshots else None
        self._last_snapshot = weakref.ref(w)
        return w

    def trainable_bytes(self) -> int:
        """Bytes of one published version (what every sampler loads)."""
        return sum(t.numel() * t.element_size() for t in self._published()[0].values())

    def weights_info(self) -> tuple[int, str]:
        """(version, checksum) without copying or shipping the tensors."""
        tensors, digest = self._published()
        return self.version, digest or checksum(tensors)
