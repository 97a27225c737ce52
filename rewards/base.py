"""One signature for every reward: ``score(images, prompts) -> RewardOutput``.

Usage::

    reward = build_reward({"name": "jpeg_compressibility"})
    out = reward.score(images_uint8_bhwc, ["a cat", "a dog"])   # out.scores: [B] float64

``images`` are ``np.ndarray`` uint8 of shape [B, H, W, 3] (what samplers send over the object store);
``prompts`` is a list of B strings. Scorers register themselves by name with ``@register("name")``;
``REGISTRY`` is the visible list. ``combine`` is the one weighted-sum function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np


@dataclass
class RewardOutput:
    """scores: [B] float64 (NaN where a sample could not be scored); info: per-scorer extras."""

    scores: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


class Reward(Protocol):
    name: str

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput: ...


REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str):
    """Class decorator: make a scorer constructible by name from config."""

    def wrap(cls):
        if name in REGISTRY:
            raise ValueError(f"reward {name!r} is registered twice")
        REGISTRY[name] = cls
        cls.name = name
        return cls

    return wrap


def check_images(images: np.ndarray, prompts: Sequence[str]) -> None:
    """Raise a clear error unless images is uint8 [B, H, W, 3] with B == len(prompts)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        got = f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
        raise ValueError(f"rewards take images as np.uint8 [B, H, W, 3]; got {got}. Use rewards.to_uint8(images).")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts: pass one prompt per image")


def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1], [B, 3, H, W] torch or [B, H, W, 3] numpy -> uint8 [B, H, W, 3]."""
    arr = images.detach().cpu().float().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.ndim == 4 and arr.shape[1] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    return np.ascontiguousarray((np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def build_reward(spec: Mapping[str, Any]) -> Reward:
    """Construct one scorer from ``{"name": ..., **kwargs}``; unknown names fail with the known list."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY)) or "(none imported)"
        raise ValueError(f"unknown reward {name!r}; known rewards: {known}")
    return REGISTRY[name](**spec)


def combine(components: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """The weighted sum: sum_k weights[k] * components[k]; NaN in any component gives NaN for that sample."""
    missing = set(weights) - set(components)
    if missing:
        raise KeyError(f"no scores for reward(s) {sorted(missing)}; got {sorted(components)}")
    total = None
    for name, w in weights.items():
        term = float(w) * np.asarray(components[name], dtype=np.float64)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("combine needs at least one weighted reward")
    return total
