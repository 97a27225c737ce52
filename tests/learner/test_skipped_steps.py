"""Non-finite gradients skip the update and are counted (``learner/skipped_steps``, restored by checkpoints), as
the reference's GradScaler skips them, instead of ending the run; fp16's loss scaling leaves the update unchanged."""

import numpy as np
import pytest
import torch

from actors.sampler import Sampler
from cluster.config import Batching, load_config, to_dict
from learner.learner import Learner
from models.adapter import SD3Adapter

PROMPTS = ["a red circle", "a blue square"]


def cfg_():
    # 2 pairs x 2 branches x 2 steps = 8 rows in one update; a LoRA, as the presets train
    return load_config(
        "tiny-cpu",
        [
            "sampling.num_steps=2",
            "train.pairs_per_epoch=2",
            "train.updates_per_epoch=1",
            "train.lr=1e-2",
            "lora.enabled=true",
            "lora.rank=4",
            "lora.alpha=8",
        ],
    )


@pytest.fixture(scope="module")
def batch():
    cfg = cfg_()
    sampler = Sampler(SD3Adapter.tiny(seed=0), cfg.sampling, cfg.lora)
    job, _ = sampler.sample(prompts=PROMPTS, prompt_ids=[0, 1], pair_ids=[0, 1], seeds=[5, 6])
    return sampler.complete(job=job, rewards=np.array([[1.0, 0.0], [0.25, 0.75]]))[0]


def learner_():
    cfg = cfg_()
    return Learner(SD3Adapter.tiny(seed=0), cfg.train, Batching.of(cfg), cfg.lora, seed=0)


def test_nan_gradient_is_skipped_counted_and_checkpointed(batch, tmp_path):
    learner = learner_()
    before = learner.weights()
    hook = learner.params[0].register_hook(lambda g: torch.full_like(g, float("nan")))  # one NaN gradient
    out = learner.train_epoch(batch)
    after = learner.weights()
    assert out["learner/skipped_steps"] == 1 and learner.skipped_steps == 1 and learner.version == 1
    assert all(torch.equal(after.tensors[n], before.tensors[n]) for n in before.tensors)
    hook.remove()
    out = learner.train_epoch(batch)  # the run goes on and trains
    assert out["learner/skipped_steps"] == 1 and learner.version == 2 and learner.weights().checksum != before.checksum
    folder = learner.save(str(tmp_path), state={"epoch": 2}, config=to_dict(cfg_()))
    restored = learner_()
    assert restored.load(folder) == {"epoch": 2} and restored.skipped_steps == 1 and restored.version == 2


def test_loss_scaling_is_exact_and_a_nan_halves_the_scale(batch):
    """The fp16 path's GradScaler (enabled on CPU here: CUDA is not needed for its arithmetic): the loss times 2^12,
    the gradients divided by 2^12 again, both exact in binary, so the update is bit for bit the unscaled one; a
    non-finite gradient skips the update and halves the scale, as the reference's scaler does."""
    plain, scaled = learner_(), learner_()
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    plain.train_epoch(batch)
    out = scaled.train_epoch(batch)
    assert plain.weights().checksum == scaled.weights().checksum and out["learner/skipped_steps"] == 0
    before = scaled.weights().checksum
    hook = scaled.params[0].register_hook(lambda g: torch.full_like(g, float("inf")))
    out = scaled.train_epoch(batch)
    hook.remove()
    assert out["learner/skipped_steps"] == 1 and scaled.weights().checksum == before
    assert scaled.scaler.get_scale() == 2.0**11
