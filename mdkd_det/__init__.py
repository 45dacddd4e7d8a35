"""mdkd_det: multi-dataset cross-domain knowledge distillation for medical object detection.

Layout follows detectron2: ``config/`` (fvcore CfgNode defaults), ``data/`` (catalog, readers,
transforms, loaders), ``modeling/`` (registries, backbones, detectors), ``engine/`` (trainer,
hooks, checkpointer, launch), ``solver/`` (optimizer, LR schedules), ``evaluation/`` (COCO via
faster-coco-eval, FROC, visualisation), ``distill/`` (taps, pure KD losses, distiller) and
``pipeline/`` (the paper's stages).
"""

__version__ = "0.1.0"
