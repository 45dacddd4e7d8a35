"""``ShapeSpec``: channels and stride of one feature map (same fields as detectron2's)."""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ShapeSpec:
    """Shape of a feature map, as detectron2's ``ShapeSpec``.

    Attributes:
        channels: number of channels C.
        height, width: spatial size in px when fixed, else None.
        stride: input px per feature px (4 for FPN level '0').
    """

    channels: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    stride: Optional[int] = None
