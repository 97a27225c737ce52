"""One signature for every reward: ``score(images, prompts) -> RewardOutput``.

Usage::

    reward = build_reward({"name": "jpeg_compressibility"})
    out = reward.score(images_uint8_bhwc, ["a cat", "a dog"])   # out.scores: [B] float64

``images`` are ``np.ndarray`` uint8 of shape [B, H, W, 3] (what samplers send over the object store);
``prompts`` is a list of B strings. Scorers register themselves by name with ``@register("name")``;
``REGISTRY`` is the visible list. ``combine`` is the one weighted-sum function.
"""

from __future__ import annotations

import inspect
import os
import types
import typing
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


def build_reward(spec: Mapping[str, Any]) -> Reward:
    """Construct one scorer from ``{"name": ..., **kwargs}``; unknown names fail with the known list."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY)) or "(none imported)"
        raise ValueError(f"unknown reward {name!r}; known rewards: {known}")
    return REGISTRY[name](**spec)


def check_spec(spec: Mapping[str, Any], what: str = "reward") -> None:
    """Validate a scorer spec ``{"name": ..., **kwargs}`` without building it (no model is loaded): the name is
    registered, every keyword is one the scorer takes and has the annotated type, the scorer's own
    ``check_settings(**kwargs)`` passes (weights files, templates), and any other path-like value exists. Raises ValueError or
    FileNotFoundError naming ``what`` (e.g. ``reward.components[1]``), the problem and the fix."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in REGISTRY:
        raise ValueError(f"{what}: unknown reward {name!r}; known rewards: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    check_kwargs(cls, spec, f"{what} ({name})", forwarded_to=getattr(cls, "FORWARDS_SETTINGS_TO", ()))
    check = getattr(cls, "check_settings", None)
    if check is not None:
        try:
            check(**spec)
        except (ValueError, FileNotFoundError, TypeError) as e:
            raise type(e)(f"{what} ({name}): {e}") from None
    for key, value in spec.items():
        if (
            isinstance(value, str)
            and value.startswith(("/", "./", "../", "~"))
            and not os.path.exists(os.path.expanduser(value))
        ):
            raise FileNotFoundError(
                f"{what} ({name}): {key}={value!r} does not exist; point it at the downloaded files or use the hub id"
            )


def check_kwargs(target: Callable, kwargs: Mapping[str, Any], what: str, forwarded_to: Sequence[Callable] = ()) -> None:
    """Every key of ``kwargs`` must be a parameter of ``target`` (or, when it takes ``**kwargs``, of one of
    ``forwarded_to``; with nothing named there any key passes) with a value of the annotated type."""
    params = _params(target)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(target).parameters.values())
    for extra in forwarded_to:
        params |= _params(extra)
    for key, value in kwargs.items():
        if key not in params:
            if takes_any and not forwarded_to:
                continue
            raise ValueError(f"{what}: unknown setting {key!r}; its settings are {', '.join(sorted(params)) or 'none'}")
        tp = params[key]
        if tp is not None and not _is_instance(value, tp):
            shown = f"a {type(value).__name__}" if isinstance(value, str) else repr(value)  # a string may be a secret
            raise ValueError(f"{what}: {key} = {shown} should be {_type_name(tp)}")


def _params(target: Callable) -> dict[str, Any]:
    """Keyword parameters of a class's constructor (or a function) -> their resolved annotation (None if unknown)."""
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that cannot be resolved here: check names only
        hints = {}
    return {
        n: hints.get(n)
        for n, p in inspect.signature(fn).parameters.items()
        if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _is_instance(value: Any, tp: Any) -> bool:
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, a) for a in typing.get_args(tp))
    if origin is not None:
        tp = origin
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    return not isinstance(tp, type) or isinstance(value, tp)


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    return (
        " or ".join(_type_name(a) for a in args)
        if args
        else getattr(tp, "__name__", str(tp)).replace("NoneType", "None")
    )


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
