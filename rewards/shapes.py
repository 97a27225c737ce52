"""The shapes task's scorers; the world (grammar, renderer, judge) lives in ``tasks/shapes/world.py``.

Usage::

    judge = build_reward({"name": "shapes_judge"})
    judge.score(images_uint8_bhwc, prompts).scores     # fraction of each prompt's clauses satisfied

``shapes_judge`` (the training reward), ``shapes_judge_soft`` (its continuous relaxation), ``shapes_exact`` and
``shapes_count`` (metrics a run does not train on) and ``shapes_clean`` (an image-quality term).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rewards.base import RewardOutput, check_images, register
from tasks.shapes import world


def _per_image(rule, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
    """``rule(scene, detected objects) -> score`` for each image; a prompt outside the grammar leaves its image
    unscored (NaN, with the reason), not the images batched with it."""
    check_images(images, prompts)
    scores, reasons = np.full(len(prompts), np.nan), [None] * len(prompts)
    for i, (image, text) in enumerate(zip(images, prompts)):
        try:
            scene = world.parse(text)
        except ValueError as e:
            reasons[i] = f"not a shapes prompt: {e}"
            continue
        scores[i] = rule(scene, world.detect(image))
    return RewardOutput(scores=scores, info={"reasons": reasons})


@register("shapes_judge")
class ShapesJudge:
    """Fraction of the prompt's clauses (colour, shape, count per group; relation) the image satisfies."""

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        return _per_image(lambda scene, found: np.mean(list(world.clauses(scene, found).values())), images, prompts)


@register("shapes_judge_soft")
class ShapesJudgeSoft:
    """The judge's clauses made continuous (``world.soft_clauses``), averaged: a denser training signal for FDFO."""

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        return _per_image(
            lambda scene, found: np.mean(list(world.soft_clauses(scene, found).values())), images, prompts
        )


@register("shapes_exact")
class ShapesExact:
    """1.0 when every clause of the prompt holds, else 0.0 (a stricter metric than the judge; not trained on)."""

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        return _per_image(lambda scene, found: float(all(world.clauses(scene, found).values())), images, prompts)


@register("shapes_count")
class ShapesCount:
    """Fraction of the prompt's count clauses (exact number of objects of each colour and shape) that hold."""

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        return _per_image(
            lambda scene, found: np.mean([v for k, v in world.clauses(scene, found).items() if k.endswith("/count")]),
            images,
            prompts,
        )


@register("shapes_clean")
class ShapesClean:
    """Mean per-pixel cleanliness (``world.clean_map``): penalises background noise and off-palette colours, which
    the judge's thresholds tolerate and which FDFO on the judge alone lets grow."""

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        check_images(images, prompts)
        return RewardOutput(scores=np.array([world.clean_map(im).mean() for im in images], dtype=np.float64))
