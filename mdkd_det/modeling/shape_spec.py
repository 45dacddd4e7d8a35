"""``ShapeSpec``: channels and stride of one feature map (same fields as detectron2's), and THE
one way feature levels of two backbones are matched by stride (issue 14): KD student/teacher
pairs (A25), the ``FusionBackbone``'s cross-task teachers (``FUSION.LEVEL_MATCH stride``) and
detectron2's FPN level names."""

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional


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


def stride_level(stride: int) -> int:
    """``log2(stride)``, the pyramid level of a map with ``stride`` px (4 -> 2).

    Raises:
        ValueError: stride is not a power of two.
    """
    level = math.log2(int(stride)) if int(stride) >= 1 else -1.0
    if level < 0 or level != int(level):
        raise ValueError(f"feature stride {stride} px is not a power of two")
    return int(level)


def level_name(stride: int) -> str:
    """detectron2's FPN name of a map with ``stride`` px: ``p{log2(stride)}`` (4 -> ``p2``).

    Raises:
        ValueError: stride is not a power of two.
    """
    return f"p{stride_level(stride)}"


def _stride_distance(a: Optional[int], b: Optional[int]) -> float:
    """``|log2 a - log2 b|`` (0 for equal strides, also unknown ones; inf if one is unknown)."""
    if a == b:
        return 0.0
    return math.inf if a is None or b is None else abs(math.log2(a) - math.log2(b))


def match_levels_by_stride(src: Mapping[str, ShapeSpec], dst: Mapping[str, ShapeSpec],
                           nearest: bool = False) -> Dict[str, str]:
    """Pair the feature levels of two backbones by stride.

    For each level of ``src`` (in order) the candidate of ``dst`` is the one whose stride is
    nearest in log2, ties -> the finer one, then the first in ``dst`` order.

    - ``nearest=False`` (KD student/teacher levels, decision A25): only equal strides pair, and
      each ``dst`` level pairs once (the first level of a stride wins when a backbone repeats a
      stride);
    - ``nearest=True`` (``FusionBackbone`` with ``level_match="stride"``): every ``src`` level
      gets its candidate, which may be shared.

    Args:
        src, dst: ``{name: ShapeSpec}`` from ``output_shape()``, strides in px.
        nearest: see above.

    Returns:
        ``{src level: dst level}``.

    Raises:
        ValueError: ``nearest=False`` and no common stride.
    """
    pairs: Dict[str, str] = {}
    for name, spec in src.items():
        cand = min(dst, key=lambda k: (_stride_distance(dst[k].stride, spec.stride), dst[k].stride or 0),
                   default=None)
        if cand is None:
            continue
        if nearest:
            pairs[name] = cand
        elif dst[cand].stride == spec.stride and cand not in pairs.values():
            pairs[name] = cand
    if not pairs and not nearest:
        raise ValueError(
            f"student levels {dict((k, v.stride) for k, v in src.items())} and teacher "
            f"levels {dict((k, v.stride) for k, v in dst.items())} share no stride"
        )
    return pairs
