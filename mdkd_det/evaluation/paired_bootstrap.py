"""Paired bootstrap over test images of a COCO-metric difference, averaged over seeds.

The question it answers: *is model B (the distilled student) better than model A (the
dataset-specific baseline) on this test set, beyond the noise of which test images happened to be
drawn?* For each seed ``s`` we have the two models' COCO results lists on the same test images.

- **Point estimate.** ``d_s = M(B_s) - M(A_s)`` on the full test set (``M`` = COCO AP or AP50,
  percent, faster-coco-eval as in :func:`~mdkd_det.evaluation.coco_evaluation.coco_bbox_metrics`;
  see :class:`CocoImageResampler`); the reported difference is ``mean_s d_s``.
- **Resampling.** ``B`` times, draw ``N`` image indices with replacement from the ``N`` test
  images (numpy ``default_rng(seed)``). The *same* draw is applied to both models and to every
  seed (paired design: the image-level difficulty cancels), and ``mean_s d_s`` is recomputed on
  the resampled set. An image drawn ``k`` times appears ``k`` times, as ``k`` distinct COCO images
  with the same ground truth and detections.
- **Interval.** The 95% percentile interval of the ``B`` resampled means (2.5th / 97.5th
  percentiles, numpy's linear interpolation). The difference is called
  *significant* when the interval excludes 0 (``lo > 0`` or ``hi < 0``).

What the interval does and does not cover: it is the test-set sampling uncertainty of the
seed-averaged difference, the models held fixed. Seed-to-seed training variance is reported
separately (``per_seed`` differences and their SD in the pipeline's results); with 3 seeds a
between-seed interval would be too wide to be useful, and the paper reports none.

Source: Efron & Tibshirani, *An Introduction to the Bootstrap* (1993), ch. 13 (percentile
interval); paired bootstrap over test items as in Koehn, EMNLP 2004 ("Statistical significance
tests for machine translation evaluation"). COCO AP: faster-coco-eval (pycocotools-compatible).
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

#: Metrics :class:`CocoImageResampler` computes (area "all", 100 detections per image) and their
#: IoU threshold (None = mean over 0.50:0.95), as in COCO's ``summarize`` (stats[0:3]).
METRICS = {"AP": None, "AP50": 0.5, "AP75": 0.75}

__all__ = ["CocoImageResampler", "METRICS", "paired_bootstrap"]


class CocoImageResampler:
    """COCO bbox metrics of one model on any multiset of the test images, evaluated once.

    faster-coco-eval's per-image evaluation (``COCOevalEvaluateImages``: matching of each
    image, category and area range at every IoU threshold) does not depend on which other
    images are in the set; only the accumulation (precision/recall over the pooled, score-sorted
    detections) does. So the images are evaluated once and every resample only re-runs the
    library's C++ accumulation (``COCOevalAccumulate``) over the per-image evaluations of the drawn
    images (an image drawn ``k`` times is listed ``k`` times) and COCO's ``_summarize``, for area
    range "all" and 100 detections per image only (:data:`METRICS`). This gives exactly
    the metrics of a COCO dataset in which the drawn images are ``k`` distinct copies (checked in
    ``tests/test_paired_bootstrap.py``), in a few milliseconds instead of a full evaluation.

    Args:
        gt_dict: COCO ground-truth dict (``images``, ``annotations``, ``categories``).
        results: COCO results list of the model on those images (may be empty).

    Attributes:
        image_ids: the ground truth's image ids, in the order :meth:`metrics` indexes them.

    Raises:
        ValueError: ``gt_dict`` has no images, or a result's image is not in it.

    Source: faster-coco-eval ``COCOeval_faster`` (``separate_eval=True`` path: evaluate once,
    accumulate); the evaluation list layout ``[category][area range][image]`` is that of
    detectron2's ``COCOevalAccumulate`` port, which faster-coco-eval keeps.
    """

    def __init__(self, gt_dict: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> None:
        from faster_coco_eval import COCO, COCOeval_faster

        if not gt_dict.get("images"):
            raise ValueError("paired bootstrap: the ground truth has no images")
        gt_ids = {img["id"] for img in gt_dict["images"]}
        bad = sorted({r["image_id"] for r in results} - gt_ids, key=str)
        if bad:
            raise ValueError(f"paired bootstrap: result image ids not in the ground truth: {bad[:10]}")
        quiet = logger.debug
        coco_gt = COCO(copy.deepcopy(dict(gt_dict)), print_function=quiet)
        coco_dt = coco_gt.loadRes(copy.deepcopy(list(results)))
        ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=quiet, separate_eval=True)
        ev.evaluate()
        p = ev._paramsEval
        n_area = len(p.areaRng)
        a_all = p.areaRngLbl.index("all")
        n_cat = len(p.catIds) if p.useCats else 1
        evals = list(ev._evalImgs_cpp)
        self.image_ids = list(p.imgIds)
        self._n = len(self.image_ids)
        # only area range "all" and the largest maxDets are accumulated (the metrics we report)
        self._evals = [evals[(k * n_area + a_all) * self._n: (k * n_area + a_all + 1) * self._n]
                       for k in range(n_cat)]
        self._params = copy.copy(p)
        self._params.areaRng, self._params.areaRngLbl = [p.areaRng[a_all]], ["all"]
        self._params.maxDets = [p.maxDets[-1]]
        ev.params = self._params
        self._ev = ev

    def __len__(self) -> int:
        return self._n

    def metrics(self, idx: Sequence[int], names: Sequence[str]) -> Dict[str, float]:
        """``{name: value}`` (percent, NaN if undefined) on the images at positions ``idx`` of
        :attr:`image_ids` (repeats allowed); ``names`` from :data:`METRICS`."""
        from faster_coco_eval.faster_eval_api_cpp import COCOevalAccumulate

        idx = np.asarray(idx, dtype=np.int64)
        ev = self._ev
        params = copy.copy(self._params)
        params.imgIds = list(range(idx.size))  # only its length is used by the accumulation
        ev.eval = COCOevalAccumulate(params, [block[i] for block in self._evals for i in idx])
        out = {}
        for k in names:
            v = ev._summarize(1, iouThr=METRICS[k], maxDets=params.maxDets[-1])
            out[k] = float(v) * 100.0 if v >= 0 else float("nan")
        return out


def paired_bootstrap(
    gt_dict: Mapping[str, Any],
    pairs: Sequence[Tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]],
    metrics: Sequence[str] = ("AP", "AP50"),
    num_resamples: int = 1000,
    seed: int = 0,
) -> Dict[str, Dict[str, Any]]:
    """Seed-averaged difference ``M(B) - M(A)`` with a paired-bootstrap percentile interval.

    Args:
        gt_dict: COCO ground truth of the test set (every image counts, with or without boxes).
        pairs: one ``(results_A, results_B)`` per seed: COCO results lists (``image_id``,
            ``category_id``, ``bbox`` xywh px, ``score``) of the baseline A and the model B.
        metrics: COCO metric names from :data:`METRICS` (AP, AP50, AP75; percent).
        num_resamples: bootstrap resamples ``B`` (>= 0); 0 gives the point estimates only
            (``ci95`` None, ``significant`` False).
        seed: seed of the resampling RNG (numpy ``default_rng``).

    Returns:
        ``{metric: {"per_seed": [d_s], "mean": mean_s d_s, "ci95": [lo, hi], "significant":
        bool, "num_valid_resamples": int, "method": str}}``; differences in percentage points.
        Resamples where the metric is undefined (NaN: no ground-truth box drawn) are dropped.

    Raises:
        ValueError: no pairs, ``num_resamples`` < 0, an unknown metric, or a result
            whose image is not in the ground truth.

    Source: module docstring (Efron & Tibshirani 1993; Koehn 2004; faster-coco-eval).
    """
    if not pairs:
        raise ValueError("paired bootstrap: no (baseline, model) pairs")
    if num_resamples < 0:
        raise ValueError(f"paired bootstrap: num_resamples must be >= 0, got {num_resamples}")
    names = list(metrics)
    unknown = [k for k in names if k not in METRICS]
    if unknown:
        raise ValueError(f"paired bootstrap: unsupported metric(s) {unknown}; supported: {list(METRICS)}")
    models = [(CocoImageResampler(gt_dict, a), CocoImageResampler(gt_dict, b)) for a, b in pairs]
    n = len(models[0][0])
    full = np.arange(n)

    def mean_diff(idx) -> Dict[str, List[float]]:
        diffs = defaultdict(list)
        for ra, rb in models:
            ma, mb = ra.metrics(idx, names), rb.metrics(idx, names)
            for k in names:
                diffs[k].append(mb[k] - ma[k])
        return diffs

    point = mean_diff(full)
    rng = np.random.default_rng(seed)
    boot = defaultdict(list)
    for _ in range(int(num_resamples)):
        d = mean_diff(rng.integers(0, n, size=n))
        for k in names:
            boot[k].append(float(np.mean(d[k])))
    out: Dict[str, Dict[str, Any]] = {}
    for k in names:
        vals = np.asarray(boot[k], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        if vals.size:
            lo, hi = (float(v) for v in np.percentile(vals, [2.5, 97.5]))
            ci, sig = [lo, hi], bool(lo > 0 or hi < 0)
        else:
            ci, sig = None, False
        out[k] = {
            "per_seed": [float(v) for v in point[k]],
            "mean": float(np.mean(point[k])),
            "ci95": ci,
            "significant": sig,
            "num_valid_resamples": int(vals.size),
            "method": f"paired bootstrap over test images, {int(num_resamples)} resamples",
        }
    return out
