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
