"""Initialise a detector's heads from another checkpoint of the same meta-architecture.

``MODEL.HEAD_INIT`` (issue 10; paper_notes A9 option): every tensor of the model that is not under
``backbone.`` -- Faster R-CNN ``rpn.*`` and ``roi_heads.*``, RF-DETR ``detr.*`` -- is loaded
strictly from the checkpoint, so a Stage-2 joint teacher can start with the Stage-1 target
teacher's heads. One mechanism for every family (called by
:func:`mdkd_det.engine.defaults.build_model`).
"""

from __future__ import annotations

import logging

from torch import nn

from ...utils.checkpoint_io import load_model_state
from ...utils.errors import CheckpointError

__all__ = ["load_head_weights"]

logger = logging.getLogger(__name__)


def load_head_weights(model: nn.Module, path: str, trust: bool = False,
                      backbone_prefix: str = "backbone.") -> int:
    """Load every non-backbone tensor of ``model`` from checkpoint ``path``, strictly.

    Args:
        model: the detector (keys ``backbone.*`` + heads).
        path: a detector checkpoint (``{"model": state_dict}`` or a bare state dict) of the same
            meta-architecture and head sizes (e.g. the target teacher's ``model_best.pth``).
        trust: ``MODEL.TRUST_CHECKPOINTS`` (see :mod:`mdkd_det.utils.checkpoint_io`).
        backbone_prefix: key prefix of the part that is *not* loaded.

    Returns:
        the number of tensors loaded.

    Raises:
        CheckpointError: missing/unreadable/refused file, or a head key of the model missing
            from the checkpoint or with another shape (names the file and the keys).
    """
    sd = load_model_state(path, trust, what="MODEL.HEAD_INIT")
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(backbone_prefix)}
    missing = sorted(k for k in own if k not in sd)
    shape = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                   for k, v in own.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape))
    if missing or shape:
        raise CheckpointError(
            f"MODEL.HEAD_INIT '{path}' does not match this model's heads: "
            + "; ".join(p for p in (f"missing {missing[:10]}" if missing else "",
                                    f"shape mismatch {shape[:10]}" if shape else "") if p))
    result = model.load_state_dict({k: sd[k] for k in own}, strict=False)
    assert not result.unexpected_keys  # only the model's own keys were given
    logger.info("Heads (%d tensors) initialised from %s", len(own), path)
    return len(own)
