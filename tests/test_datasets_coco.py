"""Tests for mdkd_det.data.datasets.coco (COCO loader, coco: specs, records -> COCO)."""

import contextlib
import io
import json

import numpy as np
import pytest

from mdkd_det.data.catalog import DatasetCatalog, MetadataCatalog
from mdkd_det.data.datasets.coco import (
    coco_image_ids,
    load_coco_json,
    maybe_register_coco_spec,
    parse_coco_spec,
    records_to_coco_dict,
    register_coco_instances,
)
from mdkd_det.utils.errors import DatasetError


def _lungct(data_root, split):
    d = data_root / "lungct_roboflow" / split
    return str(d / "_annotations.coco.json"), str(d)


def _write(tmp_path, obj, name="ann.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return str(p)


def _toy():
    return {
        "images": [
            {"id": 10, "file_name": "a.jpg", "height": 100, "width": 120},
            {"id": 11, "file_name": "b.jpg", "height": 100, "width": 120},
            {"id": 12, "file_name": "c.jpg", "height": 100, "width": 120},
        ],
        "categories": [
            {"id": 0, "name": "proj", "supercategory": "none"},
            {"id": 7, "name": "mass", "supercategory": "proj"},
            {"id": 3, "name": "nodule", "supercategory": "proj"},
            {"id": 9, "name": "calcification", "supercategory": "proj"},
        ],
        "annotations": [
            {"id": 0, "image_id": 10, "category_id": 7, "bbox": [10, 20, 30, 40]},
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [1.5, 2.5, 3, 4]},
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [0, 0, 5, 5]},
        ],
    }


# ----------------------------------------------------------------------------- real LungCT


def test_lungct_counts_and_ids(data_root):
    js, root = _lungct(data_root, "train")
    raw = json.load(open(js))
    recs = load_coco_json(js, root, "test_lungct_tmp")
    assert len(recs) == 2417
    assert sum(len(r["annotations"]) for r in recs) == 2417
    assert [r["image_id"] for r in recs] == [im["id"] for im in raw["images"]]
    meta = MetadataCatalog.get("test_lungct_tmp")
    assert meta.thing_classes == ["nodule"]  # id 0 "lung_ct" supercategory dropped
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0}
    assert meta.evaluator_type == "coco" and meta.json_file == js
    a0 = raw["annotations"][0]
    r0 = next(r for r in recs if r["image_id"] == a0["image_id"])
    x, y, w, h = a0["bbox"]
    assert r0["annotations"][0] == {"bbox": [x, y, x + w, y + h], "category_id": 0}
    assert r0["reader"] == "image" and r0["height"] == 512 and r0["width"] == 512
    MetadataCatalog.remove("test_lungct_tmp")


def test_lungct_valid_single_class(data_root):
    js, root = _lungct(data_root, "valid")
    recs = load_coco_json(js, root, "test_lungct_valid_tmp", single_class="lesion")
    assert len(recs) == 117
    meta = MetadataCatalog.get("test_lungct_valid_tmp")
    assert meta.thing_classes == ["lesion"]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0}
    assert {a["category_id"] for r in recs for a in r["annotations"]} == {0}
    MetadataCatalog.remove("test_lungct_valid_tmp")


# ----------------------------------------------------------------------------- synthetic


def test_contiguous_ids_supercategory_and_empty_images(tmp_path):
    js = _write(tmp_path, _toy())
    recs = load_coco_json(js, str(tmp_path / "imgs"), "toy_tmp")
    meta = MetadataCatalog.get("toy_tmp")
    # "proj" (unused supercategory) dropped; unused "calcification" kept; ascending source id
    assert meta.thing_classes == ["nodule", "mass", "calcification"]
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 9: 2}
    assert [r["image_id"] for r in recs] == [10, 11, 12]
    assert recs[0]["annotations"] == [
        {"bbox": [10.0, 20.0, 40.0, 60.0], "category_id": 1},
        {"bbox": [1.5, 2.5, 4.5, 6.5], "category_id": 0},
    ]
    assert recs[2]["annotations"] == []  # negative image kept
    assert recs[0]["file_name"] == str(tmp_path / "imgs" / "a.jpg")
    MetadataCatalog.remove("toy_tmp")


def test_single_class_maps_all(tmp_path):
    js = _write(tmp_path, _toy())
    recs = load_coco_json(js, str(tmp_path), "toy1_tmp", single_class="lesion")
    meta = MetadataCatalog.get("toy1_tmp")
    assert meta.thing_classes == ["lesion"]
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 0, 9: 0}
    assert {a["category_id"] for r in recs for a in r["annotations"]} == {0}
    MetadataCatalog.remove("toy1_tmp")


def test_crowd_dropped(tmp_path, caplog):
    d = _toy()
    d["annotations"][0]["iscrowd"] = 1
    recs = load_coco_json(_write(tmp_path, d), str(tmp_path))
    assert len(recs[0]["annotations"]) == 1
    assert "crowd" in caplog.text


# ----------------------------------------------------------------------------- errors


def test_missing_json(tmp_path):
    with pytest.raises(DatasetError, match="nothere.json"):
        load_coco_json(str(tmp_path / "nothere.json"), str(tmp_path))


@pytest.mark.parametrize(
    "obj, msg",
    [
        ({"images": [], "annotations": [], "categories": []}, "empty COCO JSON"),
        ([1, 2, 3], "not a COCO JSON"),
        ({"annotations": []}, "not a COCO JSON"),
    ],
)
def test_empty_or_not_coco(tmp_path, obj, msg):
    js = _write(tmp_path, obj, "bad.json")
    with pytest.raises(DatasetError, match=msg) as ei:
        load_coco_json(js, str(tmp_path))
    assert "bad.json" in str(ei.value)


def test_invalid_json_text(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(DatasetError, match="broken.json"):
        load_coco_json(str(p), str(tmp_path))


def test_annotation_unknown_image(tmp_path):
    d = _toy()
    d["annotations"].append({"id": 5, "image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1]})
    with pytest.raises(DatasetError, match="unknown image id 99"):
        load_coco_json(_write(tmp_path, d), str(tmp_path))


def test_annotation_unknown_category_and_bad_bbox(tmp_path):
    d = _toy()
    d["annotations"][0]["category_id"] = 42
    with pytest.raises(DatasetError, match="category_id 42"):
        load_coco_json(_write(tmp_path, d), str(tmp_path))
    d = _toy()
    d["annotations"][0]["bbox"] = [1, 2, 3]
    with pytest.raises(DatasetError, match="bbox"):
        load_coco_json(_write(tmp_path, d), str(tmp_path))


# ----------------------------------------------------------------------------- registration


def test_parse_coco_spec():
    assert parse_coco_spec("coco:/a/b/ann.json:/a/imgs") == ("/a/b/ann.json", "/a/imgs")
    assert parse_coco_spec("coco:C:/x/ann.json:C:/x/imgs") == ("C:/x/ann.json", "C:/x/imgs")
    assert parse_coco_spec("lungct_train") is None
    assert parse_coco_spec("coco:/a/ann.yaml:/imgs") is None
    assert parse_coco_spec("coco:/a/ann.json:") is None


def test_coco_spec_through_catalog(data_root):
    js, root = _lungct(data_root, "valid")
    name = f"coco:{js}:{root}"
    try:
        recs = DatasetCatalog.get(name)  # catalog calls maybe_register_coco_spec
        assert len(recs) == 117
        assert name in DatasetCatalog
        assert MetadataCatalog.get(name).thing_classes == ["nodule"]
        assert maybe_register_coco_spec(name) is True  # already registered: still True
    finally:
        DatasetCatalog.remove(name)
    assert maybe_register_coco_spec("not_a_spec") is False
    with pytest.raises(DatasetError, match="not registered"):
        DatasetCatalog.get("coco:/no/json/here")


def test_register_is_lazy(tmp_path):
    name = "lazy_coco_tmp"
    register_coco_instances(name, str(tmp_path / "missing.json"), str(tmp_path), single_class="lesion")
    try:
        assert MetadataCatalog.get(name).thing_classes == ["lesion"]
        with pytest.raises(DatasetError, match="missing.json"):
            DatasetCatalog.get(name)
    finally:
        DatasetCatalog.remove(name)


# ----------------------------------------------------------------------------- records -> COCO


def test_records_to_coco_roundtrip_lungct(data_root):
    js, root = _lungct(data_root, "valid")
    raw = json.load(open(js))
    recs = load_coco_json(js, root, "rt_tmp", single_class="lesion")
    out = records_to_coco_dict(recs, MetadataCatalog.get("rt_tmp"), file_name_root=root)
    MetadataCatalog.remove("rt_tmp")
    assert [im["id"] for im in out["images"]] == [im["id"] for im in raw["images"]]
    assert [im["file_name"] for im in out["images"]] == [im["file_name"] for im in raw["images"]]
    assert out["categories"] == [{"id": 1, "name": "lesion", "supercategory": "none"}]
    assert [a["id"] for a in out["annotations"]] == list(range(1, 118))
    src = {a["image_id"]: a for a in raw["annotations"]}
    for a in out["annotations"]:
        s = src[a["image_id"]]
        assert a["bbox"] == [float(v) for v in s["bbox"]]
        assert a["category_id"] == s["category_id"] == 1
        assert a["area"] == pytest.approx(s["bbox"][2] * s["bbox"][3])
    json.dumps(out)  # serialisable


def _self_eval_ap(coco_dict, lib):
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in coco_dict["annotations"]
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        if lib == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval as Eval
        else:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as Eval
        gt = COCO()
        gt.dataset = coco_dict
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = Eval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0]


@pytest.mark.parametrize("lib", ["pycocotools", "faster_coco_eval"])
def test_records_to_coco_perfect_self_eval(data_root, lib):
    js, root = _lungct(data_root, "valid")
    recs = load_coco_json(js, root, "ev_tmp", single_class="lesion")
    out = records_to_coco_dict(recs, MetadataCatalog.get("ev_tmp"))
    MetadataCatalog.remove("ev_tmp")
    assert _self_eval_ap(out, lib) == pytest.approx(1.0)


def test_records_to_coco_string_ids_and_ambiguous_categories():
    recs = [
        {"file_name": "x/a.png", "height": 10, "width": 10, "image_id": "a",
         "annotations": [{"bbox": [1, 2, 4, 6], "category_id": 0}]},
        {"file_name": "x/b.png", "height": 10, "width": 10, "image_id": "b", "annotations": []},
    ]
    meta = {"thing_classes": ["lesion"], "thing_dataset_id_to_contiguous_id": {3: 0, 7: 0}}
    out = records_to_coco_dict(recs, meta)
    assert coco_image_ids(recs) == {"a": 1, "b": 2}
    assert [im["id"] for im in out["images"]] == [1, 2]
    assert out["categories"][0]["id"] == 1  # ambiguous (3 and 7 -> 0): contiguous + 1
    assert out["annotations"] == [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "area": 12.0, "iscrowd": 0}
    ]
    # unambiguous multi-class mapping goes back to source ids
    meta2 = {"thing_classes": ["nodule", "mass"], "thing_dataset_id_to_contiguous_id": {3: 0, 7: 1}}
    recs[1]["annotations"] = [{"bbox": [0, 0, 2, 2], "category_id": 1}]
    out2 = records_to_coco_dict(recs, meta2)
    assert [c["id"] for c in out2["categories"]] == [3, 7]
    assert [a["category_id"] for a in out2["annotations"]] == [3, 7]
    # no metadata at all
    out3 = records_to_coco_dict(recs, None)
    assert [c["name"] for c in out3["categories"]] == ["class_0", "class_1"]


def test_records_to_coco_errors():
    with pytest.raises(DatasetError, match="duplicate image_id"):
        coco_image_ids([{"image_id": 1}, {"image_id": 1}])
    rec = {"file_name": "a.png", "height": 5, "width": 5, "image_id": 1,
           "annotations": [{"bbox": [0, 0, 1, 1], "category_id": 2}]}
    with pytest.raises(DatasetError, match="a.png.*category_id 2"):
        records_to_coco_dict([rec], {"thing_classes": ["lesion"]})
    assert np.isfinite(records_to_coco_dict([], {"thing_classes": ["lesion"]})["categories"][0]["id"])
