"""mdkd_det: multi-dataset cross-domain knowledge distillation for medical object detection.

Layout follows detectron2, in layers that import only downward (``docs/architecture.md``):
``utils/`` (errors, comm), ``config/`` (fvcore CfgNode defaults), ``model_zoo/``, ``data/``
(catalog, readers, transforms, loaders), ``modeling/`` (registries, backbones, meta-architectures),
``solver/`` (optimizer, LR schedules), ``evaluation/`` (COCO via faster-coco-eval, FROC,
visualisation), ``tasks/`` (detection, segmentation, classification), ``engine/`` (trainer, hooks,
checkpointer, launch), ``distill/`` (taps, pure KD losses, distiller), ``pipeline/`` (the paper's
stages) and ``d2/`` (optional detectron2 integration).
"""

__version__ = "0.1.0"
