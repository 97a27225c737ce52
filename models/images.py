"""Images as the rest of fdfo passes them: uint8 [B, H, W, 3] (what every reward takes), and PNG grids of them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1], [B, 3, H, W] torch or [B, H, W, 3] numpy -> uint8 [B, H, W, 3]."""
    arr = images.detach().cpu().float().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.ndim == 4 and arr.shape[1] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    return np.ascontiguousarray((np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def save_grid(images: np.ndarray, cols: int, path: str | Path, scale: int = 2) -> str:
    """Tile uint8 images [N, H, W, 3] into a PNG, ``cols`` per row, each upscaled ``scale``x (nearest); returns the path."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = img
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
    return str(path)
