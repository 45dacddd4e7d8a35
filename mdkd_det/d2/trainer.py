"""``MDKDTrainer``: detectron2's ``DefaultTrainer`` for our data, with optional Stage-3 KD.

- Data: :func:`~mdkd_det.d2.data.register_mdkd_datasets` + :class:`MDKDDatasetMapper`;
  evaluation with detectron2's ``COCOEvaluator`` (``OUTPUT_DIR/inference/<dataset>/``).
- ``KD.ENABLED``: the frozen joint teacher (a detectron2 model from ``KD.TEACHER_CONFIG`` +
  ``KD.TEACHER_WEIGHTS``) and a :class:`~mdkd_det.distill.distiller.Distiller` (the same class,
  pure losses, schedules and ``KD.*`` keys as the torchvision path) are built before the
  optimizer, which then also holds the student-side connectors (A3); detectron2's
  ``SimpleTrainer``/``AMPTrainer`` is replaced by its KD subclass
  (:mod:`mdkd_det.d2.train_loop`). The checkpoint's ``"model"`` holds the student only (a plain
  detectron2 Faster R-CNN); the connectors are saved under ``"distiller"``.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from detectron2.config import get_cfg
from detectron2.data import (build_detection_test_loader, build_detection_train_loader,
                             get_detection_dataset_dicts)
from detectron2.engine import AMPTrainer, DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from torch import nn

from ..distill.distiller import Distiller
from ..distill.trainer import build_teacher, distiller_options, load_teacher_cfg
from ..solver import build_optimizer as build_mdkd_optimizer
from ..utils.checkpoint_io import load_model_state
from ..utils.errors import ConfigError
from .adapter import D2GeneralizedRCNNAdapter
from .config import add_mdkd_config, merge_d2_file
from .data import MDKDDatasetMapper, register_mdkd_datasets
from .train_loop import D2KDAMPTrainer, D2KDSimpleTrainer

logger = logging.getLogger(__name__)


def _load_d2_teacher_weights(teacher: nn.Module, tcfg, trust: bool) -> None:
    """Load ``tcfg.MODEL.WEIGHTS`` (``{"model": state_dict}``, what ``DetectionCheckpointer``
    writes) into a detectron2 teacher, strictly.

    Raises:
        ConfigError: the file is missing, or its keys do not match the teacher.
        CheckpointError: unreadable checkpoint (names the file).
    """
    path = tcfg.MODEL.WEIGHTS
    if not os.path.isfile(path):
        raise ConfigError(f"KD.TEACHER_WEIGHTS '{path}' does not exist")
    result = teacher.load_state_dict(load_model_state(path, trust, "KD.TEACHER_WEIGHTS"), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(f"KD.TEACHER_WEIGHTS '{path}' does not match its config: "
                          f"missing {result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}")


def build_d2_teacher(cfg) -> nn.Module:
    """The frozen joint teacher: :func:`~mdkd_det.distill.trainer.build_teacher` (the one
    teacher builder and PIXEL_MEAN check) with detectron2's config (``KD.TEACHER_CONFIG`` merged
    into ``get_cfg()`` + :func:`add_mdkd_config`), ``build_model`` and a strict load of
    ``KD.TEACHER_WEIGHTS``.

    Raises:
        ConfigError: missing ``KD.TEACHER_CONFIG``/``KD.TEACHER_WEIGHTS`` or weights file; the
            teacher normalises pixels differently from the student (it reads the student's
            batch); the weights do not match the teacher.
        CheckpointError: unreadable checkpoint (names the file).
    """
    tcfg = load_teacher_cfg(cfg, base=add_mdkd_config(get_cfg()), merge=merge_d2_file)
    return build_teacher(cfg, tcfg, build=build_model, load=_load_d2_teacher_weights)


def build_d2_distiller(cfg, student: nn.Module, teacher: nn.Module) -> Distiller:
    """:class:`Distiller` for detectron2 ``GeneralizedRCNN`` student/teacher from ``cfg.KD``
    (:func:`~mdkd_det.distill.trainer.distiller_options`); levels paired by stride (A25),
    RoI embedding sizes from ``roi_heads.box_head.output_shape``."""
    student = student.module if hasattr(student, "module") else student

    def emb_dim(m):
        return int(m.roi_heads.box_head.output_shape.channels)

    distiller = Distiller(
        teacher=teacher,
        adapter=D2GeneralizedRCNNAdapter(),
        student_shapes=student.backbone.output_shape(),
        teacher_shapes=teacher.backbone.output_shape(),
        student_emb_dim=emb_dim(student),
        teacher_emb_dim=emb_dim(teacher),
        **distiller_options(cfg.KD),
    )
    distiller.attach_student(student)
    return distiller.to(torch.device(cfg.MODEL.DEVICE))


def build_d2_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """:func:`mdkd_det.solver.build_optimizer` (``SOLVER.OPTIMIZER``: SGD with
    ``SOLVER.MOMENTUM``/``NESTEROV`` as detectron2's, or AdamW, the paper's optimizer, A18) over
    detectron2's parameter groups (``get_default_optimizer_params``: ``SOLVER.WEIGHT_DECAY_NORM``,
    ``BIAS_LR_FACTOR``, ``WEIGHT_DECAY_BIAS``), with detectron2's gradient clipping
    (``SOLVER.CLIP_GRADIENTS``).

    Raises:
        ConfigError: unknown ``SOLVER.OPTIMIZER``.
    """
    params = get_default_optimizer_params(
        model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR, weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS)
    return maybe_add_gradient_clipping(cfg, build_mdkd_optimizer(cfg, params))


class MDKDTrainer(DefaultTrainer):
    """detectron2 ``DefaultTrainer`` on our datasets, with KD when ``cfg.KD.ENABLED``.

    Args:
        cfg: detectron2 config with :func:`add_mdkd_config` keys.

    Raises:
        ConfigError: ``KD.UNLABELED.ENABLED`` (semi-supervised KD runs in our trainer only).
    """

    def __init__(self, cfg) -> None:
        unlabeled = cfg.KD.get("UNLABELED") if "KD" in cfg else None
        if unlabeled is not None and unlabeled.get("ENABLED", False):
            raise ConfigError("KD.UNLABELED.ENABLED: semi-supervised KD is implemented for the "
                              "mdkd_det trainer (tools/train_net.py), not the detectron2 one")
        register_mdkd_datasets(cfg)
        self.distiller = None
        super().__init__(cfg)
        if self.distiller is not None:
            plain = self._trainer
            kd_cls = D2KDAMPTrainer if isinstance(plain, AMPTrainer) else D2KDSimpleTrainer
            self._trainer = kd_cls(plain.model, plain.data_loader, plain.optimizer)
            self._trainer.distiller = self.distiller
            self._trainer.epoch_iters = int(cfg.KD.EPOCH_ITERS) or self.iters_per_epoch(cfg)
            self._trainer.task_weight = float(cfg.KD.W_TASK)
            self.checkpointer.add_checkpointable("distiller", self.distiller)

    @staticmethod
    def iters_per_epoch(cfg) -> int:
        """ceil(training images / ``SOLVER.IMS_PER_BATCH``), images counted as the loader
        sees them (``DATALOADER.FILTER_EMPTY_ANNOTATIONS``): a schedule "epoch" (A7)."""
        n = len(get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS))
        return max(1, math.ceil(n / int(cfg.SOLVER.IMS_PER_BATCH)))

    def build_optimizer(self, cfg, model: nn.Module):
        """With KD: build teacher + distiller first, then optimise student + connectors (A3)."""
        if not cfg.KD.ENABLED:
            return build_d2_optimizer(cfg, model)
        teacher = build_d2_teacher(cfg)
        self.distiller = build_d2_distiller(cfg, model, teacher)
        return build_d2_optimizer(cfg, nn.ModuleList([model, self.distiller]))

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=MDKDDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name: str):
        return build_detection_test_loader(cfg, dataset_name,
                                           mapper=MDKDDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder: str = None):
        """detectron2's ``COCOEvaluator`` writing to ``OUTPUT_DIR/inference/<dataset>``."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, tasks=("bbox",), output_dir=output_folder)
