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


@register("shapes_judge")
class ShapesJudge:
    """Fraction of the prompt's clauses (colour, shape, count per group; relation) the image satisfies."""

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        check_images(images, prompts)
        results = world.judge(images, prompts)
        exact = np.array([all(r.values()) for r in results], dtype=np.float64)
        return RewardOutput(scores=world.clause_fraction(results), info={"exact": exact})


@register("shapes_judge_soft")
class ShapesJudgeSoft:
    """The judge's clauses made continuous (``world.soft_clauses``), averaged: a denser training signal for FDFO."""

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        check_images(images, prompts)
        return RewardOutput(scores=world.soft_judge_scores(images, prompts))


@register("shapes_exact")
class ShapesExact:
    """1.0 when every clause of the prompt holds, else 0.0 (a stricter metric than the judge; not trained on)."""

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        check_images(images, prompts)
        return RewardOutput(scores=np.array([all(r.values()) for r in world.judge(images, prompts)], dtype=np.float64))


@register("shapes_count")
class ShapesCount:
    """Fraction of the prompt's count clauses (exact number of objects of each colour and shape) that hold."""

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        check_images(images, prompts)
        scores = [np.mean([v for k, v in r.items() if k.endswith("/count")]) for r in world.judge(images, prompts)]
        return RewardOutput(scores=np.asarray(scores, dtype=np.float64))


@register("shapes_clean")
class ShapesClean:
    """Mean per-pixel cleanliness (``world.clean_map``): penalises background noise and off-palette colours, which
    the judge's thresholds tolerate and which FDFO on the judge alone lets grow."""

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        check_images(images, prompts)
        return RewardOutput(scores=np.array([world.clean_map(im).mean() for im in images], dtype=np.float64))
