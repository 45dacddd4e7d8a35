"""Photometric views of a normalised batch for multi-view KD (paper 001, DCGD; D15.5).

The views change intensities only, never geometry, so every box and mask of the batch stays
valid: they are made on the already-normalised, padded tensor the backbones read (inside the KD
step, after the data pipeline), not in the data layer.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor


def photometric_views(x: Tensor, n: int, strength: float = 1.0,
                      generator: Optional[torch.Generator] = None) -> List[Tensor]:
    """``n`` random photometric views of ``x`` [B, C, H, W] (normalised units), each drawn per
    image: gamma ``u^g`` on the image min-max rescaled to [0, 1] (log g ~ U(-0.2s, 0.2s)), then
    contrast ``(x - mean) c + mean`` (c ~ U(1 - 0.2s, 1 + 0.2s)), brightness ``+ b std``
    (b ~ U(-0.2s, 0.2s)) and Gaussian noise of std ``0.05 s std`` (mean/std of the image; s =
    ``strength``). 001 uses cutout, Sobel, noise and blur; D15.5 keeps the photometric ones that
    leave boxes and the padded border meaningful.

    Returns:
        list of ``n`` tensors shaped like ``x`` (no autograd history from ``x``).

    Raises:
        ValueError: ``x`` not 4-D, ``n`` < 1 or ``strength`` < 0.
    """
    if x.dim() != 4 or int(n) < 1 or strength < 0:
        raise ValueError(f"photometric_views: needs [B,C,H,W], n >= 1, strength >= 0; got "
                         f"{tuple(x.shape)}, n={n}, strength={strength}")
    x = x.detach().float()
    B = x.shape[0]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    span = (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp(min=1e-6)
    s = float(strength)

    def u(*shape):
        return (torch.rand(*shape, generator=generator) * 2 - 1).to(x.device)  # U(-1, 1)

    views = []
    for _ in range(int(n)):
        g = torch.exp(0.2 * s * u(B, 1, 1, 1))
        c = 1 + 0.2 * s * u(B, 1, 1, 1)
        b = 0.2 * s * u(B, 1, 1, 1)
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        v = ((x - lo) / span).clamp(0, 1).pow(g) * span + lo
        v = (v - mean) * c + mean + b * std + 0.05 * s * std * noise
        views.append(v)
    return views
