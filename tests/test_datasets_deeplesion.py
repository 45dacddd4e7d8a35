"""Tests for mdkd_det.data.datasets.deeplesion (official DL_info.csv + 16-bit PNGs).

Uses the 158 real rows of ``$MDKD_DATASETS/deeplesion_dl_info_fragment/DL_info_fragment.csv``;
the images are not released with the fragment, so some tests write 16-bit PNG fixtures.
"""

import csv
import os
import shutil

import cv2
import numpy as np
import pytest

from mdkd_det.data.datasets.deeplesion import deeplesion_image_path, load_deeplesion
from mdkd_det.data.io import read_image
from mdkd_det.utils.errors import DatasetError

LUNG_FILES = [
    "000097_02_02_134.png",
    "000098_04_02_135.png",
    "000098_04_02_097.png",
    "000098_05_02_100.png",
    "000098_05_02_146.png",
]


@pytest.fixture(scope="module")
def csv_file(data_root):
    p = data_root / "deeplesion_dl_info_fragment" / "DL_info_fragment.csv"
    assert p.is_file()
    return str(p)


def _n_lesions(recs):
    return sum(len(r["annotations"]) for r in recs)


def test_fragment_counts(csv_file):
    with open(csv_file, newline="") as f:
        assert sum(1 for _ in csv.DictReader(f)) == 158
    all_recs = load_deeplesion(csv_file, "/nonexistent", lesion_types=None, check_images=False)
    assert _n_lesions(all_recs) == 158
    assert len(all_recs) == 152  # 6 key slices carry two lesions
    for split, n in (("train", 105), ("val", 18), ("test", 35)):
        recs = load_deeplesion(csv_file, "/x", split=split, lesion_types=None, check_images=False)
        assert _n_lesions(recs) == n, split
    # Coarse_lesion_type is -1 on the whole official train split
    assert load_deeplesion(csv_file, "/x", split="train", check_images=False) == []


def test_lung_filter(csv_file):
    recs = load_deeplesion(csv_file, "/img", check_images=False)  # default lesion_types=(5,)
    assert _n_lesions(recs) == 5 and len(recs) == 5
    assert [r["image_id"] + ".png" for r in recs] == LUNG_FILES
    assert {r["patient_id"] for r in recs} == {"97", "98"}
    r = recs[0]
    assert r["file_name"] == os.path.join("/img", "000097_02_02", "134.png")
    assert r["reader"] == "png16_hu" and (r["height"], r["width"]) == (512, 512)
    assert r["series_id"] == "000097_02_02"
    assert r["annotations"] == [
        {"bbox": [181.214, 156.729, 254.77, 187.567], "category_id": 0, "lesion_type": 5}
    ]
    assert "window" not in r
    assert r["dicom_window"] == (-500.0, 2000.0)  # DICOM_windows "-1500, 500" (min, max)
    assert len(load_deeplesion(csv_file, "/img", split="val", check_images=False)) == 4
    assert len(load_deeplesion(csv_file, "/img", split="test", check_images=False)) == 1


def test_grouping_and_per_lesion_filter(csv_file):
    recs = load_deeplesion(csv_file, "/x", lesion_types=None, check_images=False)
    r = next(r for r in recs if r["image_id"] == "000091_03_01_093")
    assert [a["bbox"] for a in r["annotations"]] == [
        [237.344, 224.926, 256.32, 241.319], [235.948, 231.555, 265.168, 253.91]]
    liver = load_deeplesion(csv_file, "/x", lesion_types=(4,), check_images=False)
    r = next(r for r in liver if r["image_id"] == "000097_02_01_076")
    assert [a["lesion_type"] for a in r["annotations"]] == [4]  # its type-2 lesion is filtered


def test_dicom_window_option(csv_file):
    recs = load_deeplesion(csv_file, "/x", lesion_types=None, use_dicom_window=True, check_images=False)
    r = next(r for r in recs if r["image_id"] == "000089_01_01_037")  # "-175, 275"
    assert r["window"] == (50.0, 450.0)


def test_image_path():
    assert deeplesion_image_path("/r", "000089_01_01_037.png") == os.path.join("/r", "000089_01_01", "037.png")
    with pytest.raises(DatasetError, match="File_name"):
        deeplesion_image_path("/r", "89_1.png")


def _fixture_root(csv_file, tmp_path, files=LUNG_FILES):
    root = tmp_path / "deeplesion"
    (root / "Images_png").mkdir(parents=True)
    shutil.copy(csv_file, root / "DL_info.csv")
    hu = np.full((512, 512), -600, np.int32)
    hu[:, 256:] = 150
    for fn in files:
        p = deeplesion_image_path(str(root / "Images_png"), fn)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        assert cv2.imwrite(p, (hu + 32768).astype(np.uint16))
    return root


def test_with_png16_fixtures(csv_file, tmp_path):
    root = _fixture_root(csv_file, tmp_path)
    recs = load_deeplesion(str(root / "DL_info.csv"), str(root / "Images_png"))
    assert len(recs) == 5
    img = read_image(recs[0])
    assert img.shape == (512, 512)
    np.testing.assert_allclose(img[0, [0, 511]], [0.5, 1.0], atol=1e-6)  # lung window
    recs = load_deeplesion(str(root / "DL_info.csv"), str(root / "Images_png"), use_dicom_window=True)
    np.testing.assert_allclose(read_image(recs[0])[0, [0, 511]], [0.45, 0.825], atol=1e-6)  # [-1500, 500]


def test_missing_image(csv_file, tmp_path):
    root = _fixture_root(csv_file, tmp_path, files=LUNG_FILES[:-1])
    with pytest.raises(DatasetError, match=r"000098_05_02.146\.png"):
        load_deeplesion(str(root / "DL_info.csv"), str(root / "Images_png"))


def _corrupt(csv_file, tmp_path, row_index, column, value):
    with open(csv_file, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    rows[row_index][column] = value
    out = tmp_path / "DL_info_bad.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return str(out)


@pytest.mark.parametrize(
    "column, value",
    [
        ("Bounding_boxes", "132.9, 171.8, 165.9"),
        ("Bounding_boxes", "a, b, c, d"),
        ("Bounding_boxes", "50, 50, 40, 60"),
        ("Train_Val_Test", "7"),
        ("Coarse_lesion_type", "lung"),
        ("Possibly_noisy", "2"),
        ("Image_size", "512"),
        ("DICOM_windows", "500, -1500"),
        ("File_name", "bad_name.png"),
        ("Patient_index", "12345"),
    ],
)
def test_malformed_row(csv_file, tmp_path, column, value):
    bad = _corrupt(csv_file, tmp_path, 9, column, value)  # data row 10 = CSV row 11
    with pytest.raises(DatasetError) as ei:
        load_deeplesion(bad, "/x", lesion_types=None, check_images=False)
    msg = str(ei.value)
    assert bad in msg and "row 11" in msg and column in msg


def test_missing_column_csv_and_bad_split(csv_file, tmp_path):
    p = tmp_path / "short.csv"
    p.write_text("File_name,Patient_index\n000001_01_01_001.png,1\n")
    with pytest.raises(DatasetError, match="missing column"):
        load_deeplesion(str(p), "/x")
    with pytest.raises(DatasetError, match="not found"):
        load_deeplesion(str(tmp_path / "none.csv"), "/x")
    with pytest.raises(DatasetError, match="split"):
        load_deeplesion(csv_file, "/x", split="validation")


def test_drop_noisy(csv_file, tmp_path):
    with open(csv_file, newline="") as f:
        idx = [r["File_name"] for r in csv.DictReader(f)].index(LUNG_FILES[0])
    assert idx == 127  # CSV row 129
    bad = _corrupt(csv_file, tmp_path, idx, "Possibly_noisy", "1")
    assert len(load_deeplesion(bad, "/x", check_images=False)) == 5
    recs = load_deeplesion(bad, "/x", drop_noisy=True, check_images=False)
    assert [r["image_id"] + ".png" for r in recs] == LUNG_FILES[1:]
