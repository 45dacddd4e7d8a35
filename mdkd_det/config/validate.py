"""Domain check of every numeric config value, before anything is built (issue 13).

A value outside its domain used to hang (``SOLVER.IMS_PER_BATCH 0`` looped forever in
``GroupedBatchSampler``) or fail deep inside a training step (``NUM_CLASSES 0``: ``IndexError``).
:func:`validate_config` checks the whole config once, in the launcher process (before workers are
spawned), and raises a one-line :class:`~mdkd_det.utils.errors.ConfigError` naming the key, its
value and the domain, e.g. ``SOLVER.IMS_PER_BATCH = 0: must be an integer >= 1``.

The rules are one table, :data:`DOMAINS` (key -> domain); keys absent from a config (configs of
other families, e.g. detectron2's) are skipped. ``MODEL.DEVICE`` is checked against the machine:
``cuda`` without CUDA is refused.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, Tuple

from ..utils.errors import ConfigError

__all__ = ["DOMAINS", "validate_config", "check_device"]


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def int_ge(lo: int) -> Tuple[Callable[[Any], bool], str]:
    """Domain: an integer >= ``lo``."""
    return (lambda v: _is_int(v) and v >= lo), f"an integer >= {lo}"


def int_in(lo: int, hi: int) -> Tuple[Callable[[Any], bool], str]:
    """Domain: an integer in ``[lo, hi]``."""
    return (lambda v: _is_int(v) and lo <= v <= hi), f"an integer in [{lo}, {hi}]"


def num_gt(lo: float) -> Tuple[Callable[[Any], bool], str]:
    """Domain: a finite number > ``lo``."""
    return (lambda v: _is_num(v) and v > lo), f"a finite number > {lo:g}"


def num_ge(lo: float) -> Tuple[Callable[[Any], bool], str]:
    """Domain: a finite number >= ``lo``."""
    return (lambda v: _is_num(v) and v >= lo), f"a finite number >= {lo:g}"


def num_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    """Domain: a finite number in the interval ``lo..hi`` (open or closed ends)."""
    def ok(v):
        return (_is_num(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))
    return ok, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def each(dom, min_len: int = 0, sorted_=False):
    """Domain: a list/tuple of at least ``min_len`` values, each in ``dom`` (optionally sorted)."""
    pred, text = dom

    def ok(v):
        if not isinstance(v, (list, tuple)) or len(v) < min_len or not all(pred(x) for x in v):
            return False
        return not sorted_ or all(a <= b for a, b in zip(v, v[1:]))
    more = f"at least {min_len} " if min_len else ""
    return ok, f"a list of {more}values, each {text}" + (", in increasing order" if sorted_ else "")


_PROB = num_in(0.0, 1.0)
_FRACTION = num_in(0.0, 1.0, lo_open=True)
_DROPOUT = num_in(0.0, 1.0, hi_open=True)

#: key -> (predicate, domain text). Units as in ``defaults.py``.
DOMAINS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    # model
    "MODEL.PIXEL_STD": each(num_gt(0.0), 1),
    "MODEL.BACKBONE.TRAINABLE_LAYERS": int_in(0, 5),
    "MODEL.CLASSIFIER.NUM_CLASSES": int_ge(1),
    "MODEL.CLASSIFIER.DROPOUT": _DROPOUT,
    "MODEL.CLASSIFIER.ATTN_DROPOUT": _DROPOUT,
    "MODEL.CLASSIFIER.CLASS_WEIGHT_EPS": num_gt(0.0),
    "MODEL.CLASSIFIER.INPUT_SIZE": int_ge(0),
    "MODEL.FPN.OUT_CHANNELS": int_ge(1),
    "MODEL.SEG.DICE_SMOOTH": num_ge(0.0),
    "MODEL.SEG.THRESHOLD": _PROB,
    "MODEL.SEG.BASE_CHANNELS": int_ge(1),
    "MODEL.SEG.DEPTH": int_ge(1),
    "MODEL.SEG.TRANSFORMER_DIM": int_ge(1),
    "MODEL.SEG.TRANSFORMER_LAYERS": int_ge(1),
    "MODEL.SEG.TRANSFORMER_HEADS": int_ge(1),
    "MODEL.SEG.DILATIONS": each(int_ge(1), 1),
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": int_ge(1),
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": int_ge(1),
    "MODEL.RPN.PRE_NMS_TOPK_TEST": int_ge(1),
    "MODEL.RPN.POST_NMS_TOPK_TEST": int_ge(1),
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE": int_ge(1),
    "MODEL.RPN.POSITIVE_FRACTION": _FRACTION,
    "MODEL.RPN.NMS_THRESH": _FRACTION,
    "MODEL.ROI_HEADS.NUM_CLASSES": int_ge(1),
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": int_ge(1),
    "MODEL.ROI_HEADS.POSITIVE_FRACTION": _FRACTION,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": _PROB,
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": _FRACTION,
    "MODEL.ROI_HEADS.DETECTIONS_PER_IMG": int_ge(1),
    "MODEL.ROI_HEADS.MLP_HEAD_DIM": int_ge(1),
    "MODEL.RFDETR.RESOLUTION": int_ge(0),
    "MODEL.RFDETR.NUM_QUERIES": int_ge(1),
    "MODEL.RFDETR.GROUP_DETR": int_ge(1),
    "MODEL.RFDETR.HIDDEN_DIM": int_ge(0),
    "MODEL.RFDETR.DEC_LAYERS": int_ge(0),
    # input (px, HU)
    "INPUT.MIN_SIZE_TRAIN": int_ge(1),
    "INPUT.MAX_SIZE_TRAIN": int_ge(1),
    "INPUT.MIN_SIZE_TEST": int_ge(1),
    "INPUT.MAX_SIZE_TEST": int_ge(1),
    "INPUT.CHANNELS": int_ge(1),
    "INPUT.AUG.HFLIP_PROB": _PROB,
    "INPUT.AUG.VFLIP_PROB": _PROB,
    "INPUT.AUG.AFFINE_PROB": _PROB,
    "INPUT.AUG.AFFINE_SCALE": each(num_gt(0.0), 2, sorted_=True),
    "INPUT.AUG.AFFINE_TRANSLATE": num_in(0.0, 1.0),
    "INPUT.AUG.AFFINE_ROTATE": num_in(0.0, 180.0),
    "INPUT.AUG.BRIGHTNESS_CONTRAST_PROB": _PROB,
    "INPUT.AUG.BRIGHTNESS_LIMIT": num_in(0.0, 1.0),
    "INPUT.AUG.CONTRAST_LIMIT": num_in(0.0, 1.0),
    "INPUT.AUG.MIN_BOX_SIZE": num_ge(0.0),
    # datasets
    "DATASETS.SPLIT_SEED": int_ge(0),
    "DATASETS.SPLIT_FRACTIONS": each(num_ge(0.0), 3),
    "DATASETS.LABEL_FRACTION": num_in(0.0, 1.0, lo_open=True),
    "DATASETS.LESION_PATCH.SIZE": int_ge(1),
    "DATASETS.LESION_PATCH.NEG_PER_IMAGE": int_ge(0),
    "DATASETS.LESION_PATCH.CONTEXT": num_gt(0.0),
    "DATASETS.LESION_PATCH.MIN_SIDE": int_ge(1),
    "DATASETS.LESION_PATCH.SEED": int_ge(0),
    "DATASETS.LESION_PATCH.MAX_SLICES": int_ge(0),
    "DATASETS.LESION_PATCH.FRACTIONS": each(num_ge(0.0), 3),
    "DATASETS.TRAIN_LIMIT": int_ge(0),
    "DATASETS.TEST_LIMIT": int_ge(0),
    "DATALOADER.NUM_WORKERS": int_ge(0),
    "FROZEN_TEACHER.CACHE_MAX_GB": num_gt(0.0),
    # solver (iter, LR)
    "SOLVER.BASE_LR": num_gt(0.0),
    "SOLVER.MOMENTUM": num_in(0.0, 1.0, hi_open=True),
    "SOLVER.WEIGHT_DECAY": num_ge(0.0),
    "SOLVER.IMS_PER_BATCH": int_ge(1),
    "SOLVER.MAX_ITER": int_ge(0),
    "SOLVER.STEPS": each(int_ge(0), sorted_=True),
    "SOLVER.GAMMA": num_gt(0.0),
    "SOLVER.WARMUP_ITERS": int_ge(0),
    "SOLVER.WARMUP_FACTOR": num_in(0.0, 1.0, lo_open=True),
    "SOLVER.CHECKPOINT_PERIOD": int_ge(0),
    "SOLVER.CLIP_GRADIENTS.MAX_NORM": num_gt(0.0),
    # test
    "TEST.EVAL_PERIOD": int_ge(0),
    "TEST.FROC_FPS": each(num_gt(0.0), 1, sorted_=True),
    "TEST.FROC_IOU": _FRACTION,
    "TEST.VIS_NUM": int_ge(0),
    "TEST.VIS_SCORE_THRESH": _PROB,
    # misc
    "SEED": int_ge(0),
    "LOG_PERIOD": int_ge(1),
    "ADVERSARIAL.GAMMA": num_ge(0.0),
    "ADVERSARIAL.R": int_ge(1),
    "ADVERSARIAL.SOURCE_IMS_PER_BATCH": int_ge(1),
    "ADVERSARIAL.TARGET_IMS_PER_BATCH": int_ge(1),
    "FUSION.OUT_CHANNELS": int_ge(0),  # 0 = teacher 0's channels per level
    "FUSION.FA_BLOCKS": int_ge(0),
    "FUSION.ATTN_DROPOUT": _DROPOUT,
    "FUSION.DROPOUT": _DROPOUT,
    # KD weights (A13) and schedules (epochs)
    "KD.W_TASK": num_ge(0.0),
    "KD.W_CON": num_ge(0.0),
    "KD.W_FALGN": num_ge(0.0),
    "KD.W_COS": num_ge(0.0),
    "KD.W_ATT": num_ge(0.0),
    "KD.W_CLSKD": num_ge(0.0),
    "KD.W_ROIKD": num_ge(0.0),
    "KD.W_KLD": num_ge(0.0),
    "KD.W_KMM": num_ge(0.0),
    "KD.W_DCGD": num_ge(0.0),
    "KD.W_MSAN": num_ge(0.0),
    "KD.W_HINT": num_ge(0.0),
    "KD.W_CTX": num_ge(0.0),
    "KD.W_LM": num_ge(0.0),
    "KD.W_AAM": num_ge(0.0),
    "KD.LATE_LEVELS": int_ge(0),
    "KD.DCGD.VIEWS": int_ge(1),
    "KD.DCGD.STRENGTH": num_ge(0.0),
    "KD.DCGD.INTER_WEIGHT": num_ge(0.0),
    "KD.MSAN.LAMBDA": num_ge(0.0),
    "KD.CTX.POSITIONS": int_ge(0),
    "KD.CTX.BANDWIDTH": num_gt(0.0),
    "KD.AAM.MARGIN": num_ge(0.0),
    "KD.TEMPERATURE": num_gt(0.0),
    "KD.UNLABELED.WEIGHT": num_ge(0.0),
    "KD.ONLINE_TEACHER.WEIGHT": num_gt(0.0),
    "KD.UNLABELED.IMS_PER_BATCH": int_ge(0),
    "KD.QUERY_TOPK": int_ge(0),
    "KD.CF.WARMUP": num_ge(0.0),
    "KD.CF.RAMP": num_ge(0.0),
    "KD.CF.MAX": num_ge(0.0),
    "KD.T_ANNEAL.FLOOR": num_gt(0.0),
    "KD.T_ANNEAL.DECAY": num_in(0.0, 1.0, lo_open=True),
    "KD.T_ANNEAL.EVERY": num_gt(0.0),
    "KD.BETA_RAMP.START": num_ge(0.0),
    "KD.BETA_RAMP.END": num_ge(0.0),
    "KD.BETA_RAMP.WARMUP": num_ge(0.0),
    "KD.BETA_RAMP.RAMP": num_ge(0.0),
    "KD.CLS.K": int_ge(1),
    "KD.EPOCH_ITERS": int_ge(0),
    # pipeline (0 = take SOLVER.MAX_ITER / SOLVER.BASE_LR)
    "PIPELINE.ITERS.MULTI_HEAD": int_ge(0),
    "PIPELINE.ITERS.DATASET_SPECIFIC": int_ge(0),
    "PIPELINE.ITERS.TARGET_TEACHER": int_ge(0),
    "PIPELINE.ITERS.SOURCE_TEACHER": int_ge(0),
    "PIPELINE.ITERS.JOINT_TEACHER": int_ge(0),
    "PIPELINE.ITERS.STUDENT": int_ge(0),
    "PIPELINE.ITERS.BACKBONE_INIT": int_ge(0),
    "PIPELINE.JOINT_TEACHER_BASE_LR": num_ge(0.0),
    "PIPELINE.VAL_PERIOD": int_ge(0),
}


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def check_device(device: str) -> None:
    """``MODEL.DEVICE`` must name a device this machine has (``cpu``, ``cuda[:i]`` with CUDA,
    ``mps`` on Apple silicon).

    Raises:
        ConfigError: unparsable device, CUDA/MPS not available, or a CUDA index beyond the
            visible devices.
    """
    import torch

    try:
        dev = torch.device(str(device))
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"MODEL.DEVICE = {device!r}: not a torch device (use cpu or cuda[:index])") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"MODEL.DEVICE = {device!r}: CUDA is not available on this machine; "
                              "use MODEL.DEVICE cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"MODEL.DEVICE = {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"MODEL.DEVICE = {device!r}: MPS is not available on this machine; use MODEL.DEVICE cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"MODEL.DEVICE = {device!r}: unsupported device type (use cpu or cuda[:index])")


def validate_config(cfg) -> None:
    """Check every key of :data:`DOMAINS` present in ``cfg``, ``INPUT.WINDOW`` (HU level, width
    > 0), the train/test size pairs (min <= max) and ``MODEL.DEVICE`` (:func:`check_device`).

    Raises:
        ConfigError: the first bad value, as ``KEY = value: must be <domain>``.
    """
    for key, (ok, text) in DOMAINS.items():
        v = _get(cfg, key)
        if v is _MISSING:
            continue
        if not ok(v):
            raise ConfigError(f"{key} = {v!r}: must be {text}")
    win = _get(cfg, "INPUT.WINDOW")
    if win is not _MISSING and not (isinstance(win, (list, tuple)) and len(win) == 2
                                    and all(_is_num(x) for x in win) and win[1] > 0):
        raise ConfigError(f"INPUT.WINDOW = {win!r}: must be [level, width] in HU with width > 0")
    for split in ("TRAIN", "TEST"):
        lo, hi = _get(cfg, f"INPUT.MIN_SIZE_{split}"), _get(cfg, f"INPUT.MAX_SIZE_{split}")
        if lo is not _MISSING and hi is not _MISSING and lo > hi:
            raise ConfigError(f"INPUT.MIN_SIZE_{split} = {lo} exceeds INPUT.MAX_SIZE_{split} = {hi}")
    dev = _get(cfg, "MODEL.DEVICE")
    if dev is not _MISSING:
        check_device(dev)
