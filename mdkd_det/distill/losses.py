"""Pure knowledge-distillation losses of MDKD (paper Eqs. 11-13, 15, 19-23).

Every function here is *pure*: no modules, hooks, config or state (except a warn-once flag for
:func:`con`). Connectors (1x1 conv, resize modules with parameters) live on the student side of
the distiller (decision A3); these functions only see tensors that already correspond.

Common conventions (paper_notes.md A2, A4, A8):

- ``s`` = student, ``t`` = teacher. Teacher tensors are treated as constants: they are
  ``detach()``-ed inside every function, so no gradient ever reaches the teacher.
- Every loss returns a 0-dim ``float32`` tensor, which is a *mean* over batch elements, spatial
  positions, channels and levels unless stated otherwise (A4). Computation is done in float32
  (safe under autocast).
- Multi-level inputs (``*_feats``) are a list/tuple of tensors, a single tensor (one level), or
  a mapping name -> tensor (e.g. a backbone's ``OrderedDict``). Two mappings are paired by key
  (student order); a mapping and a sequence are paired by position.
- KL-type losses default to KL(P_teacher || P_student) (A2); ``t^2`` is applied only to
  :func:`kld` (Eq. 15), as in the paper. ``direction`` / ``t2_scale`` switch to the literal
  forms (A2 "configurable").
- Degenerate inputs give a finite zero *with a gradient path* to the student (so a caller can
  always ``backward()``): zero feature maps, batch size 1 for :func:`con`, empty region sets.

Shape errors raise ``ValueError`` naming the level (index and key) and the shapes.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, List, Mapping, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["con", "falgn", "cos_sim", "att", "cls_kd", "roi_kd", "kld"]

Feats = Union[Tensor, Sequence[Tensor], Mapping[Any, Tensor]]

_DIRECTIONS = ("t||s", "s||t")
_REDUCTIONS = ("mean", "paper")
_WARNED: set = set()  # keys of warnings already issued (warn once per process)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _warn_once(key: str, message: str) -> None:
    """``warnings.warn`` the first time ``key`` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _pair_levels(fn: str, s_feats: Feats, t_feats: Feats) -> List[Tuple[str, Tensor, Tensor]]:
    """Pair student and teacher levels -> list of (level label, s, t).

    The label is ``"level <i>"`` or ``"level <i> ('<key>')"`` for error messages.

    Raises:
        ValueError: no level, different number of levels, or a key missing in the teacher.
    """
    if isinstance(s_feats, Tensor):
        s_feats = [s_feats]
    if isinstance(t_feats, Tensor):
        t_feats = [t_feats]
    if isinstance(s_feats, Mapping) and isinstance(t_feats, Mapping):
        missing = [k for k in s_feats if k not in t_feats]
        if missing or len(s_feats) != len(t_feats):
            raise ValueError(
                f"{fn}: student levels {list(s_feats)} and teacher levels {list(t_feats)} "
                f"differ (missing in teacher: {missing})"
            )
        pairs = [(f"level {i} ({k!r})", s_feats[k], t_feats[k]) for i, k in enumerate(s_feats)]
    else:
        s_keys = list(s_feats.keys()) if isinstance(s_feats, Mapping) else None
        s_list = list(s_feats.values()) if isinstance(s_feats, Mapping) else list(s_feats)
        t_list = list(t_feats.values()) if isinstance(t_feats, Mapping) else list(t_feats)
        if len(s_list) != len(t_list):
            raise ValueError(
                f"{fn}: {len(s_list)} student levels but {len(t_list)} teacher levels"
            )
        pairs = [
            (f"level {i}" + (f" ({s_keys[i]!r})" if s_keys else ""), s, t)
            for i, (s, t) in enumerate(zip(s_list, t_list))
        ]
    if not pairs:
        raise ValueError(f"{fn}: no feature levels given")
    for name, s, t in pairs:
        if not isinstance(s, Tensor) or not isinstance(t, Tensor):
            raise ValueError(f"{fn}: {name} is not a tensor pair ({type(s)}, {type(t)})")
        if s.dim() not in (2, 4) or t.dim() not in (2, 4) or s.dim() != t.dim():
            raise ValueError(
                f"{fn}: {name} needs [B,C,H,W] or [B,C] tensors of the same rank, got student "
                f"{tuple(s.shape)} and teacher {tuple(t.shape)}"
            )
        if s.shape[0] != t.shape[0]:
            raise ValueError(
                f"{fn}: {name} batch sizes differ: student {tuple(s.shape)}, "
                f"teacher {tuple(t.shape)}"
            )
    return pairs


def _check_channels(fn: str, name: str, s: Tensor, t: Tensor) -> None:
    """Raise ValueError naming the level when student and teacher channels differ."""
    if s.shape[1] != t.shape[1]:
        raise ValueError(
            f"{fn}: {name} channels differ: student {tuple(s.shape)} vs teacher "
            f"{tuple(t.shape)}; add a student-side connector (Conv1x1 C_s->C_t, A3)"
        )


def _zero(*tensors: Tensor) -> Tensor:
    """A 0-dim float32 zero that depends on ``tensors`` (gradient path, zero gradient)."""
    out = None
    for x in tensors:
        term = x.float().sum() * 0.0
        out = term if out is None else out + term
    return out


def _gap(x: Tensor) -> Tensor:
    """Global average pooling: [B,C,H,W] -> [B,C]; [B,C] is returned unchanged."""
    return x.mean(dim=(2, 3)) if x.dim() == 4 else x


def _resize_to(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners=False) of [N,C,H,W] to ``size`` when it differs."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _check_temperature(fn: str, T: float) -> None:
    if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
        raise ValueError(f"{fn}: temperature T must be a finite number > 0, got {T!r}")


def _check_choice(fn: str, arg: str, value: str, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: {arg}={value!r} is not one of {list(choices)}")


def _logits_2d(fn: str, z_s: Tensor, z_t: Tensor) -> Tuple[Tensor, Tensor]:
    """Check equal shapes [..., K] and flatten leading dims -> [M, K] float32 pair."""
    if z_s.shape != z_t.shape or z_s.dim() < 1:
        raise ValueError(
            f"{fn}: student logits {tuple(z_s.shape)} and teacher logits {tuple(z_t.shape)} "
            f"must have the same shape [M, K]"
        )
    if z_s.dim() == 1:  # a single region
        z_s, z_t = z_s[None], z_t[None]
    k = z_s.shape[-1]
    m = math.prod(z_s.shape[:-1])
    return z_s.float().reshape(m, k), z_t.detach().float().reshape(m, k)


def _kl_log(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Elementwise KL(P || Q) terms p * (log p - log q) from log-probabilities (0 where p=0)."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True)


# --------------------------------------------------------------------------------------------
# Stage-3 representation losses
# --------------------------------------------------------------------------------------------
def con(
    s_feats: Feats,
    t_feats: Feats,
    T: float = 2.0,
    direction: str = "t||s",
    mask_diag: bool = False,
    *,
    t2_scale: bool = False,
) -> Tensor:
    """Batch relational (contrastive) distillation L_Con, paper Eq. 11 built as decision A1.

    Per level l (the student-side connector is applied by the caller when channels differ):

    1. ``z = normalize(GAP(f))`` for student and teacher -> [B, C] (unit rows; zero rows stay 0);
    2. ``S_l = Z_s Z_s^T`` and ``T_l = Z_t Z_t^T``: B x B cosine-similarity matrices;
    3. row-wise ``softmax(. / T)`` over j (the diagonal is kept unless ``mask_diag``; with B=2 a
       masked diagonal leaves one entry per row, so the loss is identically 0);
    4. ``KL`` per row i, averaged over the B rows, then over levels (A4):
       ``L_Con = mean_l (1/B) sum_i KL(P_t[i] || P_s[i])``.

    Args:
        s_feats, t_feats: per-level student/teacher tensors [B, C, H, W] (pooled here) or
            already-pooled [B, C]; list/tuple, mapping (paired by key) or one tensor.
            Similarities are taken within one model, so only B must agree: C and H x W may
            differ between student and teacher.
        T: softmax temperature (detection: 2.0 [paper, C32]); no ``T^2`` factor (Eq. 11).
        direction: ``"t||s"`` = KL(teacher || student) (A2 default) or ``"s||t"`` (Eq. 11
            as printed).
        mask_diag: drop the self-similarity j = i from each row (A1 "configurable").
        t2_scale: multiply by ``T^2`` (off, as in Eq. 11).

    Returns:
        0-dim float32 tensor. If B < 2 the relation is undefined: returns 0 (with a gradient
        path to the student) and warns once per process (``RuntimeWarning``).

    Raises:
        ValueError: bad ``T``/``direction``, level count or batch-size mismatch, bad rank.
    """
    _check_temperature("con", T)
    _check_choice("con", "direction", direction, _DIRECTIONS)
    pairs = _pair_levels("con", s_feats, t_feats)
    B = pairs[0][1].shape[0]
    if B < 2:
        _warn_once(
            "con_batch",
            f"con (L_Con, Eq. 11) needs batch size >= 2 (ideally >= 4), got {B}; "
            "returning 0. This warning is shown once.",
        )
        return _zero(*(s for _, s, _ in pairs))
    total = None
    for name, s, t in pairs:
        if s.shape[0] != B:
            raise ValueError(f"con: {name} has batch size {s.shape[0]}, level 0 has {B}")
        zs = F.normalize(_gap(s.float()), dim=1)
        zt = F.normalize(_gap(t.detach().float()), dim=1)
        sim_s = zs @ zs.t() / T  # [B, B]
        sim_t = zt @ zt.t() / T
        if mask_diag:
            keep = ~torch.eye(B, dtype=torch.bool, device=sim_s.device)
            sim_s = sim_s[keep].view(B, B - 1)
            sim_t = sim_t[keep].view(B, B - 1)
        log_ps = F.log_softmax(sim_s, dim=1)
        log_pt = F.log_softmax(sim_t, dim=1)
        if direction == "t||s":
            kl = _kl_log(log_pt, log_ps)
        else:
            kl = _kl_log(log_ps, log_pt)
        level = kl.sum(dim=1).mean()
        total = level if total is None else total + level
    loss = total / len(pairs)
    return loss * (T * T) if t2_scale else loss


def falgn(s_feats: Feats, t_feats: Feats, *, reduction: str = "mean") -> Tensor:
    """Feature alignment L_FAlgn, paper Eq. 12 with the reduction of decision A4.

    ``L_FAlgn = mean_l F.mse_loss(resize(fhat_l), f_l)``: the mean squared error over
    batch, channels and positions of each level, averaged over levels. If the spatial sizes
    differ, the student map is bilinearly resized (align_corners=False) to the teacher's
    (A3). Channel alignment (the 1x1 connector of A3) is the caller's job.

    Args:
        s_feats, t_feats: per-level [B, C, H, W] maps (or [B, C] vectors); list/tuple, mapping
            (paired by key) or one tensor.
        reduction: ``"mean"`` (A4 default, mean over levels) or ``"paper"`` (sum over levels,
            Alg. 1 line 48; each level still the element mean).

    Returns:
        0-dim float32 tensor.

    Raises:
        ValueError: channels differ at some level (message names the level index/key and
            both shapes), level count / batch / rank mismatch, bad ``reduction``.
    """
    _check_choice("falgn", "reduction", reduction, _REDUCTIONS)
    pairs = _pair_levels("falgn", s_feats, t_feats)
    total = None
    for name, s, t in pairs:
        _check_channels("falgn", name, s, t)
        s = s.float()
        if s.dim() == 4:
            s = _resize_to(s, t.shape[-2:])
        level = F.mse_loss(s, t.detach().float())
        total = level if total is None else total + level
    return total / len(pairs) if reduction == "mean" else total


def cos_sim(s_feats: Feats, t_feats: Feats, *, reduction: str = "mean") -> Tensor:
    """Cosine loss L_CosSim on pooled descriptors, paper Eq. 13 with decisions A4/A8.

    Per level: ``z = GAP(f)`` -> [B, C]; ``1 - <z_s, z_t> / (||z_s|| ||z_t||)`` per image;
    mean over images and levels. A zero descriptor has cosine 0 (loss 1), finite gradients.

    Args:
        s_feats, t_feats: per-level [B, C, H, W] maps or [B, C] vectors (channels must match;
            spatial sizes may differ since they are pooled).
        reduction: ``"mean"`` (A4) or ``"paper"`` (sum over levels, mean over images).

    Returns:
        0-dim float32 tensor in [0, 2] (x number of levels for ``"paper"``).

    Raises:
        ValueError: channel / level count / batch / rank mismatch, bad ``reduction``.
    """
    _check_choice("cos_sim", "reduction", reduction, _REDUCTIONS)
    pairs = _pair_levels("cos_sim", s_feats, t_feats)
    total = None
    for name, s, t in pairs:
        _check_channels("cos_sim", name, s, t)
        zs = F.normalize(_gap(s.float()), dim=1)
        zt = F.normalize(_gap(t.detach().float()), dim=1)
        level = (1.0 - (zs * zt).sum(dim=1)).mean()
        total = level if total is None else total + level
    return total / len(pairs) if reduction == "mean" else total


def att(s_feats: Feats, t_feats: Feats, eps: float = 1e-6) -> Tensor:
    """Attention transfer L_Att, paper Eqs. 19-21.

    Per level: spatial energy ``A = sum_c f_c^2`` -> [N, H, W]; the student energy map is
    bilinearly resized to the teacher's H x W if they differ (C31 proposal; resizing the
    1-channel energy map, after Eq. 19 and before normalising); flatten; L2-normalise
    (``A / max(||A||_2, eps)``, Eq. 20); ``||Ã_s - Ã_t||_2^2`` summed over positions; mean over
    the N images and the levels (Eq. 21: ``1/(N|L|) sum_i sum_l``). Channels may differ.

    Args:
        s_feats, t_feats: per-level [N, C, H, W] maps; list/tuple, mapping or one tensor.
        eps: lower bound of the L2 norm (an all-zero map normalises to 0, not NaN).

    Returns:
        0-dim float32 tensor in [0, 2].

    Raises:
        ValueError: non-4-D input, level count / batch mismatch.
    """
    pairs = _pair_levels("att", s_feats, t_feats)
    total = None
    for name, s, t in pairs:
        if s.dim() != 4:
            raise ValueError(f"att: {name} needs [N,C,H,W] maps, got {tuple(s.shape)}")
        a_s = s.float().pow(2).sum(dim=1, keepdim=True)  # Eq. 19, [N,1,H,W]
        a_t = t.detach().float().pow(2).sum(dim=1, keepdim=True)
        a_s = _resize_to(a_s, a_t.shape[-2:])
        a_s = F.normalize(a_s.flatten(1), dim=1, eps=eps)  # Eq. 20
        a_t = F.normalize(a_t.flatten(1), dim=1, eps=eps)
        level = (a_s - a_t).pow(2).sum(dim=1).mean()  # Eq. 21
        total = level if total is None else total + level
    return total / len(pairs)


# --------------------------------------------------------------------------------------------
# Head-level losses
# --------------------------------------------------------------------------------------------
def cls_kd(
    z_s: Tensor,
    z_t: Tensor,
    T: float = 2.0,
    kind: str = "softmax",
    *,
    direction: str = "t||s",
    t2_scale: bool = False,
) -> Tensor:
    """Head logit distillation L_ClsKD over corresponding regions/queries, paper Eq. 22.

    - ``kind="softmax"`` (Faster R-CNN ``cls_score``, K = num_classes + 1):
      ``(1/M) sum_j sum_k p_t[j,k] (log p_t[j,k] - log p_s[j,k])`` with
      ``p = softmax(z / T)`` over k: KL summed over classes, mean over the M regions, no T^2.
    - ``kind="binary"`` (sigmoid heads, e.g. RF-DETR; decision A10): per class a Bernoulli KL
      ``KL(Bern(sigma(z_t/T)) || Bern(sigma(z_s/T)))``, averaged over classes *and* regions.
      (A softmax over a single logit would be identically 0.)

    Region correspondence (M_i of Eq. 22, A10) is established by the caller.

    Args:
        z_s, z_t: logits [M, K] (any leading dims are flattened into M; [K] = one region).
        T: temperature (detection: 2.0 [paper]).
        kind: ``"softmax"`` or ``"binary"``.
        direction: ``"t||s"`` (A2 default, as printed in Eq. 22) or ``"s||t"``.
        t2_scale: multiply by ``T^2`` (off, as in Eq. 22).

    Returns:
        0-dim float32 tensor; 0 (with gradient path) when M = 0.

    Raises:
        ValueError: shape mismatch, bad ``T``/``kind``/``direction``.
    """
    _check_temperature("cls_kd", T)
    _check_choice("cls_kd", "kind", kind, ("softmax", "binary"))
    _check_choice("cls_kd", "direction", direction, _DIRECTIONS)
    z_s, z_t = _logits_2d("cls_kd", z_s, z_t)
    if z_s.numel() == 0:
        return _zero(z_s)
    if kind == "softmax":
        log_ps = F.log_softmax(z_s / T, dim=1)
        log_pt = F.log_softmax(z_t / T, dim=1)
        kl = _kl_log(log_pt, log_ps) if direction == "t||s" else _kl_log(log_ps, log_pt)
        loss = kl.sum(dim=1).mean()
    else:
        # log sigma(x) and log(1 - sigma(x)) = log sigma(-x), numerically stable
        ls_s, ls_t = F.logsigmoid(z_s / T), F.logsigmoid(z_t / T)
        lsn_s, lsn_t = F.logsigmoid(-z_s / T), F.logsigmoid(-z_t / T)
        if direction == "t||s":
            kl = _kl_log(ls_t, ls_s) + _kl_log(lsn_t, lsn_s)
        else:
            kl = _kl_log(ls_s, ls_t) + _kl_log(lsn_s, lsn_t)
        loss = kl.mean()
    return loss * (T * T) if t2_scale else loss


def roi_kd(h_s: Tensor, h_t: Tensor, *, reduction: str = "mean") -> Tensor:
    """Head feature distillation L_ROIKD (FitNets-style), paper Eq. 23 with decision A4.

    ``F.mse_loss(h_s, h_t)``: squared error averaged over the M regions and the D dimensions.
    ``reduction="paper"`` sums over D and averages over M (Eq. 23 as printed:
    ``(1/sum_i M_i) sum_ij ||h_s - h_t||_2^2``).

    Args:
        h_s, h_t: RoI embeddings (Faster R-CNN box_head output, 1024-d) or decoder query
            embeddings [M, D] (leading dims flattened into M).
        reduction: ``"mean"`` or ``"paper"``.

    Returns:
        0-dim float32 tensor; 0 (with gradient path) when M = 0.

    Raises:
        ValueError: shape mismatch, bad ``reduction``.
    """
    _check_choice("roi_kd", "reduction", reduction, _REDUCTIONS)
    h_s, h_t = _logits_2d("roi_kd", h_s, h_t)
    if h_s.numel() == 0:
        return _zero(h_s)
    if reduction == "mean":
        return F.mse_loss(h_s, h_t)
    return (h_s - h_t).pow(2).sum(dim=1).mean()


def kld(
    z_s: Tensor, z_t: Tensor, T: float = 2.0, *, direction: str = "t||s", t2_scale: bool = True
) -> Tensor:
    """Hinton logit distillation L_KLD, paper Eq. 15.

    ``L_KLD = (1/N) sum_i KL(softmax(z_t[i]/T) || softmax(z_s[i]/T)) * T^2`` — KL summed over
    classes, ``batchmean`` over the N rows, times ``T^2`` (Eq. 15; the ``T^2`` keeps gradient
    magnitudes independent of T).

    Args:
        z_s, z_t: logits [N, K] (leading dims flattened into N).
        T: temperature (classification: 2.0 [proposal C25]).
        direction: ``"t||s"`` (Eq. 15) or ``"s||t"``.
        t2_scale: multiply by ``T^2`` (on, as in Eq. 15).

    Returns:
        0-dim float32 tensor; 0 (with gradient path) when N = 0.

    Raises:
        ValueError: shape mismatch, bad ``T``/``direction``.
    """
    _check_temperature("kld", T)
    _check_choice("kld", "direction", direction, _DIRECTIONS)
    z_s, z_t = _logits_2d("kld", z_s, z_t)
    if z_s.numel() == 0:
        return _zero(z_s)
    log_ps = F.log_softmax(z_s / T, dim=1)
    log_pt = F.log_softmax(z_t / T, dim=1)
    kl = _kl_log(log_pt, log_ps) if direction == "t||s" else _kl_log(log_ps, log_pt)
    loss = kl.sum() / z_s.shape[0]
    return loss * (T * T) if t2_scale else loss
