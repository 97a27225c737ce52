"""The shipped shapes base model: files, loading (ours and the plain diffusers way), sampling, headroom."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actors.shapes_model import WEIGHTS_DIR, load_shapes_adapter, load_shapes_transformer, sample_euler
from rewards import build_reward, to_uint8
from rewards.shapes import heldout_prompts, train_prompts

# Held-out judge score of the shipped checkpoint (patch 2, 4 layers) with 10 Euler steps, 128 prompts, noise
# seed 1234: measured 0.433 (other seeds 0.44-0.46; all 272 held-out prompts 0.456; pretraining's own
# evaluation 0.470). Below the 0.5-0.6 target: headroom for FDFO. The band allows for seed noise and fails for
# a model that is much better or much worse.
HELDOUT_RANGE = (0.37, 0.52)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return load_shapes_adapter("cpu")


def test_checkpoint_files_are_small_safetensors_and_json():
    files = sorted(p.name for p in WEIGHTS_DIR.iterdir())
    assert files == ["shapes_base.json", "shapes_base.safetensors", "shapes_base_scheduler.json"]
    assert (WEIGHTS_DIR / "shapes_base.safetensors").stat().st_size < 4_000_000
    config = json.loads((WEIGHTS_DIR / "shapes_base.json").read_text())
    assert config["_class_name"] == "SD3Transformer2DModel"
    assert (config["in_channels"], config["sample_size"], config["joint_attention_dim"]) == (3, 32, 384)
    assert json.loads((WEIGHTS_DIR / "shapes_base_scheduler.json").read_text())["shift"] == 1.0


def test_adapter_contract(model):
    assert model.latent_shape == (3, 32, 32)
    assert model.pipe.vae is None and model.pipe.text_encoder is None
    n = sum(p.numel() for p in model.transformer.parameters())
    assert 300_000 < n < 2_000_000
    cond = model.encode_prompts(["a red circle", "two blue squares below a green triangle"])
    assert cond.tokens.shape == (2, 16, 384) and cond.pooled.shape == (2, 384)
    assert not torch.equal(cond.tokens[0], cond.tokens[1])
    again = model.encode_prompts(["two blue squares below a green triangle"])
    assert torch.equal(again.tokens[0], cond.tokens[1])
    sig = model.sigmas(10)
    assert sig[0] == 1.0 and sig[-1] == 0.0 and len(sig) == 11


def test_loads_the_plain_diffusers_way(model):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    plain = SD3Transformer2DModel.from_config(json.loads((WEIGHTS_DIR / "shapes_base.json").read_text()))
    plain.load_state_dict(load_file(WEIGHTS_DIR / "shapes_base.safetensors"))
    ours = load_shapes_transformer()
    cond = model.encode_prompts(["a yellow square left of a red circle"])
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(hidden_states=x, encoder_hidden_states=cond.tokens, pooled_projections=cond.pooled,
              timestep=torch.tensor([700.0]), return_dict=False)
    with torch.no_grad():
        assert torch.equal(plain.eval()(**kw)[0], ours(**kw)[0])


def test_sampling_is_seeded(model):
    prompts = ["two red circles above a blue square"] * 2
    a = sample_euler(model, prompts, 10, torch.Generator().manual_seed(7))
    b = sample_euler(model, prompts, 10, torch.Generator().manual_seed(7))
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # different noise per sample
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_heldout_judge_score_leaves_headroom(model):
    """The base model draws recognisable scenes but follows held-out prompts only partly."""
    held = heldout_prompts()
    prompts = [held[i] for i in np.random.default_rng(1234).choice(len(held), 128, replace=False)]
    images = sample_euler(model, prompts, 10, torch.Generator().manual_seed(1234))
    scores = build_reward({"name": "shapes_judge"}).score(to_uint8(images), prompts).scores
    lo, hi = HELDOUT_RANGE
    assert lo <= scores.mean() <= hi, f"held-out judge {scores.mean():.3f} outside {HELDOUT_RANGE}"
    assert (scores > 0).mean() > 0.9  # almost every sample has some correct clause: objects are drawn


def test_train_prompts_score_at_least_as_well(model):
    train = train_prompts()
    prompts = [train[i] for i in np.random.default_rng(99).choice(len(train), 64, replace=False)]
    images = sample_euler(model, prompts, 10, torch.Generator().manual_seed(99))
    score = build_reward({"name": "shapes_judge"}).score(to_uint8(images), prompts).scores.mean()
    assert 0.33 <= score <= 0.58  # measured 0.43-0.47 on 128 train prompts (four seeds)
