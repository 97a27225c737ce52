"""The real SD3 code path at tiny size: pair -> Arrow batch -> learner step -> weights swapped into the sampler."""

import numpy as np
import pytest
import torch

from actors.sampler import Sampler
from cluster.config import Batching, load_config, with_overrides
from learner.batch import from_arrow
from learner.learner import Learner
from learner.weights import Weights
from models.adapter import SD3Adapter
from rewards import build_reward

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(
        "tiny-cpu",
        [
            "lora.enabled=true",
            "lora.rank=4",
            "lora.alpha=8",
            "train.lr=1e-2",
            "train.pairs_per_epoch=2",
            "train.updates_per_epoch=1",
        ],
    )


def test_adapter_contract_shapes_and_guidance():
    model = SD3Adapter.tiny()
    assert model.latent_shape == (16, 16, 16)
    cond = model.encode_prompts(PROMPTS)
    assert cond.tokens.shape == (2, 64, 64) and cond.pooled.shape == (2, 64)  # 32 CLIP + 32 T5 tokens, T5 width
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    v1 = model.velocity(x, torch.tensor(0.7), cond, guidance_scale=1.0)
    v_neg = model.velocity(x, torch.tensor(0.7), model.encode_prompts(["", ""]), guidance_scale=1.0)
    v3 = model.velocity(x, torch.tensor(0.7), cond, guidance_scale=3.0)
    assert torch.allclose(v3, v_neg + 3.0 * (v1 - v_neg), atol=1e-5)  # CFG with the empty prompt
    sig = model.sigmas(10)
    assert sig.shape == (11,) and sig[0] == 1.0 and sig[-1] == 0.0 and torch.all(sig[:-1] > sig[1:])
    img = model.decode(x)
    assert img.shape == (2, 3, 32, 32) and img.min() >= 0 and img.max() <= 1


def test_pair_batch_step_and_weight_swap(cfg):
    sampler = Sampler(SD3Adapter.tiny(), cfg.sampling, cfg.lora)
    learner = Learner(SD3Adapter.tiny(), cfg.train, Batching.of(cfg), cfg.lora, seed=0)
    proof = sampler.set_weights(learner.weights())
    assert proof["version"] == 0 and proof["checksum"] == learner.weights().checksum
    job, images = sampler.sample(prompts=PROMPTS, prompt_ids=[0, 1], pair_ids=[0, 1], seeds=[5, 6])
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[0], images[1])  # the two branches differ
    out = build_reward({"name": "jpeg_compressibility"}).score(images, [p for p in PROMPTS for _ in range(2)])
    batch, report = sampler.complete(job=job, rewards=out)
    assert report["dropped"] == [] and batch.num_rows == 4 and report["sample_s"] > 0 and report["pack_s"] > 0
    tb = from_arrow(batch)
    assert tb.x.shape == (4, cfg.sampling.num_steps, 16, 16, 16)
    before = learner.weights()
    metrics = learner.train_epoch(batch)
    after = learner.weights()
    assert metrics["updates"] == 1 and after.version == 1 and after.checksum != before.checksum
    changed = [n for n in after.tensors if not torch.equal(after.tensors[n], before.tensors[n])]
    assert changed and all("lora_" in n for n in changed)
    proof = sampler.set_weights(after)
    assert proof == {"version": 1, "checksum": after.checksum, "sampler": 0}


def test_a_learner_actor_packs_a_snapshot_into_the_last_ones_buffer_once_it_is_gone(cfg):
    # reuse_snapshots (the runtime's learner actor): no new buffer per version, but never under a live snapshot
    learner = Learner(SD3Adapter.tiny(), cfg.train, Batching.of(cfg), cfg.lora, seed=0, reuse_snapshots=True)
    first = learner.weights()
    second = learner.weights()  # first is still held: a buffer of its own
    assert second.packed.data_ptr() != first.packed.data_ptr()
    address = second.packed.data_ptr()
    del first, second
    third = learner.weights()
    assert third.packed.data_ptr() == address
    third.verify()  # the reused bytes are this version's


def test_timestep_fraction_trains_on_a_random_share_of_the_rows(cfg):
    sampler = Sampler(SD3Adapter.tiny(), cfg.sampling, cfg.lora)
    job, images = sampler.sample(prompts=PROMPTS, prompt_ids=[0, 1], pair_ids=[0, 1], seeds=[5, 6])
    batch, _ = sampler.complete(job=job, rewards=np.array([[1.0, 0.0], [0.5, 0.25]]))
    rows = 4 * cfg.sampling.num_steps  # 2 pairs x 2 branches x N steps
    for fraction, expected in ((1.0, rows), (0.25, rows // 4), (1e-6, 1)):
        batching = Batching.of(with_overrides(cfg, [f"train.timestep_fraction={fraction}"]))
        learner = Learner(SD3Adapter.tiny(), cfg.train, batching, cfg.lora, seed=0)
        assert learner.train_epoch(batch)["learner/rows"] == expected


def test_non_finite_rewards_drop_only_their_pairs(cfg):
    sampler = Sampler(SD3Adapter.tiny(), cfg.sampling, cfg.lora)
    job, _ = sampler.sample(prompts=PROMPTS, prompt_ids=[0, 1], pair_ids=[10, 11], seeds=[1, 2])
    batch, report = sampler.complete(job=job, rewards=np.array([[1.0, np.nan], [0.5, 0.25]]))
    assert report["dropped"] == [10] and batch.num_rows == 2 and from_arrow(batch).pair_id.tolist() == [11, 11]


def test_corrupted_weights_are_refused(cfg):
    learner = Learner(SD3Adapter.tiny(), cfg.train, Batching.of(cfg), cfg.lora)
    w = learner.weights()
    name = next(iter(w.tensors))
    bad = Weights(w.version, {**w.tensors, name: w.tensors[name] + 1.0}, w.checksum)
    sampler = Sampler(SD3Adapter.tiny(), cfg.sampling, cfg.lora)
    with pytest.raises(RuntimeError, match="failed its checksum"):
        sampler.set_weights(bad)
    assert sampler.version == 0
