"""Weighted combinations of scorers, and the paper's presets.

Usage::

    reward = build_preset("combined", overrides={"vlm_judge": {"backend": "server", "url": "http://10.0.0.5:8000"}})
    reward = CombinedReward(specs=[{"name": "pickscore", "weight": 1.0}, {"name": "vlm_judge", "weight": 0.1}])
    out = reward.score(images, prompts)
    out.scores                      # [B] the weighted sum (rewards.base.combine)
    out.info["components"]["pickscore"]   # [B] raw per-scorer values, for logging as reward/<key>/...
    out.info["reasons"]             # [B] None, or why that sample is NaN (drop the pair with this reason)

Presets (ALGORITHM.md §5): ``pickscore`` = 1.0·PickScore, ``vlm_alignment`` = 1.0·VLM judge,
``combined`` = 1.0·PickScore + 0.1·VLM judge (the paper's default).

Failure contract: a scorer that raises makes its component NaN for every sample of that call (the error text
is in ``info["errors"][key]`` and in each sample's reason); a scorer that returns NaN/inf makes only those
samples NaN. Any NaN component makes the sum NaN for that sample, so the caller drops exactly those pairs.
Bad config fails at construction: unknown scorer, missing weight, duplicate key, or the scorer's own checks.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from rewards.base import Reward, RewardOutput, build_reward, check_images, combine, register

PRESETS: dict[str, list[dict[str, Any]]] = {
    "pickscore": [{"name": "pickscore", "weight": 1.0}],
    "vlm_alignment": [{"name": "vlm_judge", "weight": 1.0}],
    "combined": [{"name": "pickscore", "weight": 1.0}, {"name": "vlm_judge", "weight": 0.1}],
    "jpeg": [{"name": "jpeg_compressibility", "weight": 1.0}],  # DDPO's weight-free reward (tiny-cpu preset)
    # The shapes task: its programmatic judge, plus a cleanliness term that keeps stray noise off the canvas.
    "shapes": [{"name": "shapes_judge", "weight": 1.0}, {"name": "shapes_clean", "weight": 1.0}],
}


@register("weighted_sum")
class CombinedReward:
    """Score with every component, keep the raw values, return ``combine(components, weights)``."""

    def __init__(
        self,
        specs: Sequence[Mapping[str, Any]] | None = None,
        preset: str | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        """``specs``: a list of ``{"name": <registered scorer>, "weight": w, "key": <optional label>, **kwargs}``;
        instead of ``name`` + kwargs a spec may carry a built scorer as ``"reward"`` (tests, shared models).
        ``key`` defaults to ``name``; use it to combine one scorer twice with different settings.
        Or ``preset`` (a name in ``PRESETS``) with per-scorer ``overrides``, e.g. from a config file:
        ``{"name": "weighted_sum", "preset": "combined", "overrides": {"vlm_judge": {"backend": "server"}}}``."""
        if preset is not None:
            if specs is not None:
                raise ValueError("give either specs= or preset= to CombinedReward, not both")
            specs = preset_specs(preset, overrides)
        elif overrides:
            raise ValueError("overrides= applies to a preset; with specs= put the kwargs in each spec")
        if not specs:
            raise ValueError("CombinedReward needs at least one spec, e.g. [{'name': 'pickscore', 'weight': 1.0}]")
        self.components: dict[str, Reward] = {}
        self.weights: dict[str, float] = {}
        for spec in specs:
            spec = dict(spec)
            if "weight" not in spec:
                raise ValueError(f"reward spec {_label(spec)} has no 'weight'; add e.g. 'weight': 1.0")
            weight = spec.pop("weight")
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"reward spec {_label(spec)}: weight must be a finite number, got {weight!r}")
            reward = spec.pop("reward", None)
            key = spec.pop("key", None) or spec.get("name") or getattr(reward, "name", None)
            if key is None:
                raise ValueError(f"reward spec {_label(spec)} needs a 'name' (a registered scorer) or a built 'reward'")
            if key in self.components:
                raise ValueError(f"reward key {key!r} appears twice; give one of them a distinct 'key'")
            self.components[key] = reward if reward is not None else build_reward(spec)
            self.weights[key] = float(weight)

    @staticmethod
    def check_settings(
        specs: Sequence[Mapping[str, Any]] | None = None,
        preset: str | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Every component spec checked (``rewards.base.check_spec``) without building a model; weights and keys."""
        from rewards.base import check_spec

        if preset is not None:
            specs = preset_specs(preset, overrides)
        if not specs:
            raise ValueError("weighted_sum needs at least one spec, e.g. [{'name': 'pickscore', 'weight': 1.0}]")
        keys = set()
        for i, spec in enumerate(specs):
            spec = dict(spec)
            weight = spec.pop("weight", None)
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
                raise ValueError(
                    f"component {i} ({spec.get('name')}): weight must be a finite number, e.g. 'weight': 1.0; "
                    f"got {weight!r}"
                )
            key = spec.pop("key", None) or spec.get("name")
            if key in keys:
                raise ValueError(f"reward key {key!r} appears twice; give one of them a distinct 'key'")
            keys.add(key)
            if "reward" not in spec:
                check_spec(spec, f"component {i}")

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        """images uint8 [B, H, W, 3], B prompts -> weighted sum [B]; raw components and reasons in info."""
        check_images(images, prompts)
        n = images.shape[0]
        components: dict[str, np.ndarray] = {}
        component_info: dict[str, dict] = {}
        errors: dict[str, str] = {}
        reasons: list[str | None] = [None] * n
        for key, reward in self.components.items():
            try:
                out = reward.score(images, prompts)
                s = np.asarray(out.scores, dtype=np.float64).reshape(-1)
                if s.shape[0] != n:
                    raise ValueError(f"returned {s.shape[0]} scores for {n} images")
                sub_reasons = out.info.get("reasons") or [None] * n
                component_info[key] = {k: v for k, v in out.info.items() if k != "reasons"}
            except Exception as e:  # one scorer's failure costs its samples, not the run
                errors[key] = f"{type(e).__name__}: {e}"
                s, sub_reasons = np.full(n, np.nan), [errors[key]] * n
            bad = ~np.isfinite(s)
            for i in np.flatnonzero(bad):
                why = sub_reasons[i] or f"non-finite score {float(s[i])}"
                why = why if why.startswith("reward/") else f"reward/{key}: {why}"
                reasons[i] = why if reasons[i] is None else f"{reasons[i]}; {why}"
            components[key] = np.where(bad, np.nan, s)
        total = combine(components, self.weights)
        info = {
            "components": components,
            "weights": dict(self.weights),
            "reasons": reasons,
            "errors": errors,
            "component_info": component_info,
        }
        return RewardOutput(scores=total, info=info)


def _label(spec: Mapping[str, Any]) -> str:
    """A spec as an error message shows it: its name and setting names, never their values (a judge's api_key)."""
    return f"{spec.get('name', '<no name>')} (settings: {', '.join(sorted(k for k in spec if k != 'name')) or 'none'})"


def preset_specs(preset: str, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The specs of one of ``PRESETS`` with per-scorer keyword overrides, e.g. ``{"vlm_judge": {...}}``."""
    if preset not in PRESETS:
        raise ValueError(
            f"unknown reward preset {preset!r}; presets: {sorted(PRESETS)} "
            "(or give a weighted list: CombinedReward(specs=[{'name': ..., 'weight': ...}]))"
        )
    overrides = dict(overrides or {})
    specs = [{**spec, **overrides.pop(spec["name"], {})} for spec in PRESETS[preset]]
    if overrides:
        raise ValueError(
            f"overrides for {sorted(overrides)} do not match any scorer of preset {preset!r} "
            f"({[s['name'] for s in PRESETS[preset]]})"
        )
    return specs


def build_preset(preset: str, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> CombinedReward:
    """``CombinedReward`` for one of ``PRESETS``, e.g. ``build_preset("combined", {"vlm_judge": {"url": ...}})``."""
    return CombinedReward(preset=preset, overrides=overrides)
