"""Frozen teachers for the detectron2 ``FusionBackbone``: both sides of the backbone interface.

A teacher is either

- ``"mdkd"``: one of our torchvision-style backbones (:mod:`mdkd_det.modeling.backbone`),
  loaded from one of our detector checkpoints (e.g. a Stage-1 ``model_final.pth``), or
- ``"d2"``: a detectron2 backbone (``detectron2.modeling.build_backbone``) loaded from a
  detectron2 ``.pth`` checkpoint (``{"model": state_dict}``, what ``DetectionCheckpointer``
  writes).

Both are wrapped in :class:`PyramidBackbone`, our :class:`~mdkd_det.modeling.backbone.Backbone`
contract with maps named by stride as detectron2's FPN names them (``p2`` = stride 4 px ...
``p6`` = stride 64 px), so teachers of either kind share one key set and one
``FusionBackbone`` fuses them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence, Tuple

import torch
from torch import nn

from ..config import get_cfg as get_mdkd_cfg
from ..modeling.backbone.base import Backbone
from ..modeling.backbone.build import build_backbone as build_mdkd_backbone
from ..modeling.fusion.fusion_backbone import load_teacher_backbone
from ..modeling.shape_spec import level_name  # noqa: F401 (also the old public name here)
from ..utils.errors import ConfigError

TEACHER_FORMATS = ("mdkd", "d2")


class PyramidBackbone(Backbone):
    """Any multi-level backbone (ours or detectron2's) as our :class:`Backbone`, maps renamed
    ``p{log2 stride}``.

    Args:
        body: module with ``output_shape() -> {name: ShapeSpec}`` (ours or detectron2's; both
            have ``channels`` and ``stride``) and ``forward(x) -> dict[name, Tensor]``.

    Shapes:
        forward(x: Tensor[B, C, H, W]) -> OrderedDict[p-name, Tensor[B, C_l, H/s, W/s]], in
        ``body.output_shape()`` order.

    Raises:
        ValueError: a stride is not a power of two, or two maps share a stride.
    """

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.names = OrderedDict()
        for name, spec in body.output_shape().items():
            new = level_name(spec.stride)
            if new in self.names.values():
                raise ValueError(f"{type(body).__name__}: two maps have stride {spec.stride} px")
            self.names[name] = new
            self._out_feature_channels[new] = int(spec.channels)
            self._out_feature_strides[new] = int(spec.stride)
        self.out_channels = max(self._out_feature_channels.values())

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return OrderedDict((new, feats[old]) for old, new in self.names.items())


def build_teacher_backbone(fmt: str, config_file: str, weights: str, backbone_name: str = "",
                           trust: bool = False) -> Tuple[PyramidBackbone, Sequence[float], Sequence[float]]:
    """Build one teacher backbone and load it strictly from its detector checkpoint.

    Args:
        fmt: ``"mdkd"`` or ``"d2"`` (see the module docstring).
        config_file: the teacher's config (ours for ``"mdkd"``, optional; detectron2's for
            ``"d2"``, required).
        weights: detector checkpoint; ``""`` = random weights (smoke tests only).
        backbone_name: our registry name (``"mdkd"`` only; default the config's
            ``MODEL.BACKBONE.NAME``).
        trust: ``MODEL.TRUST_CHECKPOINTS`` (load arbitrary pickles; off by default).

    Returns:
        ``(PyramidBackbone, pixel_mean, pixel_std)``; mean/std in units of [0, 1] pixels (the
        teacher's training normalisation; detectron2's 0-255 values are divided by 255).

    Raises:
        ConfigError: unknown format, or ``"d2"`` without a config file.
        CheckpointError: unreadable or mismatching checkpoint (names file and keys).
    """
    if fmt == "mdkd":
        tcfg = get_mdkd_cfg()
        if config_file:
            tcfg.merge_from_file(config_file)
        tcfg.MODEL.BACKBONE.PRETRAINED = False  # weights come from the checkpoint
        body = build_mdkd_backbone(tcfg, backbone_name or tcfg.MODEL.BACKBONE.NAME)
        mean, std = list(tcfg.MODEL.PIXEL_MEAN), list(tcfg.MODEL.PIXEL_STD)
    elif fmt == "d2":
        from detectron2.config import get_cfg
        from detectron2.modeling import build_backbone

        from .config import add_mdkd_config, merge_d2_file

        if not config_file:
            raise ConfigError("FUSION.TEACHER_CONFIGS: a 'd2' teacher needs its detectron2 config file")
        tcfg = add_mdkd_config(get_cfg())
        tcfg.set_new_allowed(True)  # a teacher's own project keys must not fail its loading
        merge_d2_file(tcfg, config_file)
        body = build_backbone(tcfg)
        mean = [v / 255.0 for v in tcfg.MODEL.PIXEL_MEAN]
        std = [v / 255.0 for v in tcfg.MODEL.PIXEL_STD]
    else:
        raise ConfigError(f"FUSION.TEACHER_FORMATS entry '{fmt}' must be one of {TEACHER_FORMATS}")
    if weights:
        load_teacher_backbone(body.cpu(), weights, trust=trust)  # keys "backbone.*" in both layouts
    return PyramidBackbone(body), mean, std
