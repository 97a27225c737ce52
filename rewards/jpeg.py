"""JPEG compressibility (DDPO): reward = -(JPEG size in kB at quality 95). Weight-free and deterministic."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from rewards.base import RewardOutput, check_images, register


@register("jpeg_compressibility")
class JpegCompressibility:
    def __init__(self, quality: int = 95):
        if not 1 <= quality <= 100:
            raise ValueError(f"jpeg quality must be in 1..100, got {quality}")
        self.quality = quality

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        check_images(images, prompts)
        sizes = []
        for img in images:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        kb = np.asarray(sizes, dtype=np.float64)
        return RewardOutput(scores=-kb, info={"jpeg_kb": kb})
