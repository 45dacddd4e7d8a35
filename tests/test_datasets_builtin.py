"""Tests for mdkd_det.data.datasets.builtin.register_builtin (lazy built-in names)."""

import os
import shutil

import cv2
import numpy as np
import pytest

from mdkd_det.data.catalog import DatasetCatalog, MetadataCatalog
from mdkd_det.data.datasets.builtin import BUILTIN_NAMES, register_builtin
from mdkd_det.data.datasets.deeplesion import deeplesion_image_path
from mdkd_det.utils.errors import DatasetError


def test_register_reads_nothing_and_is_idempotent(tmp_path):
    missing = tmp_path / "no_data_here"
    names = register_builtin(str(missing))  # must not touch the (missing) files
    assert set(names) == set(BUILTIN_NAMES)
    assert all(n in DatasetCatalog for n in BUILTIN_NAMES)
    assert register_builtin(str(missing)) == names  # second call: no "already registered"
    assert MetadataCatalog.get("lungct_train").thing_classes == ["lesion"]
    assert MetadataCatalog.get("deeplesion_val").evaluator_type == "coco"
    with pytest.raises(DatasetError, match="no_data_here"):
        DatasetCatalog.get("lungct_train")
    with pytest.raises(DatasetError, match="DL_info.csv"):
        DatasetCatalog.get("deeplesion_train")


def test_real_counts_and_root_change(data_root, tmp_path):
    register_builtin(str(tmp_path))
    register_builtin(str(data_root))  # root changed -> re-registered
    counts = {n: len(DatasetCatalog.get(n)) for n in BUILTIN_NAMES if not n.startswith("deeplesion_")
              or n.startswith("deeplesion_sample")}
    assert counts["lungct_train"] == 2417 and counts["lungct_valid"] == 117
    assert counts["lung_pet_ct_dx_all"] == 38
    assert counts["lung_pet_ct_dx_train"] + counts["lung_pet_ct_dx_val"] + counts["lung_pet_ct_dx_test"] == 38
    assert counts["deeplesion_sample_train"] == 45 and counts["deeplesion_sample_test"] == 5
    lung = DatasetCatalog.get("deeplesion_sample_lung_train") + DatasetCatalog.get("deeplesion_sample_lung_test")
    assert sum(len(r["annotations"]) for r in lung) == 12
    tr = DatasetCatalog.get("lungct_train")
    assert all(r["series_id"] and r["series_id"] in os.path.basename(r["file_name"]) for r in tr[:5])
    meta = MetadataCatalog.get("lungct_train")
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0}  # set on load
    # loaders return fresh copies
    a = DatasetCatalog.get("lung_pet_ct_dx_train")
    a[0]["annotations"].clear()
    assert DatasetCatalog.get("lung_pet_ct_dx_train")[0]["annotations"]


def test_deeplesion_full_layout(data_root, tmp_path):
    """deeplesion_* names over a root with DL_info.csv + 16-bit PNG fixtures (lung rows)."""
    root = tmp_path / "root"
    dl = root / "deeplesion"
    (dl / "Images_png").mkdir(parents=True)
    shutil.copy(data_root / "deeplesion_dl_info_fragment" / "DL_info_fragment.csv", dl / "DL_info.csv")
    for fn in ("000097_02_02_134.png", "000098_04_02_135.png", "000098_04_02_097.png",
               "000098_05_02_100.png", "000098_05_02_146.png"):
        p = deeplesion_image_path(str(dl / "Images_png"), fn)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        cv2.imwrite(p, np.full((512, 512), 32768 - 600, np.uint16))
    register_builtin(str(root), split_seed=0)
    splits = {s: DatasetCatalog.get(f"deeplesion_{s}") for s in ("train", "val", "test")}
    assert sum(len(v) for v in splits.values()) == 5
    pats = {s: {r["patient_id"] for r in v} for s, v in splits.items()}
    assert not (pats["train"] & pats["test"]) and not (pats["train"] & pats["val"])
    assert len(splits["train"]) > 0 and len(splits["test"]) > 0  # 2 patients -> 1 train, 1 test
    register_builtin(str(data_root))
