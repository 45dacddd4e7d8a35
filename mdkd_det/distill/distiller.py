"""``Distiller``: the KD terms of paper Eq. 24 from paired student/teacher :class:`KDInputs`.

    L_total = alpha * L_task + cf * (beta*Con + gamma*FAlgn + delta*CosSim + eta*Att
                                     + zeta*ClsKD + rho*ROIKD)

and, for classification (Eq. 16), ``+ cf * kappa * KLD`` (Eq. 15, image logits, with t^2).

The distiller owns the frozen teacher (kept out of ``state_dict`` and the optimizer), the
student-side connectors (A3) and the schedules (cf, temperature, beta). It calls only the pure
functions of :mod:`mdkd_det.distill.losses`, so every model family shares it; what differs per
family is the adapter that produces :class:`KDInputs`.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional

import torch
from torch import nn

from ..modeling.frozen_teacher import TeacherRuntime
from . import losses as L
from .adapters import KDInputs
from .connectors import embedding_connector, feature_connector, match_levels_by_stride

#: loss-dict key of each term, named as in the paper.
TERM_KEYS = {
    "con": "loss_Con",
    "falgn": "loss_FAlgn",
    "cos": "loss_CosSim",
    "att": "loss_Att",
    "clskd": "loss_ClsKD",
    "roikd": "loss_ROIKD",
    "kld": "loss_KLD",
}


class Distiller(nn.Module):
    """Weighted, curriculum-scaled KD terms (paper Eq. 24; §6.3 values as defaults).

    Args:
        teacher: frozen teacher model (eval, no grad); stored outside the module tree.
        adapter: family adapter (``student_taps``, ``student_inputs``, ``teacher_inputs``).
        student_shapes, teacher_shapes: ``{level: ShapeSpec}`` of the two backbones; levels are
            paired by stride (A25) unless ``level_pairs`` is given.
        student_emb_dim, teacher_emb_dim: region-embedding sizes (None = no ROIKD connector).
        weights: ``{"con", "falgn", "cos", "att", "clskd", "roikd", "kld"}`` -> beta, gamma,
            delta, eta, zeta, rho, kappa. Zero weights skip the term.
        cf: curriculum ``cf(epoch) -> float`` (C22/C34).
        temperature: T for Con and ClsKD; or ``temperature_schedule(epoch)`` (C20).
        beta_schedule: optional ``beta(epoch)`` replacing ``weights["con"]`` (C21).
        kl_direction, cls_kind, reduction, con_mask_diag: passed to the losses (A1, A2, A4, A10).
        level_pairs: explicit ``{student level: teacher level}`` (e.g. the early-/late-k
            selection of C26); default: :func:`match_levels_by_stride`.
        runtime: how the frozen teacher is prepared (in place, here) and run
            (``FROZEN_TEACHER.*``; default: plain ``no_grad``).

    Shapes: see :class:`KDInputs`. ``forward`` returns ``{loss name: 0-dim Tensor}`` already
    multiplied by weight and cf; names in :data:`TERM_KEYS`.
    """

    def __init__(
        self,
        teacher: nn.Module,
        adapter,
        student_shapes: Mapping,
        teacher_shapes: Mapping,
        student_emb_dim: Optional[int],
        teacher_emb_dim: Optional[int],
        weights: Mapping[str, float],
        cf: Callable[[float], float],
        temperature: float = 2.0,
        temperature_schedule: Optional[Callable[[float], float]] = None,
        beta_schedule: Optional[Callable[[float], float]] = None,
        kl_direction: str = "t||s",
        cls_kind: Optional[str] = None,
        reduction: str = "mean",
        con_mask_diag: bool = False,
        level_pairs: Optional[Mapping[str, str]] = None,
        runtime: Optional[TeacherRuntime] = None,
    ) -> None:
        super().__init__()
        unknown = set(weights) - set(TERM_KEYS)
        if unknown:
            raise ValueError(f"unknown KD weight names {sorted(unknown)}; known: {sorted(TERM_KEYS)}")
        self._teacher = [teacher]  # a list keeps it out of state_dict(), parameters(), .to()
        self.adapter = adapter
        self.level_pairs = (dict(level_pairs) if level_pairs is not None
                            else match_levels_by_stride(student_shapes, teacher_shapes))
        self.connectors = nn.ModuleDict({
            s: feature_connector(student_shapes[s].channels, teacher_shapes[t].channels)
            for s, t in self.level_pairs.items()
        })
        self.roi_connector = (
            embedding_connector(student_emb_dim, teacher_emb_dim)
            if student_emb_dim and teacher_emb_dim else nn.Identity()
        )
        self.weights = {k: float(weights.get(k, 0.0)) for k in TERM_KEYS}
        self.cf = cf
        self.temperature = float(temperature)
        self.temperature_schedule = temperature_schedule
        self.beta_schedule = beta_schedule
        self.kl_direction = kl_direction
        self.cls_kind = cls_kind or getattr(adapter, "cls_kind", "softmax")
        self.reduction = reduction
        self.con_mask_diag = bool(con_mask_diag)
        freeze_teacher(teacher)
        self.runtime = runtime or TeacherRuntime()
        self.runtime.prepare(teacher)

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a submodule: absent from state_dict and parameters)."""
        return self._teacher[0]

    def teacher_inputs(self, rec) -> KDInputs:
        """The adapter's teacher :class:`KDInputs` for the student's records ``rec``, run as
        :attr:`runtime` says (``inference_mode`` / bf16) and released as fp32 tensors the KD
        losses may save for backward."""
        with self.runtime.context():
            t_in = self.adapter.teacher_inputs(self.teacher, rec)
        return self.runtime.release(t_in)

    def active(self, epoch: float) -> bool:
        """False when cf(epoch) == 0 or every weight is 0: the KD step can be skipped whole."""
        return self.cf(epoch) > 0 and any(w > 0 for w in self.weights.values())

    def forward(self, s: KDInputs, t: KDInputs, epoch: float) -> Dict[str, torch.Tensor]:
        """KD terms of Eq. 24 at ``epoch`` (0-based, fractional; A7), each already multiplied by
        its weight and cf(epoch). Region terms need ``region_*`` on both sides."""
        cf = float(self.cf(epoch))
        T = float(self.temperature_schedule(epoch)) if self.temperature_schedule else self.temperature
        w = dict(self.weights)
        if self.beta_schedule is not None:
            w["con"] = float(self.beta_schedule(epoch))
        # Att (Eq. 19) and Con (B x B similarities) are channel-free: they read the student's own
        # maps, so a trainable connector cannot lower them without changing the student (issue
        # 10). FAlgn and CosSim compare channels and read the connector output (A3).
        s_raw = [s.features[sl] for sl in self.level_pairs]
        t_feats = [t.features[tl] for tl in self.level_pairs.values()]
        s_feats = ([self.connectors[sl](f) for sl, f in zip(self.level_pairs, s_raw)]
                   if w["falgn"] or w["cos"] else None)
        out: Dict[str, torch.Tensor] = {}
        t_vec = [f.mean(dim=(2, 3)) for f in t_feats] if w["con"] or w["cos"] else None
        if w["con"]:  # GAP descriptors (A1, A8)
            out[TERM_KEYS["con"]] = L.con([f.mean(dim=(2, 3)) for f in s_raw], t_vec, T=T,
                                          direction=self.kl_direction, mask_diag=self.con_mask_diag)
        if w["falgn"]:
            out[TERM_KEYS["falgn"]] = L.falgn(s_feats, t_feats, reduction=self.reduction)
        if w["cos"]:
            out[TERM_KEYS["cos"]] = L.cos_sim([f.mean(dim=(2, 3)) for f in s_feats], t_vec,
                                              reduction=self.reduction)
        if w["att"]:
            out[TERM_KEYS["att"]] = L.att(s_raw, t_feats)
        has_regions = s.region_logits is not None and t.region_logits is not None
        if w["clskd"] and has_regions:
            out[TERM_KEYS["clskd"]] = L.cls_kd(s.region_logits, t.region_logits, T=T,
                                               kind=self.cls_kind, direction=self.kl_direction)
        if w["roikd"] and s.region_embeddings is not None and t.region_embeddings is not None:
            out[TERM_KEYS["roikd"]] = L.roi_kd(self.roi_connector(s.region_embeddings),
                                               t.region_embeddings, reduction=self.reduction)
        if w["kld"] and s.logits is not None and t.logits is not None:
            out[TERM_KEYS["kld"]] = L.kld(s.logits, t.logits, T=T, direction=self.kl_direction)
        name_to_w = {v: w[k] for k, v in TERM_KEYS.items()}
        return {k: (cf * name_to_w[k]) * v for k, v in out.items()}


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Freeze a teacher for inference-only use: no grads, eval mode (BatchNorm statistics
    fixed), and ``train()`` made a no-op so a parent's ``train()`` cannot flip it back."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.train = lambda mode=True: teacher  # type: ignore[assignment]
    return teacher
