"""KD adapter of the image classifier (paper §3.3 classification, Eq. 16; C26, A16).

It only says *where to tap* an :class:`~mdkd_det.modeling.meta_arch.classifier.ImageClassifier`
and which levels pair up; the same :class:`~mdkd_det.distill.distiller.Distiller`,
:class:`~mdkd_det.distill.mixin.KDTrainerMixin` and :class:`~mdkd_det.distill.trainer.KDTrainer`
as for the detectors compute FAlgn / CosSim on the paired levels (student connectors to the
teacher's ``joint_ch``, A3) and L_KLD on the image logits (Eq. 15, t^2).

Layer selection (C26, A16): the joint teacher's FusionBackbone levels are its FA blocks
(``fa1``..``faN``); the student's levels are its backbone levels in depth order. With ``K`` =
k (L1-L3) the student's **last k** levels are paired, in order, with the teacher's **first k**
(``"early"``) or **last k** (``"late"``) levels (:func:`select_layers`). A teacher that is a plain
classifier (no FA blocks) works the same on its own backbone levels.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Tuple

import torch
from torch import nn

from .adapter_base import KD_ADAPTER_REGISTRY, KDInputs, _unwrap
from .taps import Tap

__all__ = ["LAYER_SELECTIONS", "select_layers", "ImageClassifierAdapter"]

LAYER_SELECTIONS = ("early", "late")


def select_layers(n_student: int, n_teacher: int, k: int, mode: str) -> List[Tuple[int, int]]:
    """``[(student index, teacher index)]`` of the k distilled layer pairs (C26, A16).

    Student: its last k levels ``n_s-k .. n_s-1``. Teacher: ``0 .. k-1`` (early-k) or
    ``n_t-k .. n_t-1`` (late-k). Pairs are in depth order. E.g. ``n_s=5, n_t=3, k=2``:
    early -> ``[(3, 0), (4, 1)]``, late -> ``[(3, 1), (4, 2)]``.

    Raises:
        ValueError: ``k`` < 1 or larger than either side's level count, or a bad ``mode``.
    """
    if mode not in LAYER_SELECTIONS:
        raise ValueError(f"KD.CLS.LAYER_SELECTION must be one of {list(LAYER_SELECTIONS)}, got {mode!r}")
    if not 1 <= int(k) <= min(n_student, n_teacher):
        raise ValueError(f"KD.CLS.K={k}: must be in [1, {min(n_student, n_teacher)}] (student has "
                         f"{n_student} levels, teacher {n_teacher})")
    k = int(k)
    t0 = 0 if mode == "early" else n_teacher - k
    return [(n_student - k + i, t0 + i) for i in range(k)]


@KD_ADAPTER_REGISTRY.register("image_classifier")
class ImageClassifierAdapter:
    """Classifier adapter: student taps on ``backbone`` (its normalised input and its levels)
    and ``head`` (logits); the teacher runs its backbone and head on the same normalised batch
    under ``torch.no_grad``.

    Args:
        k: number of distilled layers (``KD.CLS.K``; L1-L3).
        mode: ``"early"`` or ``"late"`` (``KD.CLS.LAYER_SELECTION``).
    """

    #: the teacher's maps come from ``teacher.backbone(batch)`` alone (FROZEN_TEACHER.CACHE_DIR)
    teacher_backbone_cacheable = True

    cls_kind = "softmax"

    def __init__(self, k: int = 3, mode: str = "late") -> None:
        if mode not in LAYER_SELECTIONS:
            raise ValueError(f"KD.CLS.LAYER_SELECTION must be one of {list(LAYER_SELECTIONS)}, got {mode!r}")
        self.k, self.mode = int(k), mode
        self.pairs: Dict[str, str] = {}

    @classmethod
    def from_config(cls, cfg) -> "ImageClassifierAdapter":
        """From ``KD.CLS.K`` and ``KD.CLS.LAYER_SELECTION``."""
        return cls(int(cfg.KD.CLS.K), str(cfg.KD.CLS.LAYER_SELECTION))

    def kd_shapes(self, student: nn.Module, teacher: nn.Module):
        """``(student_shapes, teacher_shapes, {student level: teacher level})`` of the k pairs."""
        s_shapes = _unwrap(student).backbone.output_shape()
        t_shapes = _unwrap(teacher).backbone.output_shape()
        s_names, t_names = list(s_shapes), list(t_shapes)
        idx = select_layers(len(s_names), len(t_names), self.k, self.mode)
        self.pairs = OrderedDict((s_names[i], t_names[j]) for i, j in idx)
        return ({s: s_shapes[s] for s in self.pairs}, {t: t_shapes[t] for t in self.pairs.values()},
                dict(self.pairs))

    def student_taps(self) -> Dict[str, object]:
        """``input`` (normalised batch into the backbone), ``features`` (its levels), ``logits``."""
        return {"input": Tap("backbone", "input"), "features": "backbone", "logits": "head"}

    def student_inputs(self, rec) -> KDInputs:
        """Student :class:`KDInputs`: the paired levels [B, C_l, h, w] and logits [B, K]."""
        feats = rec["features"]
        return KDInputs(features=OrderedDict((s, feats[s]) for s in self.pairs), logits=rec["logits"])

    def teacher_inputs(self, teacher: nn.Module, rec) -> KDInputs:
        """Teacher :class:`KDInputs` on the student's normalised batch, under ``no_grad``."""
        teacher = _unwrap(teacher)
        x = rec["input"]
        with torch.no_grad():
            feats = teacher.backbone(x)
            logits = teacher.head(next(reversed(feats.values())))
        return KDInputs(features=OrderedDict((t, feats[t]) for t in self.pairs.values()), logits=logits)
