"""``build_model``: the detector of a config (detectron2's ``modeling.build_model``)."""

from __future__ import annotations

import torch

from .registry import META_ARCH_REGISTRY


def build_model(cfg, backbone=None) -> torch.nn.Module:
    """Build ``MODEL.META_ARCHITECTURE`` from ``META_ARCH_REGISTRY`` on ``MODEL.DEVICE``.

    Args:
        cfg: config (``MODEL.*``, ``INPUT.*``).
        backbone: optional prebuilt backbone (e.g. a ``FusionBackbone``).

    Returns:
        the model in train mode (torchvision API). ``.eval()`` switches Faster R-CNN to the
        test size (``INPUT.*_TEST``).

    With ``MODEL.HEAD_INIT`` its heads (every non-backbone tensor) are loaded from that
    checkpoint (:func:`~mdkd_det.modeling.meta_arch.head_init.load_head_weights`).

    Raises:
        RegistryError: unknown detector or backbone name (lists registered names).
        CheckpointError: ``MODEL.HEAD_INIT`` unreadable or not matching the heads.
    """
    from . import meta_arch  # noqa: F401  (register built-ins)
    from .meta_arch.head_init import load_head_weights

    model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg, backbone=backbone)
    if cfg.MODEL.HEAD_INIT:
        load_head_weights(model, cfg.MODEL.HEAD_INIT, bool(cfg.MODEL.TRUST_CHECKPOINTS))
    return model.to(torch.device(cfg.MODEL.DEVICE))


def backbone_init_key(meta_architecture: str) -> str:
    """The config key through which ``meta_architecture`` initialises its backbone from another
    detector's checkpoint (the pipeline's ``backbone_init`` stage sets it on every later stage),
    or ``""`` when the family has none. A builder declares it as its ``backbone_init_key``
    attribute (RF-DETR: ``MODEL.RFDETR.BACKBONE_INIT``).

    Raises:
        RegistryError: unknown meta-architecture (lists the registered names).
    """
    from . import meta_arch  # noqa: F401  (register built-ins)

    return str(getattr(META_ARCH_REGISTRY.get(meta_architecture), "backbone_init_key", ""))
