"""OCR reward: how well the text rendered in the image matches the quoted text of the prompt.

Usage::

    ocr = OCRReward()                                   # rapidocr-onnxruntime's shipped PP-OCRv4 models, CPU
    ocr.score(images, ['a sign that says "OPEN 24 HOURS"']).scores      # [B] in [0, 1]

Target: the text between quotes in the prompt ("...", '...', or typographic quotes); several quoted parts are
joined with a space. Recognised: every text line PP-OCR detects with confidence >= ``min_confidence``, joined
in the detector's reading order. Both are lower-cased with whitespace removed (layout is not judged), then

    reward = 1 - min(levenshtein(recognised, target), len(target)) / len(target)

(Flow-GRPO's OCR reward). 1 means the exact text; 0 means nothing useful. A prompt without quoted text gives
NaN with the reason, so those pairs are dropped rather than trained towards empty images.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
from PIL import Image

from rewards.base import RewardOutput, check_images, register

_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”|‘([^’]+)’|(?<![A-Za-z])\'([^\']+)\'(?![A-Za-z])')


def quoted_text(prompt: str) -> str | None:
    """The prompt's quoted parts joined by a space, or None when it quotes nothing."""
    parts = ["".join(groups) for groups in _QUOTED.findall(prompt)]
    parts = [p for p in parts if p.strip()]
    return " ".join(parts) if parts else None


def normalize(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_similarity(recognised: str, target: str) -> float:
    """1 - min(edit distance, len(target)) / len(target) on normalised strings, in [0, 1]."""
    rec, tgt = normalize(recognised), normalize(target)
    if not tgt:
        raise ValueError("empty target text")
    return 1.0 - min(levenshtein(rec, tgt), len(tgt)) / len(tgt)


@register("ocr")
class OCRReward:
    """PP-OCR (det + rec; the angle classifier off by default) via rapidocr-onnxruntime, on CPU."""

    def __init__(self, min_confidence: float = 0.5, use_angle_cls: bool = False, **rapidocr_kwargs):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:
            raise ImportError(
                "the OCR reward needs rapidocr-onnxruntime: pip install rapidocr-onnxruntime==1.4.4 "
                "(with opencv-python-headless instead of opencv-python)"
            ) from e
        self.engine = RapidOCR(**rapidocr_kwargs)
        self.min_confidence = float(min_confidence)
        self.use_angle_cls = bool(use_angle_cls)

    def recognise(self, image: np.ndarray) -> str:
        """uint8 [H, W, 3] RGB -> recognised text lines joined by spaces ('' when none)."""
        result, _ = self.engine(Image.fromarray(image), use_cls=self.use_angle_cls)
        lines = [text for _, text, conf in (result or []) if float(conf) >= self.min_confidence]
        return " ".join(lines)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        """images uint8 [B, H, W, 3], B prompts -> [B] in [0, 1]; NaN where the prompt quotes no text."""
        check_images(images, prompts)
        scores = np.full(len(prompts), np.nan)
        texts: list[str] = []
        reasons: list[str | None] = []
        for i, (img, prompt) in enumerate(zip(images, prompts)):
            target = quoted_text(prompt)
            if target is None or not normalize(target):
                texts.append("")
                reasons.append(f"reward/ocr: prompt has no quoted text to read: {prompt!r}")
                continue
            texts.append(self.recognise(img))
            scores[i] = text_similarity(texts[-1], target)
            reasons.append(None)
        return RewardOutput(scores=scores, info={"recognised": texts, "reasons": reasons})
