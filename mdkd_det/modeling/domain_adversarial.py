"""Domain-adversarial alignment of Stage 1 (paper Eqs. 2-6, C2-C4; decision A11).

Pieces:

- :class:`GradReverse` / :func:`grad_reverse` / :class:`GradientReversal`: the gradient
  reversal layer of DANN (Ganin & Lempitsky 2015): identity forward, ``-coeff * grad`` backward.
- ``DISCRIMINATOR_REGISTRY``: domain discriminators ``D(x) -> logit [B, 1]`` built by name,
  ``"conv"`` (A11, feature maps) and ``"mlp"`` (pooled vectors). Plugins: entry-point group
  ``mdkd_det.discriminators``.
- :class:`DomainAdversarialHead`: GRL + discriminator + BCE-with-logits for one feature map.
- :class:`MultiLevelDomainAdversarial`: one head per level, losses averaged (A11 ``levels="all"``).

Gradient semantics (C3). The paper's update rules are

    theta_d <- theta_d - eta * lambda * dL_d/dtheta_d                      (Eq. 5)
    theta_f <- theta_f - eta * (dL_y/dtheta_f - lambda * dL_d/dtheta_f)    (Eq. 6)

``grad_scaling="paper"`` (default) reproduces them exactly: the head returns ``lambda * L_d``
computed through ``GRL(coeff=1)``, so the discriminator receives ``lambda * dL_d/dtheta_d`` and
the encoder ``-lambda * dL_d/dtheta_f``. ``grad_scaling="grl_only"`` is the common DANN code:
the head returns the *unweighted* ``L_d`` computed through ``GRL(coeff=lambda)``, so the
discriminator receives the unscaled ``dL_d/dtheta_d`` and the encoder ``-lambda * dL_d/dtheta_f``.
In both modes the head's return value is the term to add to the task loss as is:
``total = L_y + head(feat, label, lam)``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import Registry

__all__ = [
    "GradReverse",
    "grad_reverse",
    "GradientReversal",
    "DISCRIMINATOR_REGISTRY",
    "ConvDiscriminator",
    "MLPDiscriminator",
    "build_discriminator",
    "DomainAdversarialHead",
    "MultiLevelDomainAdversarial",
    "GRAD_SCALING_MODES",
]

GRAD_SCALING_MODES = ("paper", "grl_only")


class GradReverse(torch.autograd.Function):
    """Gradient reversal (DANN): forward ``y = x``; backward ``dx = -coeff * dy``.

    Use through :func:`grad_reverse` (``GradReverse.apply(x, coeff)``). ``coeff`` is a Python
    float (no gradient). Works for any tensor shape and dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, coeff: float) -> Tensor:  # noqa: D102
        ctx.coeff = float(coeff)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # noqa: D102
        return -ctx.coeff * grad_output, None


def grad_reverse(x: Tensor, coeff: float = 1.0) -> Tensor:
    """Functional gradient reversal: identity forward, ``-coeff * grad`` backward."""
    return GradReverse.apply(x, coeff)


class GradientReversal(nn.Module):
    """Module form of :class:`GradReverse`. ``coeff`` is a plain attribute (may be changed
    between steps). No parameters; any input shape.

    Raises:
        ValueError: non-finite ``coeff``.
    """

    def __init__(self, coeff: float = 1.0) -> None:
        super().__init__()
        self.coeff = _finite("GradientReversal", "coeff", coeff)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return grad_reverse(x, self.coeff)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}"


def _finite(owner: str, name: str, value: Any, nonneg: bool = False) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{owner}: {name} must be a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or (nonneg and value < 0):
        raise ValueError(
            f"{owner}: {name} must be a finite number{' >= 0' if nonneg else ''}, got {value!r}"
        )
    return value


# --------------------------------------------------------------------------------------------
# discriminators
# --------------------------------------------------------------------------------------------
DISCRIMINATOR_REGISTRY = Registry("DISCRIMINATOR", entry_point_group="mdkd_det.discriminators")
DISCRIMINATOR_REGISTRY.__doc__ = """Domain discriminators.

Builder: ``builder(in_channels, **kw) -> nn.Module``. Contract: ``forward(x) -> Tensor[B, 1]``,
raw logits (source = 1, target = 0 after BCE), where ``x`` is ``[B, in_channels, H, W]``
("conv") or ``[B, in_channels]`` ("mlp"). No GRL inside: :class:`DomainAdversarialHead` adds it.
"""


@DISCRIMINATOR_REGISTRY.register("conv")
class ConvDiscriminator(nn.Module):
    """Image-level domain discriminator of decision A11 (the paper gives none, C6).

    ``Conv3x3(C->256, s2, p1) -> ReLU -> Conv3x3(256->128, s2, p1) -> ReLU -> GAP ->
    Linear(128->1)``. Input ``[B, in_channels, H, W]`` (any H, W >= 1); output logits [B, 1].

    Raises:
        ValueError: ``in_channels`` < 1, or an input that is not [B, in_channels, H, W].
    """

    def __init__(self, in_channels: int, hidden: Sequence[int] = (256, 128)) -> None:
        super().__init__()
        if int(in_channels) < 1 or len(hidden) != 2:
            raise ValueError(
                f"ConvDiscriminator: need in_channels >= 1 and two hidden widths, got "
                f"in_channels={in_channels}, hidden={hidden}"
            )
        self.in_channels = int(in_channels)
        self.conv1 = nn.Conv2d(self.in_channels, hidden[0], 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(hidden[0], hidden[1], 3, stride=2, padding=1)
        self.fc = nn.Linear(hidden[1], 1)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ConvDiscriminator expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


@DISCRIMINATOR_REGISTRY.register("mlp")
class MLPDiscriminator(nn.Module):
    """Discriminator for pooled vectors (A11, classification attachment).

    ``Linear(C->256) -> ReLU -> Linear(256->128) -> ReLU -> Linear(128->1)``. Input
    ``[B, in_channels]``; a ``[B, in_channels, H, W]`` map is global-average-pooled first.
    Output logits [B, 1].

    Raises:
        ValueError: ``in_channels`` < 1, or an input with the wrong channel count / rank.
    """

    def __init__(self, in_channels: int, hidden: Sequence[int] = (256, 128)) -> None:
        super().__init__()
        if int(in_channels) < 1 or len(hidden) < 1:
            raise ValueError(
                f"MLPDiscriminator: need in_channels >= 1 and hidden widths, got "
                f"in_channels={in_channels}, hidden={hidden}"
            )
        self.in_channels = int(in_channels)
        layers, c = [], self.in_channels
        for h in hidden:
            layers += [nn.Linear(c, h), nn.ReLU(inplace=True)]
            c = h
        layers.append(nn.Linear(c, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if x.dim() == 4:
            x = x.mean(dim=(2, 3))
        if x.dim() != 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"MLPDiscriminator expects [B, {self.in_channels}] (or a map), got "
                f"{tuple(x.shape)}"
            )
        return self.net(x)


def build_discriminator(name: str, in_channels: int, **kwargs: Any) -> nn.Module:
    """Build a registered discriminator: ``DISCRIMINATOR_REGISTRY.get(name)(in_channels, **kw)``.

    Raises:
        RegistryError: unknown ``name`` (the message lists the registered names).
    """
    return DISCRIMINATOR_REGISTRY.get(name)(in_channels=in_channels, **kwargs)


# --------------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------------
def _domain_targets(domain_label: Union[int, bool, Tensor], batch: int, device) -> Tensor:
    """0/1 label or tensor [B] -> float targets [B] (source = 1, target = 0)."""
    if isinstance(domain_label, Tensor):
        y = domain_label.detach().to(device=device, dtype=torch.float32).reshape(-1)
        if y.numel() == 1 and batch != 1:
            y = y.expand(batch)
        if y.numel() != batch:
            raise ValueError(
                f"DomainAdversarialHead: domain_label has {y.numel()} entries for a batch of "
                f"{batch}"
            )
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError(
                "DomainAdversarialHead: domain_label must be 0 (target) or 1 (source), got "
                f"{domain_label.tolist()}"
            )
        return y
    if isinstance(domain_label, bool) or domain_label in (0, 1):
        return torch.full((batch,), float(domain_label), device=device)
    raise ValueError(
        f"DomainAdversarialHead: domain_label must be 0 (target), 1 (source) or a tensor [B], "
        f"got {domain_label!r}"
    )


class DomainAdversarialHead(nn.Module):
    """GRL + domain discriminator + BCE on one feature map (paper Eqs. 2-6, A11).

    ``forward(feat, domain_label, lam)`` returns the **already weighted** adversarial term;
    the caller adds it to the task loss: ``total = L_y + head(feat, label, lam)``.

    - ``grad_scaling="paper"`` (default, Eqs. 5-6 exactly): returns ``lam * L_d`` with
      ``GRL(coeff=1)``. Discriminator grad = ``lam * dL_d/dtheta_d``; encoder grad =
      ``-lam * dL_d/dfeat``. Note: at ``lam = lambda(0) = 0`` the discriminator does not learn.
    - ``grad_scaling="grl_only"`` (common DANN code): returns ``L_d`` with ``GRL(coeff=lam)``.
      Discriminator grad = ``dL_d/dtheta_d`` (unscaled); encoder grad = ``-lam * dL_d/dfeat``.

    ``L_d = mean_b BCEWithLogits(D(feat)[b], y[b])`` with y = 1 for source and 0 for target
    images (Eq. 2, mean instead of sum per C3 proposal). For paired batches, either call once
    per domain and add the two terms (= mean_source + mean_target, as Eq. 2's two sums), or
    concatenate the batches and pass a label tensor [B].
    ``last_bce`` holds the detached unweighted L_d of the last call and ``last_acc`` the
    discriminator's accuracy on that call's images (fraction in [0, 1] of images whose logit is
    on the side of their label: ``logit > 0`` for source, ``<= 0`` for target), for logging.

    Args:
        in_channels: channels C of the feature map (or vector length for "mlp").
        discriminator: registered name in ``DISCRIMINATOR_REGISTRY``.
        grad_scaling: ``"paper"`` or ``"grl_only"``.
        **disc_kwargs: passed to the discriminator builder.

    Raises:
        ValueError: bad ``grad_scaling``; in forward, a bad label or a negative / non-finite lam.
        RegistryError: unknown discriminator name.
    """

    def __init__(
        self,
        in_channels: int,
        discriminator: str = "conv",
        grad_scaling: str = "paper",
        **disc_kwargs: Any,
    ) -> None:
        super().__init__()
        if grad_scaling not in GRAD_SCALING_MODES:
            raise ValueError(
                f"DomainAdversarialHead: grad_scaling={grad_scaling!r} is not one of "
                f"{list(GRAD_SCALING_MODES)}"
            )
        self.grad_scaling = grad_scaling
        self.grl = GradientReversal(1.0)
        self.discriminator = build_discriminator(discriminator, in_channels, **disc_kwargs)
        self.last_bce: Optional[Tensor] = None
        self.last_acc: Optional[Tensor] = None

    def forward(
        self, feat: Tensor, domain_label: Union[int, bool, Tensor], lam: float
    ) -> Tensor:
        """Weighted domain loss (0-dim float32) for ``feat`` [B, C, H, W] (or [B, C] for mlp)."""
        lam = _finite("DomainAdversarialHead", "lam", lam, nonneg=True)
        y = _domain_targets(domain_label, feat.shape[0], feat.device)
        self.grl.coeff = 1.0 if self.grad_scaling == "paper" else lam
        logits = self.discriminator(self.grl(feat)).reshape(-1).float()
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="mean")
        self.last_bce = bce.detach()
        self.last_acc = ((logits.detach() > 0).float() == y).float().mean()
        return lam * bce if self.grad_scaling == "paper" else bce

    def extra_repr(self) -> str:
        return f"grad_scaling={self.grad_scaling!r}"


class MultiLevelDomainAdversarial(nn.Module):
    """One :class:`DomainAdversarialHead` per feature level; returns the mean of their terms
    (A11 ``levels="all"``).

    Args:
        in_channels: an int (same for all levels) or one int per level.
        num_levels: number of levels L.
        discriminator, grad_scaling, **disc_kwargs: as :class:`DomainAdversarialHead`.

    ``forward(feats, domain_label, lam)``: ``feats`` is a list/tuple of L maps [B, C_l, H_l, W_l]
    or a mapping (e.g. an FPN ``OrderedDict``, taken in its order); returns
    ``(1/L) sum_l head_l(feats[l], domain_label, lam)`` (0-dim).

    Raises:
        ValueError: ``num_levels`` < 1, ``in_channels`` list of the wrong length, or a forward
            call with a number of levels different from ``num_levels``.
    """

    def __init__(
        self,
        in_channels: Union[int, Sequence[int]],
        num_levels: int,
        discriminator: str = "conv",
        grad_scaling: str = "paper",
        **disc_kwargs: Any,
    ) -> None:
        super().__init__()
        if int(num_levels) < 1:
            raise ValueError(
                f"MultiLevelDomainAdversarial: num_levels must be >= 1, got {num_levels}"
            )
        if isinstance(in_channels, int):
            chans = [in_channels] * num_levels
        else:
            chans = [int(c) for c in in_channels]
        if len(chans) != num_levels:
            raise ValueError(
                f"MultiLevelDomainAdversarial: {len(chans)} in_channels for {num_levels} levels"
            )
        self.heads = nn.ModuleList(
            DomainAdversarialHead(c, discriminator, grad_scaling, **disc_kwargs) for c in chans
        )

    def forward(
        self,
        feats: Union[Sequence[Tensor], Mapping[Any, Tensor]],
        domain_label: Union[int, bool, Tensor],
        lam: float,
    ) -> Tensor:
        """Mean over levels of the weighted per-level domain losses (0-dim float32)."""
        maps = list(feats.values()) if isinstance(feats, Mapping) else list(feats)
        if len(maps) != len(self.heads):
            raise ValueError(
                f"MultiLevelDomainAdversarial: got {len(maps)} feature levels, built for "
                f"{len(self.heads)}"
            )
        losses = [head(f, domain_label, lam) for head, f in zip(self.heads, maps)]
        return torch.stack(losses).mean()
