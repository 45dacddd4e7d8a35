"""Paired bootstrap of a COCO-metric difference (mdkd_det.evaluation.paired_bootstrap)."""

import numpy as np
import pytest

from mdkd_det.evaluation.coco_evaluation import coco_bbox_metrics
from mdkd_det.evaluation.paired_bootstrap import CocoImageResampler, paired_bootstrap


def _gt(n=6):
    """``n`` 100x100 images, image i has one 20x20 box at (5i, 5i) (category 1)."""
    images = [{"id": i + 1, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in range(n)]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [5.0 * i, 5.0 * i, 20.0, 20.0],
             "area": 400.0, "iscrowd": 0} for i in range(n)]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "nodule"}]}


def _perfect(gt):
    return [{"image_id": a["image_id"], "category_id": 1, "bbox": list(a["bbox"]), "score": 0.9}
            for a in gt["annotations"]]


def _noisy(gt, seed):
    """Per image: a shifted copy of the box (IoU between .5 and 1) and a false positive."""
    rng = np.random.default_rng(seed)
    out = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        dx = float(rng.uniform(0, 6))
        out.append({"image_id": a["image_id"], "category_id": 1, "bbox": [x + dx, y, w, h],
                    "score": float(rng.uniform(0.3, 1))})
        out.append({"image_id": a["image_id"], "category_id": 1, "bbox": [70.0, 5.0, 15.0, 15.0],
                    "score": float(rng.uniform(0, 1))})
    return out


def _duplicated(gt, res, idx):
    """The COCO dataset whose images are those at positions ``idx``, each copy a new image."""
    images, anns, out = [], [], []
    for new_id, p in enumerate(idx, start=1):
        old = gt["images"][p]["id"]
        images.append({**gt["images"][p], "id": new_id})
        anns += [{**a, "id": len(anns) + 1, "image_id": new_id} for a in gt["annotations"] if a["image_id"] == old]
        out += [{**r, "image_id": new_id} for r in res if r["image_id"] == old]
    return {"images": images, "annotations": anns, "categories": gt["categories"]}, out


def test_resampler_equals_full_coco_evaluation_with_repeats():
    gt = _gt()
    res = _noisy(gt, 1)
    rs = CocoImageResampler(gt, res)
    assert rs.image_ids == [1, 2, 3, 4, 5, 6]
    full = coco_bbox_metrics(gt, res)
    got = rs.metrics(np.arange(6), ["AP", "AP50", "AP75"])
    for k in ("AP", "AP50", "AP75"):
        assert got[k] == pytest.approx(full[k], abs=1e-9), k
    assert 0 < full["AP"] < 100  # the case is not degenerate
    idx = [0, 0, 3, 5, 5, 5]
    dup = coco_bbox_metrics(*_duplicated(gt, res, idx))
    got = rs.metrics(idx, ["AP", "AP50", "AP75"])
    for k in ("AP", "AP50", "AP75"):
        assert got[k] == pytest.approx(dup[k], abs=1e-9), k
    assert dup["AP"] != pytest.approx(full["AP"])  # the repeats changed the metric


def test_identical_predictions_give_exactly_zero():
    gt = _gt()
    pairs = [(_noisy(gt, s), _noisy(gt, s)) for s in (1, 2)]
    out = paired_bootstrap(gt, pairs, ["AP", "AP50"], num_resamples=50, seed=0)
    for k in ("AP", "AP50"):
        assert out[k]["per_seed"] == [0.0, 0.0]
        assert out[k]["mean"] == 0.0
        assert out[k]["ci95"] == [0.0, 0.0]
        assert out[k]["significant"] is False
        assert out[k]["num_valid_resamples"] == 50
        assert out[k]["method"] == "paired bootstrap over test images, 50 resamples"


def test_known_shift():
    # seed A: baseline finds nothing (AP 0), model is perfect (AP 100) -> +100 on every resample
    # (every image has a box); seed B: identical models -> 0. Mean over seeds: exactly +50.
    gt = _gt()
    empty, perfect = [], _perfect(gt)
    same = _noisy(gt, 3)
    out = paired_bootstrap(gt, [(empty, perfect), (same, same)], ["AP", "AP50"], num_resamples=40, seed=1)
    for k in ("AP", "AP50"):
        assert out[k]["per_seed"] == [100.0, 0.0]
        assert out[k]["mean"] == 50.0
        assert out[k]["ci95"] == [50.0, 50.0]
        assert out[k]["significant"] is True
    # reversed: a significant loss
    out = paired_bootstrap(gt, [(perfect, empty)], ["AP"], num_resamples=10)
    assert out["AP"]["ci95"] == [-100.0, -100.0] and out["AP"]["significant"] is True


def test_interval_crossing_zero_is_not_significant_and_seeded():
    gt = _gt(12)
    pairs = [(_noisy(gt, 5), _noisy(gt, 6))]
    a = paired_bootstrap(gt, pairs, ["AP"], num_resamples=200, seed=7)
    b = paired_bootstrap(gt, pairs, ["AP"], num_resamples=200, seed=7)
    assert a == b  # same seed -> same interval
    lo, hi = a["AP"]["ci95"]
    assert lo < a["AP"]["mean"] < hi
    assert a["AP"]["significant"] is (lo > 0 or hi < 0)


def test_errors():
    gt = _gt()
    with pytest.raises(ValueError, match="unsupported metric"):
        paired_bootstrap(gt, [([], [])], ["APs"])
    with pytest.raises(ValueError, match="no \\(baseline, model\\) pairs"):
        paired_bootstrap(gt, [])
    with pytest.raises(ValueError, match="not in the ground truth"):
        CocoImageResampler(gt, [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
