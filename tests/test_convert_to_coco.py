"""Tests for tools/convert_to_coco.py (records of any registered dataset -> COCO JSON)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mdkd_det.data.catalog import DatasetCatalog

TOOL = Path(__file__).resolve().parents[1] / "tools" / "convert_to_coco.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("convert_to_coco", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lung_pet_ct_dx_to_coco(tool, data_root, tmp_path):
    out = tmp_path / "sub" / "lpcd.json"
    assert tool.main(["--dataset", "lung_pet_ct_dx_all", "--root", str(data_root),
                      "--output", str(out)]) == 0
    coco = json.loads(out.read_text())
    assert len(coco["images"]) == 38 and len(coco["annotations"]) == 38
    assert [i["id"] for i in coco["images"]] == list(range(1, 39))  # UIDs -> 1..N
    assert [a["id"] for a in coco["annotations"]] == list(range(1, 39))
    assert coco["categories"] == [{"id": 1, "name": "lesion", "supercategory": "none"}]
    recs = DatasetCatalog.get("lung_pet_ct_dx_all")
    for im, r in zip(coco["images"], recs):
        assert im["file_name"] == r["file_name"]
    x1, y1, x2, y2 = recs[0]["annotations"][0]["bbox"]
    assert coco["annotations"][0]["bbox"] == [x1, y1, x2 - x1, y2 - y1]


def test_coco_spec_roundtrip(tool, data_root, tmp_path):
    d = data_root / "lungct_roboflow" / "valid"
    src = json.loads((d / "_annotations.coco.json").read_text())
    out = tmp_path / "valid.json"
    name = f"coco:{d / '_annotations.coco.json'}:{d}"
    try:
        assert tool.main(["--dataset", name, "--root", str(data_root), "--output", str(out),
                          "--relative-to", str(d)]) == 0
    finally:
        DatasetCatalog.remove(name)
    coco = json.loads(out.read_text())
    assert [(i["id"], i["file_name"]) for i in coco["images"]] == [
        (i["id"], i["file_name"]) for i in src["images"]]
    assert coco["categories"] == [{"id": 1, "name": "nodule", "supercategory": "none"}]
    assert sorted((a["image_id"], a["category_id"], a["bbox"]) for a in coco["annotations"]) == sorted(
        (a["image_id"], a["category_id"], [float(v) for v in a["bbox"]]) for a in src["annotations"])
    assert min(a["id"] for a in coco["annotations"]) == 1  # the export starts at 0


def test_bad_dataset_exit_code(tool, tmp_path, capsys):
    rc = tool.main(["--dataset", "no_such_dataset", "--root", str(tmp_path),
                    "--output", str(tmp_path / "x.json")])
    assert rc == 2 and "not registered" in capsys.readouterr().err
    rc = tool.main(["--dataset", "lungct_train", "--root", str(tmp_path),
                    "--output", str(tmp_path / "x.json")])
    assert rc == 2 and "_annotations.coco.json" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_cli_subprocess(data_root, tmp_path):
    out = tmp_path / "dl.json"
    res = subprocess.run(
        [sys.executable, str(TOOL), "--dataset", "deeplesion_sample_lung_test", "--root",
         str(data_root), "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    coco = json.loads(out.read_text())
    assert len(coco["images"]) == 2 and len(coco["annotations"]) == 2


def test_dicom_coco_round_trip(tool, data_root, tmp_path):
    """convert_to_coco output with .dcm file names loads back through coco: (DICOM reader) with
    the same pixels and boxes (issue 12)."""
    import numpy as np

    from mdkd_det.data.io import read_image

    root = data_root / "lung_pet_ct_dx_sample"
    out = tmp_path / "lpcd.json"
    assert tool.main(["--dataset", "lung_pet_ct_dx_all", "--root", str(data_root), "--output", str(out),
                      "--relative-to", str(root)]) == 0
    name = f"coco:{out}:{root}"
    try:
        back = DatasetCatalog.get(name)
    finally:
        DatasetCatalog.remove(name)
    orig = DatasetCatalog.get("lung_pet_ct_dx_all")
    assert len(back) == len(orig) == 38 and all(r["reader"] == "dicom" for r in back)
    for a, b in zip(orig, back):
        assert a["file_name"] == b["file_name"]
        assert [x["bbox"] for x in a["annotations"]] == [x["bbox"] for x in b["annotations"]]
    np.testing.assert_array_equal(read_image(orig[0]), read_image(back[0]))


def test_png16_coco_loads_with_hu_reader(tmp_path):
    import cv2
    import numpy as np

    from mdkd_det.data.datasets.coco import load_coco_json
    from mdkd_det.data.io import read_hu

    cv2.imwrite(str(tmp_path / "a.png"), np.full((8, 8), 32768 - 600, np.uint16))
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((8, 8), np.uint8))
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8},
                                         {"id": 2, "file_name": "b.png", "height": 8, "width": 8}],
                              "annotations": [], "categories": [{"id": 1, "name": "lesion"}]}))
    recs = load_coco_json(str(js), str(tmp_path))
    assert [r["reader"] for r in recs] == ["png16_hu", "image"]
    assert float(read_hu(recs[0])[0, 0]) == -600.0


def test_config_file_sets_split(tool, data_root, tmp_path):
    """--config-file + KEY VALUE: the split follows DATASETS.SPLIT_SEED / SPLIT_FRACTIONS."""
    from mdkd_det.data.datasets import register_builtin
    from mdkd_det.data.datasets.splits import split_by_patient

    out = tmp_path / "t.json"
    cfgf = str(Path(TOOL).parents[1] / "configs" / "LungPet" / "mdkd_faster_rcnn_R18_demo.yaml")
    assert tool.main(["--config-file", cfgf, "--dataset", "lung_pet_ct_dx_train", "--root", str(data_root),
                      "--output", str(out), "DATASETS.SPLIT_SEED", "5", "DATASETS.SPLIT_FRACTIONS",
                      "(0.5, 0.0, 0.5)"]) == 0
    register_builtin(str(data_root))
    expected = split_by_patient(DatasetCatalog.get("lung_pet_ct_dx_all"), (0.5, 0.0, 0.5), 5)["train"]
    names = [i["file_name"] for i in json.loads(out.read_text())["images"]]
    assert names == [r["file_name"] for r in expected] and names
    assert tool.main(["--config-file", cfgf, "--dataset", "lung_pet_ct_dx_train", "--output", str(out),
                      "DATASETS.NO_SUCH_KEY", "1"]) == 2
