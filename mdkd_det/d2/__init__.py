"""detectron2 integration (optional; needs detectron2 installed by the user, see README).

Importing this package imports detectron2 and registers:

- ``build_fusion_backbone`` in detectron2's ``BACKBONE_REGISTRY`` (:mod:`.backbone`): our
  :class:`~mdkd_det.modeling.fusion.FusionBackbone` over frozen teachers that are our
  torchvision-style backbones or detectron2 backbones (:mod:`.teachers`);
- the ``"detectron2_generalized_rcnn"`` KD adapter and tap preset (:mod:`.adapter`);
- nothing in detectron2's ``DatasetCatalog`` until :func:`register_mdkd_datasets` is called
  (:mod:`.data`).

``import mdkd_det`` never imports detectron2; only ``import mdkd_det.d2`` does.

Raises:
    ImportError: detectron2 is not installed (the message says how to install it).
"""

try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without detectron2
    raise ImportError(
        "mdkd_det.d2 needs detectron2, which is not on PyPI: install it from source "
        "(https://github.com/facebookresearch/detectron2, `pip install --no-build-isolation -e .`)"
    ) from e

from .adapter import D2GeneralizedRCNNAdapter
from .backbone import D2BackboneAdapter, build_fusion_backbone
from .config import add_mdkd_config
from .data import MDKDDatasetMapper, register_mdkd_datasets
from .teachers import PyramidBackbone, build_teacher_backbone
from .train_loop import D2KDAMPTrainer, D2KDSimpleTrainer
from .trainer import MDKDTrainer, build_d2_distiller, build_d2_teacher

__all__ = [
    "D2BackboneAdapter",
    "D2GeneralizedRCNNAdapter",
    "D2KDAMPTrainer",
    "D2KDSimpleTrainer",
    "MDKDDatasetMapper",
    "MDKDTrainer",
    "PyramidBackbone",
    "add_mdkd_config",
    "build_d2_distiller",
    "build_d2_teacher",
    "build_fusion_backbone",
    "build_teacher_backbone",
    "register_mdkd_datasets",
]
