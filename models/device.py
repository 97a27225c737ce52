"""Dtype names (as the config spells them), the device a model runs on, and the one autocast both the sampler and
the learner compute velocities under (so that at lag 0 the learner's v_theta is the sampler's v, and log rho = 0)."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> str:
    """"auto" = cuda when this process sees a GPU, else cpu; an explicit cuda device must exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"model.device={device!r} but this process sees no GPU; give the actor num_gpus or use cpu")
    return device


def autocast(device: torch.device, amp: bool):
    """The mixed-precision context of every velocity a sampler records or the learner trains: bf16 autocast on CUDA
    when ``amp`` (``train.amp``), nothing on CPU (exact float32 there)."""
    if amp and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
