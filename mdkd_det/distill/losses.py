"""Pure knowledge-distillation losses of MDKD (paper Eqs. 11-13, 15, 19-23) and of the related
papers 001 (GKD: DCGD Eqs. 5-8, MSAN Eqs. 2-4), 002 (KMM Eq. 6, LM Eq. 7, AAM Eqs. 1-4) and 004
(CMEDL contextual loss Eqs. 3-4; paper_notes.md Part 3).

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

__all__ = ["con", "falgn", "cos_sim", "att", "cls_kd", "roi_kd", "kld",
           "kmm", "dcgd", "msan", "contextual", "pixel_kl", "affinity"]

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


# --------------------------------------------------------------------------------------------
# Related papers (issue 15; paper_notes.md Part 3)
# --------------------------------------------------------------------------------------------
def kmm(s_feats: Feats, t_feats: Feats, *, normalize: bool = True, reduction: str = "mean") -> Tensor:
    """Kernel Matrix Module L_KM of paper 002 (Eqs. 5-6): batch Gram matrices, MSE + L1.

    Per level: ``z = GAP(f)`` -> [B, C] (L2-normalised rows if ``normalize``, D15.4: the paper
    does not say, and unit rows make the loss scale-free like L_Con); ``K = Z Z^T`` (B x B) for
    student and teacher (within one model, so C may differ); ``D = K_s - K_t`` and

    - ``reduction="mean"`` (A4): ``mean(D^2) + mean(|D|)`` over the B^2 entries;
    - ``reduction="paper"`` (Eq. 6 as printed): ``(1/B) sum D^2 + sum |D|``.

    Averaged over levels.

    Args:
        s_feats, t_feats: per-level [B, C, H, W] maps or [B, C] vectors; only B must agree.
        normalize: L2-normalise the pooled descriptors first.
        reduction: ``"mean"`` or ``"paper"``.

    Returns:
        0-dim float32 tensor; 0 (with gradient path, warned once) when B < 2.

    Raises:
        ValueError: level count / batch / rank mismatch, bad ``reduction``.
    """
    _check_choice("kmm", "reduction", reduction, _REDUCTIONS)
    pairs = _pair_levels("kmm", s_feats, t_feats)
    B = pairs[0][1].shape[0]
    if B < 2:
        _warn_once("kmm_batch", f"kmm (L_KM, paper 002 Eq. 6) needs batch size >= 2, got {B}; returning 0.")
        return _zero(*(s for _, s, _ in pairs))
    total = None
    for name, s, t in pairs:
        zs, zt = _gap(s.float()), _gap(t.detach().float())
        if normalize:
            zs, zt = F.normalize(zs, dim=1), F.normalize(zt, dim=1)
        d = zs @ zs.t() - zt @ zt.t()
        level = (d.pow(2).mean() + d.abs().mean() if reduction == "mean"
                 else d.pow(2).sum() / B + d.abs().sum())
        total = level if total is None else total + level
    return total / len(pairs)


def _check_views(fn: str, z_s: Tensor, z_t: Tensor) -> None:
    if z_s.dim() != 3 or z_s.shape[:2] != z_t.shape[:2] or z_s.shape[0] < 2:
        raise ValueError(f"{fn}: needs latents [V, B, D] with V >= 2 views (anchor first) and the "
                         f"same V, B for student and teacher, got {tuple(z_s.shape)} and {tuple(z_t.shape)}")


def dcgd(z_s: Tensor, z_t: Tensor, *, inter_weight: float = 1.0, eps: float = 1e-8) -> Tensor:
    """Dual Contrastive Graph Distillation of paper 001 (GKD), Eqs. 5-8, on per-image latents.

    View 0 is the anchor (the un-augmented image), views 1..V-1 photometric views. Latents are
    L2-normalised (D15.5). Per image and view, the node is the outer product
    ``N_v = z_v z_v^T`` [D, D]; an edge between views u, v is the cosine of their nodes,
    ``cos(vec N_u, vec N_v) = (z_u . z_v)^2`` for unit z (exact identity, used here). Then

    - Eq. 5 ``L_intra = |N^T - N^S|_1 + |E^T - E^S|_1``: nodes of every view (anchor included),
      edges anchor -> each view;
    - Eq. 6 ``L_inter(N) = KL(softmax(N^T) || softmax(N^S))`` row-wise over the views 1..V-1
      (softmax axis not given in 001: rows, KL summed over a row, mean over rows);
    - Eq. 7 ``L_inter(E) = |E^T - E^S|_1`` over the pairs of views 1..V-1 (0 when V < 3);
    - Eq. 8 ``L_inter = L_inter(N) + L_inter(E)``;

    every ``|.|_1`` a mean absolute difference (A4), all means over images and views.
    Returns ``L_intra + inter_weight * L_inter`` (001 Eq. 10 has alpha L_intra + beta L_inter,
    alpha = beta = 100: ``inter_weight`` = beta / alpha, the term weight = alpha).

    Args:
        z_s, z_t: student / teacher latents [V, B, D] (pooled features or MSAN latents); the
            teacher is detached.
        inter_weight: beta / alpha.
        eps: norm floor.

    Returns:
        0-dim float32 tensor.

    Raises:
        ValueError: shapes (fewer than 2 views, V/B mismatch).
    """
    _check_views("dcgd", z_s, z_t)
    zs = F.normalize(z_s.float(), dim=2, eps=eps)
    zt = F.normalize(z_t.detach().float(), dim=2, eps=eps)
    n_s = zs.unsqueeze(3) * zs.unsqueeze(2)  # [V, B, D, D]
    n_t = zt.unsqueeze(3) * zt.unsqueeze(2)
    e_s = (zs[:1] * zs[1:]).sum(dim=2).pow(2)  # [V-1, B] anchor -> view edges
    e_t = (zt[:1] * zt[1:]).sum(dim=2).pow(2)
    intra = (n_t - n_s).abs().mean() + (e_t - e_s).abs().mean()
    log_ps = F.log_softmax(n_s[1:], dim=-1)
    log_pt = F.log_softmax(n_t[1:], dim=-1)
    inter_n = _kl_log(log_pt, log_ps).sum(dim=-1).mean()
    v = zs.shape[0] - 1
    if v >= 2:
        iu = torch.triu_indices(v, v, offset=1, device=zs.device)
        g_s = torch.einsum("ubd,vbd->uvb", zs[1:], zs[1:]).pow(2)[iu[0], iu[1]]
        g_t = torch.einsum("ubd,vbd->uvb", zt[1:], zt[1:]).pow(2)[iu[0], iu[1]]
        inter_e = (g_t - g_s).abs().mean()
    else:
        inter_e = _zero(zs)
    return intra + float(inter_weight) * (inter_n + inter_e)


def msan(f: Tensor, f_hat: Tensor, z: Tensor, z_ref: Tensor, lam: float = 0.5) -> Tensor:
    """MSAN latent-alignment loss of paper 001, Eqs. 2-4:
    ``L_MSAN = L_rec + lam * L_regu``, ``L_rec = |F - Fhat|_1``, ``L_regu = |S^Y - S|_1``
    (mean absolute differences, A4; lam = 0.5 in 001).

    Args:
        f: [B, C, H, W] features the head encodes; ``f_hat``: its reconstruction (same shape).
        z: [B, D] latent of the head; ``z_ref``: [B, D] reference latent (001: the label SAE
            latent; here the teacher's normalised pooled descriptor, D15.6; detached).
        lam: lambda of Eq. 4.

    Returns:
        0-dim float32 tensor.

    Raises:
        ValueError: shape mismatch.
    """
    if f.shape != f_hat.shape or z.shape != z_ref.shape:
        raise ValueError(f"msan: F {tuple(f.shape)} vs Fhat {tuple(f_hat.shape)}, S {tuple(z.shape)} "
                         f"vs S_ref {tuple(z_ref.shape)} must match")
    rec = (f.float() - f_hat.float()).abs().mean()
    regu = (z_ref.detach().float() - z.float()).abs().mean()
    return rec + float(lam) * regu


def _positions(x: Tensor, n: int, generator=None) -> Tensor:
    """[B, C, H, W] -> [B, P, C] with P = min(n, H*W) positions drawn without replacement
    (``n <= 0`` or ``n >= H*W``: every position, in order)."""
    flat = x.flatten(2).transpose(1, 2)
    hw = flat.shape[1]
    if n <= 0 or n >= hw:
        return flat
    idx = torch.randperm(hw, generator=generator, device="cpu")[:n].to(x.device)
    return flat[:, idx]


def contextual(s_feats: Feats, t_feats: Feats, *, h: float = 0.5, positions: int = 256,
               eps: float = 1e-5, generator=None) -> Tensor:
    """Contextual loss of paper 004 (CMEDL), Eqs. 3-4 (Mechrez et al. 2018), on spatially
    unaligned feature maps.

    Per level and image: x_i = student feature vectors at P_s positions, y_j = teacher vectors at
    P_t positions (each at most ``positions``, drawn at random; sizes may differ, channels must
    match: connector A3). Centred by the teacher mean ``mu = mean_j y_j``, cosine distance
    ``d_ij = 1 - cos(x_i - mu, y_j - mu)``, ``dt_ij = d_ij / (min_k d_ik + eps)``,
    ``w_ij = exp((1 - dt_ij) / h)``, ``CX_ij = w_ij / sum_k w_ik``;
    ``CX = (1/P_t) sum_j max_i CX_ij`` (Eq. 3) and ``L_cx = -log CX`` (Eq. 4); mean over images
    and levels.

    Args:
        s_feats, t_feats: per-level [B, C, H, W] maps (list, mapping or one tensor).
        h: bandwidth (> 0; 0.5, D15.8).
        positions: positions sampled per map (<= 0 = all).
        eps: as in the formula.
        generator: optional ``torch.Generator`` for the position draw (CPU).

    Returns:
        0-dim float32 tensor >= 0.

    Raises:
        ValueError: channels / levels / batch mismatch, non-4-D maps, ``h`` <= 0.
    """
    if not h > 0:
        raise ValueError(f"contextual: bandwidth h must be > 0, got {h!r}")
    pairs = _pair_levels("contextual", s_feats, t_feats)
    total = None
    for name, s, t in pairs:
        if s.dim() != 4:
            raise ValueError(f"contextual: {name} needs [B,C,H,W] maps, got {tuple(s.shape)}")
        _check_channels("contextual", name, s, t)
        x = _positions(s.float(), positions, generator)
        y = _positions(t.detach().float(), positions, generator)
        mu = y.mean(dim=1, keepdim=True)
        xn, yn = F.normalize(x - mu, dim=2), F.normalize(y - mu, dim=2)
        d = 1.0 - xn @ yn.transpose(1, 2)  # [B, P_s, P_t]
        dt = d / (d.min(dim=2, keepdim=True).values + eps)
        cx = F.softmax((1.0 - dt) / h, dim=2)  # = w_ij / sum_k w_ik
        level = -torch.log(cx.max(dim=1).values.mean(dim=1)).mean()
        total = level if total is None else total + level
    return total / len(pairs)


def _pixel_log_probs(z: Tensor, T: float) -> Tensor:
    """[B, K, H, W] logits -> [B, K', H, W] log-probabilities: softmax over K, or for K = 1 the
    Bernoulli pair (log sigma, log(1 - sigma)) (K' = 2)."""
    z = z.float() / T
    if z.shape[1] == 1:
        return torch.cat([F.logsigmoid(-z), F.logsigmoid(z)], dim=1)
    return F.log_softmax(z, dim=1)


def pixel_kl(z_s: Tensor, z_t: Tensor, T: float = 1.0, *, direction: str = "s||t") -> Tensor:
    """Pixel-wise logit KD L_Logits of paper 002 (LM), Eq. 7:
    ``(1/N) sum_i KL(p_i^s || p_i^t)`` over the N pixels of the batch (KL summed over classes),
    student||teacher as printed, T = 1 (no temperature in 002). One-channel (sigmoid) heads use
    the Bernoulli pair (background, foreground). The student map is bilinearly resized to the
    teacher's size when they differ.

    Args:
        z_s, z_t: pixel logits [B, K, H, W] (K = 1: binary).
        T: temperature (> 0).
        direction: ``"s||t"`` (Eq. 7) or ``"t||s"``.

    Returns:
        0-dim float32 tensor.

    Raises:
        ValueError: rank / batch / class-count mismatch, bad ``T`` / ``direction``.
    """
    _check_temperature("pixel_kl", T)
    _check_choice("pixel_kl", "direction", direction, _DIRECTIONS)
    if z_s.dim() != 4 or z_t.dim() != 4 or z_s.shape[:2] != z_t.shape[:2]:
        raise ValueError(f"pixel_kl: needs [B,K,H,W] logits with equal B, K, got {tuple(z_s.shape)} "
                         f"and {tuple(z_t.shape)}")
    log_ps = _pixel_log_probs(_resize_to(z_s.float(), z_t.shape[-2:]), T)
    log_pt = _pixel_log_probs(z_t.detach(), T)
    kl = _kl_log(log_ps, log_pt) if direction == "s||t" else _kl_log(log_pt, log_ps)
    return kl.sum(dim=1).mean()


_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def affinity(z_s: Tensor, z_t: Tensor, *, margin: float = 3.0, dilation: int = 1) -> Tensor:
    """Adaptive Affinity loss of paper 002 (AAM), Eqs. 1-4 (after Ke et al. 2018, AAF).

    Pairs (i, j) = every pixel i and each of its 8 neighbours j at ``dilation`` (inside the map).
    The teacher's label map (argmax of softmax; sigmoid > 0.5 for one channel) splits them into
    P+ (same label) and P- (different). With ``W_ij = KL(F_i || F_j)`` between the student's
    class-probability vectors at i and j (Eq. 3):
    ``L_AA = mean_{P+} W_ij + mean_{P-} max(0, m - W_ij)`` (Eqs. 1, 2, 4); an empty set
    contributes 0. The margin and the neighbourhood are not given in 002 (D15.7: AAF's 8
    neighbours, m = 3).

    Args:
        z_s, z_t: pixel logits [B, K, H, W] (K = 1: binary); the student is resized to the
            teacher's size when they differ.
        margin: m of Eq. 2.
        dilation: neighbour distance in pixels (>= 1).

    Returns:
        0-dim float32 tensor.

    Raises:
        ValueError: rank / batch / class-count mismatch, ``dilation`` < 1.
    """
    if z_s.dim() != 4 or z_t.dim() != 4 or z_s.shape[:2] != z_t.shape[:2]:
        raise ValueError(f"affinity: needs [B,K,H,W] logits with equal B, K, got {tuple(z_s.shape)} "
                         f"and {tuple(z_t.shape)}")
    if int(dilation) < 1:
        raise ValueError(f"affinity: dilation must be >= 1, got {dilation}")
    log_p = _pixel_log_probs(_resize_to(z_s.float(), z_t.shape[-2:]), 1.0)  # [B, K', H, W]
    zt = z_t.detach()
    label = (zt[:, 0] > 0).long() if zt.shape[1] == 1 else zt.argmax(dim=1)  # [B, H, W]
    H, W = label.shape[-2:]
    pos_sum = neg_sum = _zero(log_p)
    n_pos = n_neg = 0
    k = int(dilation)
    for dy, dx in _NEIGHBOURS:
        dy, dx = dy * k, dx * k
        ys, yn = slice(max(0, -dy), H - max(0, dy)), slice(max(0, dy), H - max(0, -dy))
        xs, xn = slice(max(0, -dx), W - max(0, dx)), slice(max(0, dx), W - max(0, -dx))
        li, lj = log_p[:, :, ys, xs], log_p[:, :, yn, xn]
        if li.numel() == 0:
            continue
        w = _kl_log(li, lj).sum(dim=1)  # KL(F_i || F_j), [B, h, w]
        same = label[:, ys, xs] == label[:, yn, xn]
        pos_sum = pos_sum + w[same].sum()
        neg_sum = neg_sum + (margin - w[~same]).clamp(min=0).sum()
        n_pos += int(same.sum())
        n_neg += int((~same).sum())
    return pos_sum / max(n_pos, 1) + neg_sum / max(n_neg, 1)
