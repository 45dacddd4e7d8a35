"""Run a detector over a data loader and feed an evaluator (detectron2 ``inference_on_dataset``).

Source: detectron2 ``evaluation/evaluator.py`` (API shape); progress bar: tqdm.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Dict, Iterable, List, Mapping

import torch

from ..utils.device import model_device

logger = logging.getLogger(__name__)

__all__ = ["inference_on_dataset", "print_metrics_table"]


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def inference_on_dataset(model: torch.nn.Module, data_loader: Iterable[List[dict]], evaluator: Any) -> Dict:
    """Evaluate ``model`` on every batch of ``data_loader`` with ``evaluator``.

    Args:
        model: a detector taking ``list[FloatTensor[C, H, W]]`` (values in [0, 1], original
            size) and returning, in eval mode, torchvision detection dicts (``boxes`` ``[N, 4]``
            XYXY px in original coordinates, ``scores`` ``[N]``, ``labels`` ``[N]``).
        data_loader: yields batches: lists of ``{"image": FloatTensor[C, H, W], "target": ...,
            "record": record}``. Images are moved to the model's device.
        evaluator: object with ``reset()``, ``process(records, outputs)``, ``evaluate()``
            (e.g. :class:`.coco_evaluation.COCOEvaluator`).

    Returns:
        whatever ``evaluator.evaluate()`` returns (``{}`` on non-zero ranks for COCOEvaluator).

    The model runs under ``model.eval()`` and ``torch.inference_mode()``; its previous
    training mode is restored afterwards, even on error. Progress is shown with tqdm on rank 0
    when stderr is a TTY; throughput (images/s, model time only and overall) is logged.

    Raises:
        whatever the model or evaluator raise (e.g. ``DatasetError`` for bad predictions).
    """
    try:
        total = len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    from tqdm import tqdm

    disable = _rank() != 0 or not sys.stderr.isatty()
    device = model_device(model)
    was_training = model.training
    evaluator.reset()
    n_images, model_time = 0, 0.0
    start = time.perf_counter()
    model.eval()
    try:
        with torch.inference_mode():
            bar = tqdm(data_loader, total=total, desc="inference", disable=disable, dynamic_ncols=True)
            for batch in bar:
                images = [d["image"].to(device, non_blocking=True) for d in batch]
                t0 = time.perf_counter()
                outputs = model(images)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                model_time += time.perf_counter() - t0
                evaluator.process([d["record"] for d in batch], outputs)
                n_images += len(batch)
                if not disable:
                    bar.set_postfix(img_s=f"{n_images / max(model_time, 1e-9):.1f}")
            bar.close()
    finally:
        model.train(was_training)
    wall = time.perf_counter() - start
    logger.info(
        "Inference on %d images: %.1f s (%.2f img/s overall, %.2f img/s model only)",
        n_images, wall, n_images / max(wall, 1e-9), n_images / max(model_time, 1e-9),
    )
    return evaluator.evaluate()


_TABLE_COLUMNS = (
    ("AP", "bbox"), ("AP50", "bbox"), ("AP75", "bbox"), ("APs", "bbox"), ("APm", "bbox"),
    ("APl", "bbox"), ("AR100", "bbox"), ("CPM", "froc"),
)  # fmt: skip


def _fmt(v: Any, key: str) -> str:
    if v is None:
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return "nan"
    return f"{f:.4f}" if key == "CPM" else f"{f:.2f}"


def print_metrics_table(results: Mapping[str, Any]) -> str:
    """A plain-text table of AP, AP50, AP75, APs, APm, APl, AR100 (percent) and CPM (fraction).

    Args:
        results: one evaluator result ``{"bbox": {...}, "froc": {...}}``, or a mapping
            ``dataset name -> such a result`` (one row per dataset). Missing values print "-".

    Returns:
        the table as a string (also logged at INFO level); nothing is printed to stdout.
    """
    if "bbox" in results or "froc" in results:
        rows = [("", results)]
    else:
        rows = [(str(k), v) for k, v in results.items() if isinstance(v, Mapping)]
    header = ["dataset"] + [c for c, _ in _TABLE_COLUMNS]
    body = []
    for name, res in rows:
        line = [name or "-"]
        for col, group in _TABLE_COLUMNS:
            line.append(_fmt((res.get(group) or {}).get(col), col))
        body.append(line)
    if rows and all(name == "" for name, _ in rows):
        header, body = header[1:], [r[1:] for r in body]
    widths = [max(len(header[i]), *(len(r[i]) for r in body)) if body else len(header[i]) for i in range(len(header))]
    fmt_row = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    table = "\n".join([fmt_row(header), sep] + [fmt_row(r) for r in body])
    logger.info("Evaluation results:\n%s", table)
    return table
