"""Tests of mdkd_det.evaluation.coco_evaluation (COCOEvaluator, faster-coco-eval vs pycocotools)."""

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
import torch

from mdkd_det.data.catalog import Metadata
from mdkd_det.evaluation import coco_evaluation
from mdkd_det.utils.errors import DatasetError
from mdkd_det.evaluation.coco_evaluation import COCO_BBOX_METRIC_NAMES, COCOEvaluator


def _pycocotools_stats(gt_dict, results):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(gt_dict)
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (v * 100 if v >= 0 else float("nan")) for k, v in zip(COCO_BBOX_METRIC_NAMES, ev.stats)}


def _assert_stats_equal(ours, ref, tol=1e-6):
    for k in COCO_BBOX_METRIC_NAMES:
        a, b = ours[k], ref[k]
        if math.isnan(b):
            assert math.isnan(a), f"{k}: ours {a}, pycocotools NaN"
        else:
            assert abs(a - b) <= tol, f"{k}: ours {a}, pycocotools {b}, diff {a - b}"


def _noisy_outputs(records, rng, label_of=lambda a: a["category_id"] + 1):
    """Jittered copies of GT boxes (0-2 each) plus 0-3 random FPs per image, uniform scores."""
    outs = []
    for r in records:
        boxes, labels = [], []
        for a in r["annotations"]:
            x1, y1, x2, y2 = a["bbox"]
            s = max(x2 - x1, y2 - y1)
            for _ in range(rng.integers(0, 3)):
                j = rng.normal(0, 0.15 * s, 4)
                bx = [x1 + j[0], y1 + j[1], x2 + j[2], y2 + j[3]]
                bx[2], bx[3] = max(bx[2], bx[0] + 1), max(bx[3], bx[1] + 1)
                boxes.append(bx)
                labels.append(label_of(a))
        for _ in range(rng.integers(0, 4)):
            x, y = rng.uniform(0, r["width"] - 130), rng.uniform(0, r["height"] - 130)
            w, h = rng.uniform(4, 120, 2)
            boxes.append([x, y, x + w, y + h])
            labels.append(int(rng.integers(1, 2)))
        n = len(boxes)
        outs.append({
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
            "scores": torch.tensor(rng.random(n), dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
        })
    return outs


def _lungct_valid(data_root):
    path = data_root / "lungct_roboflow" / "valid" / "_annotations.coco.json"
    raw = json.loads(path.read_text())
    meta = Metadata(name="lungct_valid_test", thing_classes=["nodule"], thing_dataset_id_to_contiguous_id={1: 0})
    by_img = {}
    for a in raw["annotations"]:
        x, y, w, h = a["bbox"]
        by_img.setdefault(a["image_id"], []).append({"bbox": [x, y, x + w, y + h], "category_id": 0})
    records = [
        {"file_name": str(path.parent / im["file_name"]), "height": im["height"], "width": im["width"],
         "image_id": im["id"], "annotations": by_img.get(im["id"], []), "reader": "image"}
        for im in raw["images"]
    ]
    gt = copy.deepcopy(raw)
    for i, a in enumerate(gt["annotations"]):  # ids start at 0 in this export: renumber from 1
        a["id"] = i + 1
    return records, meta, gt


def _run(ev, records, outputs, batch=8):
    ev.reset()
    for i in range(0, len(records), batch):
        ev.process(records[i:i + batch], outputs[i:i + batch])
    return ev.evaluate()


@pytest.mark.real_data
def test_equals_pycocotools_on_lungct_valid(data_root, tmp_path):
    records, meta, gt_raw = _lungct_valid(data_root)
    assert len(records) == 117
    outputs = _noisy_outputs(records, np.random.default_rng(1234))
    ev = COCOEvaluator("lungct_valid_test", records, meta, output_dir=str(tmp_path))
    res = _run(ev, records, outputs)
    results = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert len(results) == sum(len(o["scores"]) for o in outputs)
    ref = _pycocotools_stats(gt_raw, results)
    _assert_stats_equal(res["bbox"], ref)
    # the synthetic detections give a non-trivial operating point (guards against a vacuous test)
    assert 5 < res["bbox"]["AP50"] < 95 and 0 < res["froc"]["CPM"] < 1
    assert math.isnan(res["bbox"]["APl"])  # no large nodules in LungCT valid


def _small_set():
    """4 images (ids 100, 205, 7, 0; image 205 without GT), source categories 3 -> 0, 7 -> 1."""
    meta = Metadata(name="small", thing_classes=["a", "b"], thing_dataset_id_to_contiguous_id={3: 0, 7: 1})
    records = [
        {"file_name": "/x/100.png", "height": 200, "width": 300, "image_id": 100,
         "annotations": [{"bbox": [10, 10, 50, 40], "category_id": 0}, {"bbox": [100, 60, 180, 160], "category_id": 1}]},
        {"file_name": "/x/205.png", "height": 200, "width": 300, "image_id": 205, "annotations": []},
        {"file_name": "/x/7.png", "height": 200, "width": 300, "image_id": 7,
         "annotations": [{"bbox": [30, 30, 45, 44], "category_id": 1}]},
        {"file_name": "/x/0.png", "height": 200, "width": 300, "image_id": 0,
         "annotations": [{"bbox": [150, 20, 290, 190], "category_id": 0}]},
    ]
    return records, meta


def _small_outputs():
    """Detections for the 4 images of :func:`_small_set` (xyxy px, scores, labels 1..2)."""
    return [
        {"boxes": torch.tensor([[11.0, 10.0, 50.0, 41.0], [100.0, 60.0, 170.0, 160.0]]),
         "scores": torch.tensor([0.9, 0.6]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[5.0, 5.0, 25.0, 25.0]]), "scores": torch.tensor([0.7]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([[150.0, 25.0, 290.0, 190.0]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([1])},
    ]


def test_files_use_source_ids_and_no_gt_image(tmp_path):
    records, meta = _small_set()
    outputs = _small_outputs()
    ev = COCOEvaluator("small", records, meta, output_dir=str(tmp_path / "out"))
    res = _run(ev, records, outputs, batch=3)
    results = json.loads((tmp_path / "out" / "coco_instances_results.json").read_text())
    assert {r["image_id"] for r in results} == {100, 205, 0}
    assert {r["category_id"] for r in results} == {3, 7}  # source ids, not contiguous ones
    first = [r for r in results if r["image_id"] == 100 and r["category_id"] == 3][0]
    assert first["bbox"] == pytest.approx([11.0, 10.0, 39.0, 31.0]) and first["score"] == pytest.approx(0.9)
    # strict JSON: NaN written as null
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert set(metrics) == {"bbox", "froc"} and set(metrics["bbox"]) == set(COCO_BBOX_METRIC_NAMES)
    assert metrics["bbox"]["AP"] == pytest.approx(res["bbox"]["AP"])
    for k, v in res["bbox"].items():
        assert (metrics["bbox"][k] is None) == math.isnan(v)
    # the image without GT (FP there) and the GT dict agree with pycocotools
    _assert_stats_equal(res["bbox"], _pycocotools_stats(ev.gt_dict, results))
    # FROC (class-agnostic, IoU .5): TPs 100/a (IoU .92), 100/b (IoU .875), 0/a (IoU .97); FP on 205;
    # image 7 missed. Score order: .9 TP, .8 TP, .7 FP, .6 TP over 4 images and 4 GT:
    # points (FP/img, sens) (0, 0) (0, .25) (0, .5) (.25, .5) (.25, .75)
    # sens@0.125 = 0.5 (no FP allowed), sens@0.25 = 0.75
    assert res["froc"]["sens@0.125"] == pytest.approx(0.5)
    assert res["froc"]["sens@0.25"] == pytest.approx(0.75) and res["froc"]["num_fp"] == 1


def test_many_to_one_source_ids_follow_ground_truth(tmp_path):
    # source ids 7 and 9 both map to contiguous 1: the brief asks for the smallest (7), but the
    # GT builder may write other ids for such mappings; results must use the GT's ids.
    records, meta = _small_set()
    meta.thing_dataset_id_to_contiguous_id = {3: 0, 9: 1, 7: 1}
    outputs = _noisy_outputs(records, np.random.default_rng(3), label_of=lambda a: a["category_id"] + 1)
    ev = COCOEvaluator("small", records, meta, output_dir=str(tmp_path))
    res = _run(ev, records, outputs)
    results = json.loads((tmp_path / "coco_instances_results.json").read_text())
    gt_cats = [c["id"] for c in ev.gt_dict["categories"]]
    assert {r["category_id"] for r in results} <= set(gt_cats) and len(gt_cats) == 2
    if gt_cats[1] in (7, 9):
        assert gt_cats[1] == 7
    _assert_stats_equal(res["bbox"], _pycocotools_stats(ev.gt_dict, results))
    assert res["bbox"]["AP50"] > 0


def test_string_image_ids_map_to_ground_truth(tmp_path):
    records, meta = _small_set()
    for r in records:
        r["image_id"] = f"img-{r['image_id']}"
    outputs = _noisy_outputs(records, np.random.default_rng(4))
    ev = COCOEvaluator("small", records, meta, output_dir=str(tmp_path))
    res = _run(ev, records, outputs)
    results = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert {r["image_id"] for r in results} <= {im["id"] for im in ev.gt_dict["images"]}
    _assert_stats_equal(res["bbox"], _pycocotools_stats(ev.gt_dict, results))
    assert res["bbox"]["AP50"] > 0


def test_zero_detections(tmp_path):
    records, meta = _small_set()
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    ev = COCOEvaluator("small", records, meta, output_dir=str(tmp_path))
    res = _run(ev, records, [empty] * len(records))
    for k in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"):
        assert res["bbox"][k] == 0.0, k
    assert res["froc"]["CPM"] == 0.0
    assert json.loads((tmp_path / "coco_instances_results.json").read_text()) == []
    # never calling process() at all is the same (all images count as without detections)
    ev.reset()
    assert ev.evaluate()["bbox"]["AP"] == 0.0


def test_bad_predictions_raise():
    from mdkd_det.utils.errors import DatasetError

    records, meta = _small_set()
    ev = COCOEvaluator("small", records, meta)
    bad_label = {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([0])}
    with pytest.raises(DatasetError, match=r"labels must be in 1\.\.2"):
        ev.process(records[:1], [bad_label])
    with pytest.raises(DatasetError, match="not in the evaluator's records"):
        ev.process([{"image_id": 999}], [bad_label])
    with pytest.raises(DatasetError, match="thing_dataset_id_to_contiguous_id"):
        COCOEvaluator("small", records, Metadata(name="m", thing_classes=["a"]))
    with pytest.raises(DatasetError, match="duplicate image_id"):
        COCOEvaluator("small", records + records[:1], meta)


def _dist_worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        records, meta = _small_set()
        outputs = _noisy_outputs(records, np.random.default_rng(5))
        ev = COCOEvaluator("small", records, meta)
        ev.reset()
        idx = list(range(rank, len(records), world)) + [0]  # image 0 seen twice (sampler padding)
        ev.process([records[i] for i in idx], [outputs[i] for i in idx])
        res = ev.evaluate()
        with open(f"{out_file}.{rank}", "w") as f:
            json.dump(coco_evaluation.to_json_safe(res), f)
    finally:
        dist.destroy_process_group()


def test_distributed_gather_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "res")), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "res.0").read_text())
    rank1 = json.loads((tmp_path / "res.1").read_text())
    assert rank1 == {}
    records, meta = _small_set()
    single = _run(COCOEvaluator("small", records, meta), records, _noisy_outputs(records, np.random.default_rng(5)))
    assert rank0 == coco_evaluation.to_json_safe(single)


def test_froc_per_scan(tmp_path):
    # the detections of test_files_use_source_ids_and_no_gt_image; images 100 and 205 are one scan
    # (series s1), 7 and 0 another (s2). Score order .9 TP, .8 TP, .7 FP, .6 TP, 4 GT, 2 scans:
    # points (FP/scan, sens) (0, 0) (0, .25) (0, .5) (.5, .5) (.5, .75)
    # -> sens@0.125 = sens@0.25 = 0.5 (per image the FP counted .25 and sens@0.25 was .75), sens@0.5 = .75
    records, meta = _small_set()
    for r, sid in zip(records, ("s1", "s1", "s2", "s2")):
        r["series_id"] = sid
    records[0]["patient_id"] = "p9"  # series_id takes precedence over patient_id
    outputs = _small_outputs()
    res = _run(COCOEvaluator("small", records, meta, froc_fps=(0.125, 0.25, 0.5), froc_per_scan=True),
               records, outputs, batch=3)["froc"]
    assert (res["sens@0.125"], res["sens@0.25"], res["sens@0.5"]) == (0.5, 0.5, 0.75)
    assert res["CPM"] == pytest.approx((0.5 + 0.5 + 0.75) / 3) and res["num_scans"] == 2
    per_image = _run(COCOEvaluator("small", records, meta, froc_fps=(0.125, 0.25, 0.5)), records, outputs)["froc"]
    assert per_image["sens@0.25"] == 0.75 and "num_scans" not in per_image
    del records[2]["series_id"]
    with pytest.raises(DatasetError, match="TEST.FROC_PER_SCAN needs 'series_id' or 'patient_id'.*image 7"):
        COCOEvaluator("small", records, meta, froc_per_scan=True)
