"""Built-in dataset names over the shared data layout (``$MDKD_DATASETS``).

Expected layout under ``root`` (the folder names of the shared data)::

    lungct_roboflow/{train,valid}/_annotations.coco.json (+ JPEGs)
    lung_pet_ct_dx_sample/Lung-PET-CT-Dx/...  and  lung_pet_ct_dx_sample/Annotation/<patient>/*.xml
    deeplesion_sample/DeepLesion_Truth_Samples/{train,test}/*.jpg|*.tru
    deeplesion/DL_info.csv  and  deeplesion/Images_png/<P>_<S>_<Se>/<slice>.png   (full release)

Registered names (all single class ``"lesion"``, ``evaluator_type="coco"``):

=================================  ===========================================================
``lungct_train``, ``lungct_valid``  Roboflow COCO export, official train/valid folders
                                    (records get ``series_id`` = LUNA16 series from the name).
``lungct_disjoint_train/_val/_test``  series-disjoint re-split of train + valid (issue 10, A21):
                                    :func:`lungct_disjoint_split`; the default of the MDKD
                                    LungCT configs (the official folders share 58 series).
``lungct_disjoint_train_labeled``,  series-disjoint halves of ``lungct_disjoint_train`` for the
``lungct_disjoint_train_unlabeled``   semi-supervised setting (paper 003): a seeded
                                    ``DATASETS.LABEL_FRACTION`` of its series keeps its labels
                                    (:func:`~.splits.split_labeled`); the rest has its boxes
                                    removed and metadata ``unlabeled=True``, which supervised
                                    training refuses.
``lung_pet_ct_dx_all``              every annotated slice; ``_train``/``_val``/``_test`` =
                                    seeded patient-level split of it (paper_notes A21).
``deeplesion_sample_train/_test``   JPEG truth samples, all lesion types.
``deeplesion_sample_lung_train/_test``  the same, lung lesions only (label 5).
``deeplesion_train/_val/_test``     full release, lung lesions (``Coarse_lesion_type`` 5, only
                                    labelled in the official val/test), re-split patient-level
                                    (paper_notes A23).
=================================  ===========================================================

Registration reads nothing; each name's loader reads its files when called. Full-dataset loads
shared by several split names (Lung-PET-CT-Dx, DeepLesion) are cached per root for the
process; every call returns fresh copies of the records.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Callable, List, Optional, Sequence, Tuple

from ...utils.env import dataset_root
from ..catalog import DatasetCatalog, MetadataCatalog
from .coco import load_coco_json
from .deeplesion import load_deeplesion
from .deeplesion_sample import load_deeplesion_sample
from .lung_pet_ct_dx import load_lung_pet_ct_dx, lung_pet_ct_dx_metadata
from .msd_lung import SEG_NAMES, register_seg_datasets
from .splits import lungct_series_id, lungct_slice_key, split_by_patient, split_labeled

__all__ = ["BUILTIN_NAMES", "builtin_paths", "register_builtin"]

LUNGCT_DIR = "lungct_roboflow"
LUNG_PET_CT_DX_DIR = "lung_pet_ct_dx_sample"
DEEPLESION_SAMPLE_DIR = "deeplesion_sample"
DEEPLESION_DIR = "deeplesion"

BUILTIN_NAMES: Tuple[str, ...] = (
    "lungct_train",
    "lungct_valid",
    "lungct_disjoint_train",
    "lungct_disjoint_val",
    "lungct_disjoint_test",
    "lungct_disjoint_train_labeled",
    "lungct_disjoint_train_unlabeled",
    "lung_pet_ct_dx_all",
    "lung_pet_ct_dx_train",
    "lung_pet_ct_dx_val",
    "lung_pet_ct_dx_test",
    "deeplesion_sample_train",
    "deeplesion_sample_test",
    "deeplesion_sample_lung_train",
    "deeplesion_sample_lung_test",
    "deeplesion_train",
    "deeplesion_val",
    "deeplesion_test",
) + SEG_NAMES  # segmentation: msd_lung_{train,val,test}, <detection name>_boxmask (msd_lung.py)

_state = {"key": None}


def builtin_paths(root: str) -> dict:
    """Paths the built-in loaders read under ``root`` (nothing is checked)."""
    return {
        "lungct_train_json": os.path.join(root, LUNGCT_DIR, "train", "_annotations.coco.json"),
        "lungct_train_images": os.path.join(root, LUNGCT_DIR, "train"),
        "lungct_valid_json": os.path.join(root, LUNGCT_DIR, "valid", "_annotations.coco.json"),
        "lungct_valid_images": os.path.join(root, LUNGCT_DIR, "valid"),
        "lung_pet_ct_dx_dicom_root": os.path.join(root, LUNG_PET_CT_DX_DIR),
        "lung_pet_ct_dx_annotations": os.path.join(root, LUNG_PET_CT_DX_DIR, "Annotation"),
        "deeplesion_sample_root": os.path.join(root, DEEPLESION_SAMPLE_DIR, "DeepLesion_Truth_Samples"),
        "deeplesion_csv": os.path.join(root, DEEPLESION_DIR, "DL_info.csv"),
        "deeplesion_images": os.path.join(root, DEEPLESION_DIR, "Images_png"),
    }


@functools.lru_cache(maxsize=4)
def _lung_pet_ct_dx_all(dicom_root: str, annotation_dir: str) -> Tuple[dict, ...]:
    return tuple(load_lung_pet_ct_dx(dicom_root, annotation_dir))


@functools.lru_cache(maxsize=4)
def _deeplesion_lung(csv_file: str, image_root: str) -> Tuple[dict, ...]:
    return tuple(load_deeplesion(csv_file, image_root, split=None, lesion_types=(5,)))


def _lungct_loader(name: str, json_file: str, image_root: str) -> Callable[[], List[dict]]:
    def load() -> List[dict]:
        records = load_coco_json(json_file, image_root, name, single_class="lesion")
        for r in records:
            r["series_id"] = lungct_series_id(r["file_name"])
        return records

    return load


#: Offset added to the image ids of the official ``valid`` JSON in the merged LungCT pool, so
#: ids stay unique (both JSONs number their images from 0).
LUNGCT_VALID_ID_OFFSET = 100000


def lungct_disjoint_split(train: Sequence[dict], valid: Sequence[dict], seed: int,
                          fractions: Sequence[float]) -> dict:
    """Series-disjoint train/val/test split of the LungCT Roboflow export (issue 10, A21).

    The official ``train`` and ``valid`` folders share 58 of valid's 102 LUNA16 series, so a model
    selected or reported on ``valid`` has seen those patients' slices. Here both folders are
    pooled (``valid`` image ids shifted by :data:`LUNGCT_VALID_ID_OFFSET`) and split by
    :func:`~.splits.split_by_patient` with ``series_id`` as the group (LUNA16 series = one CT of
    one patient), so no series is on two sides. Roboflow's three augmented copies of a source
    slice share its series and stay on one side. In ``val`` and ``test`` only one image per
    source slice is kept (the un-augmented ``valid`` copy when there is one, else the first file
    name), so evaluation images are not near-duplicates of each other; ``train`` keeps every copy.

    Args:
        train, valid: records of ``lungct_train`` / ``lungct_valid`` (with ``series_id``).
        seed, fractions: as :func:`~.splits.split_by_patient` (``DATASETS.SPLIT_SEED``,
            ``DATASETS.SPLIT_FRACTIONS``; default 72/8/20 % of the 514 series).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` (new record dicts).

    Raises:
        DatasetError: bad ``fractions``.
    """
    pool = [dict(r) for r in train]
    for r in valid:
        r = dict(r)
        r["image_id"] = int(r["image_id"]) + LUNGCT_VALID_ID_OFFSET
        r["official_split"] = "valid"
        pool.append(r)
    out = split_by_patient(pool, fractions, seed)
    for name in ("val", "test"):
        chosen: dict = {}
        for r in sorted(out[name], key=lambda r: (r.get("official_split") != "valid",
                                                 os.path.basename(r["file_name"]))):
            chosen.setdefault(lungct_slice_key(r["file_name"]), r)
        keep = {id(r) for r in chosen.values()}
        out[name] = [r for r in out[name] if id(r) in keep]
    return out


def _split_loader(full: Callable[[], Sequence[dict]], split: Optional[str], seed: int,
                  fractions: Sequence[float]) -> Callable[[], List[dict]]:
    def load() -> List[dict]:
        records = list(full())
        if split is not None:
            records = split_by_patient(records, fractions, seed)[split]
        return copy.deepcopy(records)

    return load


def register_builtin(
    root: Optional[str] = None,
    split_seed: int = 0,
    split_fractions: Sequence[float] = (0.72, 0.08, 0.20),
    label_fraction: float = 0.1,
) -> List[str]:
    """Register the built-in names (:data:`BUILTIN_NAMES`) for data under ``root``.

    Idempotent: a second call with the same arguments does nothing; a call with a different
    ``root`` (or split seed/fractions) removes the previous built-in names and registers them
    again. No file is read here.

    Args:
        root: data root; ``None`` -> :func:`mdkd_det.utils.env.dataset_root` (``$MDKD_DATASETS``).
        split_seed: seed of the patient-level splits (config ``DATASETS.SPLIT_SEED``).
        split_fractions: (train, val, test) patient fractions (``DATASETS.SPLIT_FRACTIONS``).
        label_fraction: share of ``lungct_disjoint_train``'s series that keeps its labels in
            ``lungct_disjoint_train_labeled`` (``DATASETS.LABEL_FRACTION``).

    Returns:
        The registered names.

    Raises:
        DatasetError: a built-in name is already registered by someone else.
    """
    root = os.path.abspath(os.path.expanduser(root if root is not None else dataset_root()))
    fractions = tuple(float(f) for f in split_fractions)
    key = (root, int(split_seed), fractions, float(label_fraction))
    if _state["key"] == key and all(n in DatasetCatalog for n in BUILTIN_NAMES):
        return list(BUILTIN_NAMES)
    if _state["key"] is not None:
        for n in BUILTIN_NAMES:
            DatasetCatalog.remove(n)
        _lung_pet_ct_dx_all.cache_clear()
        _deeplesion_lung.cache_clear()
    p = builtin_paths(root)
    lesion_meta = {"thing_classes": ["lesion"], "thing_dataset_id_to_contiguous_id": {1: 0}}

    def reg(name: str, loader: Callable[[], List[dict]], **meta) -> None:
        DatasetCatalog.register(name, loader)
        MetadataCatalog.get(name).set(evaluator_type="coco", dataset_root=root, **meta)

    for split in ("train", "valid"):
        name = f"lungct_{split}"
        js, imgs = p[f"lungct_{split}_json"], p[f"lungct_{split}_images"]
        reg(name, _lungct_loader(name, js, imgs), thing_classes=["lesion"], json_file=js,
            image_root=imgs)

    lungct_pair = (
        _lungct_loader("lungct_train", p["lungct_train_json"], p["lungct_train_images"]),
        _lungct_loader("lungct_valid", p["lungct_valid_json"], p["lungct_valid_images"]),
    )
    for split in ("train", "val", "test"):
        def load_disjoint(split=split) -> List[dict]:
            recs = lungct_disjoint_split(lungct_pair[0](), lungct_pair[1](), split_seed, fractions)
            return copy.deepcopy(recs[split])

        reg(f"lungct_disjoint_{split}", load_disjoint, image_root=os.path.join(root, LUNGCT_DIR),
            **lesion_meta)
    for part in ("labeled", "unlabeled"):
        def load_part(part=part) -> List[dict]:
            recs = lungct_disjoint_split(lungct_pair[0](), lungct_pair[1](), split_seed, fractions)
            return split_labeled(recs["train"], label_fraction, split_seed)[part]

        reg(f"lungct_disjoint_train_{part}", load_part, image_root=os.path.join(root, LUNGCT_DIR),
            unlabeled=part == "unlabeled", **lesion_meta)

    def lpcd_full():
        return _lung_pet_ct_dx_all(p["lung_pet_ct_dx_dicom_root"], p["lung_pet_ct_dx_annotations"])

    lpcd_meta = lung_pet_ct_dx_metadata(keep_subtypes=False)
    reg("lung_pet_ct_dx_all", _split_loader(lpcd_full, None, split_seed, fractions), **lpcd_meta)
    for split in ("train", "val", "test"):
        reg(f"lung_pet_ct_dx_{split}", _split_loader(lpcd_full, split, split_seed, fractions),
            **lpcd_meta)

    for lung in (False, True):
        for split in ("train", "test"):
            name = f"deeplesion_sample_{'lung_' if lung else ''}{split}"
            reg(name, functools.partial(load_deeplesion_sample, p["deeplesion_sample_root"],
                                        split, lung_only=lung), **lesion_meta)

    def dl_full():
        return _deeplesion_lung(p["deeplesion_csv"], p["deeplesion_images"])

    for split in ("train", "val", "test"):
        reg(f"deeplesion_{split}", _split_loader(dl_full, split, split_seed, fractions),
            **lesion_meta)

    def reg_seg(name: str, loader: Callable[[], List[dict]], **meta) -> None:
        DatasetCatalog.register(name, loader)
        MetadataCatalog.get(name).set(dataset_root=root, **meta)

    register_seg_datasets(reg_seg, root, split_seed)
    _state["key"] = key
    return list(BUILTIN_NAMES)


def _register_builtin_unless_present() -> None:
    """Register the built-in names under ``$MDKD_DATASETS`` on first use, unless some are
    registered already (by :func:`register_builtin` with a config's root, or by the user).
    Registration reads no file."""
    if not any(n in DatasetCatalog for n in BUILTIN_NAMES):
        register_builtin()


DatasetCatalog.add_default_registration(_register_builtin_unless_present)
