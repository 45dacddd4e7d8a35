"""mdkd_det.d2.data: our catalog in detectron2's, our readers in its mapper, its COCOEvaluator."""

import subprocess
import sys

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.evaluation import COCOEvaluator  # noqa: E402
from detectron2.structures import Boxes, BoxMode, Instances  # noqa: E402

from mdkd_det.d2 import MDKDDatasetMapper, register_mdkd_datasets  # noqa: E402

from _d2tiny import tiny_d2_cfg  # noqa: E402


def test_detectron2_configs_load():
    import glob

    from detectron2.config import get_cfg

    from mdkd_det.d2 import add_mdkd_config

    files = sorted(glob.glob("configs/Detectron2/*.yaml"))
    assert len(files) == 4
    for f in files:
        cfg = add_mdkd_config(get_cfg())
        cfg.merge_from_file(f)
        assert cfg.DATASETS.TRAIN == ("lungct_train",) and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1


def test_import_mdkd_det_does_not_import_detectron2():
    code = ("import sys, mdkd_det, mdkd_det.distill.trainer, mdkd_det.engine.cli, "
            "mdkd_det.pipeline.runner; print('detectron2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_lungct_registered_mapped_and_evaluated(tmp_path, data_root):
    cfg = tiny_d2_cfg(tmp_path)
    names = register_mdkd_datasets(cfg)
    assert names == ["lungct_train", "lungct_valid"]
    assert register_mdkd_datasets(cfg) == names  # idempotent
    records = DatasetCatalog.get("lungct_valid")
    assert len(records) == 117
    assert all(a["bbox_mode"] == BoxMode.XYXY_ABS for r in records for a in r["annotations"])
    assert MetadataCatalog.get("lungct_valid").thing_classes == ["lesion"]

    rec = next(r for r in records if r["annotations"])
    out = MDKDDatasetMapper(cfg, is_train=True)(rec)
    img, inst = out["image"], out["instances"]
    assert img.shape == (3, 128, 128) and img.dtype == torch.float32
    assert 0 <= float(img.min()) and float(img.max()) <= 255 and float(img.max()) > 1
    assert len(inst) == len(rec["annotations"]) and inst.gt_classes.tolist() == [0] * len(inst)
    scale = 128 / rec["width"]
    x1 = [a["bbox"][0] * scale for a in rec["annotations"]]
    x1_flipped = [128 - a["bbox"][2] * scale for a in rec["annotations"]]
    got = sorted(inst.gt_boxes.tensor[:, 0].tolist())
    assert got == pytest.approx(sorted(x1), abs=1e-3) or got == pytest.approx(sorted(x1_flipped), abs=1e-3)
    test_out = MDKDDatasetMapper(cfg, is_train=False)(rec)
    assert "instances" not in test_out and test_out["image"].shape == (3, 128, 128)

    # detectron2's COCOEvaluator on the registered set: ground truth as predictions -> AP 100
    ev = COCOEvaluator("lungct_valid", tasks=("bbox",), output_dir=str(tmp_path / "eval"))
    ev.reset()
    for r in records:
        inst = Instances((r["height"], r["width"]))
        boxes = torch.tensor([a["bbox"] for a in r["annotations"]], dtype=torch.float32).reshape(-1, 4)
        inst.pred_boxes = Boxes(boxes)
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.zeros(len(boxes), dtype=torch.int64)
        ev.process([{"image_id": r["image_id"]}], [{"instances": inst}])
    res = ev.evaluate()
    assert res["bbox"]["AP"] == pytest.approx(100.0)
