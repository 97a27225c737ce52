"""Dtype names (as the config spells them), the device a model runs on, and the one numerics mode both the sampler
and the learner compute velocities under (so that at lag 0 the learner's v_theta is the sampler's v, and log rho = 0).

Usage::

    with autocast(model.device, cfg.train.precision):      # "fp32" | "bf16" | "fp16"
        v = model.velocity(x, sigma, cond)
    scaler = grad_scaler(model.device, cfg.train.precision)  # the learner's; enabled for fp16 on CUDA only
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# train.precision -> the autocast dtype on CUDA (None: no autocast). fp16 is the reference's (torch.autocast('cuda')
# with its default dtype, plus a GradScaler in training).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str) -> str:
    """"auto" = cuda when this process sees a GPU, else cpu; an explicit cuda device must exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"model.device={device!r} but this process sees no GPU; give the actor num_gpus or use cpu")
    return device


def _autocast_dtype(device, precision: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)} (train.precision), got {precision!r}")
    return PRECISIONS[precision] if torch.device(device).type == "cuda" else None


def autocast(device: torch.device | str, precision: str):
    """The mixed-precision context of every velocity a sampler records or the learner trains: autocast to
    ``precision``'s dtype on CUDA ("bf16", "fp16"; "fp32" = none). On CPU it is always off: the model computes in
    its own dtype (``model.dtype``), exactly and identically in sampler and learner."""
    dtype = _autocast_dtype(device, precision)
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """The learner's loss scaler: enabled for fp16 autocast on CUDA (as the reference's), a pass-through otherwise."""
    enabled = _autocast_dtype(device, precision) == torch.float16
    return torch.amp.GradScaler("cuda" if enabled else "cpu", enabled=enabled)
