"""KD adapter for :class:`~mdkd_det.modeling.meta_arch.rfdetr.RFDETRDetector` (paper_notes A9,
A10; engineering_notes §4 hook points). Registered as ``"rfdetr"`` in ``KD_ADAPTER_REGISTRY``.

Everything is captured with :class:`~mdkd_det.distill.taps.TapRecorder` forward hooks on the
unmodified modules:

- ``features``: ``model.backbone`` output, the projector-level maps the decoder reads
  (OrderedDict ``[B, C, R/s, R/s]``) -> FAlgn, CosSim, Con, Att;
- ``outputs``: ``model.detr`` (rfdetr ``LWDETR``) output dict, ``pred_logits [B, Q*G, K+1]``
  and ``pred_boxes [B, Q*G, 4]``; only query group 0 (``[:, :Q]``) and the K real classes are
  used (the teacher runs in eval mode: one group);
- ``hs``: ``model.detr.transformer`` output[0][-1], the last decoder layer's query embeddings
  ``[B, Q*G, D]`` -> ROIKD.

Pairing (A10): every student group-0 query is matched one-to-one to a teacher query among the
teacher's top-K by :func:`~mdkd_det.distill.query_matching.pair_queries` (Hungarian on the two
models' predictions), so ``region_logits`` / ``region_embeddings`` rows correspond; M_i = Q.
The class head is sigmoid, so ClsKD is the per-class binary KL (``cls_kind = "binary"``, A10).
"""

from __future__ import annotations

import torch
from torch import nn

from ..utils.errors import ConfigError
from .adapter_base import KD_ADAPTER_REGISTRY, KDInputs, _unwrap
from .query_matching import pair_queries
from .taps import Tap, TapRecorder, register_detector_taps

__all__ = ["RFDETRAdapter"]


def _last_hidden(module, args, kwargs, output):
    """Last decoder layer of ``Transformer.forward``'s ``hs [L, B, Q*G, D]``."""
    return output[0][-1]


register_detector_taps("rfdetr", {
    # (ImageList [tensors: B, 3, R, R normalised], rfdetr targets)
    "images": Tap("transform"),
    # OrderedDict level -> Tensor[B, C, R/s, R/s] (projector-level maps)
    "features": Tap("backbone"),
    # dict: pred_logits [B, Q*G, K+1], pred_boxes [B, Q*G, 4] (cxcywh in [0, 1]), aux_outputs, ...
    "outputs": Tap("detr"),
    # last decoder layer query embeddings [B, Q*G, D]
    "hs": Tap("detr.transformer", what=_last_hidden),
})


@KD_ADAPTER_REGISTRY.register("rfdetr")
class RFDETRAdapter:
    """RF-DETR adapter (module docstring). ``query_topk``: teacher top-K of the pairing (0 = the
    student's number of queries); set from ``KD.QUERY_TOPK`` by :meth:`from_config`."""

    cls_kind = "binary"

    def __init__(self, query_topk: int = 0) -> None:
        self.query_topk = int(query_topk)

    @classmethod
    def from_config(cls, cfg) -> "RFDETRAdapter":
        """Adapter with ``KD.QUERY_TOPK`` (used by ``build_kd_adapter(name, cfg)``)."""
        return cls(query_topk=int(cfg.KD.QUERY_TOPK))

    def student_taps(self):
        """Tap preset ``"rfdetr"``."""
        return register_detector_taps("rfdetr")

    @staticmethod
    def _group0(model: nn.Module, out: dict, hs: torch.Tensor):
        q, k = model.num_queries, model.num_classes
        return out["pred_logits"][:, :q, :k], out["pred_boxes"][:, :q], hs[:, :q]

    def student_inputs(self, rec: TapRecorder) -> KDInputs:
        """Student maps, and group-0 query logits ``[B*Q, K]`` / embeddings ``[B*Q, D]`` in
        (image, query) order."""
        model = _unwrap(rec.model)
        logits, _, hs = self._group0(model, rec["outputs"], rec["hs"])
        return KDInputs(features=rec["features"], region_logits=logits.flatten(0, 1),
                        region_embeddings=hs.flatten(0, 1))

    def student_forward_unlabeled(self, student: nn.Module, images) -> TapRecorder:
        """Student forward on unlabelled images without targets (``KD.UNLABELED``, paper 003
        Eq. 3): the transform and ``model.detr`` run in the student's own (train) mode, so all
        query groups are decoded as in a labelled step (group 0 is distilled); the criterion
        (task loss) is not called.

        Args:
            student: :class:`RFDETRDetector` (or its DDP wrapper).
            images: ``list[Tensor[C, H, W]]`` in [0, 1] (px at any size), on the model's device.

        Returns:
            The closed recorder with the preset's records (``images``, ``features``,
            ``outputs``, ``hs``).
        """
        model = _unwrap(student)
        with TapRecorder(model, self.student_taps()) as rec:
            image_list, _ = model.transform(images, None)
            model.detr(image_list.tensors)
        return rec

    def teacher_inputs(self, teacher: nn.Module, rec: TapRecorder) -> KDInputs:
        """Teacher forward (``no_grad``; the teacher is frozen by
        :func:`~mdkd_det.modeling.frozen_teacher.freeze_teacher`, so in eval mode: one query
        group) on the student's transformed batch; its query rows
        reordered to pair with :meth:`student_inputs` (Hungarian, A10).

        Raises:
            ConfigError: the teacher has fewer queries than the student.
        """
        teacher = _unwrap(teacher)
        student = _unwrap(rec.model)
        tensors = rec["images"][0].tensors
        with torch.no_grad(), TapRecorder(teacher, {"features": "backbone",
                                                    "hs": Tap("detr.transformer", what=_last_hidden)}) as trec:
            t_out = teacher.detr(tensors)  # eval mode: the teacher is frozen (freeze_teacher)
        t_logits, t_boxes, t_hs = self._group0(teacher, t_out, trec["hs"])
        s_logits, s_boxes, _ = self._group0(student, rec["outputs"], rec["hs"])
        try:
            b, si, ti = pair_queries(s_logits, s_boxes, t_logits, t_boxes, top_k=self.query_topk)
        except ValueError as e:
            raise ConfigError(f"RF-DETR KD query pairing: {e}") from e
        order = torch.argsort(b * s_logits.shape[1] + si)  # (image, student query) order
        b, ti = b[order], ti[order]
        return KDInputs(features=trec["features"], region_logits=t_logits[b, ti],
                        region_embeddings=t_hs[b, ti])
