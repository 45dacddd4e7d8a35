"""Segmentation models' parts: encoders (registered backbones), decoder, task losses."""

from .decoder import UNetDecoder
from .encoders import TResUNetEncoder, UNetEncoder
from .losses import bce_loss, dice_loss, seg_task_losses

__all__ = ["UNetDecoder", "UNetEncoder", "TResUNetEncoder", "dice_loss", "bce_loss", "seg_task_losses"]
