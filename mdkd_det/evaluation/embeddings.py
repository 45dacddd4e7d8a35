"""Embedding extraction and t-SNE comparison of a baseline and a student (paper Fig. 6, C44).

Three extractors, each returning ``(embeddings float32 [P, D], labels int64 [P])``:

- :func:`classification_embeddings`: penultimate embeddings (the input of the classifier's last
  Linear, ``head.fc``), label = the image's class;
- :func:`segmentation_embeddings`: bottleneck pixel embeddings: the last level of
  ``model.backbone(x)`` (an ``OrderedDict``, the generic Backbone contract). ``resolution=
  "image"`` (default) upsamples it bilinearly to the mask size and takes, per image, every fg
  pixel and as many random bg pixels (at most ``pixels_per_image`` in all), labelled by the
  mask; ``"bottleneck"`` takes one row per bottleneck cell, fg (1) when at least
  ``fg_fraction`` of the cell is mask, bg (0) when it holds none (mixed cells dropped). Small
  lesions rarely fill half a stride-16 cell (MSD lung 48 px patches: at most 13 %), hence the
  default;
- :func:`detection_embeddings`: Faster R-CNN RoI embeddings (``roi_heads.box_head`` output,
  eval mode, the RPN's test proposals), label fg when the proposal's best IoU with a ground-truth
  box is >= ``fg_iou``, bg when < ``bg_iou`` (the others are dropped), captured with
  :class:`~mdkd_det.distill.taps.TapRecorder` from the unmodified model.

:func:`tsne_compare` subsamples each set (balanced, seeded), computes the silhouette score
(scikit-learn, cosine distance in the embedding space, and Euclidean in the 2-D t-SNE map),
runs scikit-learn ``TSNE`` and writes one PNG with one panel per model (matplotlib, Agg).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..distill.taps import Tap, TapRecorder

__all__ = ["classification_embeddings", "segmentation_embeddings", "detection_embeddings",
           "separation_scores", "tsne_compare"]

Emb = Tuple[np.ndarray, np.ndarray]


def _inner(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def classification_embeddings(model: nn.Module, batches: Sequence[Tuple[List[torch.Tensor], Sequence[int]]]) -> Emb:
    """Penultimate embeddings of an image classifier (input of ``head.fc``).

    Args:
        model: an :class:`~mdkd_det.modeling.meta_arch.classifier.ImageClassifier` (eval mode is
            set here and restored).
        batches: ``(images list[Tensor[C, H, W]] in [0, 1], labels)`` pairs.

    Returns:
        ``(Tensor [N, D] as numpy float32, labels int64 [N])``.
    """
    m = _inner(model)
    was = m.training
    m.eval()
    embs, labels = [], []
    try:
        with TapRecorder(m, {"emb": Tap("head.fc", "input")}) as rec:
            for images, ys in batches:
                m(images)
                embs.append(rec["emb"].float().cpu().numpy())
                labels.extend(int(y) for y in ys)
    finally:
        m.train(was)
    return np.concatenate(embs), np.asarray(labels, dtype=np.int64)


@torch.no_grad()
def segmentation_embeddings(model: nn.Module, images: torch.Tensor, masks: torch.Tensor,
                            batch_size: int = 32, fg_fraction: float = 0.5, resolution: str = "image",
                            pixels_per_image: int = 64, seed: int = 0) -> Emb:
    """Bottleneck pixel embeddings of a segmentation model, fg/bg from the masks.

    Args:
        model: exposes ``backbone(x) -> OrderedDict`` whose last level is the bottleneck
            [B, C, h, w]; if it has ``preprocess(x)`` (normalisation) it is applied first.
        images: [N, C, H, W] in the model's input range (e.g. [0, 1]).
        masks: [N, 1, H, W] (or [N, H, W]) binary.
        fg_fraction: ``"bottleneck"`` mode: a cell is fg when this fraction (or more) is mask.
        resolution: ``"image"`` or ``"bottleneck"`` (see the module docstring).
        pixels_per_image: ``"image"`` mode: at most this many pixels per image (half fg).

    Returns:
        ``(embeddings [P, C], labels [P])``, 1 = fg.

    Raises:
        ValueError: unknown ``resolution``.
    """
    if resolution not in ("image", "bottleneck"):
        raise ValueError(f"segmentation_embeddings: resolution must be 'image' or 'bottleneck', got {resolution!r}")
    gen = torch.Generator().manual_seed(seed)
    m = _inner(model)
    was = m.training
    m.eval()
    embs, labels = [], []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].float()
            if hasattr(m, "preprocess"):
                x = m.preprocess(x)
            feats = m.backbone(x)
            z = next(reversed(feats.values())).float()
            mk = masks[i:i + batch_size].float()
            mk = mk[:, None] if mk.dim() == 3 else mk
            if resolution == "image":
                zu = F.interpolate(z, size=mk.shape[-2:], mode="bilinear", align_corners=False)
                for zi, mi in zip(zu, mk[:, 0]):
                    fg, bg = torch.nonzero(mi.reshape(-1) >= 0.5)[:, 0], torch.nonzero(mi.reshape(-1) < 0.5)[:, 0]
                    n_fg = min(fg.numel(), pixels_per_image // 2)
                    fg = fg[torch.randperm(fg.numel(), generator=gen)[:n_fg]]
                    bg = bg[torch.randperm(bg.numel(), generator=gen)[:max(n_fg, pixels_per_image // 4)]]
                    idx = torch.cat([fg, bg])
                    embs.append(zi.reshape(zi.shape[0], -1)[:, idx].T.cpu().numpy())
                    labels.append(torch.cat([torch.ones(fg.numel()), torch.zeros(bg.numel())]).long().numpy())
                continue
            frac = F.adaptive_avg_pool2d(mk, z.shape[-2:])  # area fraction per bottleneck cell
            frac = frac[:, 0].reshape(-1)
            keep = (frac >= fg_fraction) | (frac == 0)
            embs.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])[keep].cpu().numpy())
            labels.append((frac[keep] >= fg_fraction).long().cpu().numpy())
    finally:
        m.train(was)
    return np.concatenate(embs), np.concatenate(labels)


@torch.no_grad()
def detection_embeddings(model: nn.Module, images: Sequence[torch.Tensor], gt_boxes: Sequence[torch.Tensor],
                         fg_iou: float = 0.5, bg_iou: float = 0.3) -> Emb:
    """RoI embeddings of a torchvision Faster R-CNN, fg/bg by IoU with the ground truth.

    Args:
        model: ``FasterRCNN`` (eval mode set here and restored).
        images: list of [C, H, W] in [0, 1] at their original size (px).
        gt_boxes: per image [G, 4] xyxy in original px.
        fg_iou, bg_iou: proposal labelled fg if best IoU >= fg_iou, bg if < bg_iou.

    Returns:
        ``(embeddings [P, D] of the kept proposals, labels [P])``.
    """
    from torchvision.ops import box_iou

    m = _inner(model)
    was = m.training
    m.eval()
    embs, labels = [], []
    taps = {"emb": Tap("roi_heads.box_head"), "roi_in": Tap("roi_heads", "inputs")}
    try:
        with TapRecorder(m, taps) as rec:
            for img, gt in zip(images, gt_boxes):
                m([img])
                args, kwargs = rec["roi_in"]
                proposals = (args[1] if len(args) > 1 else kwargs["proposals"])[0]
                image_shapes = args[2] if len(args) > 2 else kwargs["image_shapes"]
                h, w = image_shapes[0]
                sy, sx = h / img.shape[-2], w / img.shape[-1]
                gt = torch.as_tensor(gt, dtype=torch.float32).reshape(-1, 4) * torch.tensor([sx, sy, sx, sy])
                emb = rec["emb"].float()
                if gt.numel():
                    best = box_iou(proposals.float(), gt.to(proposals.device)).max(dim=1).values
                else:
                    best = torch.zeros(proposals.shape[0])
                keep = (best >= fg_iou) | (best < bg_iou)
                embs.append(emb[keep].cpu().numpy())
                labels.append((best[keep] >= fg_iou).long().cpu().numpy())
    finally:
        m.train(was)
    return np.concatenate(embs), np.concatenate(labels)


def _subsample(emb: np.ndarray, y: np.ndarray, per_class: int, rng: np.random.Generator) -> Emb:
    idx = []
    for c in np.unique(y):
        ic = np.flatnonzero(y == c)
        idx.append(rng.choice(ic, size=min(per_class, ic.size), replace=False))
    idx = np.sort(np.concatenate(idx))
    return emb[idx], y[idx]


def separation_scores(emb: np.ndarray, y: np.ndarray, seed: int = 0) -> Dict[str, float]:
    """Silhouette scores (scikit-learn; in [-1, 1], higher = better separated classes): in the
    embedding space (cosine distance) and of the 2-D t-SNE map (Euclidean). Returns also the
    2-D map as ``"_tsne"`` (numpy [N, 2]).

    Raises:
        ValueError: fewer than two classes or fewer than 5 points.
    """
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    if len(np.unique(y)) < 2 or len(y) < 5:
        raise ValueError(f"separation_scores: need >= 2 classes and >= 5 points, got classes "
                         f"{np.unique(y).tolist()} and {len(y)} points")
    emb = emb.reshape(len(emb), -1).astype(np.float64)
    perplexity = float(max(2.0, min(30.0, (len(y) - 1) / 3.0)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(emb)
    return {"silhouette": float(silhouette_score(emb, y, metric="cosine")),
            "silhouette_tsne": float(silhouette_score(xy, y)), "_tsne": xy}


def tsne_compare(sets: Mapping[str, Emb], class_names: Sequence[str], out_png: str, title: str = "",
                 per_class: int = 500, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """t-SNE panels of several models' embeddings with their silhouette scores.

    Args:
        sets: ``{model name: (embeddings [N, D], labels [N])}`` (e.g. baseline, student).
        class_names: name of each label value.
        out_png: output PNG path (a ``.json`` with the scores is written beside it).
        per_class: at most this many points per class and model (seeded subsample).

    Returns:
        ``{model name: {"silhouette", "silhouette_tsne", "n_points", "n_<class>"}}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4.6), squeeze=False)
    scores: Dict[str, Dict[str, float]] = {}
    for ax, (name, (emb, y)) in zip(axes[0], sets.items()):
        e, yy = _subsample(np.asarray(emb), np.asarray(y), per_class, rng)
        s = separation_scores(e, yy, seed)
        xy = s.pop("_tsne")
        s["n_points"] = int(len(yy))
        s.update({f"n_{class_names[c]}": int((yy == c).sum()) for c in np.unique(yy)})
        scores[name] = s
        for c in np.unique(yy):
            ax.scatter(xy[yy == c, 0], xy[yy == c, 1], s=6, alpha=0.6, label=class_names[c])
        ax.set_title(f"{name}\nsilhouette {s['silhouette']:.3f} (emb, cosine) / {s['silhouette_tsne']:.3f} (t-SNE)",
                     fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=8, markerscale=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    with open(os.path.splitext(out_png)[0] + ".json", "w") as f:
        json.dump({"title": title, "scores": scores}, f, indent=2)
    return scores
