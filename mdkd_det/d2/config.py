"""``add_mdkd_config``: our keys on a detectron2 ``CfgNode`` (as detectron2 projects do).

The ``FUSION`` and ``KD`` nodes are copied from :mod:`mdkd_det.config.defaults`, so they have
the same names, defaults and meaning as in the torchvision path (one documented list), plus
the detectron2-only keys below. Data keys come from ours too (``DATASETS.ROOT``,
``DATASETS.SPLIT_*``, ``INPUT.WINDOW``, ``INPUT.USE_DATASET_WINDOW``), read by
:mod:`mdkd_det.d2.data`.
"""

from __future__ import annotations

import yaml
from detectron2.config import CfgNode as CN

from ..config.defaults import _C as _MDKD_DEFAULTS


def _copy_node(node) -> CN:
    """Our fvcore node -> detectron2 ``CfgNode`` (plain YAML round trip, no shared objects)."""
    return CN(yaml.safe_load(node.dump()))


def add_mdkd_config(cfg: CN) -> CN:
    """Add the MDKD keys to detectron2 config ``cfg`` (in place; returns it). Idempotent.

    Added:
        ``FUSION.*`` and ``KD.*``: as :mod:`mdkd_det.config.defaults` (fusion op, teachers,
            KD weights beta..rho, curriculum ``KD.CF.*``, temperature, schedules).
        ``FUSION.TEACHER_FORMATS``: per teacher ``"mdkd"`` (our torchvision-style checkpoint,
            e.g. a Stage-1 ``model_final.pth``) or ``"d2"`` (a detectron2 checkpoint); one entry
            is broadcast. Default ``("mdkd",)``.
        ``FUSION.TEACHER_CONFIGS``: per teacher, the config file it was trained with: our YAML
            (or its ``OUTPUT_DIR/config.yaml``) for ``"mdkd"`` (``""`` = our defaults with
            ``FUSION.TEACHER_BACKBONES``), a detectron2 YAML for ``"d2"`` (required).
        ``DATASETS.ROOT`` (``""`` = ``$MDKD_DATASETS``), ``DATASETS.SPLIT_SEED``,
            ``DATASETS.SPLIT_FRACTIONS``, ``INPUT.WINDOW`` (HU level, width),
            ``INPUT.USE_DATASET_WINDOW``: our data keys (see mdkd_det/config/defaults.py).
        ``SOLVER.OPTIMIZER``: ``"SGD"`` (detectron2's) or ``"AdamW"`` (A18).
        ``MODEL.TRUST_CHECKPOINTS``: as ours (load teacher checkpoints with
            ``weights_only=False``; off).
    """
    if "FUSION" not in cfg:
        cfg.FUSION = _copy_node(_MDKD_DEFAULTS.FUSION)
        cfg.FUSION.TEACHER_FORMATS = ("mdkd",)
        cfg.FUSION.TEACHER_CONFIGS = ()
    if "KD" not in cfg:
        cfg.KD = _copy_node(_MDKD_DEFAULTS.KD)
    for key in ("ROOT", "SPLIT_SEED", "SPLIT_FRACTIONS"):
        if key not in cfg.DATASETS:
            cfg.DATASETS[key] = _MDKD_DEFAULTS.DATASETS[key]
    if "OPTIMIZER" not in cfg.SOLVER:
        cfg.SOLVER.OPTIMIZER = "SGD"  # or "AdamW" (mdkd_det.d2.trainer.build_d2_optimizer)
    if "TRUST_CHECKPOINTS" not in cfg.MODEL:
        cfg.MODEL.TRUST_CHECKPOINTS = _MDKD_DEFAULTS.MODEL.TRUST_CHECKPOINTS
    for key in ("WINDOW", "USE_DATASET_WINDOW"):
        if key not in cfg.INPUT:
            cfg.INPUT[key] = _MDKD_DEFAULTS.INPUT[key]
    return cfg


def merge_d2_file(cfg: CN, path: str) -> CN:
    """``cfg.merge_from_file(path)`` with YAML read safely (detectron2's default is
    ``allow_unsafe=True``, which falls back to ``yaml.unsafe_load`` on Python tags).

    Raises:
        ConfigError: the file (or a ``_BASE_``) is missing, is not YAML, or holds a Python tag
            (the message names the file and the tag).
    """
    from ..config.config import yaml_error

    try:
        cfg.merge_from_file(path, allow_unsafe=False)
    except yaml.YAMLError as e:
        raise yaml_error(path, e) from e
    return cfg
