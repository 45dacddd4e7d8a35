"""DefaultPredictor (issue 12): the same detections as the evaluator on real slices (JPEG and
DICOM), for Faster R-CNN, RF-DETR and a distilled student; the test size follows eval mode."""

import json

import numpy as np
import pytest
import torch

from mdkd_det.config import get_cfg
from mdkd_det.data.io import read_hu, reader_for_path
from mdkd_det.engine import DefaultPredictor, DefaultTrainer, do_test
from mdkd_det.engine.checkpointer import export_model
from mdkd_det.engine.defaults import dataset_output_name
from mdkd_det.modeling import build_model
from mdkd_det.utils.errors import CheckpointError, ConfigError

from _tiny import tiny_cfg

TEST_SETS = "('lungct_valid', 'lung_pet_ct_dx_all')"
#: train and test sizes differ, so a predictor at the training size would give other boxes
SIZES = {"INPUT.MIN_SIZE_TEST": 96, "INPUT.MAX_SIZE_TEST": 96, "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0,
         "DATASETS.TEST": TEST_SETS, "DATASETS.TEST_LIMIT": 2, "TEST.VIS_NUM": 0}


def _evaluator_detections(cfg, model, out_dir):
    """{file_name: [(x, y, w, h, score)]} from the evaluator's coco_instances_results.json."""
    do_test(cfg, model, output_dir=str(out_dir))
    from mdkd_det.data.build import get_dataset_records

    dets = {}
    for name in cfg.DATASETS.TEST:
        records = get_dataset_records(cfg, [name], cfg.DATASETS.TEST_LIMIT)
        res = json.loads((out_dir / "inference" / dataset_output_name(name) / "coco_instances_results.json").read_text())
        gt_ids = {r["image_id"]: r for r in records}
        from mdkd_det.data.datasets.coco import coco_image_ids

        id_map = coco_image_ids(records)
        by_coco = {id_map[i]: r["file_name"] for i, r in gt_ids.items()}
        for r in records:
            dets.setdefault(r["file_name"], [])
        for d in res:
            dets[by_coco[d["image_id"]]].append((*d["bbox"], d["score"]))
    return dets


def _predictor_detections(pred, files):
    out = {}
    for f in files:
        r = pred(f)
        b = r["boxes"].double()
        out[f] = [(float(x1), float(y1), float(x2 - x1), float(y2 - y1), float(s))
                  for (x1, y1, x2, y2), s in zip(b.tolist(), r["scores"].double().tolist())]
    return out


def _assert_same(ev, pr):
    assert set(ev) == set(pr)
    n = 0
    for f in ev:
        a = sorted(ev[f], key=lambda t: (-t[4], t[0], t[1]))
        b = sorted(pr[f], key=lambda t: (-t[4], t[0], t[1]))
        assert len(a) == len(b), f
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-4, err_msg=f)
        n += len(a)
    assert n > 0  # the comparison is not vacuous
    assert any(f.endswith(".dcm") for f in ev) and any(f.endswith(".jpg") for f in ev)


@pytest.fixture(scope="module")
def frcnn(tmp_path_factory, data_root):
    """A tiny Faster R-CNN trained 2 iterations on LungCT (model_final.pth)."""
    out = tmp_path_factory.mktemp("frcnn")
    cfg = tiny_cfg(out, max_iter=2, **{"DATASETS.TEST": "()"})
    DefaultTrainer(cfg).train()
    return cfg, out / "model_final.pth"


def test_faster_rcnn_equals_evaluator(frcnn, tmp_path):
    cfg, weights = frcnn
    cfg = cfg.clone()
    cfg.merge_from_list([x for kv in SIZES.items() for x in kv])
    pred = DefaultPredictor(cfg, weights=str(weights))
    ev = _evaluator_detections(cfg, pred.model, tmp_path)
    pr = _predictor_detections(pred, list(ev))
    _assert_same(ev, pr)
    # HU array and uint8 image array inputs give the path's detections
    dcm = next(f for f in ev if f.endswith(".dcm"))
    hu = read_hu({"file_name": dcm, "reader": "dicom"})
    a, b = pred(dcm), pred(hu)
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    jpg = next(f for f in ev if f.endswith(".jpg"))
    import cv2

    bgr = cv2.imread(jpg, cv2.IMREAD_COLOR)
    assert torch.equal(pred(jpg)["boxes"], pred(bgr)["boxes"])
    batch = pred.predict_batch([jpg, jpg])
    assert len(batch) == 2 and torch.equal(batch[0]["scores"], batch[1]["scores"])


def test_eval_mode_uses_test_size():
    cfg = get_cfg()
    cfg.merge_from_list(["INPUT.MIN_SIZE_TRAIN", 128, "INPUT.MAX_SIZE_TRAIN", 128,
                         "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 96])
    model = build_model(cfg)
    img = [torch.rand(3, 300, 300)]
    assert model.transform(img)[0].tensors.shape[-2:] == (128, 128)
    model.eval()  # no other call: the trap of issue 12
    assert model.transform(img)[0].tensors.shape[-2:] == (96, 96)
    model.train()
    assert model.transform(img)[0].tensors.shape[-2:] == (128, 128)


def test_distilled_student_equals_evaluator(frcnn, tmp_path):
    """KDTrainer (1 iteration, teacher = the tiny model) exports model_student.pth; the predictor
    built from the student's config.yaml (KD keys in it) loads it alone."""
    from mdkd_det.distill.trainer import KDTrainer

    cfg, weights = frcnn
    out = tmp_path / "student"
    scfg = tiny_cfg(out, max_iter=1, **{"DATASETS.TEST": "()", "KD.ENABLED": True,
                                        "KD.TEACHER_CONFIG": str(weights.parent / "config.yaml"),
                                        "KD.TEACHER_WEIGHTS": str(weights)})
    (weights.parent / "config.yaml").write_text(cfg.dump())
    out.mkdir()
    (out / "config.yaml").write_text(scfg.dump())
    KDTrainer(scfg).train()
    student = out / "model_student.pth"
    sd = torch.load(student, map_location="cpu", weights_only=True)["model"]
    assert not any(k.startswith(("teacher.", "connectors.")) for k in sd)
    pcfg = get_cfg()
    pcfg.merge_from_file(str(out / "config.yaml"))
    assert pcfg.KD.ENABLED
    pcfg.merge_from_list([x for kv in SIZES.items() for x in kv])
    pred = DefaultPredictor(pcfg, weights=str(student))
    ev = _evaluator_detections(pred.cfg, pred.model, tmp_path / "eval")
    _assert_same(ev, _predictor_detections(pred, list(ev)))


def test_rfdetr_equals_evaluator(tmp_path, data_root):
    pytest.importorskip("rfdetr")
    from test_rfdetr import TINY_RFDETR

    cfg = tiny_cfg(tmp_path, max_iter=1, **{**TINY_RFDETR, **SIZES})
    weights = export_model(build_model(cfg), str(tmp_path / "rfdetr.pth"))
    pred = DefaultPredictor(cfg, weights=weights)
    ev = _evaluator_detections(pred.cfg, pred.model, tmp_path)
    _assert_same(ev, _predictor_detections(pred, list(ev)))


def test_errors(tmp_path):
    cfg = get_cfg()
    with pytest.raises(ConfigError, match="MODEL.WEIGHTS is empty"):
        DefaultPredictor(cfg)
    with pytest.raises(CheckpointError, match="nope.pth"):
        DefaultPredictor(cfg, weights=str(tmp_path / "nope.pth"))
    with pytest.raises(ConfigError, match="did you mean LungCT/mdkd_faster_rcnn_R18_cpu.yaml"):
        DefaultPredictor("LungCT/mdkd_faster_rcnn_R18_cpuu.yaml", weights="x.pth")


def test_reader_for_path(tmp_path, data_root):
    import cv2

    p8, p16 = tmp_path / "a.png", tmp_path / "b.png"
    cv2.imwrite(str(p8), np.zeros((4, 4), np.uint8))
    cv2.imwrite(str(p16), np.full((4, 4), 32768 - 1000, np.uint16))
    assert reader_for_path(str(p8)) == "image" and reader_for_path(str(p16)) == "png16_hu"
    dcm = next((data_root / "lung_pet_ct_dx_sample").rglob("*.dcm"))
    noext = tmp_path / "slice0001"
    noext.write_bytes(dcm.read_bytes())
    assert reader_for_path(str(dcm)) == "dicom" and reader_for_path(str(noext)) == "dicom"
