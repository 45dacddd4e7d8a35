"""Segmentation task losses: Dice (paper Eq. 1) and DiceBCE (Eq. 10), pure functions.

Decision (paper_notes C16 [proposal]): Dice is computed on sigmoid probabilities, flattened over
the whole batch, with a smoothing constant ``smooth`` (1.0) in numerator and denominator:

    L_Dice = 1 - (2 * sum_i p_i y_i + smooth) / (sum_i p_i + sum_i y_i + smooth)
    L_BCE  = (1/N) sum_i BCE(p_i, y_i)          (N = number of pixels in the batch)
    L_DiceBCE = L_Dice + L_BCE                                                   (Eq. 10)

BCE is computed from logits (``binary_cross_entropy_with_logits``) for numerical stability.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

__all__ = ["dice_loss", "bce_loss", "seg_task_losses", "SEG_LOSSES"]

#: Accepted values of ``MODEL.SEG.LOSS``.
SEG_LOSSES = ("dice", "dice_bce")


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"segmentation loss: logits {tuple(logits.shape)} and target "
                         f"{tuple(target.shape)} must have the same shape [B, 1, H, W]")


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss (paper Eq. 1 / the Dice part of Eq. 10), batch-flattened.

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
    p = torch.sigmoid(logits.float()).reshape(-1)
    y = target.float().reshape(-1)
    inter = (p * y).sum()
    return 1.0 - (2.0 * inter + smooth) / (p.sum() + y.sum() + smooth)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean pixel BCE (Eq. 10's ``(1/N) sum_i BCE``), from logits. Shapes as :func:`dice_loss`."""
    _check(logits, target)
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="mean")


def seg_task_losses(logits: torch.Tensor, target: torch.Tensor, kind: str = "dice_bce",
                    smooth: float = 1.0) -> Dict[str, torch.Tensor]:
    """The task-loss dict of a segmentation model.

    ``kind="dice"``: ``{"loss_dice"}`` (teachers, paper Eq. 1 / Alg. 1 l. 7, 36);
    ``kind="dice_bce"``: ``{"loss_dice", "loss_bce"}`` (students and baselines, Eq. 10; each term
    its own entry so both are logged; their sum is L_DiceBCE).

    Raises:
        ValueError: unknown ``kind`` or shape mismatch.
    """
    if kind not in SEG_LOSSES:
        raise ValueError(f"MODEL.SEG.LOSS must be one of {SEG_LOSSES}, got {kind!r}")
    out = {"loss_dice": dice_loss(logits, target, smooth)}
    if kind == "dice_bce":
        out["loss_bce"] = bce_loss(logits, target)
    return out
