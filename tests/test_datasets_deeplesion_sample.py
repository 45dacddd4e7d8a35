"""Tests for mdkd_det.data.datasets.deeplesion_sample (JPEG + .tru truth samples)."""

import shutil

import cv2
import numpy as np
import pytest

from mdkd_det.data.datasets.deeplesion_sample import load_deeplesion_sample
from mdkd_det.utils.errors import DatasetError


@pytest.fixture(scope="module")
def sample_root(data_root):
    return str(data_root / "deeplesion_sample" / "DeepLesion_Truth_Samples")


def _boxes(recs):
    return sum(len(r["annotations"]) for r in recs)


def test_real_counts(sample_root):
    tr = load_deeplesion_sample(sample_root, "train")
    te = load_deeplesion_sample(sample_root, "test")
    assert (len(tr), len(te)) == (45, 5)
    assert _boxes(tr) + _boxes(te) == 51
    ltr = load_deeplesion_sample(sample_root, "train", lung_only=True)
    lte = load_deeplesion_sample(sample_root, "test", lung_only=True)
    assert _boxes(ltr) + _boxes(lte) == 12
    assert all(a["lesion_type"] == 5 for r in ltr + lte for a in r["annotations"])
    assert all(r["annotations"] for r in ltr + lte)  # images without lung lesions dropped
    assert all(r["reader"] == "image" and (r["height"], r["width"]) == (512, 512) for r in tr)


def test_y_first_conversion(sample_root):
    tr = load_deeplesion_sample(sample_root, "train")
    r = next(r for r in tr if r["image_id"] == "000009_01_01_069")
    # .tru: "2   0.3715   0.3944   0.4098   0.4368" = label ymin xmin ymax xmax
    assert r["annotations"] == [{
        "bbox": pytest.approx([0.3944 * 512, 0.3715 * 512, 0.4368 * 512, 0.4098 * 512]),
        "category_id": 0, "lesion_type": 2}]
    assert r["patient_id"] == "9" and r["series_id"] == "000009_01_01"


def _copy_one(sample_root, tmp_path, stem="000009_01_01_069"):
    d = tmp_path / "train"
    d.mkdir()
    for ext in (".jpg", ".tru"):
        shutil.copy(f"{sample_root}/train/{stem}{ext}", d / f"{stem}{ext}")
    return d


def test_size_from_image_header(sample_root, tmp_path):
    d = tmp_path / "train"
    d.mkdir()
    cv2.imwrite(str(d / "000001_01_01_001.jpg"), np.zeros((200, 100, 3), np.uint8))
    (d / "000001_01_01_001.tru").write_text("5 0.5 0.1 1.0 0.2\n\n")
    (r,) = load_deeplesion_sample(str(tmp_path), "train")
    assert (r["height"], r["width"]) == (200, 100)
    assert r["annotations"][0]["bbox"] == pytest.approx([10.0, 100.0, 20.0, 200.0])


@pytest.mark.parametrize("line", ["5 0.1 0.2 0.3", "x 0.1 0.2 0.3 0.4", "5 0.1 0.2 1.3 0.4",
                                  "5 0.5 0.2 0.3 0.4"])
def test_malformed_tru(sample_root, tmp_path, line):
    d = _copy_one(sample_root, tmp_path)
    (d / "000009_01_01_069.tru").write_text("2 0.1 0.1 0.2 0.2\n" + line + "\n")
    with pytest.raises(DatasetError, match=r"000009_01_01_069\.tru, line 2"):
        load_deeplesion_sample(str(tmp_path), "train")


def test_missing_tru_and_folder(sample_root, tmp_path):
    d = _copy_one(sample_root, tmp_path)
    (d / "000009_01_01_069.tru").unlink()
    with pytest.raises(DatasetError, match=r"000009_01_01_069\.tru not found"):
        load_deeplesion_sample(str(tmp_path), "train")
    with pytest.raises(DatasetError, match="not found"):
        load_deeplesion_sample(str(tmp_path), "test")


def test_unreadable_image(tmp_path):
    d = tmp_path / "train"
    d.mkdir()
    (d / "000001_01_01_001.jpg").write_bytes(b"garbage")
    (d / "000001_01_01_001.tru").write_text("5 0.1 0.1 0.2 0.2\n")
    with pytest.raises(DatasetError, match="000001_01_01_001.jpg"):
        load_deeplesion_sample(str(tmp_path), "train")
