"""The learner's model keeps off its GPU what it does not need (``build_model(model_cfg, role="learner")``): no VAE,
and the text encoders where ``model.learner_encoders`` says. Every placement encodes the samplers' bits and trains
the same update; on a CPU-only machine the placements differ only in the moves they make, which these tests count."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from actors.sampler import Sampler
from cluster.build import build_model
from cluster.config import Batching, ModelConfig, load_config
from learner.learner import Learner
from models.adapter import NO_VAE, PromptCache, text_encoders

KINDS = ["sd3_tiny", "flux_tiny", "shapes"]
MODES = ["device", "offload", "cpu"]
PROMPTS = ["a red circle", "two blue squares above a green triangle", ""]
ENCODERS = {
    "sd3_tiny": ["text_encoder", "text_encoder_2", "text_encoder_3"],
    "flux_tiny": ["text_encoder", "text_encoder_2"],
    "shapes": ["prompt_encoder"],
}


def learner_model(kind: str, mode: str = "offload"):
    return build_model(ModelConfig(kind=kind, learner_encoders=mode), role="learner")


@pytest.mark.parametrize("kind", KINDS)
def test_every_placement_encodes_the_samplers_bits(kind):
    sampler = build_model(ModelConfig(kind=kind))
    want = [sampler.encode_prompts([p]) for p in PROMPTS]
    for mode in MODES:
        model = learner_model(kind, mode)
        got = PromptCache(model)(PROMPTS)  # the learner's path: one window, then cached
        for i, (w, p) in enumerate(zip(want, PROMPTS)):
            direct = model.encode_prompts([p])
            assert torch.equal(direct.tokens, w.tokens) and torch.equal(direct.pooled, w.pooled), (mode, p)
            assert torch.equal(got.tokens[i], w.tokens[0]) and torch.equal(got.pooled[i], w.pooled[0]), (mode, p)
            assert direct.tokens.dtype == w.tokens.dtype and direct.tokens.device == model.device


@pytest.mark.parametrize("kind", KINDS)
def test_the_learner_model_has_no_vae_and_says_where_each_component_lives(kind):
    sampler = build_model(ModelConfig(kind=kind))
    assert sampler.placement() == {"transformer": "cpu", **dict.fromkeys(ENCODERS[kind], "cpu"), "vae": "cpu"}
    assert sampler.decode(torch.zeros(1, *sampler.latent_shape)).shape[1] == 3  # samplers decode as before
    model = learner_model(kind)
    assert model.placement() == {"transformer": "cpu", **dict.fromkeys(ENCODERS[kind], "cpu"), "vae": "released"}
    assert model.pipe.vae is None and model.latent_shape == sampler.latent_shape
    assert NO_VAE.startswith("the learner's model has no VAE: ")
    with pytest.raises(RuntimeError, match=f"^{re.escape(NO_VAE)}$"):
        model.decode(torch.zeros(1, *model.latent_shape))


def spy_moves(model) -> list[tuple[str, str]]:
    """(encoder, device) of every ``to`` call on the model's text encoders from now on."""
    moves = []
    for name, encoder in text_encoders(model).items():

        def to(device, _name=name, _to=encoder.to):
            moves.append((_name, str(device)))
            return _to(device)

        encoder.to = to
    return moves


@pytest.mark.parametrize("kind", KINDS)
def test_offload_moves_the_encoders_in_for_one_window_per_call_and_back_out(kind):
    model = learner_model(kind, "offload")
    moves = spy_moves(model)
    cache = PromptCache(model)
    cache(PROMPTS)  # three new prompts: one window
    names = ENCODERS[kind]
    assert moves == [(n, str(model.device)) for n in names] + [(n, "cpu") for n in names]
    assert model.encoder_moves == 1 and model.placement()[names[-1]] == "cpu"
    cache(PROMPTS[:2])  # all cached: the encoders stay out
    cache.prefetch(PROMPTS + ["a yellow square", "a blue circle"])  # an epoch's new prompts: one window
    cache(["a yellow square", "a blue circle"])
    assert model.encoder_moves == 2 and len(moves) == 4 * len(names)
    assert all(model.placement()[n] == "cpu" for n in names)


@pytest.mark.parametrize("mode", ["device", "cpu"])
def test_device_and_cpu_placements_never_move_the_encoders(mode):
    model = learner_model("sd3_tiny", mode)
    moves = spy_moves(model)
    PromptCache(model)(PROMPTS)
    assert moves == [] and model.encoder_moves == 0


def test_a_bad_placement_or_role_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"model.learner_encoders.*'gpu'"):
        load_config("tiny-cpu", ["model.learner_encoders=gpu"])
    with pytest.raises(ValueError, match=r"role must be one of \('sampler', 'learner'\), got 'trainer'"):
        build_model(ModelConfig(), role="trainer")
    with pytest.raises(ValueError, match=r"learner_encoders must be one of"):
        build_model(ModelConfig()).for_learner("gpu")


CASES = {  # preset, overrides, offload windows in the first epoch: the epoch's prompts (Learner.begin_epoch
    # prefetches them) and, under CFG, the empty prompt once a run, at the first velocity
    "sd3_tiny": ("tiny-cpu", ["sampling.guidance_scale=2.0"], 2),  # full fine-tuning with CFG
    "flux_tiny": ("tiny-flux", [], 1),  # a LoRA, FLUX-dev's embedded guidance
    "shapes": ("shapes", [], 1),
}


@pytest.mark.parametrize("kind", KINDS)
def test_a_learner_on_the_learner_model_takes_the_same_update(kind):
    preset, extra, windows = CASES[kind]
    cfg = load_config(
        preset,
        [
            "sampling.num_steps=2",
            "train.pairs_per_epoch=2",
            "train.updates_per_epoch=1",
            "sampling.pairs_per_call=2",
            "train.micro_batch_rows=3",
            *extra,
        ],
    )
    default = Learner(build_model(cfg.model), cfg.train, Batching.of(cfg), cfg.lora, seed=0)
    placed = Learner(build_model(cfg.model, role="learner"), cfg.train, Batching.of(cfg), cfg.lora, seed=0)
    assert placed.placement()["vae"] == "released" and default.placement()["vae"] == "cpu"
    sampler = Sampler(build_model(cfg.model), cfg.sampling, cfg.lora, precision=cfg.train.precision)
    sampler.set_weights(default.weights())
    job, _ = sampler.sample(
        prompts=["a red circle", "two blue squares"], prompt_ids=[0, 1], pair_ids=[0, 1], seeds=[5, 6]
    )
    batch, _ = sampler.complete(job=job, rewards=np.array([[0.0, 1.0], [2.0, 0.5]]))
    before = {k: t.clone() for k, t in default.weights().tensors.items()}
    a, b = default.train_epoch(batch), placed.train_epoch(batch)
    assert a["checksum"] == b["checksum"] and a["learner/loss"] == b["learner/loss"]
    wa, wb = default.weights(), placed.weights()
    assert wa.version == wb.version == 1 and wa.tensors.keys() == wb.tensors.keys()
    assert all(torch.equal(wa.tensors[k], wb.tensors[k]) for k in wa.tensors)
    assert any(not torch.equal(wa.tensors[k], before[k]) for k in before)  # the update moved the weights
    assert placed.model.encoder_moves == windows
