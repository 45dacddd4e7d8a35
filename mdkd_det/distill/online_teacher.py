"""Paper 004 (CMEDL) concurrent teacher-student training: ``KD.ONLINE_TEACHER`` (issue 15).

CMEDL trains its teacher and student together, end to end (paper_notes Part 3 §3.4,
"Optimisation": the segmentors follow -grad(L_hint + L_seg)). Here that is a Stage-3 variant
for when Stage-2 compute is scarce: the KD teacher is built from ``KD.TEACHER_CONFIG`` (weights
``KD.TEACHER_WEIGHTS``, or from scratch when that is empty) by
:func:`~mdkd_det.distill.trainer.build_teacher` with ``frozen=False``. Every step:

1. the student's task loss and the KD terms, as always (:class:`~mdkd_det.distill.mixin.
   KDTrainerMixin`); the teacher's maps and region outputs come from its current weights in
   ``eval()`` without autograd (:meth:`~mdkd_det.distill.distiller.Distiller.teacher_inputs`);
2. the teacher's own task loss on the same labelled batch (train mode, with autograd), added as
   ``loss_teacher_<name>`` times ``KD.ONLINE_TEACHER.WEIGHT``;
3. one optimizer step over student, connectors and teacher; gradients are clipped for the
   student side and the teacher apart (``SOLVER.CLIP_GRADIENTS``), so neither's norm scales
   the other's.

Decision D15.10: the KD terms do not back-propagate into the teacher (CMEDL's hint loss does,
but there both networks are trained for the same task on different modalities; a detection
teacher pulled towards a weaker student is what the frozen-teacher design avoids). The teacher
is part of the checkpoints (``--resume`` is exact) and is exported as
``OUTPUT_DIR/model_teacher.pth``.
"""

from __future__ import annotations

from ..config import CfgNode
from ..utils.errors import ConfigError

#: META_ARCHITECTUREs whose model(images, targets) returns the task-loss dict the teacher trains on
SUPPORTED_ARCHS = ("faster_rcnn",)


def online_teacher_enabled(cfg: CfgNode) -> bool:
    """``KD.ONLINE_TEACHER.ENABLED`` (False when the node is absent, e.g. detectron2 configs)."""
    node = getattr(cfg.KD, "ONLINE_TEACHER", None)
    return bool(node is not None and node.ENABLED)


def check_online_teacher_config(cfg: CfgNode) -> None:
    """Refuse settings the online teacher cannot honour, before anything is built.

    Raises:
        ConfigError: (one line) a META_ARCHITECTURE not in
            :data:`SUPPORTED_ARCHS`; ``FROZEN_TEACHER.FOLD_BN`` or ``FROZEN_TEACHER.CACHE_DIR``
            (both assume fixed weights).
    """
    if not online_teacher_enabled(cfg):
        return
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in SUPPORTED_ARCHS:
        raise ConfigError(f"KD.ONLINE_TEACHER.ENABLED: MODEL.META_ARCHITECTURE '{arch}' is not "
                          f"supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    if cfg.FROZEN_TEACHER.FOLD_BN or cfg.FROZEN_TEACHER.CACHE_DIR:
        raise ConfigError("KD.ONLINE_TEACHER.ENABLED: the teacher trains, so FROZEN_TEACHER.FOLD_BN "
                          "and FROZEN_TEACHER.CACHE_DIR must be off")
