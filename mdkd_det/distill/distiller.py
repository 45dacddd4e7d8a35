"""``Distiller``: the KD terms of paper Eq. 24 from paired student/teacher :class:`KDInputs`.

    L_total = alpha * L_task + cf * (beta*Con + gamma*FAlgn + delta*CosSim + eta*Att
                                     + zeta*ClsKD + rho*ROIKD)

and, for classification (Eq. 16), ``+ cf * kappa * KLD`` (Eq. 15, image logits, with t^2).

The distiller owns the frozen teacher (kept out of ``state_dict`` and the optimizer), the
student-side connectors (A3) and the schedules (cf, temperature, beta). Its terms are the
registered :class:`~mdkd_det.distill.kd_terms.KDTerm` objects named by ``KD.TERMS`` (plus any
other with a non-zero weight: the related papers' terms and plugins, issue 15); each calls a pure
function of :mod:`mdkd_det.distill.losses`, so every model family shares them; what differs per
family is the adapter that produces :class:`KDInputs`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..modeling.frozen_teacher import TeacherRuntime, freeze_teacher  # noqa: F401 (re-exported: old import path)
from .adapters import KDInputs
from ..modeling.shape_spec import match_levels_by_stride
from ..modeling.teacher_cache import uncached
from .connectors import LatentAlignmentHead, embedding_connector, feature_connector
from .kd_terms import DEFAULT_TERMS, KDContext, get_term, resolve_terms
from .views import photometric_views

logger = logging.getLogger(__name__)

#: loss-dict key of each of the paper's terms (registry name -> key), named as in the paper.
TERM_KEYS = {name: get_term(name).key for name in DEFAULT_TERMS}


class Distiller(nn.Module):
    """Weighted, curriculum-scaled KD terms (paper Eq. 24; §6.3 values as defaults), computed by
    iterating over the registered terms of :mod:`mdkd_det.distill.kd_terms`.

    Args:
        teacher: frozen teacher model (eval, no grad); stored outside the module tree.
        adapter: family adapter (``student_taps``, ``student_inputs``, ``teacher_inputs``).
        student_shapes, teacher_shapes: ``{level: ShapeSpec}`` of the two backbones; levels are
            paired by stride (A25) unless ``level_pairs`` is given.
        student_emb_dim, teacher_emb_dim: region-embedding sizes (None = no ROIKD connector).
        weights: ``{term name: weight}`` (``"con"``... ``"kld"`` -> beta, gamma, delta, eta,
            zeta, rho, kappa; related terms ``"kmm"``, ``"dcgd"``...). Missing = 0; a zero
            weight skips the term (nothing computed).
        cf: curriculum ``cf(epoch) -> float`` (C22/C34).
        temperature: T for Con and ClsKD; or ``temperature_schedule(epoch)`` (C20).
        beta_schedule: optional ``beta(epoch)`` replacing ``weights["con"]`` (C21).
        kl_direction, cls_kind, reduction, con_mask_diag: passed to the losses (A1, A2, A4, A10).
        level_pairs: explicit ``{student level: teacher level}`` (e.g. the early-/late-k
            selection of C26); default: :func:`match_levels_by_stride`.
        runtime: how the frozen teacher is prepared (in place, here) and run
            (``FROZEN_TEACHER.*``; default: plain ``no_grad``).
        terms: the term names in order (``KD.TERMS``; None = the paper's seven); registered
            terms not listed but with a non-zero weight follow (D15.1).
        kd_options: options of the related terms (``dcgd_views``, ``dcgd_strength``,
            ``dcgd_inter_weight``, ``msan_lambda``, ``late_levels``, ``ctx_positions``,
            ``ctx_bandwidth``, ``aam_margin``; see ``KD.*`` in defaults.py) and ``cfg`` (the
            ``KD`` node, read by plugin terms as ``KDContext.cfg``).
        online_teacher: paper 004's concurrent training (``KD.ONLINE_TEACHER.ENABLED``): the
            teacher is not frozen or prepared (it trains; the trainer owns its optimizer and
            loss); :meth:`teacher_inputs` runs it in ``eval()`` without autograd.

    Shapes: see :class:`KDInputs`. ``forward`` returns ``{loss name: 0-dim Tensor}`` already
    multiplied by weight and cf; names are the terms' keys (:data:`TERM_KEYS` for the paper's).

    Raises:
        RegistryError: an unknown term name in ``terms`` or ``weights``.
        ValueError: ``online_teacher`` with a runtime that folds BatchNorm or caches maps.
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
        terms: Optional[Sequence[str]] = None,
        kd_options: Optional[Mapping[str, float]] = None,
        online_teacher: bool = False,
    ) -> None:
        super().__init__()
        self.terms = resolve_terms(terms, weights)
        self._teacher = [teacher]  # a list keeps it out of state_dict(), parameters(), .to()
        self._student: List[nn.Module] = []  # set by attach_student (multi-view terms)
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
        self.weights = {k: float(weights.get(k, 0.0)) for k in self.terms}
        on = [get_term(n) for n in self.terms if self.weights[n]]
        if any(t.connector == "latent" for t in on):  # MSAN heads only when used (state_dict unchanged otherwise)
            self.latent_heads = nn.ModuleDict({
                s: LatentAlignmentHead(student_shapes[s].channels, teacher_shapes[t].channels)
                for s, t in self.level_pairs.items()})
        if hasattr(adapter, "kd_fields") or any("pixel_logits" in t.reads for t in on):
            adapter.kd_fields = frozenset(f for t in on for f in t.reads)  # adapters may skip unread fields
        self.kd_options = dict(kd_options or {})
        self.cf = cf
        self.temperature = float(temperature)
        self.temperature_schedule = temperature_schedule
        self.beta_schedule = beta_schedule
        self.kl_direction = kl_direction
        self.cls_kind = cls_kind or getattr(adapter, "cls_kind", "softmax")
        self.reduction = reduction
        self.con_mask_diag = bool(con_mask_diag)
        self.online_teacher = bool(online_teacher)
        self.runtime = runtime or TeacherRuntime()
        if self.online_teacher:  # paper 004: the teacher trains alongside (KD.ONLINE_TEACHER)
            if self.runtime.fold_bn or self.runtime.cache_dir:
                raise ValueError("an online (training) teacher cannot be BatchNorm-folded or cached")
            return
        freeze_teacher(teacher)
        self.runtime.prepare(teacher)
        if self.runtime.cache_dir:
            self._cache_teacher_backbone(teacher, adapter)

    def _cache_teacher_backbone(self, teacher: nn.Module, adapter) -> None:
        """Put the teacher's ``backbone`` behind the disk cache (``FROZEN_TEACHER.CACHE_DIR``)
        when the adapter runs it on the student's batch (``teacher_backbone_cacheable``); a
        joint teacher's FusionBackbone then stops caching its own teachers (one entry per image,
        not four). Otherwise (RF-DETR) only the FusionBackbone's teachers are cached."""
        if not getattr(adapter, "teacher_backbone_cacheable", False):
            logger.warning("FROZEN_TEACHER.CACHE_DIR: the %s adapter runs the whole teacher, whose "
                           "maps are not cached", type(adapter).__name__)
            return
        t = teacher.module if hasattr(teacher, "module") else teacher
        for m in t.backbone.modules():  # a joint teacher's own teachers: the outer cache suffices
            if hasattr(m, "set_runtime") and m.runtime.cache_dir:
                m.set_runtime(dataclasses.replace(m.runtime, cache_dir=""))
        t.backbone = freeze_teacher(self.runtime.cached(t.backbone))

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a submodule: absent from state_dict and parameters)."""
        return self._teacher[0]

    def attach_student(self, student: nn.Module) -> "Distiller":
        """Keep a reference to the student (not a submodule) for terms that run its backbone on
        extra views (DCGD); returns self."""
        self._student = [student.module if hasattr(student, "module") else student]
        return self

    def teacher_inputs(self, rec) -> KDInputs:
        """The adapter's teacher :class:`KDInputs` for the student's records ``rec``, run as
        :attr:`runtime` says (``inference_mode`` / bf16) and released as fp32 tensors the KD
        losses may save for backward. An online teacher runs in ``eval()`` here (then back to
        its mode): no autograd into it from the KD terms, BatchNorm on running statistics."""
        teacher = self.teacher
        was_training = teacher.training
        if self.online_teacher:  # its current weights, BatchNorm on running statistics
            teacher.eval()
        try:
            with self.runtime.context():
                t_in = self.adapter.teacher_inputs(teacher, rec)
        finally:
            if self.online_teacher:
                teacher.train(was_training)
        return self.runtime.release(t_in)

    def active(self, epoch: float) -> bool:
        """False when cf(epoch) == 0 or every weight is 0: the KD step can be skipped whole."""
        return self.cf(epoch) > 0 and any(w > 0 for w in self.weights.values())

    def view_latents(self, ctx: KDContext) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Per paired level, DCGD latents ``z_s, z_t`` [V, B, D] (001 Eqs. 5-8; D15.5): view 0 is
        the step's own batch (its features are reused), views 1..``dcgd_views`` are
        :func:`photometric_views` of the student's normalised batch ``ctx.s.images`` run
        through the student backbone (with autograd) and the teacher backbone (``runtime``).
        Student latent = MSAN head encoding when ``msan`` is on, else the GAP of the connector
        output; teacher latent = GAP of its map. Cost: ``dcgd_views`` extra student backbone
        forward/backward and teacher backbone forward passes per step.

        Raises:
            RuntimeError: no student attached (:meth:`attach_student`).
        """
        if not self._student:
            raise RuntimeError("DCGD needs the student backbone: call Distiller.attach_student(student)")
        o = self.kd_options
        views = photometric_views(ctx.s.images, int(o.get("dcgd_views", 2)), float(o.get("dcgd_strength", 1.0)))
        heads = getattr(self, "latent_heads", None)

        def s_latent(sl, f):
            return heads[sl].encode(f) if heads is not None else self.connectors[sl](f).mean(dim=(2, 3))

        z_s = [[s_latent(sl, f)] for sl, f in zip(self.level_pairs, ctx.s_raw)]
        z_t = [[f] for f in ctx.t_pooled]
        backbone = self._student[0].backbone
        teacher = self.teacher.module if hasattr(self.teacher, "module") else self.teacher
        for v in views:
            s_maps = backbone(v)
            with self.runtime.context():
                t_maps = uncached(teacher.backbone)(self.runtime.input(v))  # views: seen once
                t_vec = {tl: t_maps[tl].mean(dim=(2, 3)) for tl in self.level_pairs.values()}
            t_vec = self.runtime.release(t_vec)
            for i, (sl, tl) in enumerate(self.level_pairs.items()):
                z_s[i].append(s_latent(sl, s_maps[sl]))
                z_t[i].append(t_vec[tl])
        return [torch.stack(z) for z in z_s], [torch.stack(z) for z in z_t]

    def forward(self, s: KDInputs, t: KDInputs, epoch: float) -> Dict[str, torch.Tensor]:
        """KD terms at ``epoch`` (0-based, fractional; A7), in :attr:`terms` order, each already
        multiplied by its weight and cf(epoch) (Eq. 24). A term whose optional inputs are
        missing (e.g. regions) is skipped for the step."""
        cf = float(self.cf(epoch))
        T = float(self.temperature_schedule(epoch)) if self.temperature_schedule else self.temperature
        w = dict(self.weights)
        if self.beta_schedule is not None and "con" in w:
            w["con"] = float(self.beta_schedule(epoch))
        # Att (Eq. 19), Con and KMM (B x B similarities) are channel-free: they read the
        # student's own maps, so a trainable connector cannot lower them without changing the
        # student (issue 10). FAlgn, CosSim, hint, CX and DCGD read the connector output (A3).
        ctx = KDContext(self, s, t, T, epoch)
        on = [(name, get_term(name)) for name in self.terms if w[name]]
        if any(term.connector == "feature" for _, term in on):
            ctx.s_feats  # connector outputs first: the autograd order (and gradients) of before the registry
        out: Dict[str, torch.Tensor] = {}
        for name, term in on:
            if term.available(s, t):
                out[term.key] = (cf * w[name]) * term.loss(ctx)
        return out

