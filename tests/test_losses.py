"""The three losses against pytorch-metric-learning and against cases computed by hand."""

import math

import pytest
import torch

from radregion.losses import byol_loss, ntxent_loss, supcon_loss


def _unit(*angles):
    return torch.tensor([[math.cos(a), math.sin(a)] for a in angles])


def test_ntxent_two_pairs_by_hand():
    # images 0 and 1, views at angles: cos(view1_i, view2_i) = cos(0.2); everything else from the angles
    z1, z2 = _unit(0.0, 2.0), _unit(0.2, 2.3)
    t = 0.5
    z = torch.cat([z1, z2])
    expected = 0.0
    for i, j in [(0, 2), (1, 3), (2, 0), (3, 1)]:
        others = [k for k in range(4) if k != i]
        expected += -(z[i] @ z[j] / t - torch.logsumexp(torch.stack([z[i] @ z[k] / t for k in others]), 0))
    assert ntxent_loss(z1, z2, t).item() == pytest.approx(expected.item() / 4, rel=1e-6)


def test_ntxent_ignores_scale_and_rewards_alignment():
    z1 = torch.randn(8, 16)
    assert ntxent_loss(z1, z1 * 3) < ntxent_loss(z1, torch.randn(8, 16))
    assert ntxent_loss(z1, z1.clone(), 0.2).item() == pytest.approx(ntxent_loss(5 * z1, z1, 0.2).item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_ntxent_matches_pytorch_metric_learning(temperature):
    from pytorch_metric_learning.losses import NTXentLoss

    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(12, 32, generator=g), torch.randn(12, 32, generator=g)
    labels = torch.arange(12).repeat(2)
    reference = NTXentLoss(temperature=temperature)(torch.cat([z1, z2]), labels)
    assert ntxent_loss(z1, z2, temperature).item() == pytest.approx(reference.item(), rel=1e-5)


def test_ntxent_gradient_flows_to_both_views():
    z1, z2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    ntxent_loss(z1, z2).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_byol_identical_is_zero_opposite_is_four():
    p = torch.randn(5, 7)
    assert byol_loss(p, 2 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-6)
    orthogonal = byol_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]]))
    assert orthogonal.item() == pytest.approx(2.0)
    at_60_degrees = byol_loss(_unit(0.0, 1.0), _unit(math.pi / 3, 1.0))  # cos = 0.5 and 1: (1 + 0) / 2
    assert at_60_degrees.item() == pytest.approx(0.5, abs=1e-6)


def test_byol_target_gets_no_gradient():
    p, z = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_supcon_matches_pytorch_metric_learning(temperature):
    from pytorch_metric_learning.losses import SupConLoss

    g = torch.Generator().manual_seed(2)
    features = torch.randn(20, 16, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0, 1] * 2)
    reference = SupConLoss(temperature=temperature)(features, labels)
    assert supcon_loss(features, labels, temperature).item() == pytest.approx(reference.item(), rel=1e-5)


def test_supcon_with_unique_labels_is_ntxent():
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    labels = torch.arange(6).repeat(2)
    assert supcon_loss(torch.cat([z1, z2]), labels, 0.3).item() == pytest.approx(
        ntxent_loss(z1, z2, 0.3).item(), rel=1e-5
    )


def test_supcon_by_hand():
    # three unit vectors; 0 and 1 share a class, 2 is alone (no positive: not an anchor)
    z = _unit(0.0, 0.5, 2.0)
    t = 1.0
    sims = z @ z.T
    anchor0 = -(sims[0, 1] - torch.logsumexp(torch.stack([sims[0, 1], sims[0, 2]]), 0))
    anchor1 = -(sims[1, 0] - torch.logsumexp(torch.stack([sims[1, 0], sims[1, 2]]), 0))
    expected = (anchor0 + anchor1) / 2
    assert supcon_loss(z, torch.tensor([5, 5, 9]), t).item() == pytest.approx(expected.item(), rel=1e-6)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="same shape"):
        ntxent_loss(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="no anchor has a positive"):
        supcon_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]))
