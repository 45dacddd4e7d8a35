"""Training augmentation from config, with albumentations (bbox-safe).

Source: albumentations 2.x (``Compose`` + ``BboxParams(format="pascal_voc", clip=True)``).
Works on grey float32 images [H, W] in [0, 1]; boxes are xyxy px. Boxes that leave the image are
clipped; boxes smaller than ``INPUT.AUG.MIN_BOX_SIZE`` px after augmentation are dropped by
albumentations (and the image is kept as a negative).
"""

from __future__ import annotations

from typing import Optional

import albumentations as A


def build_augmentation(cfg, is_train: bool) -> Optional[A.Compose]:
    """Return the albumentations pipeline for training, or ``None`` (test time, or all off).

    Keys (``INPUT.AUG``): HFLIP_PROB, VFLIP_PROB, AFFINE_PROB (+ AFFINE_SCALE, AFFINE_TRANSLATE as
    a fraction of the size, AFFINE_ROTATE in degrees), BRIGHTNESS_CONTRAST_PROB (+ limits),
    MIN_BOX_SIZE (px).
    """
    if not is_train:
        return None
    ops = augmentation_ops(cfg)
    if not ops:
        return None
    return A.Compose(
        ops,
        bbox_params=A.BboxParams(
            format="pascal_voc",
            label_fields=["labels"],
            clip=True,
            min_width=float(cfg.INPUT.AUG.MIN_BOX_SIZE),
            min_height=float(cfg.INPUT.AUG.MIN_BOX_SIZE),
        ),
    )


def build_seg_augmentation(cfg, is_train: bool) -> Optional[A.Compose]:
    """The same ``INPUT.AUG`` operations for segmentation: ``aug(image=img, mask=mask)``
    transforms the mask with the image (albumentations applies the geometric ops to ``mask``
    with nearest-neighbour interpolation; photometric ops leave it). ``None`` at test time or
    when all are off."""
    if not is_train:
        return None
    ops = augmentation_ops(cfg)
    return A.Compose(ops) if ops else None


def augmentation_ops(cfg) -> list:
    """The albumentations operations enabled by ``INPUT.AUG`` (shared by boxes and masks)."""
    aug = cfg.INPUT.AUG
    ops = []
    if aug.HFLIP_PROB > 0:
        ops.append(A.HorizontalFlip(p=float(aug.HFLIP_PROB)))
    if aug.VFLIP_PROB > 0:
        ops.append(A.VerticalFlip(p=float(aug.VFLIP_PROB)))
    if aug.AFFINE_PROB > 0:
        ops.append(
            A.Affine(
                scale=tuple(float(s) for s in aug.AFFINE_SCALE),
                translate_percent=(-float(aug.AFFINE_TRANSLATE), float(aug.AFFINE_TRANSLATE)),
                rotate=(-float(aug.AFFINE_ROTATE), float(aug.AFFINE_ROTATE)),
                p=float(aug.AFFINE_PROB),
            )
        )
    if aug.BRIGHTNESS_CONTRAST_PROB > 0:
        ops.append(
            A.RandomBrightnessContrast(
                brightness_limit=float(aug.BRIGHTNESS_LIMIT),
                contrast_limit=float(aug.CONTRAST_LIMIT),
                p=float(aug.BRIGHTNESS_CONTRAST_PROB),
            )
        )
    return ops
