"""`fdfo eval --suite`: the reference's prompt shuffle and seeds, the suite end to end on the tiny SD3 with tiny
scorers (JSON + Markdown checked against numbers recomputed here), the Ray pool's images equal to in-process ones,
and the errors a bad setup gets before anything loads."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from cluster.build import build_model
from cluster.cli import main
from cluster.config import load_config
from cluster.eval_images import LocalImages, RayImages
from cluster.eval_prompts import plan
from cluster.eval_scorers import VLM_QUESTIONS
from cluster.eval_suite import run_suite
from models.euler import generate_images
from tests.fixtures.tiny_eval import tiny_suite_scorers


def prompt_files(tmp_path, n_pick: int = 100, n_hpd: int = 9) -> list[str]:
    (tmp_path / "pick.txt").write_text("\n".join(f"pick prompt {i}" for i in range(n_pick)) + "\n")
    (tmp_path / "hpd.json").write_text(json.dumps([f"a cat number {i}" for i in range(n_hpd)]))
    return [f"eval.suite_prompts={{pickscore_train: {tmp_path / 'pick.txt'}, hpdv2: {tmp_path / 'hpd.json'}}}"]


def test_prompts_are_shuffled_like_the_reference_and_seeds_pair_images(tmp_path):
    cfg = load_config("tiny-cpu", prompt_files(tmp_path))
    quick, paper = plan(cfg, "quick"), plan(cfg, "paper")
    expected = [f"pick prompt {i}" for i in range(100)]
    np.random.RandomState(0).shuffle(expected)  # the reference: RandomState(prompt_seed=0).shuffle
    assert paper[0].chosen == expected and quick[0].chosen == expected[:64]  # quick: the first 64 of paper's
    assert quick[0].seeds == list(range(64))  # image r of prompt i: seed i * R + r
    hpd = paper[1]
    assert len(hpd.chosen) == 9 and hpd.seeds == list(range(36))
    assert hpd.prompts[:8] == [hpd.chosen[0]] * 4 + [hpd.chosen[1]] * 4
    # HPDv2 as downloaded: a folder of benchmark/<category>.json, concatenated in category order
    for k, cat in enumerate(("anime", "concept-art", "paintings", "photo")):
        (tmp_path / "hpdv2" / "benchmark").mkdir(parents=True, exist_ok=True)
        (tmp_path / "hpdv2" / "benchmark" / f"{cat}.json").write_text(json.dumps([f"{cat} {i}" for i in range(2)]))
    folder = plan(
        load_config("tiny-cpu", prompt_files(tmp_path) + [f"eval.suite_prompts.hpdv2={tmp_path / 'hpdv2'}"]), "quick"
    )[1]
    everything = [f"{c} {i}" for c in ("anime", "concept-art", "paintings", "photo") for i in range(2)]
    np.random.RandomState(0).shuffle(everything)
    assert folder.chosen == everything


def test_suite_end_to_end_in_process_writes_the_table(tmp_path):
    cfg = load_config("tiny-cpu", prompt_files(tmp_path) + ["eval.num_steps=2"])
    scorers, model = tiny_suite_scorers(seed=0), build_model(cfg.model)
    out = run_suite(
        cfg,
        "quick",
        tmp_path / "out",
        tag="eval_quick_base",
        model=model,
        scorers=scorers,
        local=True,
        num_prompts=3,
        progress=False,
    )
    pick, hpd = out["prompt_sets"]["pickscore_train"], out["prompt_sets"]["hpdv2"]
    assert [k for k in pick if not k.startswith("_")] == ["pickscore", "vlm_alignment"]
    assert [k for k in hpd if not k.startswith("_")] == [
        "hpsv2",
        "clip_h14",
        "clip_l14",
        "dreamsim_diversity",
        "vlm_quality",
        "vlm_photo",
    ]
    assert hpd["_config"] | {"prompts_source": None} == {
        "checkpoint": None,
        "prompt_set": "hpdv2",
        "prompts_source": None,
        "num_prompts": 3,
        "num_repeats": 4,
        "prompt_seed": 0,
        "image_seed": 0,
        "num_inference_steps": 2,
        "guidance_scale": 1.0,
        "model": "sd3_tiny",
    }
    # every number recomputed from the same images: the model's Euler samples of the plan's prompts and seeds
    parts = plan(cfg, "quick", 3)
    images = [generate_images(model, p.prompts, p.seeds, 2) for p in parts]
    assert pick["pickscore"] == pytest.approx(scorers["pickscore"].score(images[0], parts[0].prompts).scores.mean())
    assert hpd["clip_l14"] == pytest.approx(scorers["clip_l14"].score(images[1], parts[1].prompts).scores.mean())
    assert hpd["dreamsim_diversity"] == pytest.approx(scorers["dreamsim"].diversity(images[1], 4).mean())
    # the judge is asked each metric's own question (the stand-in scores a question by its length)
    assert hpd["vlm_quality"] == len(VLM_QUESTIONS["vlm_quality"])
    assert pick["vlm_alignment"] == np.mean(
        [len(VLM_QUESTIONS["vlm_alignment"].format(prompt=p)) for p in parts[0].prompts]
    )
    saved = json.loads((tmp_path / "out" / "eval_quick_base.json").read_text())
    assert saved["prompt_sets"]["hpdv2"]["hpsv2"] == hpd["hpsv2"] and saved["suite"] == "quick"
    per_image = json.loads((tmp_path / "out" / "eval_quick_base_scores.json").read_text())
    assert per_image["hpdv2"]["seeds"] == list(range(12)) and len(per_image["hpdv2"]["dreamsim_diversity"]) == 3
    table = (tmp_path / "out" / "eval_quick_base.md").read_text().splitlines()
    assert table[2] == "| prompt set | prompts x images | metric | value | paper: FDFO combined, no CFG, epoch 100 |"
    rows = [line.split(" | ") for line in table[4:12]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("| pickscore_train", "3 x 1", m) for m in ("pickscore", "vlm_alignment")
    ] + [
        ("| hpdv2", "3 x 4", m)
        for m in ("clip_h14", "clip_l14", "dreamsim_diversity", "hpsv2", "vlm_photo", "vlm_quality")
    ]
    assert rows[0][3] == f"{pick['pickscore']:.4f}" and rows[0][4] == "22.4704 |"
    assert (tmp_path / "out" / "eval_quick_base_hpdv2_grid.png").is_file()


def test_ray_pool_images_equal_in_process_images_with_checkpoint_weights(tmp_path, ray_local):
    from learner.weights import Weights
    from models.lora import make_trainable

    cfg = load_config("tiny-cpu", prompt_files(tmp_path, n_pick=20) + ["eval.num_steps=2", "runtime.sampler.count=2"])
    model = build_model(cfg.model)
    make_trainable(model.transformer, cfg.lora)
    with torch.no_grad():  # a "trained" policy: weights the base does not have
        for p in model.transformer.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    weights = Weights.of(model.transformer, version=7)
    part = plan(cfg, "paper")[0]  # 20 prompts x 1 image: chunks of 16 and 4
    pool = RayImages(cfg, weights)
    try:
        remote = dict(pool.chunks(part, 2))
    finally:
        pool.close()
    assert sorted(remote) == [(0, 16), (16, 20)]
    local = dict(LocalImages(model, cfg).chunks(part, 2))
    for span in local:
        np.testing.assert_array_equal(remote[span], local[span])


def test_a_bad_setup_fails_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no prompts/ folder here
    expected = (
        "prompt set 'pickscore_train': no file at 'prompts/pickscore_train.txt'. Get it with: mkdir -p prompts "
        "&& curl -o prompts/pickscore_train.txt https://raw.githubusercontent.com/yifan123/flow_grpo/main/"
        "dataset/pickscore/train.txt; or set eval.suite_prompts.pickscore_train=<your file> (one prompt per "
        "line, or a JSON list)"
    )
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(expected)}$"):
        main(["eval", "--suite", "quick", "--config", "tiny-cpu", "--local"])
    files = prompt_files(tmp_path)
    with pytest.raises(ValueError, match="eval.suite_scorers: unknown scorer 'clip_b32'; scorers: pickscore, hpsv2"):
        main(["eval", "--suite", "quick", "--config", "tiny-cpu", *files, "eval.suite_scorers={clip_b32: {}}"])
    with pytest.raises(ValueError, match="eval.suite_scorers.vlm: the questions belong to the metrics"):
        main(["eval", "--suite", "quick", "--config", "tiny-cpu", *files, "eval.suite_scorers={vlm: {question: x}}"])
    monkeypatch.setitem(__import__("sys").modules, "dreamsim", None)  # as if the package were not installed
    with pytest.raises(
        ImportError, match=r"^DreamSim diversity needs the dreamsim package: pip install dreamsim==0\.2\.1"
    ):
        main(["eval", "--suite", "quick", "--config", "tiny-cpu", *files])
    with pytest.raises(ValueError, match="--seeds does not apply"):
        main(["eval", "--suite", "quick", "--config", "tiny-cpu", "--seeds", "2"])


def test_auto_samplers_go_to_the_ray_pool_from_the_command(tmp_path, monkeypatch):
    """`fdfo eval --suite quick --config tiny-cpu runtime.sampler.count=auto`: auto is not a count to compare with 1
    (it was: TypeError '<=' between str and int); it means sampler actors, as many as fit, so the suite runs off-process."""
    import cluster.eval_suite as eval_suite

    monkeypatch.chdir(tmp_path)  # no prompts/ folder: the command reaches the plan
    with pytest.raises(FileNotFoundError, match="^prompt set 'pickscore_train': no file at"):
        main(["eval", "--suite", "quick", "--config", "tiny-cpu", "runtime.sampler.count=auto"])
    calls = []
    monkeypatch.setattr(eval_suite, "run_suite", lambda cfg, suite, out, **kw: calls.append((cfg, kw)) or {})
    for samplers, local in (("auto", False), ("1", True), ("0", True), ("2", False)):
        main(["eval", "--suite", "quick", "--config", "tiny-cpu", f"runtime.sampler.count={samplers}"])
        cfg, kw = calls.pop()
        assert (str(cfg.runtime.sampler.count), kw["local"], kw["weights"]) == (samplers, local, None)
