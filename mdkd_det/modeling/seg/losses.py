"""Segmentation task losses: Dice (paper Eq. 1) and DiceBCE (Eq. 10), pure functions on MONAI.

Decision (paper_notes C16 [proposal]): Dice is computed on sigmoid probabilities, flattened over
the whole batch, with a smoothing constant ``smooth`` (1.0) in numerator and denominator:

    L_Dice = 1 - (2 * sum_i p_i y_i + smooth) / (sum_i p_i + sum_i y_i + smooth)
    L_BCE  = (1/N) sum_i BCE(p_i, y_i)          (N = number of pixels in the batch)
    L_DiceBCE = L_Dice + L_BCE                                                   (Eq. 10)

Both terms are the two parts of MONAI's ``DiceCELoss(sigmoid=True, batch=True,
smooth_nr=smooth, smooth_dr=smooth)`` (``.dice``: ``monai.losses.DiceLoss``; ``.bce``:
``torch.nn.BCEWithLogitsLoss``, i.e. BCE from logits for numerical stability); their sum is
that loss's value. MONAI writes the denominator as ``2 * (tp + fp / 2 + fn / 2) + smooth`` with
``fp = sum p - tp``, ``fn = sum y - tp``: the same number, up to float32 rounding (it differs from
the direct formula above by at most one unit in the last place, ~6e-8;
``tests/test_seg_losses_metrics.py`` checks both against the formula).
"""

from __future__ import annotations

import functools
from typing import Dict

import torch
from monai.losses import DiceCELoss

__all__ = ["dice_loss", "bce_loss", "seg_task_losses", "SEG_LOSSES"]

#: Accepted values of ``MODEL.SEG.LOSS``.
SEG_LOSSES = ("dice", "dice_bce")


@functools.lru_cache(maxsize=None)
def _dice_ce(smooth: float) -> DiceCELoss:
    """MONAI's DiceBCE for one ``smooth`` (stateless; built once per value)."""
    return DiceCELoss(sigmoid=True, batch=True, smooth_nr=smooth, smooth_dr=smooth)


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"segmentation loss: logits {tuple(logits.shape)} and target "
                         f"{tuple(target.shape)} must have the same shape [B, 1, H, W]")


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss (paper Eq. 1 / the Dice part of Eq. 10), batch-flattened, in float32.

    ``monai.losses.DiceLoss(sigmoid=True, batch=True, smooth_nr=smooth, smooth_dr=smooth)``.

    Args:
        logits: ``[B, 1, H, W]`` raw scores.
        target: ``[B, 1, H, W]`` binary mask (0/1, any float/int dtype).
        smooth: additive smoothing (C16 proposal: 1.0).

    Returns:
        0-dim tensor in [0, 1].

    Raises:
        ValueError: shapes differ.
    """
    _check(logits, target)
    return _dice_ce(float(smooth)).dice(logits.float(), target.float())


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean pixel BCE from logits (Eq. 10's ``(1/N) sum_i BCE``), in float32: the CE part of
    MONAI's ``DiceCELoss`` for one channel (``torch.nn.BCEWithLogitsLoss``). Shapes and errors as
    :func:`dice_loss`."""
    _check(logits, target)
    return _dice_ce(1.0).bce(logits.float(), target.float())


def seg_task_losses(logits: torch.Tensor, target: torch.Tensor, kind: str = "dice_bce",
                    smooth: float = 1.0) -> Dict[str, torch.Tensor]:
    """The task-loss dict of a segmentation model.

    ``kind="dice"``: ``{"loss_dice"}`` (teachers, paper Eq. 1 / Alg. 1 l. 7, 36);
    ``kind="dice_bce"``: ``{"loss_dice", "loss_bce"}`` (students and baselines, Eq. 10; each term
    its own entry so both are logged; their sum is L_DiceBCE, the value of MONAI's
    ``DiceCELoss(sigmoid=True, batch=True)``).

    Args:
        logits, target: ``[B, 1, H, W]`` as in :func:`dice_loss`.
        kind: ``MODEL.SEG.LOSS``, one of :data:`SEG_LOSSES`.
        smooth: ``MODEL.SEG.DICE_SMOOTH``.

    Returns:
        name -> 0-dim float32 tensor.

    Raises:
        ValueError: unknown ``kind`` or shape mismatch.
    """
    if kind not in SEG_LOSSES:
        raise ValueError(f"MODEL.SEG.LOSS must be one of {SEG_LOSSES}, got {kind!r}")
    out = {"loss_dice": dice_loss(logits, target, smooth)}
    if kind == "dice_bce":
        out["loss_bce"] = bce_loss(logits, target)
    return out
