"""Our dataset catalog inside detectron2: registration and a mapper using our image readers.

:func:`register_mdkd_datasets` puts names of our :class:`~mdkd_det.data.DatasetCatalog`
(e.g. the built-in ``lungct_train`` / ``lungct_valid`` over ``$MDKD_DATASETS``) into
detectron2's ``DatasetCatalog`` / ``MetadataCatalog``. Our records are already detectron2
dicts (``file_name``, ``height``, ``width``, ``image_id``, ``annotations`` with ``bbox``
[x1, y1, x2, y2] px and contiguous ``category_id``); each annotation gets
``bbox_mode = BoxMode.XYXY_ABS``.

:class:`MDKDDatasetMapper` reads pixels with :func:`mdkd_det.data.io.read_image` (JPEG,
16-bit PNG -> HU -> window, DICOM -> HU -> window) and then follows detectron2's mapper
(``detection_utils.build_augmentation``: ResizeShortestEdge + RandomFlip in training).
"""

from __future__ import annotations

import copy
from typing import List, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog as D2DatasetCatalog
from detectron2.data import MetadataCatalog as D2MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from ..data.catalog import DatasetCatalog, MetadataCatalog
from ..data.datasets.builtin import register_builtin
from ..data.io import read_image
from ..utils.env import dataset_root


def _to_d2(name: str) -> List[dict]:
    records = DatasetCatalog.get(name)
    for r in records:
        for a in r.get("annotations", []):
            a["bbox_mode"] = BoxMode.XYXY_ABS
    return records


def register_mdkd_datasets(cfg, names: Sequence[str] = ()) -> List[str]:
    """Register our datasets in detectron2's catalogs (idempotent).

    Args:
        cfg: detectron2 config with :func:`~mdkd_det.d2.add_mdkd_config` keys
            (``DATASETS.ROOT``, ``DATASETS.SPLIT_SEED``, ``DATASETS.SPLIT_FRACTIONS``).
        names: our dataset names; default ``DATASETS.TRAIN + DATASETS.TEST``.

    Metadata copied: ``thing_classes`` (and ``thing_dataset_id_to_contiguous_id`` when ours has
    it) and ``evaluator_type``. ``json_file`` is NOT copied: detectron2's ``COCOEvaluator`` then
    writes the ground truth from these same records, so its category ids and boxes match the
    predictions exactly.

    Returns:
        The names registered in detectron2.

    Raises:
        DatasetError: (on first use of a name) unknown name or unreadable files, from our
            catalog, naming the file.
    """
    register_builtin(dataset_root(cfg), cfg.DATASETS.SPLIT_SEED, cfg.DATASETS.SPLIT_FRACTIONS,
                     cfg.DATASETS.LABEL_FRACTION)
    names = list(names) or list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    for name in names:
        if name in D2DatasetCatalog.list():
            continue
        D2DatasetCatalog.register(name, lambda n=name: _to_d2(n))
        meta = MetadataCatalog.get(name)
        extra = {k: meta.get(k) for k in ("thing_dataset_id_to_contiguous_id",)
                 if meta.get(k) is not None}
        D2MetadataCatalog.get(name).set(
            thing_classes=list(meta.get("thing_classes", ["lesion"])),
            evaluator_type=meta.get("evaluator_type", "coco"), **extra)
    return names


class MDKDDatasetMapper:
    """detectron2 mapper over our readers: ``mapper(record) -> {"image", "instances", ...}``.

    Args:
        cfg: detectron2 config (+ ``INPUT.WINDOW``, ``INPUT.USE_DATASET_WINDOW``).
        is_train: training augmentation and ground-truth instances.

    Returns (per record): the record's keys plus ``"image"``: ``Tensor[3, H', W']`` float, grey
    replicated, values 0-255 (detectron2's pixel range; ``MODEL.PIXEL_MEAN/STD`` apply), and in
    training ``"instances"`` (``gt_boxes`` px of the resized image, ``gt_classes``).

    Raises:
        DatasetError: from :func:`read_image`, naming the file.
    """

    def __init__(self, cfg, is_train: bool = True) -> None:
        self.is_train = is_train
        self.augmentations = T.AugmentationList(utils.build_augmentation(cfg, is_train))
        self.window = tuple(cfg.INPUT.WINDOW)
        self.use_dataset_window = bool(cfg.INPUT.USE_DATASET_WINDOW)
        self.channels = len(cfg.MODEL.PIXEL_MEAN)

    def __call__(self, record: dict) -> dict:
        record = copy.deepcopy(record)
        window = self.window
        if self.use_dataset_window and record.get("dicom_window") is not None:
            window = tuple(record["dicom_window"])
        grey = read_image(record, window=window) * 255.0
        image = np.repeat(grey[:, :, None], self.channels, axis=2)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        h, w = image.shape[:2]
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)),
                                          dtype=torch.float32)
        if not self.is_train:
            record.pop("annotations", None)
            return record
        annos = [utils.transform_instance_annotations(a, transforms, (h, w))
                 for a in record.pop("annotations", [])]
        record["instances"] = utils.filter_empty_instances(utils.annotations_to_instances(annos, (h, w)))
        return record
