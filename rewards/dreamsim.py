"""DreamSim diversity: how different a prompt's images look, the way the FDFO paper measures it.

Usage::

    ds = DreamSim()                                        # needs `pip install dreamsim==0.2.1` (see below)
    per_prompt = ds.diversity(images_uint8_bhwc, images_per_prompt=4)   # [P], a prompt's images adjacent
    float(per_prompt.mean())                               # the paper's "DreamSim diversity" (0.455 for FDFO combined)

The metric (ALGORITHM.md §7): embed every image with DreamSim (Fu et al. 2023, the default "ensemble" model:
DINO ViT-B/16 + CLIP ViT-B/16 + OpenCLIP ViT-B/16 features, each LoRA-tuned to human similarity judgements, whose
embeddings DreamSim centres and normalises); for each prompt, the mean over its image pairs i < j of the squared L2
distance ||e_i - e_j||^2; then the mean over prompts. ``mean_pairwise_sq_l2`` is that formula, on any embeddings.

The model is an optional dependency: the ``dreamsim`` package pulls timm, open_clip and torchvision, which the CPU
install keeps out. Install it where the evaluation runs (``pip install dreamsim==0.2.1``, after the CUDA torch and
its matching torchvision). On first use it downloads its weights (the ensemble checkpoint zip from the
ssundaram21/dreamsim GitHub releases) into ``cache_dir``; on a machine without internet, unzip that file there
beforehand. Its checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
from PIL import Image

DEFAULT_CACHE_DIR = "~/.cache/fdfo/dreamsim"
INSTALL_HINT = (
    "DreamSim diversity needs the dreamsim package: pip install dreamsim==0.2.1 (it brings timm, "
    "open_clip and torchvision; install the torchvision that matches your torch first). Its weights "
    "download on first use into cache_dir (default ~/.cache/fdfo/dreamsim) from the ssundaram21/dreamsim "
    "GitHub releases; offline, unzip dreamsim_ensemble_checkpoint.zip there beforehand"
)


def mean_pairwise_sq_l2(embeddings: Any) -> np.ndarray:
    """embeddings [P, R, D] (R images of each of P prompts) -> [P] float64: the mean over pairs i < j of
    ||e_i - e_j||^2 within each prompt. R must be at least 2."""
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 3 or e.shape[1] < 2:
        raise ValueError(f"diversity needs embeddings [prompts, images per prompt >= 2, dim]; got shape {e.shape}")
    sq = ((e[:, :, None, :] - e[:, None, :, :]) ** 2).sum(-1)  # [P, R, R]
    i, j = np.triu_indices(e.shape[1], k=1)
    return sq[:, i, j].mean(axis=1)


class DreamSim:
    """DreamSim image embeddings and the diversity over them. ``model`` / ``preprocess``: what
    ``dreamsim.dreamsim()`` returns (a module with ``embed(x [B, 3, S, S]) -> [B, D]`` and a PIL image ->
    [1, 3, S, S] transform), passed built in tests; by default the pretrained ensemble is loaded."""

    def __init__(
        self,
        model: Any = None,
        preprocess: Callable | None = None,
        device: str | None = None,
        cache_dir: str = DEFAULT_CACHE_DIR,
        dreamsim_type: str = "ensemble",
        batch_size: int = 32,
    ):
        import torch

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if model is None:
            try:
                import dreamsim
            except ImportError as e:
                raise ImportError(f"{INSTALL_HINT} ({e})") from None
            cache = os.path.expanduser(cache_dir)
            os.makedirs(cache, exist_ok=True)  # dreamsim creates only the last folder of the path
            model, preprocess = dreamsim.dreamsim(
                pretrained=True, device=self.device, cache_dir=cache, dreamsim_type=dreamsim_type
            )
        if preprocess is None:
            raise ValueError("a built DreamSim model needs its preprocess transform: pass preprocess=")
        self.model, self.preprocess = model, preprocess
        self.batch_size = int(batch_size)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> float64 [B, D] DreamSim embeddings."""
        out = []
        for lo in range(0, len(images), self.batch_size):
            x = self.torch.cat([self.preprocess(Image.fromarray(im)) for im in images[lo : lo + self.batch_size]])
            with self.torch.inference_mode():
                out.append(self.model.embed(x.to(self.device)).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def diversity(self, images: np.ndarray, images_per_prompt: int) -> np.ndarray:
        """uint8 [P * R, H, W, 3], a prompt's R images adjacent -> [P] mean pairwise squared L2 of their embeddings."""
        if images_per_prompt < 2 or len(images) % images_per_prompt:
            raise ValueError(
                f"diversity needs whole groups of >= 2 images per prompt; got {len(images)} images in "
                f"groups of {images_per_prompt}"
            )
        emb = self.embed(images)
        return mean_pairwise_sq_l2(emb.reshape(-1, images_per_prompt, emb.shape[-1]))
