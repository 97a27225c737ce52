"""A small compositional text-to-image world: coloured shapes on a plain background, and its judge.

Usage::

    scene = parse("two red circles above a blue square")
    image = render(scene, np.random.default_rng(0))             # uint8 [32, 32, 3]
    judge_scores(image[None], [prompt(scene)])                   # -> [1.0]

Grammar (a group is ``<count> <colour> <shape>``, count "a" | "two" | "three", plural shapes for 2 and 3):

- one group: ``"three green triangles"`` (4 clauses: colour, shape, count, and no extra objects);
- two groups with distinct colours and at most three objects in all:
  ``"two red circles above a blue square"`` with relation ``above | below | left of | right of``
  (8 clauses: colour, shape and count of each group, no extra objects, and the relation).

``train_prompts()`` / ``heldout_prompts()`` (or ``prompts("train" | "heldout")``) are a fixed, disjoint split; the held-out prompts are
combinations never seen in training (pairs of coloured shapes, and (count, colour, shape) triples),
built only from colours, shapes, counts and relations that training does show.

Its scorers are registered by ``rewards/shapes.py`` (the reward signature of ``rewards.base``):
- ``shapes_judge``: fraction of the prompt's clauses the image satisfies, in [0, 1] (the training reward);
- ``shapes_exact``: 1.0 when every clause holds, else 0.0 (GenEval-style strict accuracy);
- ``shapes_count``: fraction of the prompt's count clauses that hold;
- ``shapes_clean``: how cleanly the image is drawn in the world's colours, in [0, 1] (an image-quality term: 1.0
  for a rendered scene, lower as stray noise or muddy colours appear; it ignores what the prompt asks for).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SIZE = 32
BACKGROUND = (30, 30, 30)
PALETTE = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "left of", "right of")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
WORD_COUNTS = {w: n for n, w in COUNT_WORDS.items()} | {"one": 1, "an": 1}
# Two-group scenes keep to three objects in all so that 32x32 pixels leave room between them.
PAIR_COUNTS = ((1, 1), (2, 1), (1, 2))
SPLIT_SEED = 0
HELDOUT_PAIR_FRACTION = 0.2

# Judge thresholds, in pixels of the 32x32 image. A pixel belongs to a palette colour when that colour is
# its nearest palette entry (background included) within MAX_COLOUR_DIST in RGB: blends of a colour with
# the background, as blurry samples make, still count; muddy in-between colours do not.
MAX_COLOUR_DIST = 110.0
MIN_AREA = 8  # smallest component that counts as an object (the smallest rendered object has ~25 px)
MARGIN = 1.5  # centroids must differ by more than this along the relation's axis
# The soft judge (training signal): shape evidence as a softmax over template errors per unit area, and the
# relation margin through a logistic of this width in pixels.
SOFT_TAU = 0.1
SOFT_POS = 1.0


@dataclass(frozen=True)
class Group:
    count: int
    colour: str
    shape: str

    def phrase(self) -> str:
        return f"{COUNT_WORDS[self.count]} {self.colour} {self.shape}{'s' if self.count > 1 else ''}"


@dataclass(frozen=True)
class Scene:
    """One or two groups; ``relation`` (of groups[0] to groups[1]) is set iff there are two."""

    groups: tuple[Group, ...]
    relation: str | None = None

    def __post_init__(self):
        if len(self.groups) not in (1, 2) or (len(self.groups) == 2) != (self.relation is not None):
            raise ValueError(f"a scene is one group, or two groups with a relation; got {self}")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; expected one of {RELATIONS}")
        for g in self.groups:
            if g.colour not in PALETTE or g.shape not in SHAPES or g.count not in COUNT_WORDS:
                raise ValueError(f"group {g} is outside the grammar ({COLOURS}, {SHAPES}, counts 1-3)")
        if len(self.groups) == 2 and self.groups[0].colour == self.groups[1].colour:
            raise ValueError(f"the two groups of a scene need distinct colours; got {self}")


def prompt(scene: Scene) -> str:
    """The prompt of a scene, e.g. ``"two red circles above a blue square"``."""
    if scene.relation is None:
        return scene.groups[0].phrase()
    return f"{scene.groups[0].phrase()} {scene.relation} {scene.groups[1].phrase()}"


def _parse_group(words: list[str], text: str) -> Group:
    if len(words) != 3 or words[0] not in WORD_COUNTS:
        raise ValueError(f"cannot parse {text!r}: expected '<a|two|three> <colour> <shape>' groups")
    count, colour, shape = WORD_COUNTS[words[0]], words[1], words[2]
    if count > 1 and shape.endswith("s"):
        shape = shape[:-1]
    if colour not in PALETTE or shape not in SHAPES:
        raise ValueError(f"cannot parse {text!r}: colour must be one of {COLOURS}, shape one of {SHAPES}")
    return Group(count, colour, shape)


def parse(text: str) -> Scene:
    """Inverse of ``prompt``; raises ValueError (naming the grammar) on text outside it."""
    words = text.lower().replace(",", " ").split()
    for rel in sorted(RELATIONS, key=len, reverse=True):
        rel_words = rel.split()
        for i in range(len(words) - len(rel_words) + 1):
            if words[i : i + len(rel_words)] == rel_words:
                first = _parse_group(words[:i], text)
                second = _parse_group(words[i + len(rel_words) :], text)
                return Scene((first, second), rel)
    return Scene((_parse_group(words, text),))


def all_scenes() -> list[Scene]:
    """Every scene of the grammar, in a fixed order (36 one-group + 1296 two-group scenes)."""
    scenes = [Scene((Group(n, c, s),)) for n, c, s in itertools.product(COUNT_WORDS, COLOURS, SHAPES)]
    objects = list(itertools.product(COLOURS, SHAPES))
    for (c1, s1), (c2, s2) in itertools.product(objects, objects):
        if c1 == c2:
            continue
        for rel, (n1, n2) in itertools.product(RELATIONS, PAIR_COUNTS):
            scenes.append(Scene((Group(n1, c1, s1), Group(n2, c2, s2)), rel))
    return scenes


def _heldout_keys() -> tuple[set, set]:
    """The held-out combinations: unordered pairs of (colour, shape) objects, and (count, colour, shape)
    triples (at most one count per coloured shape, so every coloured shape is still trained on)."""
    rng = random.Random(SPLIT_SEED)
    objects = list(itertools.product(COLOURS, SHAPES))
    pairs = sorted({tuple(sorted((a, b))) for a, b in itertools.product(objects, objects) if a[0] != b[0]})
    heldout_pairs = set(rng.sample(pairs, round(HELDOUT_PAIR_FRACTION * len(pairs))))
    heldout_triples = {(rng.choice(list(COUNT_WORDS)), c, s) for c, s in rng.sample(objects, 8)}
    return heldout_pairs, heldout_triples


def is_heldout(scene: Scene) -> bool:
    pairs, triples = _heldout_keys()
    g = scene.groups
    if len(g) == 1:
        return (g[0].count, g[0].colour, g[0].shape) in triples
    return tuple(sorted(((g[0].colour, g[0].shape), (g[1].colour, g[1].shape)))) in pairs


def train_prompts() -> list[str]:
    """The prompts pretraining and FDFO train on (fixed order)."""
    return [prompt(s) for s in all_scenes() if not is_heldout(s)]


def heldout_prompts() -> list[str]:
    """Prompts whose combinations never appear in training (fixed order; disjoint from ``train_prompts``)."""
    return [prompt(s) for s in all_scenes() if is_heldout(s)]


def prompts(split: str) -> list[str]:
    """The prompts of one split: ``"train"`` or ``"heldout"`` (what ``prompts.source: builtin:shapes-<split>`` loads)."""
    if split == "train":
        return train_prompts()
    if split == "heldout":
        return heldout_prompts()
    raise ValueError(f"unknown shapes prompt split {split!r}; use 'train' or 'heldout'")


# ---------------------------------------------------------------------------------------------- rendering

_SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges like a real image


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, size: float, fill) -> None:
    k = _SUPERSAMPLE
    x0, y0, x1, y1 = x * k, y * k, (x + size) * k - 1, (y + size) * k - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # isosceles triangle, apex up
        draw.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=fill)


def _place(scene: Scene, rng: np.random.Generator) -> list[tuple[Group, float, float, float]]:
    """Sizes and top-left corners for every object; groups of a relation sit in opposite bands."""
    gap = 2.0  # anti-aliased edges bleed ~1 px; 2 px keeps components apart
    for _ in range(1000):
        split = SIZE / 2 + rng.uniform(-2, 2)
        bands = [(1.0, SIZE - 1.0, 1.0, SIZE - 1.0)] * len(scene.groups)  # x_lo, x_hi, y_lo, y_hi
        if scene.relation is not None:
            first, second = (1.0, split - gap / 2), (split + gap / 2, SIZE - 1.0)
            if scene.relation in ("below", "right of"):
                first, second = second, first
            if scene.relation in ("above", "below"):
                bands = [(1.0, SIZE - 1.0, *first), (1.0, SIZE - 1.0, *second)]
            else:
                bands = [(*first, 1.0, SIZE - 1.0), (*second, 1.0, SIZE - 1.0)]
        placed: list[tuple[Group, float, float, float]] = []
        ok = True
        for group, (xl, xh, yl, yh) in zip(scene.groups, bands):
            for _ in range(group.count):
                for _ in range(100):
                    size = rng.uniform(7.0, 10.0)
                    if xh - xl < size or yh - yl < size:
                        continue
                    x, y = rng.uniform(xl, xh - size), rng.uniform(yl, yh - size)
                    if all(
                        x + size + gap <= px or px + ps + gap <= x or y + size + gap <= py or py + ps + gap <= y
                        for _, px, py, ps in placed
                    ):
                        placed.append((group, x, y, size))
                        break
                else:
                    ok = False
                    break
            if not ok:
                break
        if ok:
            return placed
    raise RuntimeError(f"could not place {scene} on {SIZE}x{SIZE} pixels")  # unreachable for the grammar


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """One image of the scene, uint8 [32, 32, 3], with random sizes (7-10 px) and positions."""
    k = _SUPERSAMPLE
    canvas = Image.new("RGB", (SIZE * k, SIZE * k), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for group, x, y, size in _place(scene, rng):
        _draw(draw, group.shape, x, y, size, PALETTE[group.colour])
    return np.asarray(canvas.resize((SIZE, SIZE), Image.BOX), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- the judge


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    cy: float
    cx: float
    area: int
    shape_p: tuple[float, ...] = ()  # posterior over SHAPES (``shape_posterior``), for the soft judge


_PALETTE_RGB = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float32)  # [1 + C, 3]


def _template(shape: str, cy: float, cx: float, area: float, h: int, w: int) -> np.ndarray:
    """Anti-aliased coverage [h, w] of an ideal shape of the given area centred (by centroid) at (cy, cx)."""
    sub = (np.arange(4) + 0.5) / 4  # 4x4 samples per pixel, like the renderer's supersampling
    ys = (np.arange(h)[:, None] + sub[None, :]).reshape(-1)[:, None]
    xs = (np.arange(w)[:, None] + sub[None, :]).reshape(-1)[None, :]
    if shape == "circle":
        r = np.sqrt(area / np.pi)
        inside = (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
    elif shape == "square":
        half = np.sqrt(area) / 2
        inside = (np.abs(ys - cy) <= half) & (np.abs(xs - cx) <= half)
    else:  # apex-up triangle with base = height = s: area s^2 / 2, centroid 2/3 of the way down
        s = np.sqrt(2 * area)
        top = cy - 2 * s / 3
        inside = (ys >= top) & (ys <= top + s) & (np.abs(xs - cx) <= (ys - top) / 2)
    return inside.reshape(h, 4, w, 4).mean(axis=(1, 3))


def shape_errors(coverage: np.ndarray) -> dict[str, float]:
    """L1 distance, per unit area, between one object's soft coverage map (float [h, w] in [0, 1], zero outside
    the object) and the ideal anti-aliased circle, square and apex-up triangle of its area and centroid. The
    closest ideal shape is the object's shape; blurry or lumpy blobs get the nearest one."""
    area = float(coverage.sum())
    yy, xx = np.mgrid[: coverage.shape[0], : coverage.shape[1]]
    cy, cx = (coverage * (yy + 0.5)).sum() / area, (coverage * (xx + 0.5)).sum() / area
    return {s: float(np.abs(_template(s, cy, cx, area, *coverage.shape) - coverage).sum()) / area for s in SHAPES}


def shape_posterior(errors: dict[str, float]) -> tuple[float, ...]:
    """softmax(-error / SOFT_TAU) over SHAPES: how decidedly an object is each shape (for the soft judge)."""
    e = np.array([errors[s] for s in SHAPES])
    w = np.exp(-(e - e.min()) / SOFT_TAU)
    return tuple(float(x) for x in w / w.sum())


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in one uint8 [H, W, 3] image: palette segmentation, connected components, shape by template fit."""
    pixels = image.astype(np.float32)
    dist = np.linalg.norm(pixels[:, :, None, :] - _PALETTE_RGB, axis=-1)  # [H, W, 1 + C]
    nearest = dist.argmin(-1)
    nearest[dist.min(-1) > MAX_COLOUR_DIST] = 0
    found = []
    for ci, colour in enumerate(PALETTE, start=1):
        labels, n = ndimage.label(nearest == ci)
        if n == 0:
            continue
        # Soft coverage of this colour over the background: anti-aliased and blurry edges count partly.
        c = _PALETTE_RGB[ci] - _PALETTE_RGB[0]
        coverage = np.clip((pixels - _PALETTE_RGB[0]) @ c / (c @ c), 0.0, 1.0)
        for idx in range(1, n + 1):
            comp = labels == idx
            area = int(comp.sum())
            if area < MIN_AREA:
                continue
            ys, xs = np.nonzero(comp)
            # The object's window, padded by 2 px; its fringe is the 1-px ring around the hard mask.
            y0, y1 = max(ys.min() - 2, 0), min(ys.max() + 3, image.shape[0])
            x0, x1 = max(xs.min() - 2, 0), min(xs.max() + 3, image.shape[1])
            own = ndimage.binary_dilation(comp)[y0:y1, x0:x1] & ((labels[y0:y1, x0:x1] == 0) | comp[y0:y1, x0:x1])
            errors = shape_errors(coverage[y0:y1, x0:x1] * own)
            found.append(
                Detection(
                    colour,
                    min(errors, key=errors.get),
                    float(ys.mean()),
                    float(xs.mean()),
                    area,
                    shape_posterior(errors),
                )
            )
    return found


def relation_gap(relation: str, a: tuple[float, float], b: tuple[float, float]) -> float:
    """How far centroid a = (y, x) lies beyond centroid b in the relation's direction, in pixels (> 0 when it holds)."""
    return {"above": b[0] - a[0], "below": a[0] - b[0], "left of": b[1] - a[1], "right of": a[1] - b[1]}[relation]


def clauses(scene: Scene, found: Sequence[Detection]) -> dict[str, bool]:
    """Each clause of the prompt and whether the detections satisfy it.

    Keys: ``g{i}/colour`` (some object has the colour), ``g{i}/shape`` (at least half of the objects of
    that colour, and at least one, have the shape), ``g{i}/count`` (exactly ``count`` objects of that colour
    and shape) ``no_extra`` (the image holds exactly as many objects as the prompt names) and ``relation`` (the mean centroid of group 0 lies beyond group 1's by > MARGIN px along the
    relation; a group's objects are those of its colour and shape, or of its colour if none has the shape).
    """
    out: dict[str, bool] = {}
    members = []
    for i, g in enumerate(scene.groups):
        of_colour = [d for d in found if d.colour == g.colour]
        matching = [d for d in of_colour if d.shape == g.shape]
        out[f"g{i}/colour"] = bool(of_colour)
        out[f"g{i}/shape"] = bool(matching) and 2 * len(matching) >= len(of_colour)
        out[f"g{i}/count"] = len(matching) == g.count
        members.append(matching or of_colour)
    # Without this clause a clutter of coloured blobs satisfies most colour and shape clauses.
    out["no_extra"] = len(found) == sum(g.count for g in scene.groups)
    if scene.relation is not None:
        a, b = members
        if a and b:
            gap = relation_gap(
                scene.relation,
                (np.mean([d.cy for d in a]), np.mean([d.cx for d in a])),
                (np.mean([d.cy for d in b]), np.mean([d.cx for d in b])),
            )
            out["relation"] = bool(gap > MARGIN)
        else:
            out["relation"] = False
    return out


def soft_clauses(scene: Scene, found: Sequence[Detection]) -> dict[str, float]:
    """``clauses`` made continuous in the pixels, each in [0, 1]: shape = mean posterior of the prompted shape
    over the objects of the group's colour; count = 1 - |sum of those posteriors - count| (floored at 0);
    relation = logistic((centroid gap - MARGIN) / SOFT_POS) with posterior-weighted group centroids; colour
    and no_extra as in ``clauses``. A finite difference between two close samples then sees partial progress
    (a blob becoming more square, a group drifting the right way) that the 0/1 judge only sees when it flips."""
    out: dict[str, float] = {}
    centroids = []
    for i, g in enumerate(scene.groups):
        of_colour = [d for d in found if d.colour == g.colour]
        p = np.array([d.shape_p[SHAPES.index(g.shape)] for d in of_colour])
        out[f"g{i}/colour"] = float(bool(of_colour))
        out[f"g{i}/shape"] = float(p.mean()) if len(p) else 0.0
        out[f"g{i}/count"] = max(0.0, 1.0 - abs(float(p.sum()) - g.count))
        if len(p) and p.sum() > 1e-6:
            w = p / p.sum()
            centroids.append((float(w @ [d.cy for d in of_colour]), float(w @ [d.cx for d in of_colour])))
        else:
            centroids.append(None)
    out["no_extra"] = float(len(found) == sum(g.count for g in scene.groups))
    if scene.relation is not None:
        a, b = centroids
        if a is not None and b is not None:
            gap = relation_gap(scene.relation, a, b)
            out["relation"] = float(1.0 / (1.0 + np.exp(-(gap - MARGIN) / SOFT_POS)))
        else:
            out["relation"] = 0.0
    return out


def judge(images: np.ndarray, prompts: Sequence[str]) -> list[dict[str, bool]]:
    """The clauses of each prompt and whether its image [H, W, 3] uint8 satisfies them (``clauses``)."""
    return [clauses(parse(p), detect(img)) for img, p in zip(images, prompts)]


def clause_fraction(results: Sequence[dict[str, bool]]) -> np.ndarray:
    """The fraction of satisfied clauses in each of ``judge``'s results, [B] float64 in [0, 1]."""
    return np.array([np.mean(list(r.values())) for r in results], dtype=np.float64)


def judge_scores(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """The judge: the fraction of each prompt's clauses its image satisfies, [B] float64 in [0, 1]."""
    return clause_fraction(judge(images, prompts))


def soft_judge_scores(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """The mean of ``soft_clauses`` per image, [B] float64 in [0, 1]."""
    return np.array(
        [np.mean(list(soft_clauses(parse(p), detect(im)).values())) for im, p in zip(images, prompts)], dtype=np.float64
    )


CLEAN_SCALE = 30.0  # RGB distance at which a pixel counts as e^-1 clean


def clean_map(image: np.ndarray) -> np.ndarray:
    """Per-pixel cleanliness [H, W] in (0, 1]: exp(-(d / CLEAN_SCALE)^2), d = RGB distance to the nearest
    blend of the background with one palette colour (so anti-aliased edges of a rendered object count as clean)."""
    p = image.astype(np.float32)[..., None, :] - _PALETTE_RGB[0]  # [H, W, 1, 3]
    c = _PALETTE_RGB[1:] - _PALETTE_RGB[0]  # [C, 3]
    t = np.clip((p * c).sum(-1) / (c * c).sum(-1), 0.0, 1.0)  # [H, W, C]: position along background -> colour
    d = np.linalg.norm(p - t[..., None] * c, axis=-1).min(-1)  # [H, W]
    return np.exp(-((d / CLEAN_SCALE) ** 2))
