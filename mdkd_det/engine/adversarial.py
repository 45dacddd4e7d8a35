"""Stage 1: domain-adversarial source teachers on an unmodified torchvision Faster R-CNN
(paper §3.1, Eqs. 2-6, Algorithm 1; paper_notes C2-C5, C7, A11, A12).

One training step on a paired batch ``{"source": b1 images, "target": b2 images}``
(:func:`mdkd_det.data.multi.build_paired_train_loader`)::

    L   = L_y + L_d                                                          (Eq. 2)
    L_y = L_det(source batch) + r * L_det(target batch)                      (Eq. 2, C7, A12)
    L_d = head(f(source), d=1, lambda) + head(f(target), d=0, lambda)        (Eqs. 2-3)
    lambda = 2 / (1 + exp(-gamma * rho)) - 1,  rho = iteration / max_iter   (C4)

- ``L_det`` is torchvision's loss dict (loss_classifier, loss_box_reg, loss_objectness,
  loss_rpn_box_reg; paper Eq. 8), each term a batch mean (C3 proposal: means, not sums).
- ``f`` is the backbone output (the FPN ``OrderedDict``), captured with a
  :class:`~mdkd_det.distill.taps.TapRecorder` during the detector's own forward, so the
  detector stays an unmodified torchvision model. With ``r = 0`` the target images only go
  through ``model.transform`` and ``model.backbone`` (no target detection loss, C5 / A12).
- ``head`` is a :class:`~mdkd_det.modeling.domain_adversarial.DomainAdversarialHead`
  (A11: attached to the deepest non-``pool`` FPN map, ``levels="last"``) or a
  :class:`~mdkd_det.modeling.domain_adversarial.MultiLevelDomainAdversarial` (``"all"``
  non-``pool`` levels, losses averaged). Its gradient semantics (GRL + lambda scaling,
  ``ADVERSARIAL.GRAD_SCALING``) are documented there; its return value is added as is.

The discriminator lives *outside* the detector: its parameters are an extra optimizer param
group and it is saved as the extra checkpointable ``"da_head"``, so the checkpoint's ``"model"``
is a plain torchvision detector state dict that Stage 2 (``FUSION.TEACHERS``) and
``MODEL.WEIGHTS`` load directly.

Multi-process note: the detector runs through its DDP wrapper (twice per step with r=1) and the
head gets its own DDP wrapper; only single-process training is covered by the tests.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..config import CfgNode
from ..data.multi import build_paired_train_loader
from ..distill.schedules import AdversarialLambda
from ..distill.taps import TapRecorder
from ..modeling.domain_adversarial import (
    GRAD_SCALING_MODES,
    DomainAdversarialHead,
    MultiLevelDomainAdversarial,
)
from ..solver import build_optimizer
from ..tasks import get_task
from ..utils.errors import ConfigError, DatasetError
from .checkpointer import unwrap_model
from ..utils import comm
from .defaults import DefaultTrainer, seed_all_rng
from .events import get_event_storage
from .launch import create_ddp_model
from .trainer import SimpleTrainer

__all__ = [
    "DomainAdversarialMixin",
    "DATrainer",
    "DomainAdversarialTrainer",
    "build_domain_adversarial_head",
    "feature_levels",
    "LEVEL_MODES",
    "CLIP_MODES",
]

logger = logging.getLogger(__name__)

#: Accepted values of ``ADVERSARIAL.LEVELS``.
LEVEL_MODES = ("last", "all")
#: Accepted values of ``ADVERSARIAL.GRAD_CLIP``.
CLIP_MODES = ("global", "separate")


def feature_levels(backbone: nn.Module) -> List[str]:
    """Names of the backbone maps a discriminator may read: every output map except ``"pool"``
    (torchvision's LastLevelMaxPool map is a stride-2 subsample of the deepest map), in forward
    order (finest first).

    Raises:
        ConfigError: the backbone has no ``output_shape()`` (not a :class:`Backbone`) or only
            a ``pool`` map.
    """
    if not callable(getattr(backbone, "output_shape", None)):
        raise ConfigError(f"domain-adversarial head: backbone {type(backbone).__name__} has no "
                          "output_shape(); use a mdkd_det Backbone")
    names = [k for k in backbone.output_shape() if k != "pool"]
    if not names:
        raise ConfigError(f"domain-adversarial head: backbone {type(backbone).__name__} has no "
                          "feature map other than 'pool'")
    return names


def _check_adv_cfg(cfg: CfgNode) -> None:
    a = cfg.ADVERSARIAL
    if str(a.LEVELS) not in LEVEL_MODES:
        raise ConfigError(f"ADVERSARIAL.LEVELS={a.LEVELS!r}: expected one of {list(LEVEL_MODES)}")
    if str(a.GRAD_SCALING) not in GRAD_SCALING_MODES:
        raise ConfigError(f"ADVERSARIAL.GRAD_SCALING={a.GRAD_SCALING!r}: expected one of "
                          f"{list(GRAD_SCALING_MODES)}")
    r = float(a.R)
    if not math.isfinite(r) or r < 0:
        raise ConfigError(f"ADVERSARIAL.R={a.R!r}: must be a finite number >= 0 (paper: 1 or 0)")
    for key in ("GAMMA", "LAMBDA_MAX"):
        v = float(getattr(a, key))
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"ADVERSARIAL.{key}={getattr(a, key)!r}: must be a finite number >= 0")
    m = float(a.DISC_LR_MULT)
    if not math.isfinite(m) or m <= 0:
        raise ConfigError(f"ADVERSARIAL.DISC_LR_MULT={a.DISC_LR_MULT!r}: must be a finite number > 0")
    if str(a.GRAD_CLIP) not in CLIP_MODES:
        raise ConfigError(f"ADVERSARIAL.GRAD_CLIP={a.GRAD_CLIP!r}: expected one of {list(CLIP_MODES)}")


def build_domain_adversarial_head(cfg: CfgNode, model: nn.Module) -> nn.Module:
    """Discriminator head(s) for ``model``'s backbone from ``ADVERSARIAL.*`` (A11).

    - ``LEVELS="last"``: one :class:`DomainAdversarialHead` on the deepest non-``pool`` map.
    - ``LEVELS="all"``: :class:`MultiLevelDomainAdversarial`, one head per non-``pool`` map.

    ``ADVERSARIAL.DISCRIMINATOR`` names the discriminator (``DISCRIMINATOR_REGISTRY``),
    ``ADVERSARIAL.GRAD_SCALING`` the gradient semantics ("paper" = Eqs. 5-6). Input channels
    come from ``backbone.output_shape()``. The head is moved to ``MODEL.DEVICE``.

    Args:
        cfg: config.
        model: a detector with a ``backbone`` attribute, or a backbone.

    Returns:
        ``nn.Module`` with ``forward(feat or list of feats, domain_label, lam) -> 0-dim loss``.

    Raises:
        ConfigError: bad ``ADVERSARIAL.LEVELS`` / ``GRAD_SCALING`` / ``R`` / ``GAMMA``, or a
            backbone without ``output_shape()``.
        RegistryError: unknown ``ADVERSARIAL.DISCRIMINATOR``.
    """
    _check_adv_cfg(cfg)
    backbone = getattr(unwrap_model(model), "backbone", model)
    names = feature_levels(backbone)
    shapes = backbone.output_shape()
    chans = [int(shapes[n].channels) for n in names]
    disc, scaling = str(cfg.ADVERSARIAL.DISCRIMINATOR), str(cfg.ADVERSARIAL.GRAD_SCALING)
    if cfg.ADVERSARIAL.LEVELS == "last":
        head = DomainAdversarialHead(chans[-1], discriminator=disc, grad_scaling=scaling)
    else:
        head = MultiLevelDomainAdversarial(chans, len(chans), discriminator=disc, grad_scaling=scaling)
    return head.to(torch.device(cfg.MODEL.DEVICE))


def _last_stat(head: nn.Module, name: str) -> Optional[float]:
    """``head.<name>`` of the head's last call (``last_bce``: unweighted BCE; ``last_acc``:
    discriminator accuracy), the mean over levels for a multi-level head; None before a call."""
    head = unwrap_model(head)
    if getattr(head, name, None) is not None:
        return float(getattr(head, name))
    subs = [getattr(h, name) for h in getattr(head, "heads", []) if getattr(h, name, None) is not None]
    return float(torch.stack(subs).mean()) if subs else None


class DomainAdversarialMixin:
    """Domain-adversarial Stage-1 step for a :class:`SimpleTrainer` subclass
    (``class DATrainer(DomainAdversarialMixin, SimpleTrainer)``); see the module docstring.

    ``compute_losses(batch)`` with ``batch = {"source": list[dict], "target": list[dict]}``
    (mapper dicts: ``image`` FloatTensor[C, H, W] in [0, 1], ``target`` boxes [N, 4] xyxy px +
    labels [N]) returns::

        {loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg,   # source, Eq. 8
         tgt_loss_classifier, ..., tgt_loss_rpn_box_reg,                     # r * target (r > 0)
         loss_domain}                                                        # L_d term, 0-dim

    and records ``da_lambda`` (lambda, unsmoothed), ``da_bce_source`` / ``da_bce_target``
    (unweighted BCE) and ``da_acc_source`` / ``da_acc_target`` (the discriminator's accuracy on
    each domain's images of the step, in [0, 1]; 0.5 on both = confusion, the equilibrium; a
    value near 0 = the encoder fools it, near 1 = it separates the domains) in the event
    storage, hence in ``metrics.json`` and TensorBoard (also in ``self.last_domain_stats``).

    Args (keyword-only, the rest goes to the trainer):
        da_head: the discriminator head (:func:`build_domain_adversarial_head`; may be DDP
            wrapped). Its parameters are added to the optimizer as a new param group when
            missing (prefer building the optimizer with them so the LR scheduler covers them).
        levels: ``"last"`` (deepest non-``pool`` map), ``"all"`` (all non-``pool`` maps, a
            list is passed to the head) or an explicit list of map names.
        r: weight of the target detection loss (paper flag r; 0 = unsupervised DA, the target
            then only goes through transform + backbone).
        lam_schedule: ``progress -> lambda``; default ``AdversarialLambda(gamma=10)`` (C4).
        total_iters: iterations of the planned run for ``rho = iter / total_iters``; default
            the trainer's ``max_iter`` of the current ``train`` call (SOLVER.MAX_ITER).
        clip: ``"global"`` (default, paper §6.3): ``grad_clip`` bounds the L2 norm of all the
            optimizer's gradients together; ``"separate"``: the detector's gradients and the
            discriminator's are clipped apart, each to ``grad_clip``, and ``grad_norm`` is then
            the detector's norm (``ADVERSARIAL.GRAD_CLIP``).

    Every step also records ``da_grad_norm_disc`` and ``da_grad_norm_detector``, the L2 norms
    of the discriminator's and the detector's gradients before clipping (under CUDA AMP they
    are taken before unscaling, i.e. times the grad scaler's scale).

    Raises:
        ConfigError: bad ``levels``, ``r`` or ``clip``.
        TypeError: ``da_head`` is not an ``nn.Module``.
    """

    def __init__(self, *args: Any, da_head: nn.Module, levels: Union[str, Sequence[str]] = "last",
                 r: float = 1.0, lam_schedule=None, total_iters: Optional[int] = None,
                 clip: str = "global", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(da_head, nn.Module):
            raise TypeError(f"DomainAdversarialMixin: da_head must be an nn.Module, got {type(da_head).__name__}")
        if isinstance(levels, str):
            if levels not in LEVEL_MODES:
                raise ConfigError(f"ADVERSARIAL.LEVELS={levels!r}: expected one of {list(LEVEL_MODES)} "
                                  "or a list of feature map names")
        elif not levels:
            raise ConfigError("ADVERSARIAL.LEVELS: empty list of feature map names")
        r = float(r)
        if not math.isfinite(r) or r < 0:
            raise ConfigError(f"ADVERSARIAL.R={r!r}: must be a finite number >= 0")
        self.da_head = da_head
        self.levels = levels if isinstance(levels, str) else [str(x) for x in levels]
        if clip not in CLIP_MODES:
            raise ConfigError(f"ADVERSARIAL.GRAD_CLIP={clip!r}: expected one of {list(CLIP_MODES)}")
        self.r = r
        self.clip = clip
        self.lam_schedule = lam_schedule if lam_schedule is not None else AdversarialLambda()
        self.total_iters = None if total_iters is None else int(total_iters)
        self.last_domain_stats: Dict[str, float] = {}
        self._feature_tap = TapRecorder(unwrap_model(self.model), {"features": "backbone"})
        self._ensure_head_in_optimizer()
        da_head.train()

    # ---- helpers ---------------------------------------------------------------------------
    def _ensure_head_in_optimizer(self) -> None:
        have = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = [p for p in self.da_head.parameters() if p.requires_grad and id(p) not in have]
        if missing:
            logger.info("DomainAdversarialMixin: adding %d discriminator tensors to the optimizer "
                        "as a new param group (not covered by an LR scheduler built before)", len(missing))
            self.optimizer.add_param_group({"params": missing})

    def adversarial_lambda(self, iteration: Optional[int] = None) -> float:
        """lambda(rho) with ``rho = iteration / total_iters`` (C4); ``iteration`` defaults to the
        current ``self.iter``. 0 when no total is known yet."""
        it = self.iter if iteration is None else int(iteration)
        total = self.total_iters if self.total_iters is not None else self.max_iter
        rho = it / total if total and total > 0 else 0.0
        return float(self.lam_schedule(rho))

    def _select(self, feats: Any) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Feature map(s) the head reads: see ``levels``."""
        if isinstance(feats, torch.Tensor):
            feats = {"0": feats}
        if not isinstance(feats, Mapping):
            raise TypeError(f"backbone output must be a Tensor or a dict of maps, got {type(feats).__name__}")
        if self.levels == "last" or self.levels == "all":
            names = [k for k in feats if k != "pool"] or list(feats)
            if self.levels == "last":
                return feats[names[-1]]
            return [feats[k] for k in names]
        missing = [k for k in self.levels if k not in feats]
        if missing:
            raise ConfigError(f"ADVERSARIAL levels {missing} are not backbone maps (maps: {list(feats)})")
        maps = [feats[k] for k in self.levels]
        return maps[0] if len(maps) == 1 else maps

    def _inputs(self, batch: Sequence[Dict[str, Any]], domain: str):
        if not isinstance(batch, (list, tuple)) or not batch:
            raise DatasetError(f"domain-adversarial step: the {domain} batch must be a non-empty list of "
                               f"mapper dicts, got {type(batch).__name__}")
        images, targets = self.detector_inputs(batch)
        return images, targets

    def _split_params(self):
        """(detector parameters, discriminator parameters) of the optimizer."""
        head_ids = {id(p) for p in self.da_head.parameters()}
        det, disc = [], []
        for p in self._params():
            (disc if id(p) in head_ids else det).append(p)
        return det, disc

    def after_backward(self) -> None:
        """Record ``da_grad_norm_disc`` / ``da_grad_norm_detector`` (L2 norms of the
        discriminator's / detector's gradients before clipping), then run the hooks."""
        if self.storage is not None:
            for k, params in zip(("da_grad_norm_detector", "da_grad_norm_disc"), self._split_params()):
                g = [p.grad.detach().float().norm() for p in params if p.grad is not None]
                if g:
                    self.storage.put_scalar(k, float(torch.stack(g).norm()))
        super().after_backward()

    def clip_gradients(self) -> torch.Tensor:
        """``clip="global"``: as :class:`SimpleTrainer`. ``"separate"``: clip the detector's and
        the discriminator's gradients apart, each to ``grad_clip``; return the detector's norm
        before clipping."""
        if self.clip == "global":
            return super().clip_gradients()
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        det, disc = self._split_params()
        if disc:
            torch.nn.utils.clip_grad_norm_(disc, self.grad_clip)
        return torch.nn.utils.clip_grad_norm_(det, self.grad_clip)

    # ---- the step --------------------------------------------------------------------------
    def compute_losses(self, batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """Loss dict of one paired step (Eq. 2); see the class docstring.

        Raises:
            DatasetError: ``batch`` lacks "source"/"target" or a domain batch is empty.
            KeyError / ValueError: from the detector (bad targets) or the head.
        """
        if not isinstance(batch, Mapping) or "source" not in batch or "target" not in batch:
            got = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise DatasetError(f"domain-adversarial step expects a paired batch "
                               f"{{'source': [...], 'target': [...]}} (PairedLoader), got {got}")
        inner = unwrap_model(self.model)
        lam = self.adversarial_lambda()

        src_images, src_targets = self._inputs(batch["source"], "source")
        with self._feature_tap as rec:
            losses: Dict[str, torch.Tensor] = dict(self.model(src_images, src_targets))
        src_feats = rec["features"]

        tgt_images, tgt_targets = self._inputs(batch["target"], "target")
        if self.r > 0:
            with self._feature_tap as rec:
                tgt_losses = self.model(tgt_images, tgt_targets)
            tgt_feats = rec["features"]
            for k, v in tgt_losses.items():
                losses[f"tgt_{k}"] = self.r * v
        elif hasattr(inner, "backbone_features"):  # models that own their preprocessing (seg)
            tgt_feats = inner.backbone_features(tgt_images)
        else:
            image_list, _ = inner.transform(tgt_images)
            tgt_feats = inner.backbone(image_list.tensors)

        stats: Dict[str, Optional[float]] = {"da_lambda": lam}
        d_src = self.da_head(self._select(src_feats), 1, lam)
        stats.update(da_bce_source=_last_stat(self.da_head, "last_bce"),
                     da_acc_source=_last_stat(self.da_head, "last_acc"))
        d_tgt = self.da_head(self._select(tgt_feats), 0, lam)
        stats.update(da_bce_target=_last_stat(self.da_head, "last_bce"),
                     da_acc_target=_last_stat(self.da_head, "last_acc"))
        losses["loss_domain"] = d_src + d_tgt

        self.last_domain_stats = {k: v for k, v in stats.items() if v is not None}
        try:
            storage = get_event_storage()
        except RuntimeError:  # called outside train()
            storage = None
        if storage is not None:
            storage.put_scalar("da_lambda", lam, smoothing_hint=False)
            for k in ("da_bce_source", "da_bce_target", "da_acc_source", "da_acc_target"):
                if k in self.last_domain_stats:
                    storage.put_scalar(k, self.last_domain_stats[k])
        return losses


class DATrainer(DomainAdversarialMixin, SimpleTrainer):
    """:class:`SimpleTrainer` with the domain-adversarial step (the Stage-1 ``trainer_class``)."""


class DomainAdversarialTrainer(DefaultTrainer):
    """Stage-1 source teacher T^{s_k} from config (paper §3.1, Algorithm 1; C2-C5).

    - model: the plain detector of ``MODEL.*`` (:func:`~mdkd_det.engine.defaults.build_model`);
    - ``self.da_head``: :func:`build_domain_adversarial_head` (``ADVERSARIAL.*``);
    - optimizer: ``SOLVER.*`` over two param groups, detector then discriminator (same weight
      decay; discriminator LR = ``BASE_LR * ADVERSARIAL.DISC_LR_MULT``; the LR schedule covers
      both); clipping per ``ADVERSARIAL.GRAD_CLIP``; lambda bounded by ``ADVERSARIAL.LAMBDA_MAX``;
    - data: :func:`~mdkd_det.data.multi.build_paired_train_loader` with source =
      ``ADVERSARIAL.SOURCE`` (names concatenated into one source domain; the pipeline trains one
      teacher per source) and target = ``DATASETS.TRAIN``, rebuilt at ``start_iter`` on resume;
    - checkpoints: ``"model"`` = the plain detector, ``"da_head"`` = the discriminator (restored
      by ``resume_or_load(resume=True)``; ``MODEL.WEIGHTS`` loads only the detector);
    - evaluation: the detector on the target ``DATASETS.TEST`` as in :class:`DefaultTrainer`.

    Args:
        cfg: config.
        model: a prebuilt detector (default: from ``cfg``).
        da_head: a prebuilt discriminator head (default: from ``cfg`` and ``model``).

    Raises:
        ConfigError: empty ``ADVERSARIAL.SOURCE``; bad ``ADVERSARIAL.*`` values; the target
            among the sources.
    """

    trainer_class = DATrainer

    def __init__(self, cfg: CfgNode, model: Optional[nn.Module] = None, da_head: Optional[nn.Module] = None) -> None:
        _check_adv_cfg(cfg)
        sources = [str(s) for s in cfg.ADVERSARIAL.SOURCE]
        if not sources:
            raise ConfigError("ADVERSARIAL.SOURCE is empty: name the source dataset(s) of this teacher")
        overlap = sorted(set(sources) & {str(t) for t in cfg.DATASETS.TRAIN})
        if overlap:
            raise ConfigError(f"ADVERSARIAL.SOURCE and DATASETS.TRAIN (the target) share {overlap}")
        seed_all_rng(int(cfg.SEED) + comm.get_rank())
        model = model if model is not None else self.build_model(cfg)
        self.da_head = da_head if da_head is not None else build_domain_adversarial_head(cfg, model)
        super().__init__(cfg, model)
        self.checkpointer.add_checkpointable("da_head", self.da_head)

    def build_optimizer(self, cfg: CfgNode, model: nn.Module):  # instance method: needs self.da_head
        """``SOLVER.*`` optimizer with param groups [detector, discriminator]; the
        discriminator's LR is ``SOLVER.BASE_LR * ADVERSARIAL.DISC_LR_MULT``."""
        disc_lr = float(cfg.SOLVER.BASE_LR) * float(cfg.ADVERSARIAL.DISC_LR_MULT)
        return build_optimizer(cfg, [{"params": list(model.parameters())},
                                     {"params": list(self.da_head.parameters()), "lr": disc_lr}])

    def build_train_loader(self, start_iter: int):
        """Paired source/target loader at ``start_iter`` (checks each dataset's class count)."""
        cfg = self.cfg
        loader = build_paired_train_loader(cfg, cfg.ADVERSARIAL.SOURCE, cfg.DATASETS.TRAIN, start_iter,
                                           mapper=get_task(cfg).build_mapper(cfg, is_train=True))
        for name in list(cfg.ADVERSARIAL.SOURCE) + list(cfg.DATASETS.TRAIN):
            get_task(cfg).check_dataset(cfg, name)
        return loader

    def build_trainer(self, model, data_loader) -> SimpleTrainer:
        cfg = self.cfg
        clip = float(cfg.SOLVER.CLIP_GRADIENTS.MAX_NORM) if cfg.SOLVER.CLIP_GRADIENTS.ENABLED else None
        return self.trainer_class(
            model, data_loader, self.optimizer, grad_clip=clip, amp=bool(cfg.SOLVER.AMP.ENABLED),
            da_head=create_ddp_model(self.da_head), levels=str(cfg.ADVERSARIAL.LEVELS),
            r=float(cfg.ADVERSARIAL.R),
            lam_schedule=AdversarialLambda(gamma=float(cfg.ADVERSARIAL.GAMMA),
                                           max_value=float(cfg.ADVERSARIAL.LAMBDA_MAX)),
            total_iters=self.max_iter, clip=str(cfg.ADVERSARIAL.GRAD_CLIP),
        )
