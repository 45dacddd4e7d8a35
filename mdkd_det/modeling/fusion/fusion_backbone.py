"""``FusionBackbone``: the Stage-2 joint teacher's backbone (paper §3.2; paper_notes C8, C11,
C12, A20).

N frozen teacher backbones (target teacher first, then the source teachers) see the same
batch; their maps are fused level by level by one operator from ``FUSION_REGISTRY`` per level.
The result has the teachers' keys and strides and ``out_channels`` channels, so it drops into
any detector that fits a teacher (torchvision ``FasterRCNN(FusionBackbone(...), num_classes)``
builds new RPN and RoI heads on it, as C12 says).

Frozen means (A20): :func:`~mdkd_det.modeling.frozen_teacher.freeze_teacher` (``requires_grad=False``,
always ``eval()`` whatever ``train()`` says, so BatchNorm statistics never change) and run
without autograd. How they run is a
:class:`~mdkd_det.modeling.frozen_teacher.TeacherRuntime` (``FROZEN_TEACHER.*``: BatchNorm
folded, channels_last, ``inference_mode``, bf16): the teachers' outputs are released as fp32,
non-inference tensors, because the trainable fusion ops save their inputs for backward
(inference tensors cannot be saved, torch 2.14). BatchNorm folding works on a private copy of
the teachers (built on first use, dropped on ``load_state_dict``/``.to()``), so the state dict
keeps the teachers' original layers and checkpoints do not depend on the switch.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import OrderedDict
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

import torch
from torch import nn

from ...utils.checkpoint_io import load_model_state
from ...utils.errors import CheckpointError, ConfigError
from ..backbone.base import Backbone
from ..frozen_teacher import TeacherRuntime, freeze_teacher, has_foldable_batchnorm
from ..registry import BACKBONE_REGISTRY
from ..shape_spec import match_levels_by_stride
from .ops import build_fusion_op

logger = logging.getLogger(__name__)


class TeacherInput(nn.Module):
    """Re-normalises the joint detector's input batch for one teacher.

    The batch arrives normalised with the joint model's ``input_mean``/``input_std`` (what its
    ``GeneralizedRCNNTransform`` produced from [0, 1] pixels). The teacher was trained on
    ``(x01 - mean) / std``, so

        x01 = x * input_std + input_mean;   x_t = (x01 - mean) / std
            = x * (input_std / std) + (input_mean - mean) / std

    computed as one affine map per channel; identity (no op) when both pairs are equal.

    Args:
        mean, std: the teacher's per-channel mean/std (units of [0, 1] pixels), length C.
        input_mean, input_std: the joint model's; ``None`` = same as the teacher's.

    Shapes:
        forward(x: Tensor[B, C, H, W]) -> Tensor[B, C, H, W].

    Raises:
        ValueError: lengths differ, or a std is not positive.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float],
                 input_mean: Optional[Sequence[float]] = None,
                 input_std: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        input_mean = mean if input_mean is None else input_mean
        input_std = std if input_std is None else input_std
        vals = [list(map(float, v)) for v in (mean, std, input_mean, input_std)]
        if len({len(v) for v in vals}) != 1:
            raise ValueError(f"TeacherInput: mean/std/input_mean/input_std lengths differ: {vals}")
        if any(s <= 0 for s in vals[1] + vals[3]):
            raise ValueError(f"TeacherInput: std values must be positive, got {vals[1]}, {vals[3]}")
        mean_t, std_t, in_mean, in_std = (torch.tensor(v).view(1, -1, 1, 1) for v in vals)
        self.identity = bool(torch.equal(mean_t, in_mean) and torch.equal(std_t, in_std))
        # Non-persistent: the normalisation comes from config, not from checkpoints.
        self.register_buffer("scale", in_std / std_t, persistent=False)
        self.register_buffer("shift", (in_mean - mean_t) / std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        if x.shape[1] != self.scale.shape[1]:
            raise ValueError(f"TeacherInput: input has {x.shape[1]} channels, normalisation "
                             f"has {self.scale.shape[1]}")
        return x * self.scale + self.shift

    def extra_repr(self) -> str:
        return "identity" if self.identity else f"scale={self.scale.flatten().tolist()}, " \
                                                 f"shift={self.shift.flatten().tolist()}"


class FusionBackbone(Backbone):
    """Frozen teacher backbones + one trainable fusion operator per level (paper C12).

    Args:
        teachers: N backbones (each following the :class:`Backbone` contract), target teacher
            first. They are frozen in place (:func:`~mdkd_det.modeling.frozen_teacher.freeze_teacher`).
        fusion_op: name in ``FUSION_REGISTRY`` ("concat1x1" = paper; "cross_attention" = A5).
        out_channels: channels of every fused map (paper: fixed number; 256).
        teacher_inputs: one :class:`TeacherInput` (or None = identity) per teacher.
        fusion_kwargs: extra keyword arguments for every fusion operator.
        level_match: ``"keys"`` (every teacher has teacher 0's keys and strides) or
            ``"stride"``: for each level of teacher 0, teacher k contributes its map with the
            nearest stride (log2 distance; ties -> the finer map), resized to teacher 0's H, W
            by the fusion op. This is how a segmentation joint teacher fuses cross-task CT
            detection backbones (FPN strides 4..64) with seg encoders (strides 1..16).
        levels: teacher-0 levels to fuse (default all); e.g. only the last-stage map for the
            classification joint teacher (A6).
        runtime: how the frozen teachers are prepared and run (default: plain ``no_grad``).

    ``out_channels = 0`` keeps teacher 0's channels at every level (seg fusion, A5: "the output
    keeps the teacher's C_l"); ``self.out_channels`` is then the deepest level's.

    Shapes:
        forward(x: Tensor[B, C, H, W]) -> OrderedDict[name, Tensor[B, C_name, H/s, W/s]]
        with the first teacher's names and strides s (px). An operator with ``output_names``
        (e.g. "fa_blocks") returns several maps per level; they become levels named
        ``output_names`` (prefixed ``"<level>_"`` when more than one level is fused).

    Raises:
        ValueError: no teachers; with ``level_match="keys"`` a teacher's keys or strides differ
            from teacher 0's (the message names the teacher index and both key/stride sets);
            wrong number of ``teacher_inputs``; unknown ``level_match``; a ``levels`` name that
            is not a teacher level.
        RegistryError: unknown ``fusion_op``.
    """

    def __init__(self, teachers: Sequence[nn.Module], fusion_op: str = "concat1x1",
                 out_channels: int = 256,
                 teacher_inputs: Optional[Sequence[Optional[TeacherInput]]] = None,
                 fusion_kwargs: Optional[dict] = None, level_match: str = "keys",
                 levels: Optional[Sequence[str]] = None,
                 runtime: Optional[TeacherRuntime] = None) -> None:
        super().__init__()
        self.runtime = runtime or TeacherRuntime()
        self._prepared: List[nn.ModuleList] = []  # a list keeps the prepared copy out of the tree
        self.register_load_state_dict_post_hook(_drop_prepared)
        if level_match not in LEVEL_MATCH_MODES:
            raise ValueError(f"FusionBackbone: level_match must be one of {LEVEL_MATCH_MODES}, got {level_match!r}")
        teachers = list(teachers)
        if not teachers:
            raise ValueError("FusionBackbone needs at least one teacher backbone")
        if teacher_inputs is None:
            teacher_inputs = [None] * len(teachers)
        if len(teacher_inputs) != len(teachers):
            raise ValueError(f"FusionBackbone: {len(teacher_inputs)} teacher_inputs for "
                             f"{len(teachers)} teachers")
        shapes = [t.output_shape() for t in teachers]
        ref = shapes[0]
        self.level_maps = [match_levels_by_stride(ref, s, nearest=True) if level_match == "stride"
                           else {k: k for k in ref} for s in shapes]
        for i, s in enumerate(shapes[1:] if level_match == "keys" else [], start=1):
            if list(s) != list(ref):
                raise ValueError(f"FusionBackbone: teacher {i} has output keys {list(s)}, "
                                 f"teacher 0 has {list(ref)}; teachers must share key sets")
            strides = {k: v.stride for k, v in s.items()}
            ref_strides = {k: v.stride for k, v in ref.items()}
            if strides != ref_strides:
                raise ValueError(f"FusionBackbone: teacher {i} has strides {strides} (px), "
                                 f"teacher 0 has {ref_strides}; teachers must share strides")
        self.teachers = nn.ModuleList(teachers)
        self.teacher_inputs = nn.ModuleList(
            ti if ti is not None else nn.Identity() for ti in teacher_inputs
        )
        freeze_teacher(self.teachers)
        self.fusion_op_name = fusion_op
        levels = list(ref) if not levels else [str(lv) for lv in levels]
        bad = [lv for lv in levels if lv not in ref]
        if bad:
            raise ValueError(f"FusionBackbone: levels {bad} are not teacher levels {list(ref)}")
        self.fusion = nn.ModuleDict()
        self._out_names: Dict[str, List[str]] = {}
        for name in levels:
            in_ch = [s[m[name]].channels for s, m in zip(shapes, self.level_maps)]
            out_ch = int(out_channels) or int(ref[name].channels)
            op = build_fusion_op(fusion_op, in_ch, out_ch, **(fusion_kwargs or {}))
            self.fusion[name] = op
            names = getattr(op, "output_names", None)
            outs = [name] if names is None else [n if len(levels) == 1 else f"{name}_{n}" for n in names]
            self._out_names[name] = outs
            for out in outs:
                self._out_feature_channels[out] = out_ch
                self._out_feature_strides[out] = int(ref[name].stride)
        self.out_channels = int(out_channels) or self._out_feature_channels[self._out_names[levels[-1]][-1]]

    @property
    def num_teachers(self) -> int:
        """N, the number of teacher backbones (m + 1)."""
        return len(self.teachers)

    def fusion_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the fusion operators only (the trainable part of this backbone)."""
        return self.fusion.parameters()

    def _apply(self, fn, *args, **kwargs):
        self._prepared.clear()  # .to() / .float() ...: re-prepare from the moved teachers
        return super()._apply(fn, *args, **kwargs)

    def set_runtime(self, runtime: TeacherRuntime) -> None:
        """Run the teachers with ``runtime`` from now on (re-prepared on next use)."""
        self.runtime = runtime
        self._prepared.clear()

    def prepared_teachers(self) -> nn.ModuleList:
        """The teachers as :attr:`runtime` runs them: ``self.teachers`` itself, or a private
        BatchNorm-folded copy when there is BatchNorm to fold, each behind a disk cache of its
        maps when ``runtime.cache_dir`` is set (built once, kept)."""
        if not self._prepared:
            teachers = self.teachers
            # nothing to fold (e.g. a KD teacher folded in place): no copy
            if self.runtime.fold_bn and has_foldable_batchnorm(teachers):
                teachers = copy.deepcopy(teachers)
            teachers = self.runtime.prepare(teachers)
            if self.runtime.cache_dir:  # FROZEN_TEACHER.CACHE_DIR: each teacher's maps on disk
                teachers = nn.ModuleList(self.runtime.cached(t) for t in teachers)
            self._prepared.append(teachers)
        return self._prepared[0]

    def teacher_features(self, x: torch.Tensor) -> List["OrderedDict[str, torch.Tensor]"]:
        """Each teacher's maps for batch ``x`` (joint normalisation), without autograd, as
        fp32 tensors that trainable ops may save for backward (:attr:`runtime`).

        Shapes: ``x: Tensor[B, C, H, W]`` -> N x OrderedDict[name, Tensor[B, C_k, H/s, W/s]].
        """
        rt = self.runtime
        teachers = self.prepared_teachers()
        with rt.context():
            feats = [t(rt.input(norm(x))) for t, norm in zip(teachers, self.teacher_inputs)]
        return rt.release(feats)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.forward_levels(x, None)

    def forward_levels(self, x: torch.Tensor, names=None) -> "OrderedDict[str, torch.Tensor]":
        """Fused maps of the output levels ``names`` only (None = all): a detector that reads a
        subset of the levels, e.g. the RF-DETR decoder, skips the other fusion ops."""
        feats = self.teacher_features(x)
        out = OrderedDict()
        for name, op in self.fusion.items():
            if names is not None and not set(self._out_names[name]) & set(names):
                continue  # no requested level comes from this op
            fused = op([f[m[name]] for f, m in zip(feats, self.level_maps)])
            if isinstance(fused, torch.Tensor):
                fused = [fused]
            out.update(zip(self._out_names[name], fused))
        return out if names is None else OrderedDict((n, out[n]) for n in names)


LEVEL_MATCH_MODES = ("keys", "stride")


def _drop_prepared(module: FusionBackbone, _incompatible_keys) -> None:
    """``load_state_dict`` post-hook: new teacher weights -> re-prepare on next use."""
    module._prepared.clear()


def match_levels_nearest_stride(ref: Mapping, other: Mapping) -> Dict[str, str]:
    """Deprecated alias (one release) of
    :func:`~mdkd_det.modeling.shape_spec.match_levels_by_stride` ``(ref, other, nearest=True)``."""
    warnings.warn("match_levels_nearest_stride is deprecated; use mdkd_det.modeling.shape_spec."
                  "match_levels_by_stride(ref, other, nearest=True)", DeprecationWarning, stacklevel=2)
    return match_levels_by_stride(ref, other, nearest=True)


def _fmt(keys: Sequence[str], n: int = 10) -> str:
    keys = sorted(keys)
    return str(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_teacher_backbone(backbone: nn.Module, ckpt_path: str, prefix: str = "backbone.",
                          trust: bool = False) -> nn.Module:
    """Load a teacher's backbone weights from a full-detector checkpoint, strictly.

    The checkpoint is ``{"model": state_dict}`` (the layout of
    :mod:`mdkd_det.engine.checkpointer`; ``{"state_dict": ...}`` or a bare state dict are also
    accepted) of a whole detector,
    e.g. torchvision ``FasterRCNN(<our Backbone>, ...)``, whose backbone keys read
    ``backbone.body.body.layer1...`` (ResNet) and ``backbone.body.fpn...`` (FPN): our
    :class:`WrappedBackbone` holds torchvision's ``BackboneWithFPN`` as ``.body``. Keys starting
    with ``prefix`` are kept with the prefix stripped; all other keys (RPN, RoI heads,
    discriminators) are ignored.

    Args:
        backbone: freshly built backbone of the teacher's architecture.
        ckpt_path: checkpoint file.
        prefix: key prefix of the backbone inside the detector state dict.
        trust: ``MODEL.TRUST_CHECKPOINTS`` (load arbitrary pickles; off by default).

    Returns:
        ``backbone`` with the weights loaded.

    Raises:
        CheckpointError: missing/unreadable file, no key with ``prefix``, or a mismatch; the
            message names the file and the missing, unexpected and shape-mismatched keys.
    """
    sd = load_model_state(ckpt_path, trust, what="teacher checkpoint")
    sub = OrderedDict((k[len(prefix):], v) for k, v in sd.items() if k.startswith(prefix))
    if not sub:
        raise CheckpointError(f"teacher checkpoint '{ckpt_path}' has no keys starting with "
                              f"'{prefix}' (first keys: {_fmt(list(sd), 5)})")
    own = backbone.state_dict()
    shape = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in sub.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if shape:
        raise CheckpointError(f"teacher checkpoint '{ckpt_path}' does not match the backbone: "
                              f"shape mismatch {_fmt(shape)}")
    # strict=False so module hooks (e.g. FrozenBatchNorm2d dropping num_batches_tracked) run;
    # strictness is enforced on the returned key lists.
    result = backbone.load_state_dict(sub, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {_fmt(result.missing_keys)}")
        if result.unexpected_keys:
            parts.append(f"unexpected {_fmt([prefix + k for k in result.unexpected_keys])}")
        raise CheckpointError(f"teacher checkpoint '{ckpt_path}' does not match the backbone "
                              f"(keys after stripping '{prefix}'): " + "; ".join(parts))
    return backbone


def _per_teacher(values, n: int, key: str, default):
    """Broadcast a config list to N teachers: [] -> default, [v] -> N copies, N values kept.

    A flat list of numbers counts as one value (so ``TEACHER_PIXEL_MEAN [0.5, 0.5, 0.5]`` is
    shared by all teachers).
    """
    values = list(values)
    if values and all(isinstance(v, (int, float)) for v in values):
        values = [values]  # one flat list (e.g. a mean) shared by every teacher
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ConfigError(f"{key} has {len(values)} entries for {n} teachers (give 0, 1 or {n})")
    return values


@BACKBONE_REGISTRY.register("fusion")
def build_fusion_backbone(cfg) -> FusionBackbone:
    """Build the joint teacher's :class:`FusionBackbone` from ``cfg.FUSION`` (C12).

    Keys (read with defaults, so they may be absent): ``FUSION.OP`` ("concat1x1"),
    ``FUSION.OUT_CHANNELS`` (256), ``FUSION.TEACHERS`` (checkpoint paths, target teacher first;
    ``[]`` or an entry ``""`` = random teacher, for smoke tests only, with a warning),
    ``FUSION.TEACHER_BACKBONES`` (registry names; 1 entry is broadcast), ``FUSION.
    TEACHER_PIXEL_MEAN`` / ``TEACHER_PIXEL_STD`` (lists of per-teacher lists; ``[]`` = the
    joint model's ``MODEL.PIXEL_MEAN``/``STD``). Teachers are built with the rest of ``cfg``
    (``MODEL.BACKBONE.NORM``, ``MODEL.FPN.OUT_CHANNELS``, ``INPUT.CHANNELS``) and
    ``MODEL.BACKBONE.PRETRAINED=False`` (weights come from the checkpoints). ``FUSION.LEVELS``
    (``[]`` = all) selects the fused levels; an operator with a ``config_kwargs(cfg)``
    classmethod takes its options from config (``"fa_blocks"``: ``FUSION.FA_BLOCKS`` ...).

    Raises:
        ConfigError: no teacher backbones, inconsistent list lengths, or "fusion" as a teacher.
        CheckpointError: from :func:`load_teacher_backbone`.
        ValueError: teachers with different keys/strides.
    """
    from ..backbone.build import build_backbone

    fcfg = getattr(cfg, "FUSION", None)
    get = (lambda k, d: getattr(fcfg, k, d)) if fcfg is not None else (lambda k, d: d)
    ckpts = list(get("TEACHERS", []))
    names = list(get("TEACHER_BACKBONES", []))
    n = max(len(ckpts), len(names))
    if not names:
        raise ConfigError("FUSION.TEACHER_BACKBONES is empty: give the registry name of each "
                          "teacher backbone (target teacher first)")
    names = _per_teacher(names, n, "FUSION.TEACHER_BACKBONES", None)
    ckpts = _per_teacher(ckpts, n, "FUSION.TEACHERS", "") if ckpts else [""] * n
    extra, extra_names = list(get("EXTRA_TEACHERS", [])), list(get("EXTRA_TEACHER_BACKBONES", []))
    if extra:
        ckpts += extra
        names += _per_teacher(extra_names, len(extra), "FUSION.EXTRA_TEACHER_BACKBONES", None)
        if None in names:
            raise ConfigError("FUSION.EXTRA_TEACHERS needs FUSION.EXTRA_TEACHER_BACKBONES (registry names)")
        n = len(ckpts)
    if "fusion" in names:
        raise ConfigError("FUSION.TEACHER_BACKBONES must not contain 'fusion'")
    means = _per_teacher(get("TEACHER_PIXEL_MEAN", []), n, "FUSION.TEACHER_PIXEL_MEAN",
                         list(cfg.MODEL.PIXEL_MEAN))
    stds = _per_teacher(get("TEACHER_PIXEL_STD", []), n, "FUSION.TEACHER_PIXEL_STD",
                        list(cfg.MODEL.PIXEL_STD))
    tcfg = cfg.clone()
    tcfg.defrost()
    tcfg.MODEL.BACKBONE.PRETRAINED = False
    teachers, inputs = [], []
    for i, (name, ckpt) in enumerate(zip(names, ckpts)):
        t = build_backbone(tcfg, name)
        if ckpt:
            load_teacher_backbone(t, ckpt, trust=bool(cfg.MODEL.TRUST_CHECKPOINTS))
        else:
            logger.warning("FUSION teacher %d (%s) has no checkpoint: random weights", i, name)
        teachers.append(t)
        inputs.append(TeacherInput(means[i], stds[i], cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD))
    from .ops import FUSION_REGISTRY

    op_name = get("OP", "concat1x1")
    op_cls = FUSION_REGISTRY.get(op_name)
    # operator options from config, when the operator declares them (e.g. "fa_blocks")
    kwargs = op_cls.config_kwargs(cfg) if hasattr(op_cls, "config_kwargs") else None
    return FusionBackbone(teachers, fusion_op=op_name, out_channels=int(get("OUT_CHANNELS", 256)),
                          teacher_inputs=inputs, fusion_kwargs=kwargs,
                          level_match=str(get("LEVEL_MATCH", "keys")), levels=list(get("LEVELS", ())),
                          runtime=TeacherRuntime.from_config(cfg))
