"""Versioned weights: the state that samplers load, and its checksum.

Usage::

    w = Weights.of(model.transformer, version=3)      # what the learner broadcasts
    w.load_into(sampler_model.transformer)            # what a sampler does; returns w.checksum

A ``Weights`` is the trainable tensors (LoRA factors, or every transformer parameter for full fine-tuning)
by parameter name, plus the version and a checksum over names, dtypes, shapes and bytes, so that a sampler
can prove which version it holds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from models.lora import trainable


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """blake2b over (name, dtype, shape, bytes) in name order: equal iff the weights are bit-identical."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update((t.view(torch.uint8) if t.numel() else t).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Weights:
    """A versioned snapshot of the trainable parameters. tensors: name -> CPU tensor."""

    version: int
    tensors: dict[str, torch.Tensor]
    checksum: str

    @classmethod
    def of(cls, transformer: torch.nn.Module, version: int) -> "Weights":
        tensors = {n: t.cpu().clone() for n, t in trainable(transformer).items()}
        return cls(version=version, tensors=tensors, checksum=checksum(tensors))

    def verify(self) -> None:
        got = checksum(self.tensors)
        if got != self.checksum:
            raise RuntimeError(
                f"weights version {self.version} failed its checksum ({got} != {self.checksum}): the payload was "
                "corrupted in transit; refusing to sample with it"
            )

    def load_into(self, transformer: torch.nn.Module) -> str:
        """Copy into ``transformer`` (which must have the same trainable names); returns the loaded checksum."""
        self.verify()
        params = dict(transformer.named_parameters())
        unknown = set(self.tensors) - set(params)
        if unknown:
            raise ValueError(f"weights name parameters the model lacks (LoRA config differs?): {sorted(unknown)[:3]}")
        with torch.no_grad():
            for name, t in self.tensors.items():
                params[name].copy_(t)
        loaded = checksum({n: params[n] for n in self.tensors})
        if loaded != self.checksum:  # e.g. a dtype-narrowing copy: the sampler would not hold version K
            raise RuntimeError(f"after loading version {self.version} the model's checksum is {loaded}, not {self.checksum}")
        return loaded
