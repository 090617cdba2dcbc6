"""The losses against reference code (pytorch-metric-learning; the energy paper's official training step) and
against cases computed by hand."""

import math

import pytest
import torch

from radregion.losses import byol_loss, energy_margin_loss, ntxent_loss, supcon_loss


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


def _energy_reference(x, n_in, m_in, m_out):
    """The regulariser as the official code adds it (github.com/wetliu/energy_ood, CIFAR/train.py), without its
    weight 0.1: x holds the in-domain logits first, then the outliers'."""
    import torch.nn.functional as F

    Ec_out = -torch.logsumexp(x[n_in:], dim=1)
    Ec_in = -torch.logsumexp(x[:n_in], dim=1)
    return torch.pow(F.relu(Ec_in - m_in), 2).mean() + torch.pow(F.relu(m_out - Ec_out), 2).mean()


@pytest.mark.parametrize("scale, margins", [(1.0, (-25.0, -7.0)), (12.0, (-25.0, -7.0)), (4.0, (-10.0, -3.0))])
def test_energy_margin_loss_matches_the_official_code(scale, margins):
    g = torch.Generator().manual_seed(2)
    x = scale * torch.randn(20, 21, generator=g)
    x[:12] += scale * 3 * torch.nn.functional.one_hot(torch.arange(12) % 21, 21)  # confident in-domain rows
    ours = energy_margin_loss(x[:12], x[12:], *margins)
    assert ours.item() == pytest.approx(_energy_reference(x, 12, *margins).item(), rel=1e-6)


def test_energy_margin_loss_by_hand_and_its_gradient():
    # equal logits c over C regions: E = -(c + log C)
    c_in, c_out, n = 20.0, 10.0, 21
    inside, outside = torch.full((3, n), c_in, requires_grad=True), torch.full((2, n), c_out, requires_grad=True)
    e_in, e_out = -(c_in + math.log(n)), -(c_out + math.log(n))
    expected = max(0.0, e_in + 25) ** 2 + max(0.0, -7 - e_out) ** 2
    loss = energy_margin_loss(inside, outside)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    # the in-domain energy is above its margin (raise the logits), the outliers' below theirs (lower them)
    assert (inside.grad < 0).all() and (outside.grad > 0).all()
    # energies already past both margins cost nothing
    assert energy_margin_loss(torch.full((2, n), 40.0), torch.full((2, n), -20.0)).item() == 0.0


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="same shape"):
        ntxent_loss(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="no anchor has a positive"):
        supcon_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="logits"):
        energy_margin_loss(torch.randn(3, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="margin must be below"):
        energy_margin_loss(torch.randn(3, 4), torch.randn(2, 4), -5.0, -7.0)
