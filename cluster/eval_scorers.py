"""The scorers of the paper's evaluation (``fdfo eval --suite``): which scorer computes each metric, their settings
(the reference's models unless ``eval.suite_scorers`` says otherwise), the VLM judge's questions, and one chunk of
images scored.

Usage::

    specs = scorer_specs(cfg, {"pickscore", "vlm"})                  # checked, nothing loaded
    scorers = {key: build_scorer(key, spec) for key, spec in specs.items()}
    scores = score_chunk(("pickscore", "vlm_alignment"), scorers, images, prompts, R=1)   # {metric: [B]}
"""

from __future__ import annotations

import importlib.util

import numpy as np

from cluster.build import reward_specs
from cluster.config import RunConfig

VLM_QUESTIONS = {  # the reference's evaluation questions (training asks 'Answer Yes or No.', evaluation 'with')
    "vlm_alignment": 'Does this image match the caption "{prompt}"? Answer with Yes or No.',
    "vlm_quality": "Is this image of professional quality? Answer with Yes or No.",
    "vlm_photo": "Does this image look photorealistic? Answer with Yes or No.",
}
METRIC_SCORER = {
    "pickscore": "pickscore",
    "hpsv2": "hpsv2",
    "clip_h14": "clip_h14",
    "clip_l14": "clip_l14",
    "dreamsim_diversity": "dreamsim",
    **{m: "vlm" for m in VLM_QUESTIONS},
}
SCORER_SPECS = {  # the reference's models, all in float32; the judge is the run's vlm_judge component if it has one
    "pickscore": {"name": "pickscore", "dtype": "float32"},
    "hpsv2": {"name": "hpsv2", "model": "adams-story/HPSv2-hf", "logit_scale": True, "dtype": "float32"},
    "clip_h14": {"name": "clip_logit", "model": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "dtype": "float32"},
    "clip_l14": {"name": "clip_logit", "model": "openai/clip-vit-large-patch14", "dtype": "float32"},
    "dreamsim": {},  # rewards.dreamsim.DreamSim settings
    "vlm": {"name": "vlm_judge"},  # Qwen2.5-VL-7B-Instruct in process (transformers)
}


def scorer_specs(cfg: RunConfig, keys) -> dict[str, dict]:
    """Settings of every scorer in ``keys``: ``SCORER_SPECS`` with ``eval.suite_scorers`` on top, each checked
    (names, settings, files) without loading anything."""
    from rewards.base import check_kwargs, check_spec
    from rewards.dreamsim import INSTALL_HINT, DreamSim

    user = dict(cfg.eval.suite_scorers or {})
    unknown = sorted(set(user) - set(SCORER_SPECS))
    if unknown:
        raise ValueError(f"eval.suite_scorers: unknown scorer {unknown[0]!r}; scorers: {', '.join(SCORER_SPECS)}")
    specs = {}
    for key in keys:
        over = user.get(key) or {}
        if not isinstance(over, dict):
            raise ValueError(f"eval.suite_scorers.{key} must be a mapping of settings, e.g. {{dtype: float32}}")
        spec = judge_spec(cfg, over) if key == "vlm" else {**SCORER_SPECS[key], **over}
        if key == "dreamsim":
            check_kwargs(DreamSim, spec, "eval.suite_scorers.dreamsim")
        else:
            check_spec(spec, f"eval.suite_scorers.{key}")
        specs[key] = spec
    if "model" not in specs.get("dreamsim", {"model": "given"}) and importlib.util.find_spec("dreamsim") is None:
        raise ImportError(INSTALL_HINT)  # an optional package: say how to install it before anything loads
    return specs


def judge_spec(cfg: RunConfig, over: dict) -> dict:
    """The VLM judge of the vlm_* metrics: the run's vlm_judge component (its model, backend, url, ...) if it has
    one, else ``SCORER_SPECS["vlm"]``; ``over`` on top. The judge is asked the metric's question verbatim (its
    template is "{prompt}" and the suite passes the formatted question), at the image's own size."""
    if "question" in over:
        raise ValueError(
            "eval.suite_scorers.vlm: the questions belong to the metrics (VLM_QUESTIONS in "
            "cluster/eval_scorers.py); drop question"
        )
    run_judge = [dict(s) for s in reward_specs(cfg.reward) if s.get("name") == "vlm_judge"]
    base = run_judge[0] if run_judge else dict(SCORER_SPECS["vlm"])
    for k in ("weight", "key", "question", "image_size"):
        base.pop(k, None)
    return {**base, "image_size": None, **over, "question": "{prompt}"}


def build_scorer(key: str, spec: dict):
    if key == "dreamsim":
        from rewards.dreamsim import DreamSim

        return DreamSim(**spec)
    from rewards.base import build_reward

    return build_reward(spec)


def score_chunk(metrics, scorers: dict, images: np.ndarray, prompts: list[str], R: int) -> dict[str, np.ndarray]:
    """Every metric on a chunk of whole prompts: per image [B], except dreamsim_diversity per prompt [B / R]."""
    out = {}
    for m in metrics:
        key = METRIC_SCORER[m]
        if m == "dreamsim_diversity":
            out[m] = scorers[key].diversity(images, R)
        elif key == "vlm":
            out[m] = scorers[key].score(images, [VLM_QUESTIONS[m].format(prompt=p) for p in prompts]).scores
        else:
            out[m] = scorers[key].score(images, prompts).scores
    return {m: np.asarray(v, dtype=np.float64) for m, v in out.items()}
