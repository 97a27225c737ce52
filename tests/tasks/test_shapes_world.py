"""The shapes world: grammar round-trip, the fixed split, the renderer and the clause judge."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rewards import REGISTRY, build_reward
from tasks.shapes import world
from tasks.shapes.world import (
    COLOURS,
    RELATIONS,
    SHAPES,
    Group,
    Scene,
    all_scenes,
    detect,
    heldout_prompts,
    parse,
    prompt,
    render,
    train_prompts,
)

JUDGE = build_reward({"name": "shapes_judge"})


def judge(image: np.ndarray, text: str) -> float:
    return float(JUDGE.score(image[None], [text]).scores[0])


def test_grammar_round_trips_and_counts():
    scenes = all_scenes()
    assert len(scenes) == 36 + 12 * 9 * 4 * 3
    assert len({prompt(s) for s in scenes}) == len(scenes)
    for s in scenes:
        assert parse(prompt(s)) == s
    assert prompt(parse("two red circles above a blue square")) == "two red circles above a blue square"
    assert parse("a yellow square left of a red circle") == Scene(
        (Group(1, "yellow", "square"), Group(1, "red", "circle")), "left of"
    )
    with pytest.raises(ValueError, match="cannot parse"):
        parse("a purple hexagon")


def test_split_is_fixed_disjoint_and_covers_the_grammar():
    train, held = train_prompts(), heldout_prompts()
    assert (len(train), len(held)) == (1060, 272)
    assert not set(train) & set(held)
    assert set(train) | set(held) == {prompt(s) for s in all_scenes()}
    assert train_prompts() == train and heldout_prompts() == held  # deterministic
    assert world.prompts("train") == train and world.prompts("heldout") == held  # builtin:shapes-<split>
    with pytest.raises(ValueError, match="split"):
        world.prompts("test")
    # Held-out prompts are new combinations of seen parts: every colour/shape/relation is trained on,
    # and no held-out pair of coloured shapes appears in any training prompt (in either order).
    trained_pairs = set()
    for p in train:
        g = parse(p).groups
        if len(g) == 2:
            trained_pairs.add(frozenset(((g[0].colour, g[0].shape), (g[1].colour, g[1].shape))))
    for p in held:
        g = parse(p).groups
        if len(g) == 2:
            assert frozenset(((g[0].colour, g[0].shape), (g[1].colour, g[1].shape))) not in trained_pairs
    words = " ".join(train)
    assert all(w in words for w in COLOURS + SHAPES + RELATIONS)


def test_rendered_scenes_score_one_on_their_own_prompt():
    rng = np.random.default_rng(0)
    scenes = all_scenes()
    idx = rng.choice(len(scenes), 400, replace=False)
    images = np.stack([render(scenes[i], rng) for i in idx])
    assert images.shape == (400, 32, 32, 3) and images.dtype == np.uint8
    out = JUDGE.score(images, [prompt(scenes[i]) for i in idx])
    assert out.scores.min() == 1.0
    assert REGISTRY["shapes_exact"]().score(images, [prompt(scenes[i]) for i in idx]).scores.min() == 1.0


def test_render_is_seeded_and_jittered():
    s = parse("two red circles above a blue square")
    a, b = render(s, np.random.default_rng(1)), render(s, np.random.default_rng(1))
    c = render(s, np.random.default_rng(2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def _swap_colour(g: Group, avoid: set[str]) -> Group:
    return dataclasses.replace(g, colour=next(c for c in COLOURS if c not in avoid))


def _swap_shape(g: Group) -> Group:
    return dataclasses.replace(g, shape=next(s for s in SHAPES if s != g.shape))


def _swap_count(g: Group) -> Group:
    return dataclasses.replace(g, count=1 if g.count > 1 else 2)


OPPOSITE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


@pytest.mark.parametrize("seed", range(6))
def test_contradicting_any_clause_type_scores_strictly_less(seed):
    rng = np.random.default_rng(seed)
    scene = Scene((Group(2, "red", "circle"), Group(1, "blue", "square")), RELATIONS[seed % 4])
    image = render(scene, rng)
    g0, g1 = scene.groups
    used = {g0.colour, g1.colour}
    contradictions = {
        "colour": Scene((_swap_colour(g0, used), g1), scene.relation),
        "shape": Scene((g0, _swap_shape(g1)), scene.relation),
        "count": Scene((_swap_count(g0), g1), scene.relation),
        "position": Scene((g0, g1), OPPOSITE[scene.relation]),
    }
    assert judge(image, prompt(scene)) == 1.0
    for kind, wrong in contradictions.items():
        assert judge(image, prompt(wrong)) < 1.0, kind
    # one clause out of eight for the relation alone
    assert judge(image, prompt(contradictions["position"])) == pytest.approx(7 / 8)


@pytest.mark.parametrize("text", ["three green triangles", "a yellow circle", "two blue squares"])
def test_single_group_clauses(text):
    scene = parse(text)
    image = render(scene, np.random.default_rng(3))
    g = scene.groups[0]
    assert judge(image, text) == 1.0
    # nothing of that colour: only "no extra objects" can hold, when the count matches
    assert judge(image, prompt(Scene((_swap_colour(g, {g.colour}),)))) == pytest.approx(1 / 4)
    assert judge(image, prompt(Scene((_swap_shape(g),)))) == pytest.approx(2 / 4)  # colour, object count
    assert judge(image, prompt(Scene((_swap_count(g),)))) == pytest.approx(2 / 4)  # colour, shape


def test_judge_survives_blur_and_noise_and_rejects_blank_images():
    from scipy import ndimage

    rng = np.random.default_rng(4)
    scenes = [s for s in all_scenes()][::7][:150]
    images = np.stack([render(s, rng) for s in scenes]).astype(np.float32)
    blurred = ndimage.gaussian_filter(images, sigma=(0, 0.6, 0.6, 0)) + rng.normal(0, 12, images.shape)
    blurred = np.clip(blurred, 0, 255).astype(np.uint8)
    prompts = [prompt(s) for s in scenes]
    assert JUDGE.score(blurred, prompts).scores.mean() > 0.9
    blank = np.full((len(scenes), 32, 32, 3), 30, np.uint8)
    assert JUDGE.score(blank, prompts).scores.max() == 0.0
    assert detect(blank[0]) == []


def test_extra_metrics():
    image = render(parse("two red circles above a blue square"), np.random.default_rng(5))
    count = REGISTRY["shapes_count"]()
    exact = REGISTRY["shapes_exact"]()
    assert count.score(image[None], ["two red circles above a blue square"]).scores[0] == 1.0
    assert count.score(image[None], ["three red circles above a blue square"]).scores[0] == 0.5
    assert exact.score(image[None], ["two red circles below a blue square"]).scores[0] == 0.0
    with pytest.raises(ValueError, match="uint8"):
        exact.score(image[None].astype(np.float32), ["a red circle"])


def test_clean_term_is_one_on_renders_and_falls_with_noise_and_muddy_colours():
    clean = build_reward({"name": "shapes_clean"})
    rng = np.random.default_rng(6)
    scenes = all_scenes()[::97]
    images = np.stack([render(s, rng) for s in scenes])
    prompts = [prompt(s) for s in scenes]
    # anti-aliased edges are blends of a colour with the background: clean
    assert clean.score(images, prompts).scores.min() > 0.999
    # one off-palette grey pixel at distance d from every background->colour segment costs 1 - exp(-(d/30)^2)
    grey = np.full((1, 32, 32, 3), world.BACKGROUND, np.uint8)
    grey[0, 0, 0] = (128, 128, 128)
    d = min(
        np.linalg.norm(np.float32([128] * 3) - world.BACKGROUND - t * c)
        for c in (np.float32(v) - world.BACKGROUND for v in world.PALETTE.values())
        for t in np.linspace(0, 1, 20001)
    )
    expected = 1 - (1 - np.exp(-((d / world.CLEAN_SCALE) ** 2))) / 1024
    assert clean.score(grey, ["a red circle"]).scores[0] == pytest.approx(expected, abs=1e-5)
    noisy = np.clip(images.astype(np.float32) + rng.normal(0, 30, images.shape), 0, 255).astype(np.uint8)
    assert clean.score(noisy, prompts).scores.max() < 0.8


def test_soft_judge_follows_the_judge_and_moves_continuously():
    soft = build_reward({"name": "shapes_judge_soft"})
    text = "a red square left of a blue circle"
    image = render(parse(text), np.random.default_rng(7))
    right = soft.score(image[None], [text]).scores[0]
    wrong = soft.score(
        np.stack([image] * 3),
        [text.replace("left of", "right of"), text.replace("square", "triangle"), text.replace("a red", "two red")],
    ).scores
    assert right > 0.8 and np.all(wrong < right)
    # the relation clause is a logistic of the centroid gap: shifting the red square right lowers it smoothly
    scene = Scene((Group(1, "red", "square"), Group(1, "blue", "circle")), "left of")
    canvas = np.full((32, 32, 3), world.BACKGROUND, np.uint8)
    canvas[20:28, 20:28] = world.PALETTE["blue"]
    values = []
    for x in (14, 17, 18, 21):  # centroid gaps 6, 3, 2 and -1 px around the 1.5 px margin
        img = canvas.copy()
        img[4:12, x : x + 8] = world.PALETTE["red"]
        found = detect(img)
        gap = [d.cx for d in found if d.colour == "blue"][0] - [d.cx for d in found if d.colour == "red"][0]
        values.append(world.soft_clauses(scene, found)["relation"])
        assert values[-1] == pytest.approx(1 / (1 + np.exp(-(gap - world.MARGIN) / world.SOFT_POS)))
    assert values[0] > 0.9 > values[1] > values[2] > 0.5 > values[3] > 0
