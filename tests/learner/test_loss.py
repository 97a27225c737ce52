"""The pair signal and the SPO loss against ALGORITHM.md §3-4, on values worked out by hand."""

import math

import pytest
import torch

from learner.loss import fdfo_loss, pair_signal


def test_pair_signal_by_hand():
    rewards = torch.tensor([[3.0, 1.0]])
    x = torch.tensor([[[1.0, 3.0], [-1.0, 1.0]]])  # [P=1, 2, M=2]
    dR, d = pair_signal(rewards, x)
    assert dR.tolist() == [[1.0, -1.0]]  # (3 - 1) / 2, and its negative
    # dx_1 = ((1, 3) - (-1, 1)) / 2 = (1, 1); mean(dx^2) = 1; d_1 = (1, 1) / (1 + 1e-6)
    assert torch.allclose(d[0, 0], torch.tensor([1.0, 1.0]) / (1 + 1e-6), atol=0, rtol=1e-7)
    assert torch.equal(d[0, 1], -d[0, 0])


def test_pair_signal_scales_inverse_to_branch_distance():
    x = torch.tensor([[[0.5, -0.5], [-0.5, 0.5]]])  # dx_1 = (0.5, -0.5), mean(dx^2) = 0.25
    _, d = pair_signal(torch.zeros(1, 2), x)
    assert torch.allclose(d[0, 0], torch.tensor([2.0, -2.0]), rtol=1e-5)


def test_loss_by_hand():
    # One row, M = 2. v = 0, d = (1, 0), dR = 0.5, v_theta = (0.1, 0.2).
    v_theta = torch.tensor([[0.1, 0.2]])
    v = torch.zeros(1, 2)
    d = torch.tensor([[1.0, 0.0]])
    dR = torch.tensor([0.5])
    loss, m = fdfo_loss(v_theta, v, d, dR, epsilon=0.03)
    # l = -mean((v_theta - (v - d))^2) = -((1.1)^2 + 0.2^2) / 2 = -0.625; l_ref = -mean(d^2) = -0.5
    rho = math.exp(-0.625 + 0.5)
    expected = -0.5 * rho + 0.5 / 0.06 * (rho - 1) ** 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["clip_frac"].item() == 1.0  # |rho - 1| = 0.1175 > 0.03
    assert m["policy_loss"].item() == pytest.approx(expected, rel=1e-6)


def test_rho_is_one_at_the_sampling_velocity_and_gradient_is_closed_form():
    g = torch.Generator().manual_seed(0)
    B, M = 3, 12
    v = torch.randn(B, 4, 3, generator=g)
    d = torch.randn(B, 4, 3, generator=g) * 50  # large d: the naive l - l_ref would lose precision
    dR = torch.tensor([0.7, -1.3, 0.0])
    v_theta = v.clone().requires_grad_(True)
    loss, m = fdfo_loss(v_theta, v, d, dR)
    assert m["log_rho_abs_max"].item() == 0.0  # rho == 1 exactly
    assert loss.item() == pytest.approx(-dR.mean().item(), abs=1e-7)
    loss.backward()
    # per row: d loss_row / d v_theta = 2 dR d / M; the loss is the mean over B rows
    expected = 2 * dR.view(B, 1, 1) * d / M / B
    assert torch.allclose(v_theta.grad, expected, rtol=1e-5, atol=1e-7)


def test_stable_log_rho_matches_float64_reference():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, 64, generator=g)
    d = torch.randn(2, 64, generator=g) * 300  # l_ref ~ -9e4
    v_theta = v + 1e-3 * torch.randn(2, 64, generator=g)
    _, m = fdfo_loss(v_theta, v, d, torch.ones(2))
    v64, d64, vt64 = v.double(), d.double(), v_theta.double()
    l = -((vt64 - (v64 - d64)) ** 2).mean(1)
    log_rho = l + (d64**2).mean(1)
    assert m["log_rho_abs_max"].item() == pytest.approx(log_rho.abs().max().item(), rel=1e-4)


def test_kl_term_adds_weighted_squared_distance():
    v_theta = torch.tensor([[1.0, 1.0]])
    base = torch.tensor([[0.0, 2.0]])
    zero = torch.zeros(1, 2)
    loss0, _ = fdfo_loss(v_theta, v_theta, zero, torch.zeros(1))
    loss1, m = fdfo_loss(v_theta, v_theta, zero, torch.zeros(1), v_base=base, kl_weight=0.5)
    assert m["kl"].item() == 1.0
    assert (loss1 - loss0).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="v_base"):
        fdfo_loss(v_theta, v_theta, zero, torch.zeros(1), kl_weight=0.5)


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="one shape"):
        fdfo_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"rewards \[P, 2\]"):
        pair_signal(torch.zeros(3), torch.zeros(3, 2, 4))
