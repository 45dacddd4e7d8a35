"""Segmentation datasets: MSD Task06 Lung 2D patches (HDF5) and box-mask patches cropped from
the CT detection sets (weakly labelled segmentation *sources*).

MSD lung patches (``msd_lung_patches/lung_2mm/{val,test}_patches.h5``; data README): ``images``
(N, 1, 48, 48) float32 in [0, 1] and binary ``labels``; 130 patches from 13 patients per file;
no per-patch patient id. Names:

==================  =========================================================================
``msd_lung_train``  val-patient file minus the hold-out (training set of every stage)
``msd_lung_val``    seeded hold-out of the val-patient file (validation)
``msd_lung_test``   test-patient file (every reported number)
==================  =========================================================================

Hold-out: the patches of one patient appear to be stored contiguously, 10 per patient (130 = 13
x 10, and foreground areas are similar within each block of 10, e.g. 290/290/111 in one block
and 719/531/436 in another). We therefore hold out whole blocks of :data:`MSD_BLOCK` patches
(:data:`MSD_HOLDOUT_BLOCKS` of 13, chosen with ``random.Random(split_seed)``) and record the
block as ``patient_id = "block<k>"``. The block-patient mapping is inferred, not documented:
if it were wrong the hold-out would only be patch-level (possible same-patient leakage between
train and validation; the test file is patient-disjoint in any case).

Box-mask sources (paper C39 wants two CT sources; no second CT *segmentation* set is available
here): for every lesion box of a detection record, a square crop of :data:`BOX_CROP_SIDE` px
centred on the box is resized to 48 x 48 px (LungCT / Lung-PET-CT-Dx pixels are ~0.7-0.8 mm,
so 128 px -> 48 px is ~2 mm/px, the MSD patches' spacing) and its mask is the ellipse inscribed
in each box inside the crop. These are real CT images with *weak* (box-derived) masks; they
serve as Stage-1 source domains and multi-head datasets, never as evaluation data. Names:
``<detection name>_boxmask`` for ``lungct_train``, ``lungct_valid``, ``lung_pet_ct_dx_all``.

Record schema (beyond ``catalog.py``): ``seg_reader`` ``"h5"`` (``h5_index``) or ``"box_crop"``
(``source`` = the detection record, ``crop`` = [x1, y1, x2, y2] px in the source image,
``mask_boxes`` = boxes in output px); ``height = width = 48``; ``annotations = []``.
"""

from __future__ import annotations

import functools
import os
import random
from typing import Callable, List, Sequence, Tuple

import numpy as np

from ...utils.errors import DatasetError

__all__ = ["MSD_DIR", "MSD_NAMES", "BOXMASK_SOURCES", "load_msd_h5", "msd_records",
           "boxmask_records", "register_seg_datasets"]

MSD_DIR = os.path.join("msd_lung_patches", "lung_2mm")
MSD_NAMES = ("msd_lung_train", "msd_lung_val", "msd_lung_test")
#: patches per (inferred) patient block and blocks held out for validation.
MSD_BLOCK = 10
MSD_HOLDOUT_BLOCKS = 2
#: detection datasets turned into box-mask segmentation sources.
BOXMASK_SOURCES = ("lungct_train", "lungct_valid", "lung_pet_ct_dx_all")
#: crop side in source px and output patch side in px.
BOX_CROP_SIDE = 128
PATCH_SIZE = 48


@functools.lru_cache(maxsize=4)
def load_msd_h5(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(images [N, H, W] float32 in [0, 1], labels [N, H, W] uint8 0/1)`` of one HDF5 file
    (cached; the files are ~3 MB).

    Raises:
        DatasetError: missing file, missing ``images``/``labels``, shape mismatch, values of
            ``images`` outside [0, 1] or non-binary ``labels`` (message names the file).
    """
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: MSD lung patch file not found")
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "images" not in f or "labels" not in f:
                raise DatasetError(f"{path}: needs datasets 'images' and 'labels', has {list(f)}")
            images, labels = np.asarray(f["images"][:], np.float32), np.asarray(f["labels"][:])
    except OSError as e:
        raise DatasetError(f"{path}: cannot read HDF5: {e}") from e
    if images.shape != labels.shape or images.ndim != 4 or images.shape[1] != 1:
        raise DatasetError(f"{path}: images {images.shape} / labels {labels.shape} must both be (N, 1, H, W)")
    if images.min() < 0 or images.max() > 1:
        raise DatasetError(f"{path}: images outside [0, 1] ({images.min()}..{images.max()})")
    if not np.isin(labels, (0, 1)).all():
        raise DatasetError(f"{path}: labels are not binary")
    return images[:, 0], labels[:, 0].astype(np.uint8)


def msd_records(path: str, name: str, indices: Sequence[int]) -> List[dict]:
    """Records of patches ``indices`` of ``path`` (see the module docstring)."""
    images, _ = load_msd_h5(path)
    h, w = images.shape[-2:]
    return [{"file_name": path, "h5_index": int(i), "height": int(h), "width": int(w),
             "image_id": f"{name}:{int(i)}", "patient_id": f"block{int(i) // MSD_BLOCK}",
             "seg_reader": "h5", "annotations": []} for i in indices]


def msd_holdout_blocks(n: int, seed: int) -> List[int]:
    """Block ids (``index // MSD_BLOCK``) held out for validation, seeded."""
    blocks = list(range((n + MSD_BLOCK - 1) // MSD_BLOCK))
    return sorted(random.Random(int(seed)).sample(blocks, min(MSD_HOLDOUT_BLOCKS, len(blocks) - 1)))


def boxmask_records(det_records: Sequence[dict], name: str) -> List[dict]:
    """One 48 x 48 box-mask patch record per lesion box of ``det_records`` (module docstring)."""
    out = []
    scale = PATCH_SIZE / float(BOX_CROP_SIDE)
    for rec in det_records:
        boxes = [a["bbox"] for a in rec.get("annotations", [])]
        for j, (x1, y1, x2, y2) in enumerate(boxes):
            cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
            crop = [cx - BOX_CROP_SIDE / 2, cy - BOX_CROP_SIDE / 2, cx + BOX_CROP_SIDE / 2, cy + BOX_CROP_SIDE / 2]
            inside = [[(b[0] - crop[0]) * scale, (b[1] - crop[1]) * scale,
                       (b[2] - crop[0]) * scale, (b[3] - crop[1]) * scale]
                      for b in boxes if b[2] > crop[0] and b[0] < crop[2] and b[3] > crop[1] and b[1] < crop[3]]
            out.append({"file_name": rec["file_name"], "height": PATCH_SIZE, "width": PATCH_SIZE,
                        "image_id": f"{name}:{rec['image_id']}:{j}", "seg_reader": "box_crop",
                        "source": rec, "crop": crop, "mask_boxes": inside, "annotations": [],
                        **{k: rec[k] for k in ("patient_id", "series_id") if k in rec}})
    if not out:
        raise DatasetError(f"dataset '{name}': the detection records have no lesion box to crop")
    return out


def register_seg_datasets(reg: Callable, root: str, split_seed: int) -> List[str]:
    """Register :data:`MSD_NAMES` and the ``<name>_boxmask`` sources with ``reg(name, loader,
    **metadata)`` (``register_builtin``'s helper); metadata ``evaluator_type="sem_seg"``."""
    from ..catalog import DatasetCatalog

    val_file = os.path.join(root, MSD_DIR, "val_patches.h5")
    test_file = os.path.join(root, MSD_DIR, "test_patches.h5")

    def split(which: str) -> List[dict]:
        n = len(load_msd_h5(val_file)[0])
        held = set(msd_holdout_blocks(n, split_seed))
        idx = [i for i in range(n) if (i // MSD_BLOCK in held) == (which == "val")]
        return msd_records(val_file, f"msd_lung_{which}", idx)

    meta = {"evaluator_type": "sem_seg", "stuff_classes": ["background", "tumour"]}
    reg("msd_lung_train", lambda: split("train"), **meta)
    reg("msd_lung_val", lambda: split("val"), **meta)
    reg("msd_lung_test", lambda: msd_records(test_file, "msd_lung_test", range(len(load_msd_h5(test_file)[0]))),
        **meta)
    names = list(MSD_NAMES)
    for det in BOXMASK_SOURCES:
        name = f"{det}_boxmask"
        reg(name, functools.partial(lambda d, n: boxmask_records(DatasetCatalog.get(d), n), det, name),
            **meta, weak_labels="ellipse inscribed in each lesion box")
        names.append(name)
    return names


SEG_NAMES: Tuple[str, ...] = MSD_NAMES + tuple(f"{d}_boxmask" for d in BOXMASK_SOURCES)
