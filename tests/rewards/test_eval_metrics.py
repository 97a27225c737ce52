"""The paper-evaluation metrics on hand-made inputs: DreamSim diversity in closed form, CLIP / HPSv2 scores as
exp(logit_scale) * cos, PickScore in float32 unless told otherwise."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.base import build_reward
from rewards.clip import ClipLogitScore, HPSv2, PickScore
from rewards.dreamsim import DreamSim, mean_pairwise_sq_l2
from tests.fixtures.tiny_eval import SIZE, tiny_dreamsim
from tests.fixtures.tiny_rewards import tiny_clip
from tests.rewards.test_clip import by_hand_embeddings

IMGS = np.random.default_rng(1).integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
PROMPTS = ["a cat", "a red car on a street", "two dogs", "hello world", "a photo of a cat", "two red dogs"]


def test_mean_pairwise_squared_l2_closed_form():
    emb = np.array(
        [
            [[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]],  # pairs: 25, 0, 25 -> 50 / 3
            [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
        ]
    )  # pairs: 2, 1, 1 -> 4 / 3
    np.testing.assert_array_equal(mean_pairwise_sq_l2(emb), np.array([50.0, 4.0]) / 3)
    assert mean_pairwise_sq_l2(np.ones((4, 2, 7))).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match=r"images per prompt >= 2, dim\]; got shape \(3, 1, 2\)"):
        mean_pairwise_sq_l2(np.zeros((3, 1, 2)))


def test_dreamsim_diversity_is_zero_for_identical_images_and_the_formula_otherwise():
    ds = tiny_dreamsim(seed=0)
    same = np.repeat(IMGS[:2], 3, axis=0)  # 2 prompts x 3 identical images
    assert ds.diversity(same, images_per_prompt=3).tolist() == [0.0, 0.0]
    # by hand: bicubic to 8x8, [0, 1], flatten, times the embedder's matrix; then the pairwise mean per prompt
    x = np.stack(
        [
            np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.BICUBIC), np.float64)
            .transpose(2, 0, 1)
            .reshape(-1)
            / 255.0
            for im in IMGS
        ]
    )
    e = x @ ds.model.w.weight.detach().double().numpy().T  # [6, 5]
    expected = [
        np.mean([((e[3 * p + i] - e[3 * p + j]) ** 2).sum() for i in range(3) for j in range(i + 1, 3)])
        for p in range(2)
    ]
    np.testing.assert_allclose(ds.diversity(IMGS, images_per_prompt=3), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="whole groups of >= 2 images per prompt; got 6 images in groups of 4"):
        ds.diversity(IMGS, images_per_prompt=4)


def test_dreamsim_without_its_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dreamsim", None)  # `import dreamsim` raises ImportError
    with pytest.raises(ImportError, match=r"pip install dreamsim==0\.2\.1 .*~/\.cache/fdfo/dreamsim"):
        DreamSim(device="cpu")


def test_clip_and_hpsv2_scores_are_exp_logit_scale_times_cos():
    model, processor = tiny_clip(seed=4)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))  # a known temperature: exp(scale) = 50
    img, txt = by_hand_embeddings(model, processor, IMGS, PROMPTS)
    cos = (img * txt).sum(1)
    assert np.ptp(cos) > 0.05  # distinct values: a scale cannot pass as an offset
    clip = ClipLogitScore(model=model, processor=processor, device="cpu")
    np.testing.assert_allclose(clip.score(IMGS, PROMPTS).scores, 50.0 * cos, atol=1e-4)
    hps = HPSv2(model=model, processor=processor, device="cpu", dtype="float32")
    np.testing.assert_allclose(hps.score(IMGS, PROMPTS).scores, cos, atol=2e-6)  # the training reward: cos
    hps = HPSv2(model=model, processor=processor, device="cpu", dtype="float32", logit_scale=True)
    np.testing.assert_allclose(hps.score(IMGS, PROMPTS).scores, 50.0 * cos, atol=1e-4)  # the paper's evaluation
    by_name = build_reward({"name": "clip_logit", "model": model, "processor": processor, "device": "cpu"})
    np.testing.assert_array_equal(by_name.score(IMGS, PROMPTS).scores, clip.score(IMGS, PROMPTS).scores)


def test_pickscore_and_clip_logit_default_to_float32():
    model, processor = tiny_clip(seed=0)
    assert PickScore(model=model.half(), processor=processor, device="cpu").clip.model.dtype == torch.float32
    assert ClipLogitScore(model=model.half(), processor=processor, device="cpu").clip.model.dtype == torch.float32
    assert PickScore(model=model, processor=processor, device="cpu", dtype="float16").clip.model.dtype == torch.float16
