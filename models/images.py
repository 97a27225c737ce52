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


def save_grid(images: np.ndarray, cols: int, path: str | Path, scale: int = 2, labels: list[str] | None = None) -> str:
    """Tile uint8 images [N, H, W, 3] into a PNG, ``cols`` per row, each upscaled ``scale``x (nearest); returns the path.

    ``labels`` (one per row, e.g. the prompt each row was sampled for) are written in a white column left of the
    rows, wrapped to the row's height (what does not fit ends in "..."); without them the grid is the tiles alone."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = math.ceil(n / cols)
    if labels is not None and len(labels) != rows:
        raise ValueError(
            f"save_grid: {len(labels)} labels for {rows} rows ({n} images, {cols} per row): give one per row"
        )
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = img
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tiles = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    (tiles if labels is None else _captioned(tiles, labels, (h + 2) * scale)).save(path)
    return str(path)


LABEL_CHARS = 40  # characters per caption line
LABEL_PAD = 4  # pixels around a caption
LABEL_FONT_PX = 12  # caption font size (Pillow's bundled font: no system fonts needed)


def _captioned(tiles, labels: list[str], row_px: int):
    """``tiles`` with a white caption column on its left: ``labels[r]`` beside row ``r`` (each row ``row_px`` high)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=LABEL_FONT_PX)
    line_px = _text_size(font, "Ag")[1] + 2
    fit = max(1, (row_px - 2 * LABEL_PAD) // line_px)  # caption lines a row has room for
    wrapped = []
    for label in labels:
        lines = textwrap.wrap(str(label), LABEL_CHARS) or [""]
        if len(lines) > fit:
            lines = lines[:fit]
            lines[-1] = lines[-1][: LABEL_CHARS - 3].rstrip() + "..."
        wrapped.append(lines)
    width = max(_text_size(font, line)[0] for lines in wrapped for line in lines) + 2 * LABEL_PAD
    out = Image.new("RGB", (width + tiles.width, tiles.height), (255, 255, 255))
    out.paste(tiles, (width, 0))
    draw = ImageDraw.Draw(out)
    for r, lines in enumerate(wrapped):
        for i, line in enumerate(lines):
            draw.text((LABEL_PAD, r * row_px + LABEL_PAD + i * line_px), line, fill=(0, 0, 0), font=font)
    return out


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text or " ")
    return right - left if text else 0, bottom - top
