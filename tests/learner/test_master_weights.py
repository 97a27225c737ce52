"""Full fine-tuning of a half-precision model keeps fp32 master weights: AdamW steps them, the model's bf16 weights are
rounded from them, so updates far below a bf16 ulp accumulate instead of rounding away."""

import pytest
import torch

from cluster.config import Batching, load_config
from learner.learner import Learner
from tests.helpers import GaussianFlow
from tests.learner.test_learner_internals import toy_batch


def toy(dtype, lr):
    cfg = load_config(
        "tiny-cpu",
        [
            "sampling.num_steps=2",
            "train.pairs_per_epoch=3",
            "train.updates_per_epoch=1",
            "lora.enabled=false",
            f"train.lr={lr}",
            "train.weight_decay=0",
            "train.grad_clip=1000",
            "train.max_policy_lag=100",
        ],
    )
    model = GaussianFlow()
    with torch.no_grad():
        model.transformer.b.fill_(1.0)
    model.transformer.to(dtype)
    return model, Learner(model, cfg.train, Batching.of(cfg), lora=None, seed=0)


def test_updates_below_a_bf16_ulp_accumulate_in_the_fp32_masters():
    # b = 1.0 in bf16 has an ulp of 2^-7; AdamW's first steps move b by about lr = 1e-3 each: each alone rounds away
    model, learner = toy(torch.bfloat16, 1e-3)
    assert learner.masters is not None and learner.masters[0].dtype == torch.float32
    assert learner.opt.param_groups[0]["params"][0] is learner.masters[0]
    for _ in range(10):
        learner.train_epoch(toy_batch(GaussianFlow()))
    master = float(learner.masters[0])
    assert master == pytest.approx(1.0 - 10e-3, abs=1e-4)  # ten steps of -lr (the gradient's sign is fixed)
    assert float(model.transformer.b.detach()) == float(
        torch.tensor(master).to(torch.bfloat16)
    )  # the model: the master rounded
    assert float(model.transformer.b.detach()) < 1.0  # moved, where bf16 AdamW would not have


def test_fp32_weights_need_no_masters():
    _, learner = toy(torch.float32, 1e-3)
    assert learner.masters is None


def test_a_checkpoint_resumes_the_masters_exactly(tmp_path):
    # the tiny SD3 in bf16, fully fine-tuned: its checkpoint carries the fp32 masters, not only the rounded weights
    import numpy as np

    from actors.sampler import Sampler
    from models.adapter import SD3Adapter

    cfg = load_config(
        "tiny-cpu",
        [
            "sampling.num_steps=2",
            "train.pairs_per_epoch=2",
            "train.updates_per_epoch=1",
            "train.lr=1e-4",
            "train.max_policy_lag=100",
            "train.keep_checkpoints=0",
        ],
    )
    sampler = Sampler(SD3Adapter.tiny(seed=0), cfg.sampling, cfg.lora)
    job, _ = sampler.sample(prompts=["a", "b"], prompt_ids=[0, 1], pair_ids=[0, 1], seeds=[5, 6])
    batch, _ = sampler.complete(job=job, rewards=np.array([[1.0, 0.0], [0.25, 0.75]]))
    make = lambda: Learner(SD3Adapter.tiny(seed=0, dtype=torch.bfloat16), cfg.train, Batching.of(cfg), cfg.lora)  # noqa: E731
    learner = make()
    for _ in range(2):
        learner.train_epoch(batch)
    folder = learner.save(str(tmp_path), {"epoch": 2}, {"train": {"keep_checkpoints": 0}})
    resumed = make()
    assert resumed.load(folder) == {"epoch": 2}
    assert all(torch.equal(a, b) for a, b in zip(resumed.masters, learner.masters))  # exact, not re-rounded
    assert any(not torch.equal(m, p.detach().float()) for m, p in zip(learner.masters, learner.params))
    for one in (learner, resumed):
        one.train_epoch(batch)
    assert all(torch.equal(a, b) for a, b in zip(resumed.masters, learner.masters))
