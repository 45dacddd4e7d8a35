"""Our backbones inside detectron2: :class:`D2BackboneAdapter` and the registered
``build_fusion_backbone`` (the joint teacher's backbone, paper §3.2 / C12, in a detectron2
``GeneralizedRCNN``).
"""

from __future__ import annotations

from typing import Dict

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone as D2Backbone

from ..modeling.backbone.base import Backbone
from ..modeling.fusion.fusion_backbone import FusionBackbone, TeacherInput, _per_teacher
from ..utils.errors import ConfigError
from .teachers import build_teacher_backbone


class D2BackboneAdapter(D2Backbone):
    """Our :class:`~mdkd_det.modeling.backbone.Backbone` (maps already named ``p2``... e.g. a
    :class:`FusionBackbone` over :class:`~mdkd_det.d2.teachers.PyramidBackbone` teachers) as a
    ``detectron2.modeling.Backbone``.

    Args:
        body: our backbone; its ``output_shape()`` names the maps.

    Shapes:
        forward(x: Tensor[B, C, H, W]) -> dict[name, Tensor[B, C_l, H/s, W/s]].
        ``output_shape()`` -> ``{name: detectron2 ShapeSpec(channels, stride)}``.
        ``size_divisibility`` = the body's (the coarsest stride, px): detectron2 pads the
        batch to a multiple of it.

    Train/eval: ``train()`` recurses into the body, whose own ``train`` keeps frozen teachers
    in ``eval()`` (FusionBackbone, A20).
    """

    def __init__(self, body: Backbone) -> None:
        super().__init__()
        self.body = body
        shapes = body.output_shape()
        self._out_features = list(shapes)
        self._out_feature_channels = {k: int(v.channels) for k, v in shapes.items()}
        self._out_feature_strides = {k: int(v.stride) for k, v in shapes.items()}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return dict(self.body(x))

    @property
    def size_divisibility(self) -> int:
        return int(self.body.size_divisibility)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {k: ShapeSpec(channels=self._out_feature_channels[k],
                             stride=self._out_feature_strides[k]) for k in self._out_features}


@BACKBONE_REGISTRY.register()
def build_fusion_backbone(cfg, input_shape: ShapeSpec) -> D2BackboneAdapter:
    """detectron2 ``MODEL.BACKBONE.NAME: "build_fusion_backbone"``: a FusionBackbone over the
    frozen teachers of ``cfg.FUSION`` (keys added by :func:`~mdkd_det.d2.add_mdkd_config`).

    Per teacher i (target teacher first; one-entry lists are broadcast):
    ``FUSION.TEACHER_FORMATS[i]`` ("mdkd" | "d2"), ``FUSION.TEACHER_CONFIGS[i]``,
    ``FUSION.TEACHERS[i]`` (checkpoint; ``""`` = random, smoke tests only),
    ``FUSION.TEACHER_BACKBONES[i]`` (our registry name, "mdkd" only), and optionally
    ``FUSION.TEACHER_PIXEL_MEAN/STD`` ([0, 1] units; default: the teacher config's). The joint
    model's input is normalised with ``MODEL.PIXEL_MEAN/STD`` (0-255 units, detectron2); each
    teacher gets a :class:`TeacherInput` mapping it to its own normalisation.
    ``FUSION.OP`` / ``FUSION.OUT_CHANNELS``: fusion operator and its channels.

    Returns:
        :class:`D2BackboneAdapter` with maps ``p2``..``p6`` (for FPN teachers).

    Raises:
        ConfigError: no teachers, list lengths that cannot be broadcast, input channels other
            than the teachers'.
        CheckpointError: a teacher checkpoint is missing or does not match.
        ValueError: teachers with different strides.
    """
    f = cfg.FUSION
    n = max(len(f.TEACHERS), len(f.TEACHER_CONFIGS), len(f.TEACHER_BACKBONES))
    if n == 0:
        raise ConfigError("build_fusion_backbone: FUSION.TEACHERS, TEACHER_CONFIGS and "
                          "TEACHER_BACKBONES are empty; give one entry per teacher (target first)")
    fmts = _per_teacher(f.TEACHER_FORMATS, n, "FUSION.TEACHER_FORMATS", "mdkd")
    cfgs = _per_teacher(f.TEACHER_CONFIGS, n, "FUSION.TEACHER_CONFIGS", "")
    ckpts = _per_teacher(f.TEACHERS, n, "FUSION.TEACHERS", "")
    names = _per_teacher(f.TEACHER_BACKBONES, n, "FUSION.TEACHER_BACKBONES", "")
    means = _per_teacher(f.TEACHER_PIXEL_MEAN, n, "FUSION.TEACHER_PIXEL_MEAN", None)
    stds = _per_teacher(f.TEACHER_PIXEL_STD, n, "FUSION.TEACHER_PIXEL_STD", None)
    joint_mean = [v / 255.0 for v in cfg.MODEL.PIXEL_MEAN]
    joint_std = [v / 255.0 for v in cfg.MODEL.PIXEL_STD]
    if input_shape.channels is not None and input_shape.channels != len(joint_mean):
        raise ConfigError(f"build_fusion_backbone: input has {input_shape.channels} channels, "
                          f"MODEL.PIXEL_MEAN has {len(joint_mean)}")
    teachers, inputs = [], []
    for i in range(n):
        t, mean, std = build_teacher_backbone(fmts[i], cfgs[i], ckpts[i], names[i],
                                              trust=bool(cfg.MODEL.TRUST_CHECKPOINTS))
        teachers.append(t)
        inputs.append(TeacherInput(means[i] or mean, stds[i] or std, joint_mean, joint_std))
    fusion = FusionBackbone(teachers, fusion_op=f.OP, out_channels=int(f.OUT_CHANNELS),
                            teacher_inputs=inputs)
    return D2BackboneAdapter(fusion)
