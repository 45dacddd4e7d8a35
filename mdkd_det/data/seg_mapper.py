"""``SegDatasetMapper``: one segmentation record -> one model input dict (image + mask).

Readers by ``record["seg_reader"]`` (schema: :mod:`mdkd_det.data.datasets.msd_lung`):

- ``"h5"``: patch ``h5_index`` of the HDF5 file ``file_name`` (MSD lung patches, already in
  [0, 1]; mask = the file's binary label);
- ``"box_crop"``: the detection record ``source`` read with
  :func:`mdkd_det.data.io.read_image` (JPEG / DICOM windowed with ``INPUT.WINDOW``), cropped to
  ``crop`` (zero padding outside the image) and resized to ``height`` x ``width`` (OpenCV
  area interpolation); mask = the filled ellipses inscribed in ``mask_boxes``.

Training applies the seeded albumentations pipeline of ``INPUT.AUG`` to image and mask together
(:func:`~mdkd_det.data.transforms.build_seg_augmentation`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import cv2
import numpy as np
import torch

from ..utils.errors import DatasetError
from .datasets.msd_lung import load_msd_h5
from .io import read_image
from .transforms import build_seg_augmentation

__all__ = ["SegDatasetMapper", "read_seg_record"]


def _crop(img: np.ndarray, box) -> np.ndarray:
    """``img[y1:y2, x1:x2]`` with zero padding where the box leaves the image (px, rounded)."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    out = np.zeros((y2 - y1, x2 - x1), np.float32)
    h, w = img.shape
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if sx2 > sx1 and sy2 > sy1:
        out[sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = img[sy1:sy2, sx1:sx2]
    return out


def read_seg_record(record: dict, window=None) -> Tuple[np.ndarray, np.ndarray]:
    """``(image [H, W] float32 in [0, 1], mask [H, W] uint8 0/1)`` of one record.

    Raises:
        DatasetError: unknown ``seg_reader``, bad index, or a reader error (names the file).
    """
    kind = record.get("seg_reader")
    if kind == "h5":
        images, labels = load_msd_h5(record["file_name"])
        i = int(record["h5_index"])
        if not 0 <= i < len(images):
            raise DatasetError(f"{record['file_name']}: patch index {i} out of range 0..{len(images) - 1}")
        return images[i].copy(), labels[i].copy()
    if kind == "box_crop":
        h, w = int(record["height"]), int(record["width"])
        src = read_image(record["source"], window=window)
        img = cv2.resize(_crop(src, record["crop"]), (w, h), interpolation=cv2.INTER_AREA)
        mask = np.zeros((h, w), np.uint8)
        for x1, y1, x2, y2 in record["mask_boxes"]:
            center = (int(round((x1 + x2) / 2)), int(round((y1 + y2) / 2)))
            axes = (max(1, int(round((x2 - x1) / 2))), max(1, int(round((y2 - y1) / 2))))
            cv2.ellipse(mask, center, axes, 0, 0, 360, 1, thickness=-1)
        return np.clip(img, 0.0, 1.0).astype(np.float32), mask
    raise DatasetError(f"{record.get('file_name')}: record has seg_reader {kind!r}; expected 'h5' or 'box_crop'")


class SegDatasetMapper:
    """Callable ``mapper(record, seed=None) -> dict``.

    Returns:
        ``{"image": FloatTensor[C, H, W] in [0, 1] (grey replicated to INPUT.CHANNELS),
        "target": {"masks": FloatTensor[1, H, W] 0/1}, "record": record}``.

    Raises:
        DatasetError: from :func:`read_seg_record` or a failing augmentation (names the file).
    """

    def __init__(self, cfg, is_train: bool) -> None:
        self.channels = int(cfg.INPUT.CHANNELS)
        self.window = tuple(cfg.INPUT.WINDOW)
        self.aug = build_seg_augmentation(cfg, is_train)

    def __call__(self, record: dict, seed: Optional[int] = None) -> dict:
        img, mask = read_seg_record(record, self.window)
        if self.aug is not None:
            if seed is not None:
                self.aug.set_random_seed(int(seed))
            try:
                out = self.aug(image=img, mask=mask)
            except Exception as e:
                raise DatasetError(f"{record.get('file_name')}: augmentation failed: {e}") from e
            img, mask = out["image"], out["mask"]
        image = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None].expand(self.channels, -1, -1)
        masks = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]
        return {"image": image, "target": {"masks": masks}, "record": record}
