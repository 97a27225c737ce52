"""log rho = 0 at lag 0 for FLUX: the tiny FLUX.1 (guidance distilled into an embedding, no CFG pair of forwards)
sampled and trained in one process with bf16 weights and a bf16 record; the learner's own loss inputs are observed."""

import numpy as np
import pyarrow as pa
import torch

from actors.sampler import Sampler
from cluster.config import Batching, load_config
from learner.batch import from_arrow
from learner.learner import Learner
from learner.loss import fdfo_loss
from models.flux import FluxAdapter


def loss_callers() -> list:
    """The learner modules that call ``fdfo_loss`` by name: ``learner.learner``, and ``learner.micro_loss`` where the
    learner's loss lives in a part of its own."""
    import importlib
    import importlib.util

    names = ["learner.learner"] + (["learner.micro_loss"] if importlib.util.find_spec("learner.micro_loss") else [])
    return [m for m in map(importlib.import_module, names) if hasattr(m, "fdfo_loss")]


def test_flux_log_rho_is_zero_at_lag_zero_in_the_learners_own_update(monkeypatch):
    # the learner's v_theta at the recorded (x, t, guidance) is the recorded v bit for bit, so log rho is exactly 0 at
    # every row of its update (seen in fdfo_loss's inputs inside train_epoch, not a re-built forward)
    seen = []

    def spy(v_theta, v, *args, **kwargs):
        loss, m = fdfo_loss(v_theta, v, *args, **kwargs)
        seen.append((v_theta.detach(), v.detach(), m))
        return loss, m

    for module in loss_callers():
        monkeypatch.setattr(module, "fdfo_loss", spy)
    cfg = load_config(
        "tiny-flux",
        [
            "sampling.num_steps=2",
            "train.pairs_per_epoch=2",
            "train.updates_per_epoch=1",
            "sampling.pairs_per_call=2",
            "train.micro_batch_rows=8",
            "sampling.record_dtype=bfloat16",
        ],
    )
    assert cfg.train.precision == "bf16" and cfg.lora.enabled
    learner = Learner(FluxAdapter.tiny(seed=0, dtype=torch.bfloat16), cfg.train, Batching.of(cfg), cfg.lora, seed=0)
    sampler = Sampler(
        FluxAdapter.tiny(seed=0, dtype=torch.bfloat16), cfg.sampling, cfg.lora, precision=cfg.train.precision
    )
    with torch.no_grad():  # a non-zero LoRA, so the adapter's path is exercised
        for p in learner.params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    sampler.set_weights(learner.weights())
    job, _ = sampler.sample(
        prompts=["a red circle", "two blue squares"], prompt_ids=[0, 1], pair_ids=[0, 1], seeds=[5, 6]
    )
    batch, _ = sampler.complete(job=job, rewards=np.array([[1.0, 0.0], [0.25, 0.75]]))
    tb = from_arrow(pa.Table.from_batches([batch]))
    assert tb.v.dtype == torch.bfloat16 and tb.x.dtype == torch.bfloat16
    out = learner.train_epoch(batch)
    rows = tb.x.shape[0] * tb.x.shape[1]
    assert out["learner/rows"] == rows and sum(len(v) for _, v, _ in seen) == rows
    assert out["learner/policy_lag_max"] == 0
    for v_theta, v, m in seen:
        assert torch.equal(v_theta, v.float()) and float(m["log_rho_abs_max"]) == 0.0
    assert out["learner/log_rho_abs_max"] == 0.0 and learner.version == 1
