"""``KDTrainer``: Stage 3 (student distilled from the frozen joint teacher) from config.

Config: ``KD.TEACHER_CONFIG`` (the joint teacher's YAML) and ``KD.TEACHER_WEIGHTS`` (its
checkpoint), ``KD.W_*`` weights, ``KD.CF.*`` curriculum, ``KD.TEMPERATURE[_SCHEDULE]``,
``KD.BETA_SCHEDULE`` (paper Eq. 24, §6.3; classification Eq. 16 adds ``KD.W_KLD`` and the
``KD.CLS`` layer selection). The student is ``MODEL.*``. After training, the
student alone is exported to ``OUTPUT_DIR/model_student.pth`` (``{"model": state_dict}``: no
teacher, hook or connector keys), loadable by the dataset-specific baseline config.
``KD.UNLABELED.ENABLED`` adds the semi-supervised KD terms on ``DATASETS.TRAIN_UNLABELED``
(paper 003; :mod:`mdkd_det.distill.unlabeled`).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable, Optional

import torch
from torch import nn

from ..config import CfgNode, get_cfg
from ..engine.checkpointer import Checkpointer, export_model
from ..utils import comm
from ..engine.defaults import DefaultTrainer, build_model, seed_all_rng
from ..engine.trainer import SimpleTrainer
from ..modeling.frozen_teacher import TeacherRuntime, freeze_teacher
from ..solver import build_optimizer
from ..utils.errors import ConfigError
from .adapters import build_kd_adapter
from .distiller import Distiller
from .kd_terms import term_weights
from .mixin import KDTrainerMixin
from .online_teacher import check_online_teacher_config, online_teacher_enabled
from .schedules import build_schedule
from .unlabeled import build_unlabeled_loader, check_unlabeled_config, load_unlabeled_records, unlabeled_loss_keys

logger = logging.getLogger(__name__)

#: adapter name per ``MODEL.META_ARCHITECTURE``.
ADAPTER_FOR_ARCH = {"faster_rcnn": "torchvision_faster_rcnn", "image_classifier": "image_classifier",
                    "rfdetr": "rfdetr", "unet": "encoder_features", "tresunet": "encoder_features"}


class KDSimpleTrainer(KDTrainerMixin, SimpleTrainer):
    """``SimpleTrainer`` with the KD mixin."""


def load_teacher_cfg(cfg: CfgNode, base: Optional[CfgNode] = None,
                     merge: Optional[Callable[[CfgNode, str], object]] = None) -> CfgNode:
    """The teacher's config: ``base`` <- ``KD.TEACHER_CONFIG``; weights = ``KD.TEACHER_WEIGHTS``,
    device and ``FROZEN_TEACHER`` (when ``cfg`` has it) = the student's. THE one place the KD
    teacher's config is made and its pixel normalisation checked (this trainer and the
    detectron2 one, :func:`mdkd_det.d2.trainer.build_d2_teacher`).

    Args:
        cfg: the student's config with ``KD.TEACHER_CONFIG`` / ``KD.TEACHER_WEIGHTS``.
        base: the empty teacher config to merge into (default: :func:`mdkd_det.config.get_cfg`;
            detectron2: its ``get_cfg()`` with ``add_mdkd_config``).
        merge: ``merge(base, path)`` (default ``base.merge_from_file(path)``; detectron2:
            ``merge_d2_file``).

    Raises:
        ConfigError: missing ``KD.TEACHER_CONFIG`` / ``KD.TEACHER_WEIGHTS`` (the weights may be
            empty for an online teacher, which then starts from scratch), or teacher and student
            normalise pixels differently (the teacher reads the student's transformed batch).
    """
    kd = cfg.KD
    if not kd.TEACHER_CONFIG or not (kd.TEACHER_WEIGHTS or online_teacher_enabled(cfg)):
        raise ConfigError("KD.ENABLED needs KD.TEACHER_CONFIG and KD.TEACHER_WEIGHTS")
    tcfg = get_cfg() if base is None else base
    if merge is None:
        tcfg.merge_from_file(kd.TEACHER_CONFIG)
    else:
        merge(tcfg, kd.TEACHER_CONFIG)
    tcfg.MODEL.WEIGHTS = kd.TEACHER_WEIGHTS
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    if "FROZEN_TEACHER" in cfg:
        tcfg.FROZEN_TEACHER = cfg.FROZEN_TEACHER.clone()  # the student run decides how teachers run
    if list(tcfg.MODEL.PIXEL_MEAN) != list(cfg.MODEL.PIXEL_MEAN) or list(tcfg.MODEL.PIXEL_STD) != list(cfg.MODEL.PIXEL_STD):
        raise ConfigError(
            f"{kd.TEACHER_CONFIG}: MODEL.PIXEL_MEAN/STD differ from the student's; the teacher "
            "reads the student's normalised batch (give per-teacher normalisation in FUSION.*)"
        )
    return tcfg


def _load_teacher_weights(teacher: nn.Module, tcfg: CfgNode, trust: bool) -> None:
    """:class:`Checkpointer` load of ``tcfg.MODEL.WEIGHTS`` (the default ``load`` of
    :func:`build_teacher`)."""
    Checkpointer(teacher, tcfg.OUTPUT_DIR, trust_checkpoints=trust).load(tcfg.MODEL.WEIGHTS)


def build_teacher(cfg: CfgNode, teacher_cfg: Optional[CfgNode] = None,
                  build: Optional[Callable[[CfgNode], nn.Module]] = None,
                  load: Optional[Callable[[nn.Module, CfgNode, bool], object]] = None,
                  frozen: bool = True) -> nn.Module:
    """Build, load and freeze the teacher named by ``KD.TEACHER_*``: THE one teacher builder
    (every family here; detectron2 passes its own config, builder and loader).

    Args:
        cfg: the student's config.
        teacher_cfg: the teacher's config (default: :func:`load_teacher_cfg` of ``cfg``).
        build: ``build(teacher_cfg) -> model`` (default: :func:`~mdkd_det.engine.defaults.build_model`).
        load: ``load(model, teacher_cfg, trust)`` loading ``teacher_cfg.MODEL.WEIGHTS`` (default:
            :class:`~mdkd_det.engine.checkpointer.Checkpointer`); ``trust`` =
            ``cfg.MODEL.TRUST_CHECKPOINTS``.
        frozen: False for an online teacher (``KD.ONLINE_TEACHER``,
            :mod:`mdkd_det.distill.online_teacher`): returned in ``train()`` with gradients on,
            and loaded only when ``MODEL.WEIGHTS`` is set (else it starts from scratch).

    Returns:
        The teacher, frozen by :func:`~mdkd_det.modeling.frozen_teacher.freeze_teacher`
        (unless ``frozen`` is False).

    Raises:
        ConfigError: from :func:`load_teacher_cfg`.
        CheckpointError: the checkpoint does not match the teacher architecture (names the file
            and the mismatched keys).
    """
    tcfg = load_teacher_cfg(cfg) if teacher_cfg is None else teacher_cfg
    teacher = (build or build_model)(tcfg)
    if frozen or tcfg.MODEL.WEIGHTS:
        (load or _load_teacher_weights)(teacher, tcfg, bool(cfg.MODEL.TRUST_CHECKPOINTS))
    return freeze_teacher(teacher) if frozen else teacher.train()


def _embedding_dim(model: nn.Module) -> Optional[int]:
    """Region-embedding size for ROIKD: ``model.kd_embedding_dim`` when the model declares it
    (RF-DETR query embeddings), else the last Linear of torchvision's ``roi_heads.box_head``."""
    if getattr(model, "kd_embedding_dim", None):
        return int(model.kd_embedding_dim)
    head = getattr(getattr(model, "roi_heads", None), "box_head", None)
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1] if head is not None else None
    return last.out_features if last is not None else None


def distiller_options(kd) -> dict:
    """Keyword arguments of :class:`Distiller` read from a ``KD`` config node: the terms
    (``KD.TERMS``) and their weights (each registered term's ``KD.W_*`` key,
    :func:`~mdkd_det.distill.kd_terms.term_weights`), cf, temperature (+ schedule), beta schedule
    and loss options (paper Eq. 24, §6.3; related terms: ``KD.DCGD/MSAN/CTX/AAM.*``).

    Shared by this trainer and the detectron2 one (:mod:`mdkd_det.d2.trainer`), whose ``KD``
    node has the same keys (:func:`mdkd_det.d2.config.add_mdkd_config`).

    Raises:
        ConfigError: unknown ``KD.TEMPERATURE_SCHEDULE`` / ``KD.BETA_SCHEDULE``.
        RegistryError: (at Distiller build) an unknown name in ``KD.TERMS``.
    """
    cf = build_schedule(kd.CF.SCHEDULE, **(
        {"value": kd.CF.MAX} if kd.CF.SCHEDULE == "constant"
        else {"warmup": kd.CF.WARMUP, "ramp": kd.CF.RAMP, "max_value": kd.CF.MAX}))
    t_sched = None
    if kd.TEMPERATURE_SCHEDULE == "temperature":
        t_sched = build_schedule("temperature", t1=kd.TEMPERATURE, floor=kd.T_ANNEAL.FLOOR,
                                 decay=kd.T_ANNEAL.DECAY, every=kd.T_ANNEAL.EVERY)
    elif kd.TEMPERATURE_SCHEDULE != "constant":
        raise ConfigError(f"KD.TEMPERATURE_SCHEDULE must be 'constant' or 'temperature', got '{kd.TEMPERATURE_SCHEDULE}'")
    b_sched = None
    if kd.BETA_SCHEDULE == "beta":
        b_sched = build_schedule("beta", start=kd.BETA_RAMP.START, end=kd.BETA_RAMP.END,
                                 warmup=kd.BETA_RAMP.WARMUP, ramp=kd.BETA_RAMP.RAMP)
    elif kd.BETA_SCHEDULE != "constant":
        raise ConfigError(f"KD.BETA_SCHEDULE must be 'constant' or 'beta', got '{kd.BETA_SCHEDULE}'")
    return dict(
        weights=term_weights(kd),
        terms=list(kd.TERMS),
        kd_options={"dcgd_views": kd.DCGD.VIEWS, "dcgd_strength": kd.DCGD.STRENGTH,
                    "dcgd_inter_weight": kd.DCGD.INTER_WEIGHT, "msan_lambda": kd.MSAN.LAMBDA,
                    "late_levels": kd.LATE_LEVELS, "ctx_positions": kd.CTX.POSITIONS,
                    "ctx_bandwidth": kd.CTX.BANDWIDTH, "aam_margin": kd.AAM.MARGIN,
                    "cfg": kd},  # the whole node, for plugin terms' own keys (KDContext.cfg)
        cf=cf,
        temperature=kd.TEMPERATURE,
        temperature_schedule=t_sched,
        beta_schedule=b_sched,
        kl_direction=kd.KL_DIRECTION,
        cls_kind=None if kd.CLSKD_KIND == "auto" else kd.CLSKD_KIND,
        reduction=kd.REDUCTION,
        con_mask_diag=kd.CON_MASK_DIAG,
    )


def build_distiller(cfg: CfgNode, student: nn.Module, teacher: nn.Module) -> Distiller:
    """Distiller for ``student``/``teacher`` from ``cfg.KD`` (weights, schedules, options)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    s_unwrapped = student.module if hasattr(student, "module") else student
    adapter_name = ADAPTER_FOR_ARCH.get(arch)
    if adapter_name is None:
        raise ConfigError(f"MODEL.META_ARCHITECTURE '{arch}' has no KD adapter; known: {sorted(ADAPTER_FOR_ARCH)}")
    adapter = build_kd_adapter(adapter_name, cfg)
    if hasattr(adapter, "kd_shapes"):  # the adapter selects and pairs the distilled levels
        s_shapes, t_shapes, pairs = adapter.kd_shapes(s_unwrapped, teacher)
    else:
        s_shapes, t_shapes, pairs = s_unwrapped.backbone.output_shape(), teacher.backbone.output_shape(), None
    distiller = Distiller(
        teacher=teacher,
        adapter=adapter,
        student_shapes=s_shapes,
        teacher_shapes=t_shapes,
        level_pairs=pairs,
        student_emb_dim=_embedding_dim(s_unwrapped),
        teacher_emb_dim=_embedding_dim(teacher),
        runtime=TeacherRuntime.from_config(cfg),
        online_teacher=online_teacher_enabled(cfg),
        **distiller_options(cfg.KD),
    )
    distiller.attach_student(s_unwrapped)
    return distiller.to(torch.device(cfg.MODEL.DEVICE))


class KDTrainer(DefaultTrainer):
    """Stage-3 trainer: student + frozen teacher + KD mixin, from ``cfg`` (paper Alg. 1, l. 38-50).

    Args:
        cfg: student config with ``KD.*``.
        model: prebuilt student (default: ``build_model(cfg)``).
        teacher: prebuilt frozen teacher (default: :func:`build_teacher`).

    Raises:
        ConfigError: bad ``KD.UNLABELED`` setting (:func:`load_unlabeled_records`), or
            ``KD.UNLABELED.ENABLED`` for a family whose adapter has no forward without targets.
    """

    trainer_class = KDSimpleTrainer

    def __init__(self, cfg: CfgNode, model: Optional[nn.Module] = None,
                 teacher: Optional[nn.Module] = None) -> None:
        check_unlabeled_config(cfg)  # before anything is built
        check_online_teacher_config(cfg)
        seed_all_rng(int(cfg.SEED) + comm.get_rank())
        student = model if model is not None else build_model(cfg)
        self.online_teacher = online_teacher_enabled(cfg)
        # an online teacher (paper 004) trains alongside: distill/online_teacher.py
        self.teacher = teacher if teacher is not None else build_teacher(cfg, frozen=not self.online_teacher)
        self.distiller = build_distiller(cfg, student, self.teacher)
        self.unlabeled_records = None
        if cfg.KD.UNLABELED.ENABLED:
            if not hasattr(self.distiller.adapter, "student_forward_unlabeled"):
                raise ConfigError(f"KD.UNLABELED.ENABLED: MODEL.META_ARCHITECTURE "
                                  f"'{cfg.MODEL.META_ARCHITECTURE}' has no student forward without "
                                  "targets (supported: faster_rcnn, rfdetr)")
            self.unlabeled_records = load_unlabeled_records(cfg)
        super().__init__(cfg, model=student)

    def build_optimizer(self, cfg: CfgNode, model: nn.Module):
        """Student parameters plus the student-side connectors (A3); plus the teacher's when it
        trains online (``KD.ONLINE_TEACHER``)."""
        params = list(model.parameters()) + list(self.distiller.parameters())
        if self.online_teacher:
            params += list(self.teacher.parameters())
        return build_optimizer(cfg, params)

    def checkpointables(self) -> dict:
        """Optimizer, scheduler and the distiller's connectors; the teacher only when it trains
        online (a frozen one is not saved)."""
        extra = {"teacher": self.teacher} if self.online_teacher else {}
        return {**super().checkpointables(), "distiller": self.distiller, **extra}

    def build_trainer(self, model, data_loader) -> SimpleTrainer:
        """``KDSimpleTrainer`` with the distiller, schedule epoch length and alpha attached."""
        trainer = super().build_trainer(model, data_loader)
        n = len(data_loader.dataset)
        trainer.distiller = self.distiller
        trainer.epoch_iters = int(self.cfg.KD.EPOCH_ITERS) or max(
            1, math.ceil(n / int(self.cfg.SOLVER.IMS_PER_BATCH)))
        trainer.task_weight = float(self.cfg.KD.W_TASK)
        if self.online_teacher:
            trainer.online_teacher_weight = float(self.cfg.KD.ONLINE_TEACHER.WEIGHT)
        if self.unlabeled_records is not None:  # positioned at start_iter: resume-exact
            u = self.cfg.KD.UNLABELED
            trainer.unlabeled_loader = build_unlabeled_loader(self.cfg, self.unlabeled_records, self.start_iter)
            trainer.unlabeled_weight = float(u.WEIGHT)
            trainer.unlabeled_terms = unlabeled_loss_keys(u.TERMS)
        return trainer

    def train(self):
        """Train, then export the student alone to ``OUTPUT_DIR/model_student.pth`` (and an online
        teacher to ``OUTPUT_DIR/model_teacher.pth``)."""
        results = super().train()
        export_model(self.model, os.path.join(self.cfg.OUTPUT_DIR, "model_student.pth"))
        if self.online_teacher:
            export_model(self.teacher, os.path.join(self.cfg.OUTPUT_DIR, "model_teacher.pth"))
        return results
