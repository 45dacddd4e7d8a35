"""Record validation before training/evaluation (design.md, "Errors": validate early).

:func:`check_records` decides, for every record:

- **image file**: must exist (``os.path.isfile``; no decoding, so it stays fast for thousands
  of images) -> else :class:`DatasetError` naming the file.
- **size**: ``height`` and ``width`` must be positive integers -> else DatasetError.
- **malformed box** (not 4 finite numbers, or ``x2 < x1`` / ``y2 < y1``): always a DatasetError
  naming the file; it is a broken annotation, not a rounding issue.
- **box outside the image** (any coordinate outside ``[0, W] x [0, H]``): ``box_policy="clip"``
  clips it to the image and counts it (one warning per call with the count);
  ``box_policy="error"`` raises DatasetError naming the file and the box.
- **degenerate box** (width or height < 1 px after clipping): dropped, counted, one warning.
  Such boxes carry no learnable extent and break IoU-based matching.
- **category id**: with ``num_classes`` given, must lie in ``[0, num_classes)``.
- **empty records** (no boxes left): kept if ``keep_empty`` (negative images), else dropped.

Input records are not modified; returned records are shallow copies with new annotation lists.
"""

from __future__ import annotations

import logging
import math
import os
from typing import List, Optional, Sequence

from ...utils.errors import DatasetError

__all__ = ["BOX_POLICIES", "MIN_BOX_SIZE", "check_records"]

logger = logging.getLogger(__name__)

#: Accepted values of ``box_policy``.
BOX_POLICIES = ("clip", "error")
#: Boxes narrower or lower than this (px, after clipping) are dropped as degenerate.
MIN_BOX_SIZE = 1.0


def check_records(
    records: Sequence[dict],
    dataset_name: str,
    box_policy: str = "clip",
    keep_empty: bool = True,
    check_files: bool = True,
    num_classes: Optional[int] = None,
    num_classes_key: str = "",
) -> List[dict]:
    """Validate and clean records (see the module docstring for every rule).

    Args:
        records: records (schema in ``mdkd_det/data/catalog.py``), boxes XYXY_ABS px.
        dataset_name: used in messages.
        box_policy: ``"clip"`` or ``"error"`` for boxes outside the image (config
            ``DATASETS.BOX_POLICY``).
        keep_empty: keep records without boxes (config ``DATASETS.KEEP_EMPTY``).
        check_files: check that every ``file_name`` exists.
        num_classes: if given, category ids must be in ``[0, num_classes)``.
        num_classes_key: config key of ``num_classes``, named in the message.

    Returns:
        New list of (shallow-copied) records with clipped boxes and degenerate boxes removed.

    Raises:
        DatasetError: bad ``box_policy``; missing image file; bad height/width; malformed box;
            box outside the image with ``box_policy="error"``; category id out of range. The
            message names the dataset and the file.
    """
    if box_policy not in BOX_POLICIES:
        raise DatasetError(f"box_policy must be one of {BOX_POLICIES}, got {box_policy!r}")
    out: List[dict] = []
    n_clipped = n_degenerate = n_empty_dropped = 0
    for rec in records:
        path = rec.get("file_name", "")
        where = f"dataset '{dataset_name}', image {path}"
        if check_files and not os.path.isfile(path):
            raise DatasetError(f"{where}: image file not found")
        try:
            h, w = int(rec["height"]), int(rec["width"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{where}: record needs integer 'height' and 'width'") from None
        if h <= 0 or w <= 0:
            raise DatasetError(f"{where}: non-positive size {h}x{w} (HxW)")
        anns = []
        for ann in rec.get("annotations", []):
            try:
                x1, y1, x2, y2 = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError):
                raise DatasetError(f"{where}: bbox must be [x1, y1, x2, y2], got {ann.get('bbox')!r}") from None
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                raise DatasetError(f"{where}: non-finite bbox {[x1, y1, x2, y2]}")
            if x2 < x1 or y2 < y1:
                raise DatasetError(f"{where}: malformed bbox {[x1, y1, x2, y2]} (x2 < x1 or y2 < y1)")
            if num_classes is not None:
                c = ann.get("category_id")
                if not isinstance(c, int) or not 0 <= c < num_classes:
                    hint = f" (the model has {num_classes} classes: {num_classes_key})" if num_classes_key else ""
                    raise DatasetError(f"{where}: category_id {c!r} not in [0, {num_classes}){hint}")
            if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
                if box_policy == "error":
                    raise DatasetError(
                        f"{where}: bbox {[x1, y1, x2, y2]} lies outside the {w}x{h} (WxH) image"
                    )
                x1, x2 = min(max(x1, 0.0), float(w)), min(max(x2, 0.0), float(w))
                y1, y2 = min(max(y1, 0.0), float(h)), min(max(y2, 0.0), float(h))
                n_clipped += 1
            if x2 - x1 < MIN_BOX_SIZE or y2 - y1 < MIN_BOX_SIZE:
                n_degenerate += 1
                continue
            new = dict(ann)
            new["bbox"] = [x1, y1, x2, y2]
            anns.append(new)
        if not anns and not keep_empty:
            n_empty_dropped += 1
            continue
        new_rec = dict(rec)
        new_rec["annotations"] = anns
        out.append(new_rec)
    if n_clipped:
        logger.warning(
            "dataset '%s': clipped %d box(es) extending outside their image", dataset_name, n_clipped
        )
    if n_degenerate:
        logger.warning(
            "dataset '%s': dropped %d degenerate box(es) (width or height < %g px after clipping)",
            dataset_name, n_degenerate, MIN_BOX_SIZE,
        )
    if n_empty_dropped:
        logger.info(
            "dataset '%s': dropped %d image(s) without boxes (keep_empty=False)",
            dataset_name, n_empty_dropped,
        )
    return out
