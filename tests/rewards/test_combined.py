"""CombinedReward and presets: hand-computed weighted sums, raw components kept, failures confined."""

from __future__ import annotations

import numpy as np
import pytest

from rewards import build_reward
from rewards.base import RewardOutput
from rewards.combined import PRESETS, CombinedReward, build_preset


class Const:
    def __init__(self, values, name="const"):
        self.values, self.name = np.asarray(values, float), name

    def score(self, images, prompts):
        return RewardOutput(scores=self.values.copy(), info={"extra": 1})


class Raises:
    name = "raises"

    def score(self, images, prompts):
        raise RuntimeError("GPU fell off")


IMGS = np.zeros((3, 4, 4, 3), np.uint8)
PROMPTS = ["a", "b", "c"]


def test_weighted_sum_equals_hand_computation_and_keeps_components():
    r = CombinedReward(
        specs=[
            {"reward": Const([20.0, 21.0, 22.5]), "weight": 1.0, "key": "pickscore"},
            {"reward": Const([80.0, 10.0, 50.0]), "weight": 0.1, "key": "vlm_judge"},
        ]
    )
    out = r.score(IMGS, PROMPTS)
    np.testing.assert_allclose(out.scores, [20.0 + 8.0, 21.0 + 1.0, 22.5 + 5.0])
    np.testing.assert_array_equal(out.info["components"]["pickscore"], [20.0, 21.0, 22.5])
    np.testing.assert_array_equal(out.info["components"]["vlm_judge"], [80.0, 10.0, 50.0])
    assert out.info["weights"] == {"pickscore": 1.0, "vlm_judge": 0.1}
    assert out.info["reasons"] == [None] * 3 and out.info["errors"] == {}


def test_nan_component_drops_only_its_samples_with_reason():
    r = CombinedReward(
        specs=[
            {"reward": Const([1.0, np.nan, np.inf]), "weight": 2.0, "key": "a"},
            {"reward": Const([1.0, 1.0, 1.0]), "weight": 1.0, "key": "b"},
        ]
    )
    out = r.score(IMGS, PROMPTS)
    assert out.scores[0] == 3.0 and np.isnan(out.scores[1:]).all()
    assert out.info["reasons"][0] is None
    assert out.info["reasons"][1] == "reward/a: non-finite score nan"
    assert out.info["reasons"][2] == "reward/a: non-finite score inf"
    assert np.isnan(out.info["components"]["a"][2])  # inf is reported as NaN


def test_raising_component_makes_the_call_nan_with_the_error_text():
    r = CombinedReward(
        specs=[{"reward": Raises(), "weight": 0.1}, {"reward": Const([5.0, 6.0, 7.0]), "weight": 1.0, "key": "ok"}]
    )
    out = r.score(IMGS, PROMPTS)
    assert np.isnan(out.scores).all()
    assert out.info["errors"] == {"raises": "RuntimeError: GPU fell off"}
    assert out.info["reasons"] == ["reward/raises: RuntimeError: GPU fell off"] * 3
    np.testing.assert_array_equal(out.info["components"]["ok"], [5.0, 6.0, 7.0])  # still logged


def test_registered_scorers_by_name_and_weighted_sum_via_registry():
    r = build_reward(
        {
            "name": "weighted_sum",
            "specs": [
                {"name": "jpeg_compressibility", "weight": 0.5},
                {"name": "jpeg_compressibility", "weight": 2.0, "key": "jpeg_q50", "quality": 50},
            ],
        }
    )
    img = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    out = r.score(img, ["x", "y"])
    c = out.info["components"]
    np.testing.assert_allclose(out.scores, 0.5 * c["jpeg_compressibility"] + 2.0 * c["jpeg_q50"])
    assert (c["jpeg_compressibility"] < c["jpeg_q50"]).all()  # quality 95 files are larger -> lower reward


def test_presets_are_the_papers():
    assert PRESETS["pickscore"] == [{"name": "pickscore", "weight": 1.0}]
    assert PRESETS["vlm_alignment"] == [{"name": "vlm_judge", "weight": 1.0}]
    assert PRESETS["combined"] == [{"name": "pickscore", "weight": 1.0}, {"name": "vlm_judge", "weight": 0.1}]


def test_combined_preset_with_tiny_models_equals_hand_sum(tmp_path):
    from tests.fixtures.tiny_rewards import tiny_clip
    from tests.fixtures.tiny_vlm import build_tiny_vlm

    model, processor = tiny_clip(0)
    vlm = build_tiny_vlm(tmp_path / "vlm", seed=0)
    r = build_preset(
        "combined",
        overrides={
            "pickscore": {"model": model, "processor": processor, "device": "cpu", "dtype": "float32"},
            "vlm_judge": {"model": vlm, "dtype": "float32", "image_size": 64},
        },
    )
    img = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = r.score(img, ["a cat", "a dog"])
    c = out.info["components"]
    np.testing.assert_allclose(out.scores, c["pickscore"] + 0.1 * c["vlm_judge"], rtol=0, atol=1e-12)
    assert ((c["vlm_judge"] > 0) & (c["vlm_judge"] < 100)).all()


@pytest.mark.parametrize(
    "specs, match",
    [
        ([{"name": "no_such_scorer", "weight": 1.0}], "unknown reward 'no_such_scorer'; known rewards: .*pickscore"),
        ([{"name": "jpeg_compressibility"}], "has no 'weight'; add e.g. 'weight': 1.0"),
        ([{"name": "jpeg_compressibility", "weight": float("nan")}], "finite number"),
        (
            [{"name": "jpeg_compressibility", "weight": 1}, {"name": "jpeg_compressibility", "weight": 1}],
            "appears twice; give one of them a distinct 'key'",
        ),
        (
            [{"name": "vlm_judge", "weight": 1.0, "question": "Is this good?"}],
            r"must contain the placeholder \{prompt\}",
        ),
        ([{"name": "pickscore", "weight": 1.0, "model": "/nonexistent/PickScore_v1"}], "does not exist"),
        (
            [{"name": "aesthetic", "weight": 1.0, "head": "/nonexistent/head.pth", "model": "/nonexistent/clip"}],
            "does not exist",
        ),
        ([], "at least one spec"),
    ],
)
def test_bad_config_fails_at_construction_naming_the_fix(specs, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        CombinedReward(specs=specs)


def test_unknown_preset_and_stray_override():
    with pytest.raises(ValueError, match="unknown reward preset 'pick'"):
        build_preset("pick")
    with pytest.raises(ValueError, match=r"overrides for \['vlm_judge'\] do not match"):
        build_preset("pickscore", overrides={"vlm_judge": {}})


def test_preset_by_config_through_the_registry():
    with pytest.raises(ValueError, match="not both"):
        build_reward({"name": "weighted_sum", "preset": "pickscore", "specs": [{"name": "ocr", "weight": 1}]})
    # The preset's scorer is built with the override: a missing weights path fails naming the fix.
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_reward(
            {
                "name": "weighted_sum",
                "preset": "pickscore",
                "overrides": {"pickscore": {"model": "/nonexistent/PickScore_v1"}},
            }
        )
