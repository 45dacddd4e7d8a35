"""``DatasetMapper``: one record -> one model input dict.

Reads the image (``mdkd_det.data.io.read_image``: JPEG, DICOM -> HU -> window, 16-bit PNG ->
HU -> window), applies the seeded albumentations pipeline in training, replicates grey to
``INPUT.CHANNELS`` and builds the torchvision target. Normalisation and resizing are the
detector's job (its transform uses ``MODEL.PIXEL_MEAN/STD`` and ``INPUT.MIN_SIZE_*``), so at
test time the image stays at its original size and detections come back in original px.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..utils.errors import DatasetError
from .io import read_image
from .transforms import build_augmentation


class DatasetMapper:
    """Callable ``mapper(record, seed=None) -> dict``.

    Returns:
        ``{"image": FloatTensor[C, H, W] in [0, 1] (grey replicated, a view),
        "target": {"boxes": FloatTensor[N, 4] xyxy px, "labels": Int64Tensor[N] = category_id + 1},
        "record": record}``.

    Args:
        cfg: config (INPUT.*).
        is_train: apply augmentation.
        window: default (level, width) HU for HU readers; default ``INPUT.WINDOW``. With
            ``INPUT.USE_DATASET_WINDOW`` a record's own ``dicom_window`` (DeepLesion
            ``DICOM_windows``) is used instead.

    Raises:
        DatasetError: from the reader (missing/unreadable image), naming the file.
    """

    #: Config key of the model's class count: the train loader checks every annotation's
    #: ``category_id`` against it before training (:func:`~mdkd_det.data.build.get_dataset_records`).
    num_classes_key = "MODEL.ROI_HEADS.NUM_CLASSES"

    def __init__(self, cfg, is_train: bool, window=None) -> None:
        self.is_train = is_train
        self.channels = int(cfg.INPUT.CHANNELS)
        self.window = tuple(window if window is not None else cfg.INPUT.WINDOW)
        self.use_dataset_window = bool(cfg.INPUT.USE_DATASET_WINDOW)
        self.aug = build_augmentation(cfg, is_train)

    def read(self, record: dict) -> np.ndarray:
        """Windowed grey image [H, W] float32 in [0, 1] for ``record``."""
        window = self.window
        if self.use_dataset_window and record.get("dicom_window") is not None:
            window = tuple(record["dicom_window"])
        return read_image(record, window=window)

    def image_tensor(self, img: np.ndarray) -> torch.Tensor:
        """Grey image [H, W] in [0, 1] -> FloatTensor[C, H, W] (replicated to ``INPUT.CHANNELS``,
        a view: no copy per channel)."""
        image = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]
        return image.expand(self.channels, -1, -1)

    def __call__(self, record: dict, seed: Optional[int] = None) -> dict:
        img = self.read(record)
        anns = record.get("annotations", [])
        boxes = np.asarray([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        labels = np.asarray([a["category_id"] for a in anns], dtype=np.int64)
        if self.aug is not None:
            if seed is not None:
                self.aug.set_random_seed(int(seed))
            try:
                out = self.aug(image=img, bboxes=boxes, labels=labels)
            except Exception as e:  # albumentations errors do not name the file
                raise DatasetError(f"{record['file_name']}: augmentation failed: {e}") from e
            img = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64)
        image = self.image_tensor(img)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels) + 1,
        }
        return {"image": image, "target": target, "record": record}
