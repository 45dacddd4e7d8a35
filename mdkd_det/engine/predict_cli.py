"""``tools/predict.py`` / ``mdkd-predict``: a trained detector on CT files, series and volumes.

Inputs (``--input``, any mix, repeatable): image files (DICOM, 16-bit PNG, JPEG/PNG), folders
(searched recursively), globs, DICOM series folders (grouped by SeriesInstanceUID, slices
ordered by ImagePositionPatient / InstanceNumber) and NIfTI volumes (``.nii``/``.nii.gz``,
``pip install 'mdkd_det[nifti]'``). DICOM slices and NIfTI volumes are *volumes*; JPEG/PNG files
are single 2-D images.

Outputs under ``--output``:

- ``images.json``: COCO image list (``id``, ``file_name``, ``height``, ``width``, ``volume``,
  ``slice``) + ``categories``; ``coco_instances_results.json``: COCO results (``image_id``,
  ``category_id`` = label 1..K, ``bbox`` [x, y, w, h] px, ``score``). Reload with
  ``pycocotools.coco.COCO("images.json").loadRes("coco_instances_results.json")`` or
  :func:`load_predictions`.
- ``overlays/``: PNGs of slices with a detection ``>= --vis-thresh`` (legend, scores, zoomed
  insets for boxes under 32 px), at most ``--max-overlays``.
- volumes: ``candidates_3d.json`` and ``candidates_3d.csv``: 3-D lesion candidates
  (:mod:`mdkd_det.evaluation.candidates3d`) with z-range, 3-D box in voxels and LPS+ mm, max
  score.
- ``summary.json``: slices, seconds, slices/s (whole run and per volume).

Bad input (non-CT DICOM, mixed orientations in a series, an empty folder, an unreadable NIfTI,
missing weights) -> one line ``mdkd-predict: error: <file>: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..utils.errors import MdkdError

logger = logging.getLogger("mdkd_det")

EXAMPLES = """examples:
  # a DICOM series folder (or a patient folder holding several series) with the distilled student
  mdkd-predict --config-file output/lungct_mdkd_r18_demo/student/config.yaml \\
      --weights output/lungct_mdkd_r18_demo/student/model_student.pth \\
      --input /data/Lung_Dx-A0001 --output pred_A0001

  # a NIfTI volume, a model-zoo config and a single-model checkpoint
  mdkd-predict --config-file LungCT/faster_rcnn_R18_FPN_demo.yaml \\
      --weights output/lungct_frcnn_r18_demo/model_final.pth --input ct.nii.gz --output pred_ct

  # JPEG slices by glob, 8 per batch, keep detections >= 0.3, config overrides after --opts
  tools/predict.py --config-file configs/LungCT/faster_rcnn_R18_FPN_demo.yaml \\
      --weights model_final.pth --input 'slices/*.jpg' --batch-size 8 --score-thresh 0.3 \\
      --opts MODEL.DEVICE cpu

environment: MDKD_NUM_THREADS=1 sets torch's CPU threads (one thread is fastest on a busy machine).
"""

_GLOB_CHARS = "*?["


def argument_parser() -> argparse.ArgumentParser:
    """The ``mdkd-predict`` CLI (detectron2 demo style: --config-file, --input, --output, --opts)."""
    p = argparse.ArgumentParser(
        prog="mdkd-predict", description="Detect lesions on CT slices, DICOM series and NIfTI volumes "
        "with a trained mdkd_det detector.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE",
                   help="the model's config: a YAML path (e.g. OUTPUT_DIR/config.yaml) or a model-zoo name")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="checkpoint (model_final.pth / model_best.pth / model_student.pth); default MODEL.WEIGHTS")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files, folders, globs, DICOM series folders or NIfTI files")
    p.add_argument("--output", default="predictions", metavar="DIR", help="output folder (default: predictions)")
    p.add_argument("--batch-size", type=int, default=4, help="slices per model call (default 4)")
    p.add_argument("--score-thresh", type=float, default=0.05, help="keep detections >= this score (default 0.05)")
    p.add_argument("--vis-thresh", type=float, default=0.5, help="draw detections >= this score (default 0.5)")
    p.add_argument("--max-overlays", type=int, default=100, help="overlay PNGs to write at most (0: none)")
    p.add_argument("--link-iou", type=float, default=0.3, help="3-D linking: min IoU with the previous slice's box")
    p.add_argument("--link-gap", type=int, default=0, help="3-D linking: slices a candidate may skip (default 0)")
    p.add_argument("--link-score", type=float, default=0.3, help="3-D linking: ignore detections below this score")
    p.add_argument("--device", default=None, help="cpu / cuda (default MODEL.DEVICE)")
    p.add_argument("--trust-checkpoints", action="store_true",
                   help="allow checkpoints to unpickle arbitrary Python objects (only for files you trust)")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


# --- inputs -----------------------------------------------------------------------------------
def collect_inputs(inputs: Sequence[str]) -> Tuple[list, List[str]]:
    """Resolve ``--input`` values to volumes and 2-D image files.

    Returns:
        ``(volumes, images)``: :class:`~mdkd_det.data.volume.Volume` list (one per DICOM series,
        one per NIfTI file) and JPEG/PNG paths, in input order.

    Raises:
        DatasetError: a path that does not exist, a glob matching nothing, a folder with no
            DICOM/NIfTI/image file, a file of unknown type, a non-CT DICOM, a series with mixed
            orientations, an unreadable NIfTI (each names the file or folder).
    """
    from ..data.io import IMAGE_EXTENSIONS, reader_for_path
    from ..data.volume import dicom_files_by_series, is_nifti, load_dicom_series, load_nifti
    from ..utils.errors import DatasetError

    dicoms, niftis, images = [], [], []

    def classify(path: str, explicit: bool) -> bool:
        if is_nifti(path):
            niftis.append(path)
        elif reader_for_path(path) == "dicom":
            dicoms.append(path)
        elif os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
            images.append(path)
        elif explicit:
            raise DatasetError(f"{path}: not a DICOM, NIfTI (.nii/.nii.gz) or image (JPEG/PNG) file")
        else:
            return False
        return True

    for inp in inputs:
        matches = sorted(glob.glob(inp, recursive=True)) if any(c in inp for c in _GLOB_CHARS) else [inp]
        if not matches:
            raise DatasetError(f"{inp}: no file matches this pattern")
        for m in matches:
            if os.path.isdir(m):
                found = 0
                for d, subdirs, files in os.walk(m):
                    subdirs.sort()
                    for f in sorted(files):
                        found += classify(os.path.join(d, f), explicit=False)
                if not found:
                    raise DatasetError(f"{m}: empty folder: no DICOM, NIfTI or JPEG/PNG file in it")
            elif os.path.isfile(m):
                classify(m, explicit=not any(c in inp for c in _GLOB_CHARS))
            else:
                raise DatasetError(f"{m}: no such file or folder")
    volumes = [load_dicom_series(files) for files in dicom_files_by_series(list(dict.fromkeys(dicoms))).values()]
    volumes += [load_nifti(p) for p in dict.fromkeys(niftis)]
    seen: Dict[str, int] = {}
    for v in volumes:  # unique output names
        n = seen.get(v.name, 0)
        seen[v.name] = n + 1
        if n:
            v.name = f"{v.name}_{n}"
    return volumes, list(dict.fromkeys(images))


# --- prediction -------------------------------------------------------------------------------
def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def predict_items(predictor, items: Sequence, batch_size: int, bar) -> Tuple[List[dict], List[np.ndarray]]:
    """Detections and windowed slices of ``items`` (predictor inputs), ``batch_size`` at a time."""
    outs, units = [], []
    for i in range(0, len(items), max(1, int(batch_size))):
        batch = [predictor.unit_image(x) for x in items[i:i + batch_size]]
        outs += predictor.predict_batch(batch, kind="unit")
        units += batch
        bar.update(len(batch))
    return outs, units


def run(args) -> dict:
    """Predict on every input and write the outputs (see module doc); returns the summary."""
    import torch
    from tqdm import tqdm

    from ..evaluation.candidates3d import candidate_boxes, link_detections, write_candidates_csv
    from ..evaluation.visualize import save_overlay
    from ..model_zoo import load_config
    from .checkpointer import atomic_write_text
    from .predictor import DefaultPredictor

    if os.environ.get("MDKD_NUM_THREADS"):  # e.g. 1 on a shared machine
        torch.set_num_threads(int(os.environ["MDKD_NUM_THREADS"]))
    cfg = load_config(args.config_file)
    if args.opts:
        cfg.merge_from_list(args.opts)
    if args.trust_checkpoints:
        cfg.MODEL.TRUST_CHECKPOINTS = True
    volumes, image_files = collect_inputs(args.input)  # validate inputs before loading the model
    predictor = DefaultPredictor(cfg, weights=args.weights, device=args.device, score_thresh=args.score_thresh)
    names = predictor.class_names
    os.makedirs(args.output, exist_ok=True)
    images, results, candidates, vol_summary = [], [], [], []
    n_over = [0]
    total = sum(len(v) for v in volumes) + len(image_files)
    start = time.perf_counter()

    def record(file_name, unit, out, volume=None, z=None, overlay_name=""):
        img_id = len(images) + 1
        h, w = unit.shape
        images.append({"id": img_id, "file_name": file_name, "height": int(h), "width": int(w),
                       **({"volume": volume, "slice": int(z)} if volume is not None else {})})
        for (x1, y1, x2, y2), s, k in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
            results.append({"image_id": img_id, "category_id": int(k),
                            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                            "score": round(float(s), 5)})
        if n_over[0] < args.max_overlays and bool((out["scores"] >= args.vis_thresh).any()):
            save_overlay(unit, out["boxes"], out["scores"], out["labels"],
                         os.path.join(args.output, "overlays", overlay_name), class_names=names,
                         title=os.path.basename(file_name) + (f"  slice {z}" if z is not None else ""),
                         score_thresh=args.vis_thresh)
            n_over[0] += 1

    with tqdm(total=total, unit="slice", desc="predict", dynamic_ncols=True, disable=None) as bar:
        for v in volumes:
            t0 = time.perf_counter()
            outs, units = predict_items(predictor, [v.slice_input(z) for z in range(len(v))], args.batch_size, bar)
            for z, (out, unit) in enumerate(zip(outs, units)):
                record(v.slice_name(z), unit, out, volume=v.name, z=z,
                       overlay_name=os.path.join(_safe(v.name), f"{z:04d}.png"))
            for k, c in enumerate(link_detections(outs, iou_thresh=args.link_iou, max_gap=args.link_gap,
                                                  score_thresh=args.link_score)):
                candidates.append({"volume": v.name, "id": k + 1, "source": v.source, "series_uid": v.uid,
                                   **c, **candidate_boxes(c, v)})
            vol_summary.append({"volume": v.name, "source": v.source, "slices": len(v),
                                "seconds": round(time.perf_counter() - t0, 3)})
        outs, units = predict_items(predictor, image_files, args.batch_size, bar)
        for f, out, unit in zip(image_files, outs, units):
            record(f, unit, out, overlay_name=_safe(os.path.splitext(os.path.basename(f))[0]) + ".png")
    wall = time.perf_counter() - start
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    atomic_write_text(os.path.join(args.output, "images.json"),
                      json.dumps({"images": images, "annotations": [], "categories": cats}))
    atomic_write_text(os.path.join(args.output, "coco_instances_results.json"), json.dumps(results))
    if volumes:
        atomic_write_text(os.path.join(args.output, "candidates_3d.json"), json.dumps(candidates, indent=1))
        write_candidates_csv(os.path.join(args.output, "candidates_3d.csv"), candidates, names)
    summary = {"slices": total, "seconds": round(wall, 3), "slices_per_s": round(total / max(wall, 1e-9), 3),
               "batch_size": int(args.batch_size), "torch_threads": torch.get_num_threads(),
               "device": str(predictor.device), "volumes": vol_summary, "images": len(image_files),
               "detections": len(results), "candidates": len(candidates), "overlays": n_over[0]}
    atomic_write_text(os.path.join(args.output, "summary.json"), json.dumps(summary, indent=1))
    print(f"mdkd-predict: {total} slices in {wall:.1f} s ({summary['slices_per_s']:.2f} slices/s); "
          f"{len(volumes)} volumes, {len(results)} detections, {len(candidates)} 3-D candidates, "
          f"{n_over[0]} overlays -> {args.output}")
    return summary


def load_predictions(output_dir: str) -> Dict[str, List[dict]]:
    """Reload a predict run: ``{file_name: [{"bbox" [x, y, w, h] px, "score", "category_id"}]}``
    (every predicted slice is a key, also those without detections).

    Raises:
        DatasetError: ``images.json`` / ``coco_instances_results.json`` missing (names the folder).
    """
    from ..utils.errors import DatasetError

    try:
        with open(os.path.join(output_dir, "images.json"), encoding="utf-8") as f:
            imgs = json.load(f)["images"]
        with open(os.path.join(output_dir, "coco_instances_results.json"), encoding="utf-8") as f:
            res = json.load(f)
    except (OSError, ValueError, KeyError) as e:
        raise DatasetError(f"{output_dir}: not a predict output folder ({e})") from e
    by_id = {i["id"]: i["file_name"] for i in imgs}
    out: Dict[str, List[dict]] = {i["file_name"]: [] for i in imgs}
    for r in res:
        out[by_id[r["image_id"]]].append({k: r[k] for k in ("bbox", "score", "category_id")})
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """Parse, predict; exit status 0, or 2 with a one-line error for bad input."""
    args = argument_parser().parse_args(argv)
    try:
        run(args)
    except MdkdError as e:
        print(f"mdkd-predict: error: {e}", file=sys.stderr)
        return 2
    return 0
