"""FDFO's staleness correction (``train.staleness_correction``, docs/algorithms.md): the corrected loss by hand, its
exact reduction to today's loss at lag 0 (the function and a learner on the tiny SD3, bit for bit), the weight's
bound, and the extra no-grad forward: only when on, only for stale rows of an epoch's later updates."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.sampler import Sampler
from cluster.config import Batching, load_config
from learner.batch import POLICY_VERSION
from learner.learner import Learner
from learner.loss import WEIGHT_CAP, fdfo_loss
from models.adapter import SD3Adapter

PROMPTS = ["a red circle", "a blue square"]


# -- the loss by hand ---------------------------------------------------------------------------------------------
def test_corrected_loss_by_hand():
    # One row, M = 2: v = 0 (behaviour), d = (1, 0), dR = 0.5, anchor v_prox = (0.1, 0), v_theta = (0.1, 0.2).
    v, d, dR = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.tensor([0.5])
    v_prox = torch.tensor([[0.1, 0.0]])
    v_theta = torch.tensor([[0.1, 0.2]], requires_grad=True)
    loss, m = fdfo_loss(v_theta, v, d, dR, epsilon=0.03, v_prox=v_prox)
    # target a = v - d = (-1, 0). l(v_prox) - l_ref = -((1.1)^2 + 0) / 2 + (1 + 0) / 2 = -0.105: w = exp(-0.105)
    w = math.exp(-0.105)
    # l(v_theta) - l(v_prox) = -((1.1)^2 + 0.2^2) / 2 + (1.1)^2 / 2 = -0.02: rho_p = exp(-0.02)
    rho = math.exp(-0.02)
    expected = w * (-0.5 * rho + 0.5 / 0.06 * (rho - 1) ** 2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["behaviour_weight_mean"].item() == pytest.approx(w, rel=1e-6)
    assert m["behaviour_weight_capped"].item() == 0.0
    assert m["clip_frac"].item() == 0.0  # |rho_p - 1| = 0.0198 < 0.03
    # d loss / d v_theta = w (-dR + |dR| (rho_p - 1) / eps) rho_p * d log rho_p / d v_theta,
    # d log rho_p / d v_theta = -2 / M (v_theta - a) = -(1.1, 0.2)
    loss.backward()
    coef = w * (-0.5 + 0.5 * (rho - 1) / 0.03) * rho
    assert v_theta.grad[0].tolist() == pytest.approx([-1.1 * coef, -0.2 * coef], rel=1e-5)


def test_at_the_anchor_the_gradient_is_todays_linear_term_with_the_ratio_truncated():
    """v_theta = v_prox (an epoch's first update): rho_p = 1, the trust region's gradient vanishes and what is left is
    -dR * min(rho_0, 2) * grad log rho, rho_0 = today's ratio of the row, whatever today's (rho_0 - 1)^2 term says."""
    g = torch.Generator().manual_seed(0)
    B, M = 6, 5
    v, d = torch.randn(B, M, generator=g), 3 * torch.randn(B, M, generator=g)
    dR = torch.tensor([0.5, -0.25, 0.1, -0.4, 0.3, 0.2])
    v_now = v + 0.05 * torch.randn(B, M, generator=g)  # the policy moved since the rows were sampled
    v_now[0] = v[0] - 0.4 * d[0]  # far along its own target: rho_0 > 2, truncated
    v_theta = v_now.clone().requires_grad_(True)
    fdfo_loss(v_theta, v, d, dR, v_prox=v_now)[0].backward()
    dv = (v_now - v).double()
    rho0 = torch.exp(-dv.pow(2).mean(1) - 2 * (dv * d.double()).mean(1))
    assert rho0[0] > WEIGHT_CAP
    grad_log_rho = -2 / M * (v_now - v + d).double()  # d log rho / d v_theta at v_theta = v_now
    expected = (-dR.double() * rho0.clamp(max=WEIGHT_CAP))[:, None] * grad_log_rho / B
    assert torch.allclose(v_theta.grad.double(), expected, rtol=1e-5, atol=1e-9)


def test_weight_is_truncated_at_the_cap_and_carries_no_gradient():
    # w = exp(-mean(dp^2) - 2 mean(dp d)) with dp = (-0.1, 0), d = (10, 0): exp(-0.005 + 1) = 2.70 -> 2
    v, d, dR = torch.zeros(1, 2), torch.tensor([[10.0, 0.0]]), torch.tensor([1.0])
    v_prox = torch.tensor([[-0.1, 0.0]], requires_grad=True)
    v_theta = v_prox.detach().clone().requires_grad_(True)
    loss, m = fdfo_loss(v_theta, v, d, dR, epsilon=0.03, v_prox=v_prox)
    assert m["behaviour_weight_mean"].item() == WEIGHT_CAP == 2.0
    assert m["behaviour_weight_capped"].item() == 1.0
    assert loss.item() == pytest.approx(-2.0, rel=1e-6)  # 2 * (-dR * rho_p), rho_p = 1
    loss.backward()
    assert v_prox.grad is None  # the anchor and the weight are constants of the update
    # many random rows: every weight in (0, cap], the capped share counted
    g = torch.Generator().manual_seed(1)
    v, d = torch.randn(64, 8, generator=g), 5 * torch.randn(64, 8, generator=g)
    v_prox = v + 0.1 * torch.randn(64, 8, generator=g)
    _, m = fdfo_loss(v_prox, v, d, torch.ones(64), v_prox=v_prox)
    dp = v_prox - v
    raw = torch.exp(-dp.pow(2).mean(1) - 2 * (dp * d).mean(1))
    assert 0 < (raw > WEIGHT_CAP).float().mean().item() < 1  # the case has both kinds of rows
    assert m["behaviour_weight_capped"].item() == (raw > WEIGHT_CAP).float().mean().item()
    assert m["behaviour_weight_mean"].item() == pytest.approx(raw.clamp(max=WEIGHT_CAP).mean().item(), rel=1e-6)


def test_lag_zero_is_todays_loss_bit_for_bit():
    """v_prox = v (a row sampled with the weights the update starts from): the same floats, loss and gradient."""
    g = torch.Generator().manual_seed(2)
    v, d = torch.randn(16, 3, 4, 4, generator=g), 40 * torch.randn(16, 3, 4, 4, generator=g)
    dR = torch.randn(16, generator=g)
    theta = v + 1e-3 * torch.randn(16, 3, 4, 4, generator=g)
    out = []
    for v_prox in (None, v.clone()):
        v_theta = theta.clone().requires_grad_(True)
        loss, m = fdfo_loss(v_theta, v, d, dR, v_prox=v_prox)
        loss.backward()
        out.append((loss, m, v_theta.grad))
    (loss0, m0, g0), (loss1, m1, g1) = out
    assert torch.equal(loss0, loss1) and torch.equal(g0, g1)
    assert all(torch.equal(m0[k], m1[k]) for k in m0)
    assert m1["behaviour_weight_mean"].item() == 1.0


# -- the learner ---------------------------------------------------------------------------------------------------
def cfg_of(*extra):
    # 2 pairs x 2 branches x 2 steps = 8 rows, 2 updates of 4 rows, micro-batches of 2 rows
    return load_config(
        "tiny-cpu",
        [
            "sampling.num_steps=2",
            "train.pairs_per_epoch=2",
            "train.updates_per_epoch=2",
            "train.micro_batch_rows=2",
            "train.lr=1e-2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def batch():
    """Two pairs from the tiny SD3 at its start weights (version 0)."""
    cfg = cfg_of()
    sampler = Sampler(SD3Adapter.tiny(seed=0), cfg.sampling, cfg.lora)
    job, _ = sampler.sample(prompts=PROMPTS, prompt_ids=[0, 1], pair_ids=[0, 1], seeds=[5, 6])
    out, _ = sampler.complete(job=job, rewards=np.array([[1.0, 0.0], [0.25, 0.75]]))
    return out


def learner_of(correct: bool, version: int = 0) -> tuple[Learner, list]:
    """A learner at ``version`` whose model counts its velocity calls (grad on or off)."""
    cfg = cfg_of(f"train.staleness_correction={str(correct).lower()}")
    model = SD3Adapter.tiny(seed=0)
    calls, velocity = [], model.velocity

    def counted(x, *a, **k):
        calls.append((len(x), torch.is_grad_enabled()))
        return velocity(x, *a, **k)

    model.velocity = counted
    learner = Learner(model, cfg.train, Batching.of(cfg), cfg.lora, seed=0)
    learner.version = version
    return learner, calls


def trained(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.transformer.named_parameters() if p.requires_grad}


def test_lockstep_epoch_is_bit_identical_with_the_correction_and_needs_no_extra_forward(batch):
    """Every pair sampled with the weights the epoch starts from (lock-step, 2 updates: the second's rows are a version
    old, as in the reference's epoch): the weights after the epoch are the same floats, and no forward is added."""
    (off, calls_off), (on, calls_on) = learner_of(False), learner_of(True)
    m_off, m_on = off.train_epoch(batch), on.train_epoch(batch)
    a, b = trained(off), trained(on)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert m_off["checksum"] == m_on["checksum"] and m_off["learner/policy_loss"] == m_on["learner/policy_loss"]
    assert calls_on == calls_off == [(2, True)] * 4  # 2 updates x 2 micro-batches, nothing else
    assert m_on["learner/behaviour_weight_mean"] == 1.0 and "learner/behaviour_weight_mean" not in m_off


def test_stale_rows_get_one_no_grad_forward_each_in_later_updates_only(batch):
    """The batch at version 0 trained by a learner at version 2 (lag 2, then 3): the first update takes the anchor from its own
    forward; the second's 4 rows get one no-grad forward each (in micro-batches of 2) before the first step."""
    (off, calls_off), (on, calls_on) = learner_of(False, 2), learner_of(True, 2)
    off.train_epoch(batch)
    m = on.train_epoch(batch)
    assert calls_off == [(2, True)] * 4
    assert calls_on == [(2, False)] * 2 + [(2, True)] * 4  # the anchors first, at the epoch's weights
    assert m["learner/policy_lag_mean"] == 2.5 and 0 < m["learner/behaviour_weight_mean"] <= WEIGHT_CAP
    assert trained(on).keys() == trained(off).keys()
    assert any(not torch.equal(trained(on)[k], trained(off)[k]) for k in trained(on))  # it changed the update


def test_the_first_updates_anchor_equals_a_no_grad_forward(batch):
    """The first update reuses its own forward as the anchor: the same floats as a separate no-grad forward."""
    learner, _ = learner_of(True)
    learner.begin_epoch(batch)
    ep = learner._epoch
    x, _, sigma, _, _, cond, _ = learner._rows(ep.tb, ep.keep, ep.updates[0])
    with_grad = learner.model.velocity(x, sigma, cond, ep.w)
    with torch.no_grad():
        without = learner.model.velocity(x, sigma, cond, ep.w)
    assert with_grad.requires_grad and torch.equal(with_grad.detach(), without)


def test_a_later_update_uses_the_anchor_of_the_epochs_weights(batch):
    """After the first step the anchors of the second update's rows are still the epoch-start velocities."""
    learner, _ = learner_of(True, 2)
    learner.begin_epoch(batch)
    ep = learner._epoch
    rows = ep.updates[1]
    x, v, sigma, _, _, cond, _ = learner._rows(ep.tb, ep.keep, rows)

    def forward() -> torch.Tensor:  # in the learner's micro-batches of 2 (CPU kernels round by batch size)
        with torch.no_grad():
            return torch.cat(
                [
                    learner.model.velocity(x[i : i + 2], sigma[i : i + 2], cond.index(slice(i, i + 2)), ep.w)
                    for i in (0, 2)
                ]
            )

    at_start = forward()
    learner.update()  # the first step moves the weights
    moved = forward()
    assert not torch.equal(moved, at_start)
    assert torch.equal(learner._v_prox(ep, rows, v, moved), at_start)


def test_flow_grpo_refuses_the_correction():
    """Before any resource is taken (check_run) and in the learner itself."""
    from cluster.build import check_run
    from cluster.config import grpo_of

    cfg = load_config("shapes-flow-grpo", ["train.staleness_correction=true"])
    why = "staleness_correction corrects FDFO's SPO ratio; train.algorithm = 'flow_grpo'.*staleness_correction=false"
    with pytest.raises(ValueError, match=why):
        check_run(cfg)
    with pytest.raises(ValueError, match=why):
        Learner(lambda: None, cfg.train, Batching.of(cfg), None, seed=0, grpo=grpo_of(cfg))


def _with_versions(batch: pa.RecordBatch, versions: list[int]) -> pa.RecordBatch:
    i = batch.schema.get_field_index(POLICY_VERSION)
    cols = list(batch.columns)
    cols[i] = pa.array(versions, pa.int64())
    return pa.RecordBatch.from_arrays(cols, schema=batch.schema)


def test_only_rows_older_than_the_epoch_are_anchored(batch):
    """A batch mixing a pair sampled at the epoch's version and one a version older: only the old pair's rows of the
    second update get the extra forward."""
    learner, calls = learner_of(True, 1)
    mixed = _with_versions(batch, [1, 1, 0, 0])  # pair 0 current, pair 1 one version old
    learner.begin_epoch(mixed)
    ep = learner._epoch
    N = ep.tb.x.shape[1]
    old = [int(r) for r in ep.updates[1] if int(ep.tb.policy_version[ep.keep[r // N]]) == 0]
    assert sum(n for n, grad in calls if not grad) == len(old) and ep.prox.shape[0] == len(old)
