"""Tests for mdkd_det.data.datasets.lung_pet_ct_dx (DICOM tree + VOC XML)."""

import glob
import os
import shutil

import pydicom
import pytest

from mdkd_det.data.datasets.lung_pet_ct_dx import (
    SUBTYPES,
    load_lung_pet_ct_dx,
    lung_pet_ct_dx_metadata,
)
from mdkd_det.utils.errors import DatasetError

_XML = """<annotation><size><width>{w}</width><height>{h}</height><depth>1</depth></size>
<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>
</annotation>"""


@pytest.fixture(scope="module")
def lpcd_records(data_root):
    root = data_root / "lung_pet_ct_dx_sample"
    return load_lung_pet_ct_dx(str(root), str(root / "Annotation"))


def test_real_counts(lpcd_records):
    assert len(lpcd_records) == 38
    assert sum(len(r["annotations"]) for r in lpcd_records) == 38
    assert {r["patient_id"] for r in lpcd_records} == {"A0001", "A0002"}
    assert len({r["series_id"] for r in lpcd_records}) == 4
    assert all(r["reader"] == "dicom" and (r["height"], r["width"]) == (512, 512) for r in lpcd_records)
    assert any("  " in r["file_name"] for r in lpcd_records)  # double-spaced folder names work


def test_matched_by_sop_instance_uid(lpcd_records):
    for r in lpcd_records[:: 7]:
        ds = pydicom.dcmread(r["file_name"], stop_before_pixels=True)
        assert str(ds.SOPInstanceUID) == r["image_id"]
        assert str(ds.SeriesInstanceUID) == r["series_id"]
        assert ds.PatientID == "Lung_Dx-" + r["patient_id"]


def test_voc_box_convention(lpcd_records, data_root):
    uid = "1.3.6.1.4.1.14519.5.2.1.6655.2359.155870813347987660555133803380"
    assert (data_root / "lung_pet_ct_dx_sample" / "Annotation" / "A0001" / f"{uid}.xml").is_file()
    rec = next(r for r in lpcd_records if r["image_id"] == uid)
    # XML: xmin 290, ymin 305, xmax 338, ymax 378 (1-based inclusive) -> 0-based continuous
    assert rec["annotations"] == [{"bbox": [289.0, 304.0, 338.0, 378.0], "category_id": 0}]


def test_keep_subtypes_and_raw_convention(data_root):
    root = data_root / "lung_pet_ct_dx_sample"
    recs = load_lung_pet_ct_dx(str(root), keep_subtypes=True, voc_one_based=False)
    assert {a["category_id"] for r in recs for a in r["annotations"]} == {SUBTYPES.index("A")} == {0}
    uid = "1.3.6.1.4.1.14519.5.2.1.6655.2359.155870813347987660555133803380"
    rec = next(r for r in recs if r["image_id"] == uid)
    assert rec["annotations"][0]["bbox"] == [290.0, 305.0, 338.0, 378.0]
    assert lung_pet_ct_dx_metadata(True)["thing_classes"] == ["A", "B", "E", "G"]
    assert lung_pet_ct_dx_metadata(False) == {
        "thing_classes": ["lesion"], "thing_dataset_id_to_contiguous_id": {1: 0}}


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture()
def tiny_tree(data_root, tmp_path):
    """One real DICOM under a TCIA-like tree with spaces + its XML."""
    src = sorted(glob.glob(str(data_root / "lung_pet_ct_dx_sample" / "**" / "*.dcm"), recursive=True))[0]
    series = tmp_path / "dl" / "Lung_Dx-B0001" / "01-01-2000-NA-Chest  X" / "2.000000-5mm  40805"
    series.mkdir(parents=True)
    dst = series / "1-01.dcm"
    shutil.copy(src, dst)
    uid = str(pydicom.dcmread(str(dst), stop_before_pixels=True).SOPInstanceUID)
    ann = tmp_path / "Annotation" / "B0001"
    ann.mkdir(parents=True)
    (ann / f"{uid}.xml").write_text(_XML.format(w=512, h=512, name="B", x1=10, y1=20, x2=30, y2=50))
    # a subject without annotations is skipped entirely (even a broken file in it)
    other = tmp_path / "dl" / "Lung_Dx-Z0009"
    other.mkdir()
    (other / "junk.dcm").write_text("not dicom")
    return tmp_path, uid


def test_tiny_tree_loads(tiny_tree):
    root, uid = tiny_tree
    recs = load_lung_pet_ct_dx(str(root / "dl"), str(root / "Annotation"), keep_subtypes=True)
    assert len(recs) == 1
    r = recs[0]
    assert r["image_id"] == uid and r["patient_id"] == "B0001"
    assert r["annotations"] == [{"bbox": [9.0, 19.0, 30.0, 50.0], "category_id": SUBTYPES.index("B")}]


def test_xml_without_matching_dicom(tiny_tree):
    root, _ = tiny_tree
    bad = root / "Annotation" / "B0001" / "1.2.3.4.5.6.xml"
    bad.write_text(_XML.format(w=512, h=512, name="A", x1=1, y1=1, x2=5, y2=5))
    with pytest.raises(DatasetError, match=r"1\.2\.3\.4\.5\.6\.xml.*no DICOM"):
        load_lung_pet_ct_dx(str(root / "dl"), str(root / "Annotation"))


def test_unreadable_dicom_in_tree(tiny_tree):
    root, _ = tiny_tree
    series = next((root / "dl" / "Lung_Dx-B0001").glob("*/*"))
    (series / "1-02.dcm").write_bytes(b"\x00" * 50)
    with pytest.raises(DatasetError, match="1-02.dcm"):
        load_lung_pet_ct_dx(str(root / "dl"), str(root / "Annotation"))


def test_unknown_subtype_size_mismatch_and_bad_xml(tiny_tree):
    root, uid = tiny_tree
    xml = root / "Annotation" / "B0001" / f"{uid}.xml"
    xml.write_text(_XML.format(w=512, h=512, name="Q", x1=1, y1=1, x2=5, y2=5))
    load_lung_pet_ct_dx(str(root / "dl"), str(root / "Annotation"))  # single class: any name
    with pytest.raises(DatasetError, match="unknown subtype"):
        load_lung_pet_ct_dx(str(root / "dl"), str(root / "Annotation"), keep_subtypes=True)
    xml.write_text(_XML.format(w=256, h=512, name="A", x1=1, y1=1, x2=5, y2=5))
    with pytest.raises(DatasetError, match="differs from its DICOM"):
        load_lung_pet_ct_dx(str(root / "dl"), str(root / "Annotation"))
    xml.write_text(_XML.format(w=512, h=512, name="A", x1="abc", y1=1, x2=5, y2=5))
    with pytest.raises(DatasetError, match="xmin"):
        load_lung_pet_ct_dx(str(root / "dl"), str(root / "Annotation"))
    xml.write_text("<annotation><object>")
    with pytest.raises(DatasetError, match=os.path.basename(str(xml)).replace(".", r"\.")):
        load_lung_pet_ct_dx(str(root / "dl"), str(root / "Annotation"))


def test_missing_folders(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_lung_pet_ct_dx(str(tmp_path / "none"))
