"""Multi-head multi-dataset model: the paper's multi-head baseline (C38).

"Share a common backbone across datasets with dataset-specific detection heads": one
:class:`~mdkd_det.modeling.backbone.Backbone` instance is shared by D models (one per dataset),
each built by the ``MODEL.META_ARCHITECTURE`` builder of ``META_ARCH_REGISTRY`` with
``backbone=shared``: torchvision ``FasterRCNN`` heads (RPN + RoI head per dataset), UNet
decoders (``"unet"`` / ``"tresunet"``) or image classifiers (``"image_classifier"``). The
shared backbone receives the gradients of every dataset.

``head(name)`` is an ordinary model of that architecture (its ``state_dict`` loads with
``strict=True`` into a plain detector built from the same config), usable by ``do_test`` and
exportable as a Stage-1/baseline checkpoint.

The heads are built by the ``META_ARCH_REGISTRY`` builder of ``MODEL.META_ARCHITECTURE``
(``"rfdetr"`` gives one RF-DETR decoder + heads per dataset on the shared backbone, the RF-DETR
multi-head baseline of Table 17). ``MultiHeadFasterRCNN`` is a deprecated alias of
:class:`MultiHeadModel` (renamed in issue 14: it builds every family's heads).

Not registered in ``META_ARCH_REGISTRY``: the builder needs the list of datasets, which the
registry's ``builder(cfg, backbone=None)`` contract does not carry.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

from torch import nn

from ...utils.errors import ConfigError
from ..backbone import Backbone, build_backbone
from ..registry import META_ARCH_REGISTRY

__all__ = ["MultiHeadModel", "head_key"]


def head_key(name: str) -> str:
    """Submodule key of dataset ``name``: characters other than ``[A-Za-z0-9_]`` become ``_``
    (``nn.ModuleDict`` keys may not contain ``.``; ``coco:<json>:<dir>`` names do)."""
    key = re.sub(r"[^A-Za-z0-9_]", "_", str(name))
    return key if key and not key[0].isdigit() else f"d_{key}"


class MultiHeadModel(nn.Module):
    """One shared backbone, one ``MODEL.META_ARCHITECTURE`` model per dataset (C38): torchvision
    ``FasterRCNN`` (RPN + RoI heads), RF-DETR decoder + heads, UNet decoder or classifier head.

    Args:
        cfg: config (MODEL.*, INPUT.*) used for every head.
        dataset_names: one name per head, target first (the first is the default head).
        backbone: a prebuilt shared backbone; default ``build_backbone(cfg)``.

    Attributes:
        dataset_names: the names, in order.
        detectors: ``nn.ModuleDict`` ``{head_key(name): FasterRCNN}``; every detector's
            ``.backbone`` is the same object. (Its ``state_dict`` therefore repeats the backbone
            tensors under each head's prefix; loading it back is consistent.)

    Shapes: as torchvision ``FasterRCNN``: images ``list[Tensor[C, H, W]]`` in [0, 1] px;
    train mode returns the loss dict of the chosen head, eval mode ``list[dict(boxes [N, 4]
    xyxy px, scores [N], labels [N])]``.

    Raises:
        ConfigError: empty or duplicated ``dataset_names``, or two names with the same key.
    """

    def __init__(self, cfg, dataset_names: Sequence[str], backbone: Optional[Backbone] = None) -> None:
        super().__init__()
        names = [str(n) for n in ([dataset_names] if isinstance(dataset_names, str) else dataset_names)]
        if not names:
            raise ConfigError("MultiHeadModel: dataset_names is empty (one head per dataset)")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"MultiHeadModel: dataset names {dup} are listed more than once")
        keys = [head_key(n) for n in names]
        clash = sorted({k for k in keys if keys.count(k) > 1})
        if clash:
            raise ConfigError(f"MultiHeadModel: dataset names {names} map to the same module key(s) {clash}")
        shared = backbone if backbone is not None else build_backbone(cfg)
        self.dataset_names: List[str] = names
        self._keys: Dict[str, str] = dict(zip(names, keys))
        # Any registered model taking ``backbone=``: Faster R-CNN heads, or seg decoders (C38).
        build = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        self.detectors = nn.ModuleDict({self._keys[n]: build(cfg, backbone=shared) for n in names})

    @property
    def backbone(self) -> nn.Module:
        """The shared backbone (not a separate registered submodule)."""
        return self.detectors[self._keys[self.dataset_names[0]]].backbone

    @property
    def target_name(self) -> str:
        """The first dataset name (the target by convention)."""
        return self.dataset_names[0]

    def head(self, name: Optional[str] = None) -> nn.Module:
        """The plain ``FasterRCNN`` of dataset ``name`` (default: the first/target one).

        Raises:
            ConfigError: ``name`` is not one of the model's datasets (lists them).
        """
        name = self.dataset_names[0] if name is None else str(name)
        if name not in self._keys:
            raise ConfigError(f"MultiHeadModel has no head for dataset '{name}'; "
                              f"heads: {self.dataset_names}")
        return self.detectors[self._keys[name]]

    def forward(self, images, targets=None, dataset: Optional[str] = None):
        """Run the head of ``dataset`` (default: the first) on ``images`` (and ``targets``).

        Raises:
            ConfigError: unknown ``dataset``.
        """
        return self.head(dataset)(images, targets)


def __getattr__(name):  # PEP 562: deprecated names (issue 14), one release
    if name == "MultiHeadFasterRCNN":
        import warnings

        warnings.warn("MultiHeadFasterRCNN is deprecated: use MultiHeadModel", DeprecationWarning, stacklevel=2)
        return MultiHeadModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
