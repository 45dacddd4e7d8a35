"""Image classifier on a registry backbone: the classification task's model (issue 5).

``ImageClassifier`` = :class:`~mdkd_det.modeling.backbone.Backbone` (``.backbone``; e.g.
``efficientnet_b0``, ``medvit`` or the joint teacher's ``fusion``) + :class:`ClassifierHead`
(GAP of the last level -> dropout -> Linear) with the train/eval contract of the detectors:

- train: ``model(images, targets) -> {"loss_cls": class-weighted CE}`` (paper Eq. 14);
- eval: ``model(images) -> [{"scores": Tensor[K] softmax, "logits": Tensor[K]}]`` per image.

Registered in ``META_ARCH_REGISTRY`` as ``"image_classifier"`` (the model registry; its builder
follows the detectors' ``builder(cfg, backbone=None)``), so ``build_model``, the multi-head
baseline (shared backbone, one head per dataset), Stage 1 (GRL on the backbone's last level),
Stage 2 (``MODEL.BACKBONE.NAME "fusion"``: FA blocks over frozen teachers, a new head) and the
KD adapter ``"image_classifier"`` all work on it unchanged.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...utils.errors import ConfigError
from ..backbone import Backbone, build_backbone
from ..registry import META_ARCH_REGISTRY

logger = logging.getLogger(__name__)

__all__ = ["ClassifierHead", "ImageClassifier", "weighted_cross_entropy", "frequency_class_weights",
           "build_image_classifier"]


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                           weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Class-weighted CE, paper Eq. 14: ``-sum_c w_c y_c log p_c``, averaged over the N images.

    The mean is over images (``sum_i w_{y_i} CE_i / N``), not torch's weight-normalised mean,
    so with the A15 scaling (``sum_c w_c f_c = 1``) the loss scale matches plain CE.

    Args:
        logits: [N, K]; labels: int64 [N] in [0, K); weights: [K] or None (= plain CE).

    Returns:
        0-dim float32 tensor.
    """
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    if weights is not None:
        ce = ce * weights.to(ce)[labels]
    return ce.mean()


def frequency_class_weights(labels: Sequence[int], num_classes: int, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 14 weights from training labels (decision A15): ``f_c`` = relative frequency,
    ``w_c = 1 / (f_c + eps)``, rescaled so that ``sum_c w_c f_c = 1``.

    Returns:
        float32 [K].

    Raises:
        ValueError: no labels, or a label outside [0, K).
    """
    y = torch.as_tensor(list(labels), dtype=torch.int64)
    if y.numel() == 0:
        raise ValueError("frequency_class_weights: no training labels")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"frequency_class_weights: labels outside [0, {num_classes}): "
                         f"{sorted(set(y.tolist()))}")
    f = torch.bincount(y, minlength=num_classes).float() / y.numel()
    w = 1.0 / (f + eps)
    return w / (w * f).sum()


class ClassifierHead(nn.Module):
    """GAP -> dropout -> Linear (the classifier on the last backbone level).

    Shapes: ``forward(x: Tensor[B, C, H, W]) -> logits Tensor[B, K]``;
    ``embed(x) -> Tensor[B, C]`` (the penultimate embedding, input of ``fc``).
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(float(dropout))
        self.fc = nn.Linear(int(in_channels), int(num_classes))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if x.dim() == 4 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc(self.dropout(self.embed(x)))


class ImageClassifier(nn.Module):
    """Backbone + classifier head (see the module docstring).

    Args:
        backbone: a :class:`Backbone`; the head reads its last level.
        num_classes: K.
        pixel_mean, pixel_std: per-channel normalisation of [0, 1] pixels.
        class_weights: Eq. 14 weights [K] (None = plain CE); a non-persistent buffer (it comes
            from the training data of the run, not from checkpoints).
        dropout: head dropout; input_size: resize to this square side (px; 0 = keep).

    Shapes: images ``list[Tensor[C, H, W]]`` in [0, 1] (equal sizes) or ``Tensor[B, C, H, W]``;
    targets ``list[{"labels": int64 0-dim or [1]}]``.

    Raises:
        ValueError: training without targets, or images of different sizes without
            ``input_size``.
    """

    def __init__(self, backbone: Backbone, num_classes: int, pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], class_weights: Optional[torch.Tensor] = None,
                 dropout: float = 0.0, input_size: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        last = list(backbone.output_shape().values())[-1]
        self.head = ClassifierHead(last.channels, num_classes, dropout)
        self.num_classes = int(num_classes)
        self.input_size = int(input_size)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("class_weights", None if class_weights is None else class_weights.float(), persistent=False)

    def preprocess(self, images: Union[torch.Tensor, List[torch.Tensor]]) -> torch.Tensor:
        """Stack, resize (``input_size``) and normalise: -> Tensor[B, C, H, W]."""
        if isinstance(images, (list, tuple)):
            if self.input_size:
                images = [F.interpolate(i[None].float(), size=(self.input_size,) * 2, mode="bilinear",
                                        align_corners=False)[0] for i in images]
            sizes = {tuple(i.shape) for i in images}
            if len(sizes) != 1:
                raise ValueError(f"ImageClassifier: images of different sizes {sorted(sizes)}; set "
                                 "MODEL.CLASSIFIER.INPUT_SIZE")
            x = torch.stack([i.float() for i in images])
        else:
            x = images.float()
            if self.input_size and tuple(x.shape[-2:]) != (self.input_size,) * 2:
                x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        return (x - self.pixel_mean) / self.pixel_std

    def forward(self, images, targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        """Train: ``{"loss_cls": 0-dim}``; eval: per image ``{"scores": [K], "logits": [K]}``."""
        x = self.preprocess(images)
        feats = self.backbone(x)
        logits = self.head(next(reversed(feats.values())))
        if self.training:
            if targets is None:
                raise ValueError("ImageClassifier: targets are required in training mode")
            labels = torch.stack([t["labels"].reshape(-1)[0] for t in targets]).to(logits.device)
            return {"loss_cls": weighted_cross_entropy(logits, labels, self.class_weights)}
        scores = logits.softmax(dim=1)
        return [{"scores": s, "logits": z} for s, z in zip(scores, logits)]


def _train_labels(cfg) -> List[int]:
    from ...data.build import get_dataset_records

    return [int(r["label"]) for r in get_dataset_records(cfg, cfg.DATASETS.TRAIN, cfg.DATASETS.TRAIN_LIMIT)]


@META_ARCH_REGISTRY.register("image_classifier")
def build_image_classifier(cfg, backbone: Optional[Backbone] = None) -> ImageClassifier:
    """Build an :class:`ImageClassifier` from ``cfg`` (``MODEL.BACKBONE.NAME``,
    ``MODEL.CLASSIFIER.*``, ``MODEL.PIXEL_MEAN/STD``).

    With ``MODEL.CLASSIFIER.CLASS_WEIGHTS "frequency"`` the Eq. 14 weights come from the labels
    of ``DATASETS.TRAIN`` (A15); ``"none"`` gives plain CE.

    Raises:
        ConfigError: unknown ``CLASS_WEIGHTS``.
    """
    c = cfg.MODEL.CLASSIFIER
    backbone = backbone if backbone is not None else build_backbone(cfg)
    weights = None
    if c.CLASS_WEIGHTS == "frequency":
        if cfg.DATASETS.TRAIN:
            weights = frequency_class_weights(_train_labels(cfg), int(c.NUM_CLASSES), float(c.CLASS_WEIGHT_EPS))
            logger.info("Eq. 14 class weights from %s: %s", list(cfg.DATASETS.TRAIN),
                        [round(float(w), 4) for w in weights])
    elif c.CLASS_WEIGHTS != "none":
        raise ConfigError(f"MODEL.CLASSIFIER.CLASS_WEIGHTS must be 'frequency' or 'none', got '{c.CLASS_WEIGHTS}'")
    return ImageClassifier(backbone, int(c.NUM_CLASSES), cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD,
                           class_weights=weights, dropout=float(c.DROPOUT), input_size=int(c.INPUT_SIZE))
