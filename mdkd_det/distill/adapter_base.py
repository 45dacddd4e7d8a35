"""The KD-adapter contract's shared parts: :data:`KD_ADAPTER_REGISTRY`, :class:`KDInputs` and
:func:`build_kd_adapter` (the adapter protocol is described in :mod:`mdkd_det.distill.adapters`).

The built-in adapters (:mod:`.adapters`, :mod:`.rfdetr_adapter`, :mod:`.cls_adapter`) import
this module and register themselves; :mod:`mdkd_det.distill` imports all three, so the registry
holds them whenever any ``mdkd_det.distill`` module is imported.
"""

from __future__ import annotations

from collections import OrderedDict  # noqa: F401  (KDInputs annotation)
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..modeling.registry import Registry

__all__ = ["KD_ADAPTER_REGISTRY", "KDInputs", "build_kd_adapter"]

KD_ADAPTER_REGISTRY = Registry("KD_ADAPTER", entry_point_group="mdkd_det.kd_adapters")


@dataclass
class KDInputs:
    """What the KD losses read from one model for one step.

    Attributes:
        features: ``OrderedDict[level, Tensor[B, C, H, W]]`` multi-scale maps (FPN / projector /
            encoder levels).
        region_embeddings: ``Tensor[M, D]`` RoI-head embeddings or decoder query embeddings,
            row m of the student paired with row m of the teacher; None if the family has none.
        region_logits: ``Tensor[M, K]`` class logits of the same regions (softmax heads include
            the background logit); None if absent.
        logits: ``Tensor[B, K]`` image-level class logits (classification; L_KLD, Eq. 15); None
            if absent.
        images: ``Tensor[B, C, H, W]`` the normalised, padded batch both backbones read (student
            side; multi-view terms such as DCGD make their views from it); None if absent.
        pixel_logits: ``Tensor[B, K, H, W]`` dense logits of a segmenter (K = 1: sigmoid head;
            paper 002 LM / AAM); None if absent.
    """

    features: "OrderedDict[str, torch.Tensor]"
    region_embeddings: Optional[torch.Tensor] = None
    region_logits: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    images: Optional[torch.Tensor] = None
    pixel_logits: Optional[torch.Tensor] = None


def _unwrap(model: nn.Module) -> nn.Module:
    """``model.module`` of a (DDP / DataParallel) wrapper, else ``model``."""
    return model.module if hasattr(model, "module") else model


def build_kd_adapter(name: str, cfg=None):
    """Instantiate the adapter registered as ``name`` (e.g. ``"torchvision_faster_rcnn"``);
    an adapter class with a ``from_config(cfg)`` classmethod is built from ``cfg``.

    Raises:
        RegistryError: unknown name (lists the registered adapters).
    """
    cls = KD_ADAPTER_REGISTRY.get(name)
    if cfg is not None and hasattr(cls, "from_config"):
        return cls.from_config(cfg)
    return cls()
