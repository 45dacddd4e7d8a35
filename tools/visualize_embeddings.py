#!/usr/bin/env python
"""t-SNE of a baseline's and a student's embeddings with silhouette scores (paper Fig. 6, C44).

Examples::

    # classification: penultimate embeddings by class (lesion / no lesion)
    python tools/visualize_embeddings.py --task classification \\
        --baseline-config OUT/target_teacher/config.yaml --baseline-weights OUT/target_teacher/model_final.pth \\
        --student-config OUT/student/config.yaml --student-weights OUT/student/model_student.pth \\
        --out OUT/tsne_cls.png

    # detection: Faster R-CNN RoI embeddings, fg/bg by IoU with the ground truth
    python tools/visualize_embeddings.py --task detection --baseline-config ... --student-config ... --out det.png

    # segmentation: bottleneck pixel embeddings, fg/bg from the masks (MSD Lung patches HDF5)
    python tools/visualize_embeddings.py --task segmentation --baseline-config ... --student-config ... \\
        --h5 $MDKD_DATASETS/msd_lung_patches/lung_2mm/test_patches.h5 --out seg.png

Models are built with ``build_model`` from their configs and loaded from ``--*-weights``
(default: ``model_final.pth`` beside the config). Images come from ``--dataset`` (default the
config's ``DATASETS.TEST[0]``) through the config's task mapper, except for segmentation with
``--h5`` (arrays ``images`` [N, 1, H, W] in [0, 1] and ``labels`` masks). Writes the PNG and a
JSON of the scores beside it, and prints the scores. Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _load(config: str, weights: str):
    from mdkd_det.config import get_cfg
    from mdkd_det.engine.checkpointer import Checkpointer
    from mdkd_det.engine.defaults import build_model

    cfg = get_cfg()
    cfg.merge_from_file(config)
    cfg.MODEL.DEVICE = "cpu"
    weights = weights or os.path.join(os.path.dirname(config), "model_final.pth")
    model = build_model(cfg)
    Checkpointer(model, cfg.OUTPUT_DIR, trust_checkpoints=cfg.MODEL.TRUST_CHECKPOINTS).load(weights, checkpointables=[])
    return cfg, model.eval()


def _records(cfg, dataset: str, limit: int, seed: int):
    import random

    from mdkd_det.data.build import get_dataset_records

    records = get_dataset_records(cfg, [dataset or cfg.DATASETS.TEST[0]])
    if limit and len(records) > limit:
        records = random.Random(seed).sample(records, limit)
    return records


def _embeddings(task: str, cfg, model, args):
    import torch

    from mdkd_det.evaluation import embeddings as E
    from mdkd_det.tasks import get_task

    if task == "segmentation" and args.h5:
        import h5py

        with h5py.File(args.h5, "r") as f:
            n = min(len(f["images"]), args.max_images or len(f["images"]))
            images = torch.from_numpy(f["images"][:n]).float()
            masks = torch.from_numpy(f["labels"][:n]).float()
        if int(cfg.INPUT.CHANNELS) != images.shape[1]:
            images = images[:, :1].expand(-1, int(cfg.INPUT.CHANNELS), -1, -1)
        return E.segmentation_embeddings(model, images, masks, fg_fraction=args.fg_fraction,
                                         resolution=args.seg_resolution, seed=args.seed), ["background", "foreground"]
    records = _records(cfg, args.dataset, args.max_images, args.seed)
    mapper = get_task(cfg).build_mapper(cfg, is_train=False)
    items = [mapper(r) for r in records]
    if task == "classification":
        from mdkd_det.data.catalog import MetadataCatalog

        batches = [([d["image"] for d in items[i:i + 64]], [int(d["target"]["labels"][0]) for d in items[i:i + 64]])
                   for i in range(0, len(items), 64)]
        names = MetadataCatalog.get(args.dataset or cfg.DATASETS.TEST[0]).get("thing_classes") or ["0", "1"]
        return E.classification_embeddings(model, batches), list(names)
    if task == "detection":
        return E.detection_embeddings(model, [d["image"] for d in items], [d["target"]["boxes"] for d in items],
                                      fg_iou=args.fg_iou, bg_iou=args.bg_iou), ["background RoI", "lesion RoI"]
    if task == "segmentation":
        images = torch.stack([d["image"] for d in items])
        masks = torch.stack([d["target"]["masks"] if "masks" in d["target"] else d["target"]["mask"] for d in items])
        return E.segmentation_embeddings(model, images, masks, fg_fraction=args.fg_fraction,
                                         resolution=args.seg_resolution, seed=args.seed), ["background", "foreground"]
    raise ValueError(task)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the tool; returns the exit status (0 ok, 2 bad input)."""
    from mdkd_det.evaluation.embeddings import tsne_compare
    from mdkd_det.utils.errors import CheckpointError, ConfigError, DatasetError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=("classification", "segmentation", "detection"))
    p.add_argument("--baseline-config", required=True)
    p.add_argument("--baseline-weights", default="")
    p.add_argument("--student-config", required=True)
    p.add_argument("--student-weights", default="")
    p.add_argument("--baseline-name", default="Baseline")
    p.add_argument("--student-name", default="Student")
    p.add_argument("--dataset", default="", help="dataset name (default: DATASETS.TEST[0] of the baseline config)")
    p.add_argument("--h5", default="", help="segmentation: HDF5 with images/labels arrays")
    p.add_argument("--max-images", type=int, default=400, help="images used (seeded sample; 0 = all)")
    p.add_argument("--per-class", type=int, default=500, help="points per class in the t-SNE")
    p.add_argument("--seg-resolution", default="image", choices=("image", "bottleneck"),
                   help="segmentation: bottleneck map upsampled to the mask size, or one row per cell")
    p.add_argument("--fg-fraction", type=float, default=0.5,
                   help="segmentation: bottleneck cell is fg when this fraction is mask (0 < f <= 1)")
    p.add_argument("--fg-iou", type=float, default=0.5)
    p.add_argument("--bg-iou", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output PNG")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    try:
        sets, names = {}, None
        for label, config, weights in ((args.baseline_name, args.baseline_config, args.baseline_weights),
                                       (args.student_name, args.student_config, args.student_weights)):
            cfg, model = _load(config, weights)
            sets[label], names = _embeddings(args.task, cfg, model, args)
        scores = tsne_compare(sets, names, args.out, title=f"{args.task}: t-SNE of embeddings", per_class=args.per_class,
                              seed=args.seed)
    except (ConfigError, DatasetError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"png": os.path.abspath(args.out), "scores": scores}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
