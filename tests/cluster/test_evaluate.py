"""Evaluation helpers, `fdfo eval` / `fdfo generate` on a checkpoint of a short local run, and the curve plot."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from cluster.cli import main
from cluster.config import load_config
from cluster.driver import run_local
from cluster.evaluate import best_of_seeds, diversity, eval_set, load_policy, save_grid
from models.euler import generate_images


def jpeg_bytes(image: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_diversity_is_mean_pairwise_rms_distance():
    a = np.zeros((2, 2, 3), np.uint8)
    b = np.full((2, 2, 3), 255, np.uint8)
    c = np.zeros((2, 2, 3), np.uint8)
    c[0] = 255  # half the pixels differ from a
    # pairs: (a,b) rms 1, (a,c) rms sqrt(0.5), (b,c) rms sqrt(0.5)
    assert diversity(np.stack([a, b, c])) == np.float64((1 + 2 * np.sqrt(0.5)) / 3)
    assert diversity(np.stack([a, a])) == 0.0


def test_best_of_seeds_takes_each_prompts_best_seed():
    # two prompts x three seeds, a prompt's seeds adjacent: best 0.5 and 1.0 -> 0.75 (the mean is 0.4)
    assert best_of_seeds(np.array([0.0, 0.5, 0.25, 1.0, 0.0, 0.65]), 3) == 0.75
    assert best_of_seeds(np.array([0.2, np.nan, 0.4, 0.6]), 2) == 0.4  # an unscored image does not count
    assert best_of_seeds(np.array([0.3, 0.7]), 1) == 0.5  # one seed: the mean


def test_grid_layout(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (5, 4, 6, 3), dtype=np.uint8)
    save_grid(imgs, cols=2, path=tmp_path / "g.png", scale=1)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (3 * 6, 2 * 8, 3)  # 3 rows of (4 + 2) px, 2 columns of (6 + 2) px
    assert np.array_equal(grid[1:5, 9:15], imgs[1])


def test_eval_set_is_fixed_and_paired():
    cfg = load_config("tiny-cpu", ["eval.num_prompts=3", "eval.seeds_per_prompt=2"])
    a, b = eval_set(cfg), eval_set(cfg)
    assert a == b and len(a[0]) == 3 and len(a[1]) == 6 and len(set(a[2])) == 6


def test_checkpoint_loads_for_eval_and_generate(tmp_path, capsys):
    logging.disable(logging.INFO)
    cfg = load_config(
        "tiny-cpu",
        [
            "runtime.local=true",
            "train.epochs=2",
            "lora.enabled=true",
            "lora.rank=4",
            "lora.alpha=8",
            "train.lr=1e-2",
            "train.lr_schedule=linear",
            "train.lr_final=1e-3",
            f"output_dir={tmp_path}",
            "eval.num_prompts=4",
            "eval.seeds_per_prompt=2",
            "eval.every_epochs=1",
        ],
    )
    out = run_local(cfg)
    assert out["paths"]["learning_curve"].endswith("learning_curve.png")
    assert all("eval/reward/mean" in h for h in out["history"])
    assert np.isfinite(out["final"]["heldout_reward_gain"])
    # 2 epochs x 2 updates, linear 1e-2 -> 1e-3: each epoch logs the lr of its last update (versions 1 and 3)
    assert np.allclose([h["learner/lr"] for h in out["history"]], [1e-3 + 9e-3 * 2 / 3, 1e-3])
    model, loaded_cfg, _ = load_policy(tmp_path / "tiny-cpu")
    assert loaded_cfg == cfg
    # the loaded policy samples exactly what the trained sampler samples
    prompts, seeds = ["a red circle", "a black cat"], [3, 4]
    assert np.array_equal(generate_images(model, prompts, seeds, 8), out["sampler"].generate(prompts, seeds, 8))
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(tmp_path / "tiny-cpu"),
                "--prompt",
                "a red circle",
                "--seed",
                "0",
                "1",
                "--out",
                str(tmp_path / "gen"),
            ]
        )
        == 0
    )
    pngs = sorted((tmp_path / "gen").glob("*.png"))
    # `fdfo generate` writes exactly what the trained sampler draws for those seeds (eval steps = sampling steps)
    expected = out["sampler"].generate(["a red circle"] * 2, [0, 1], cfg.sampling.num_steps)
    assert np.array_equal(np.stack([np.asarray(Image.open(p)) for p in pngs]), expected)
    assert main(["eval", "--checkpoint", str(tmp_path / "tiny-cpu"), "--num-prompts", "3", "--seeds", "2"]) == 0
    ev = json.loads(next((tmp_path / "tiny-cpu").glob("eval_v*.json")).read_text())
    assert ev["num_prompts"] == 3 and ev["seeds_per_prompt"] == 2
    # every number recomputed here from the sampler's own images of the fixed evaluation set
    chosen, prompts, seeds = eval_set(cfg, 3, 2)
    images = out["sampler"].generate(prompts, seeds, cfg.sampling.num_steps)
    kb = np.array([len(jpeg_bytes(im)) / 1000 for im in images])  # the JPEG reward: -(kB at quality 95)
    assert ev["reward/mean"] == pytest.approx(-kb.mean())
    assert ev["reward/jpeg_compressibility/best_of_seeds"] == pytest.approx(np.mean(-kb.reshape(3, 2).min(1)))
    pixels = images.reshape(3, 2, -1).astype(np.float64) / 255
    assert ev["diversity/pixel_rms"] == pytest.approx(np.mean(np.sqrt(((pixels[:, 0] - pixels[:, 1]) ** 2).mean(1))))
    # overrides apply to the checkpoint's config, except the ones that describe its weights
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(tmp_path / "tiny-cpu"),
                "--num-prompts",
                "2",
                "--seeds",
                "2",
                "--out",
                str(tmp_path / "ev3"),
                "eval.num_steps=3",
            ]
        )
        == 0
    )
    assert json.loads(next((tmp_path / "ev3").glob("eval_v*.json")).read_text())["num_steps"] == 3
    with pytest.raises(ValueError, match="override 'lora.rank=8'.*cannot change"):
        main(["eval", "--checkpoint", str(tmp_path / "tiny-cpu"), "lora.rank=8"])
