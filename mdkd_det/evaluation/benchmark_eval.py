"""Wall-clock comparison of faster-coco-eval and pycocotools on the same bbox evaluation.

Used by ``tools/benchmark.py`` for ``eval_speed_ratio``. Source: faster-coco-eval
(``COCO``, ``COCOeval_faster``) and pycocotools (``COCO``, ``COCOeval``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from typing import Dict, List

__all__ = ["time_coco_eval"]


def _run_faster(gt: dict, res: List[dict]) -> None:
    from faster_coco_eval import COCO, COCOeval_faster

    quiet = lambda *a, **k: None  # noqa: E731
    coco_gt = COCO(gt, print_function=quiet)
    coco_dt = coco_gt.loadRes(res)
    ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=quiet)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()


def _run_pycocotools(gt: dict, res: List[dict]) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(res)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()


def time_coco_eval(gt_dict: dict, results_list: List[dict], repeats: int = 1) -> Dict[str, float]:
    """Seconds taken by a full bbox evaluation (index, loadRes, evaluate, accumulate, summarize).

    Args:
        gt_dict: COCO ground-truth dict (annotation ids >= 1).
        results_list: COCO results list (xywh px, ``score``).
        repeats: runs per library; the minimum time is reported (``timeit`` convention).
            Deep copies of the inputs are made outside the timed region.

    Returns:
        ``{"faster_coco_eval_s": t_fast, "pycocotools_s": t_ref, "speedup": t_ref / t_fast,
        "repeats": repeats}``. With an empty ``results_list`` pycocotools cannot run
        (its ``loadRes`` indexes the first result): its time and the speedup are NaN.

    Raises:
        ValueError: ``repeats < 1``.
    """
    if repeats < 1:
        raise ValueError(f"time_coco_eval: repeats must be >= 1, got {repeats}")
    times: Dict[str, float] = {}
    runners = [("faster_coco_eval_s", _run_faster), ("pycocotools_s", _run_pycocotools)]
    for key, fn in runners:
        if key == "pycocotools_s" and not results_list:
            times[key] = float("nan")
            continue
        best = float("inf")
        for _ in range(repeats):
            gt, res = copy.deepcopy(gt_dict), copy.deepcopy(results_list)
            t0 = time.perf_counter()
            fn(gt, res)
            best = min(best, time.perf_counter() - t0)
        times[key] = best
    fast, ref = times["faster_coco_eval_s"], times["pycocotools_s"]
    times["speedup"] = ref / fast if fast > 0 else float("nan")
    times["repeats"] = repeats
    return times
