"""Tests of mdkd_det.evaluation.benchmark_eval.time_coco_eval."""

import math

import pytest

from mdkd_det.evaluation.benchmark_eval import time_coco_eval


def _data():
    gt = {"images": [{"id": i, "height": 100, "width": 100} for i in range(5)],
          "annotations": [{"id": i + 1, "image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                           "iscrowd": 0} for i in range(5)],
          "categories": [{"id": 1, "name": "lesion"}]}
    res = [{"image_id": i, "category_id": 1, "bbox": [11, 10, 20, 21], "score": 0.5 + i / 10} for i in range(5)]
    return gt, res


def test_times_both_libraries_without_mutating_inputs():
    gt, res = _data()
    before = repr((gt, res))
    t = time_coco_eval(gt, res, repeats=2)
    assert t["faster_coco_eval_s"] > 0 and t["pycocotools_s"] > 0
    assert t["speedup"] == pytest.approx(t["pycocotools_s"] / t["faster_coco_eval_s"])
    assert repr((gt, res)) == before


def test_empty_results_and_bad_repeats():
    gt, _ = _data()
    t = time_coco_eval(gt, [])
    assert t["faster_coco_eval_s"] > 0 and math.isnan(t["pycocotools_s"])
    with pytest.raises(ValueError, match="repeats"):
        time_coco_eval(gt, [], repeats=0)
