"""Tests for mdkd_det.data.datasets.validate.check_records."""

import copy
import logging

import pytest

from mdkd_det.data.datasets.coco import load_coco_json
from mdkd_det.data.datasets.validate import check_records
from mdkd_det.utils.errors import DatasetError


@pytest.fixture()
def img(tmp_path):
    p = tmp_path / "slice.png"
    p.write_bytes(b"x")  # check_records only checks existence
    return str(p)


def _rec(path, boxes, h=100, w=80):
    return {"file_name": path, "height": h, "width": w, "image_id": 1,
            "annotations": [{"bbox": list(b), "category_id": 0} for b in boxes]}


def test_valid_records_unchanged(img):
    recs = [_rec(img, [[0, 0, 80, 100], [10.5, 20, 30, 40]])]
    out = check_records(recs, "toy")
    assert out == recs and out[0] is not recs[0]


def test_missing_image(tmp_path):
    with pytest.raises(DatasetError, match=r"'toy'.*nothere\.png.*not found"):
        check_records([_rec(str(tmp_path / "nothere.png"), [])], "toy")
    assert len(check_records([_rec(str(tmp_path / "nothere.png"), [])], "toy", check_files=False)) == 1


def test_clip_policy_counts_one_warning(img, caplog):
    recs = [_rec(img, [[-5, 10, 20, 30], [70, 90, 90, 110]]), _rec(img, [[1, 1, 5, 5]])]
    before = copy.deepcopy(recs)
    with caplog.at_level(logging.WARNING):
        out = check_records(recs, "toy", box_policy="clip")
    assert out[0]["annotations"][0]["bbox"] == [0.0, 10.0, 20.0, 30.0]
    assert out[0]["annotations"][1]["bbox"] == [70.0, 90.0, 80.0, 100.0]
    assert recs == before  # input not modified
    warns = [r for r in caplog.records if "clipped" in r.getMessage()]
    assert len(warns) == 1 and "clipped 2 box" in warns[0].getMessage()


def test_error_policy(img):
    with pytest.raises(DatasetError, match=r"slice\.png.*outside"):
        check_records([_rec(img, [[10, 10, 81, 50]])], "toy", box_policy="error")
    with pytest.raises(DatasetError, match="box_policy"):
        check_records([], "toy", box_policy="ignore")


def test_degenerate_dropped(img, caplog):
    recs = [_rec(img, [[10, 10, 10.5, 30], [10, 10, 30, 10.2], [-20, 5, -1, 9], [1, 1, 9, 9]])]
    with caplog.at_level(logging.WARNING):
        out = check_records(recs, "toy")
    assert [a["bbox"] for a in out[0]["annotations"]] == [[1.0, 1.0, 9.0, 9.0]]
    assert "dropped 3 degenerate" in caplog.text


def test_keep_empty(img):
    recs = [_rec(img, []), _rec(img, [[0, 0, 0.5, 0.5]]), _rec(img, [[1, 1, 5, 5]])]
    assert len(check_records(recs, "toy", keep_empty=True)) == 3
    assert len(check_records(recs, "toy", keep_empty=False)) == 1


@pytest.mark.parametrize("box", [[10, 10, 5, 20], [1, 2, 3], [0, 0, float("nan"), 5], "abcd"])
def test_malformed_box(img, box):
    rec = _rec(img, [])
    rec["annotations"] = [{"bbox": box, "category_id": 0}]
    with pytest.raises(DatasetError, match=r"slice\.png"):
        check_records([rec], "toy")


def test_bad_size_and_category(img):
    with pytest.raises(DatasetError, match="size"):
        check_records([_rec(img, [], h=0)], "toy")
    with pytest.raises(DatasetError, match="category_id 0"):
        check_records([_rec(img, [[1, 1, 5, 5]])], "toy", num_classes=0)


def test_real_lungct_valid_passes(data_root):
    d = data_root / "lungct_roboflow" / "valid"
    recs = load_coco_json(str(d / "_annotations.coco.json"), str(d))
    out = check_records(recs, "lungct_valid", box_policy="error", num_classes=1)
    assert out == recs and len(out) == 117
