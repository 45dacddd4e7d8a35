"""Tests for mdkd_det.modeling.domain_adversarial: GRL, gradient scaling modes (paper Eqs. 5-6),
BCE labels, registry and discriminator shapes."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mdkd_det.modeling.domain_adversarial import (
    DISCRIMINATOR_REGISTRY,
    ConvDiscriminator,
    DomainAdversarialHead,
    GradientReversal,
    MultiLevelDomainAdversarial,
    build_discriminator,
    grad_reverse,
)
from mdkd_det.utils.errors import RegistryError


@pytest.mark.parametrize("coeff", [1.0, 0.3, 2.5])
def test_grl_identity_forward_reversed_scaled_backward(coeff):
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = GradientReversal(coeff)(x)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -coeff))
    x2 = torch.randn(5, requires_grad=True)
    (grad_reverse(x2, coeff) * 2).sum().backward()
    assert torch.allclose(x2.grad, torch.full_like(x2, -2 * coeff))


def _reference_grads(head, x, label):
    """dL_d/dtheta_d and dL_d/dx without any GRL (plain BCE on a copy of the discriminator)."""
    disc = copy.deepcopy(head.discriminator)
    x = x.detach().clone().requires_grad_(True)
    y = torch.full((x.shape[0],), float(label))
    loss = F.binary_cross_entropy_with_logits(disc(x).reshape(-1), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in disc.parameters()], x.grad.clone()


@pytest.mark.parametrize("mode", ["paper", "grl_only"])
@pytest.mark.parametrize("label", [0, 1])
def test_gradient_scaling_modes(mode, label):
    torch.manual_seed(0)
    lam = 0.37
    head = DomainAdversarialHead(8, discriminator="conv", grad_scaling=mode)
    x = torch.randn(3, 8, 8, 8)
    ref_loss, ref_pgrads, ref_xgrad = _reference_grads(head, x, label)

    xg = x.clone().requires_grad_(True)
    out = head(xg, label, lam)
    assert out.dim() == 0
    out.backward()
    # returned value: already weighted in "paper" mode, raw L_d in "grl_only"
    want = lam * ref_loss if mode == "paper" else ref_loss
    assert out.item() == pytest.approx(want.item(), rel=1e-5)
    assert head.last_bce.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    # discriminator: lam * grad (Eq. 5) in "paper", unscaled in "grl_only"
    d_scale = lam if mode == "paper" else 1.0
    for p, g in zip(head.discriminator.parameters(), ref_pgrads):
        assert torch.allclose(p.grad, d_scale * g, atol=1e-6, rtol=1e-4)
    # encoder: -lam * dL_d/dx (Eq. 6) in both modes
    assert torch.allclose(xg.grad, -lam * ref_xgrad, atol=1e-7, rtol=1e-4)
    assert ref_xgrad.abs().sum() > 0


class _ConstLogit(nn.Module):
    def __init__(self, z):
        super().__init__()
        self.z = z

    def forward(self, x):
        return torch.full((x.shape[0], 1), self.z) + 0 * x.sum()


def test_bce_labels_source_one_target_zero():
    head = DomainAdversarialHead(4, discriminator="mlp")
    head.discriminator = _ConstLogit(2.0)
    x = torch.randn(2, 4)
    # BCE(z=2, y=1) = log(1 + e^-2) ; BCE(z=2, y=0) = log(1 + e^2) ; lam = 1 returns L_d
    src, tgt = math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))
    assert head(x, 1, 1.0).item() == pytest.approx(src, abs=1e-6)
    assert head(x, 0, 1.0).item() == pytest.approx(tgt, abs=1e-6)
    # label tensor [B] for a concatenated batch: mean over the batch
    assert head(x, torch.tensor([1, 0]), 1.0).item() == pytest.approx((src + tgt) / 2, abs=1e-6)
    # paper mode: weighted by lam
    assert head(x, 1, 0.5).item() == pytest.approx(0.5 * src, abs=1e-6)


def test_bad_labels_and_lambda():
    head = DomainAdversarialHead(4, discriminator="mlp")
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="domain_label"):
        head(x, 2, 1.0)
    with pytest.raises(ValueError, match="domain_label"):
        head(x, torch.tensor([1, 0, 1]), 1.0)
    with pytest.raises(ValueError, match="lam"):
        head(x, 1, float("nan"))
    with pytest.raises(ValueError, match="grad_scaling"):
        DomainAdversarialHead(4, grad_scaling="both")


def test_registry_unknown_name_lists_names():
    with pytest.raises(RegistryError) as e:
        build_discriminator("transformer", 16)
    assert "conv" in str(e.value) and "mlp" in str(e.value)
    assert {"conv", "mlp"} <= set(DISCRIMINATOR_REGISTRY.names())


def test_conv_discriminator_architecture():
    d = build_discriminator("conv", 16)
    assert isinstance(d, ConvDiscriminator)
    assert (d.conv1.in_channels, d.conv1.out_channels, d.conv1.kernel_size, d.conv1.stride) == (
        16, 256, (3, 3), (2, 2))
    assert (d.conv2.out_channels, d.conv2.stride) == (128, (2, 2))
    assert (d.fc.in_features, d.fc.out_features) == (128, 1)
    assert d(torch.randn(2, 16, 5, 7)).shape == (2, 1)
    assert d(torch.randn(1, 16, 1, 1)).shape == (1, 1)
    with pytest.raises(ValueError, match="expects"):
        d(torch.randn(2, 8, 5, 5))
    m = build_discriminator("mlp", 16)
    assert m(torch.randn(3, 16)).shape == (3, 1) and m(torch.randn(3, 16, 2, 2)).shape == (3, 1)


def test_multilevel_is_mean_of_heads():
    torch.manual_seed(0)
    ml = MultiLevelDomainAdversarial([4, 6], num_levels=2)
    feats = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    want = (ml.heads[0](feats[0], 1, 0.5) + ml.heads[1](feats[1], 1, 0.5)) / 2
    assert ml(feats, 1, 0.5).item() == pytest.approx(want.item(), rel=1e-6)
    assert ml({"p3": feats[0], "p4": feats[1]}, 1, 0.5).item() == pytest.approx(
        want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="levels"):
        ml(feats[:1], 1, 0.5)
