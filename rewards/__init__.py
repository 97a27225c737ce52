"""Reward models behind one signature; importing the package registers the built-in scorers.

Scorer modules import torch/transformers/onnxruntime/vllm only inside their constructors, so ``import rewards``
stays light and never imports vLLM. The package stands alone: it imports nothing of fdfo's trainer (only the image
helpers of ``models.images`` and the shapes world of ``tasks.shapes.world``), so other projects can borrow it.
"""

from models.images import to_uint8  # float images in [0, 1] -> the uint8 [B, H, W, 3] every scorer takes
from rewards import (
    clip,  # noqa: F401  (registers pickscore, clipscore, hpsv2, clip_logit, aesthetic)
    combined,  # noqa: F401  (registers weighted_sum; PRESETS, build_preset)
    imagereward,  # noqa: F401  (registers imagereward)
    jpeg,  # noqa: F401  (registers jpeg_compressibility)
    ocr,  # noqa: F401  (registers ocr)
    shapes,  # noqa: F401  (registers shapes_judge, shapes_exact, shapes_count)
    vlm_judge,  # noqa: F401  (registers vlm_judge)
)
from rewards.base import REGISTRY, Reward, RewardOutput, build_reward, check_images, combine, register

__all__ = ["REGISTRY", "Reward", "RewardOutput", "build_reward", "check_images", "combine", "register", "to_uint8"]
