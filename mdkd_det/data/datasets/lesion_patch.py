"""Lesion-patch classification data built from the three shared detection sets (issue 5).

:func:`build_lesion_patches` reads the detection records through the dataset catalog
(``lungct_train`` + ``lungct_valid``, ``lung_pet_ct_dx_all``, ``deeplesion_sample_train`` +
``_test``), windows each slice with :func:`mdkd_det.data.io.read_image` and crops

- **positive** patches: one per lesion box, a square centred on the box centre with side
  ``max(MIN_SIDE, CONTEXT * longer box side)`` px (zero padded at the border);
- **negative** patches: ``NEG_PER_IMAGE`` per slice, squares of the same side as a positive of
  that slice (so size is no cue), fully inside the slice, not touching any lesion box widened
  by a quarter side, and not blank (std >= 0.03 and mean >= 0.05 in window units), seeded;

every patch resized to ``SIZE`` x ``SIZE`` px (``cv2.INTER_AREA``), stored as uint8.

The three institutions are the three **domains** (``lungct`` = target, ``lung_pet_ct_dx``,
``deeplesion``). Each domain is split **by patient** (:func:`split_by_patient`: ``patient_id``,
else the CT ``series_id``, so LungCT's augmented copies of one series stay together) into
train/val/test with ``FRACTIONS``; patches inherit the split of their slice.

Layout of the output folder: ``patches.npz`` (``images`` uint8 [N, S, S], ``labels`` int64 [N],
0 = ``no_lesion``, 1 = ``lesion``) and ``manifest.json`` (parameters, per-patch domain / split /
patient / source file relative to the data root / crop box in source px, counts). Written atomically (temporary
folder + rename), so an interrupted build leaves nothing half-written.

Registered names (:func:`register_lesion_patches`): ``lesion_patch_<domain>_<split>`` for split
in train / val / test / all. The loaders build the folder on first use (cached).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

from ...utils.errors import DatasetError
from ..catalog import DatasetCatalog, MetadataCatalog
from ..io import read_image
from .records import load_dataset_records
from .splits import split_by_patient

__all__ = ["DOMAINS", "CLASSES", "build_lesion_patches", "default_patch_dir", "load_lesion_patches",
           "register_lesion_patches", "read_patch", "patch_params"]

logger = logging.getLogger(__name__)

#: domain -> detection datasets it is built from (LungCT is the target).
DOMAINS: Dict[str, Tuple[str, ...]] = {
    "lungct": ("lungct_train", "lungct_valid"),
    "lung_pet_ct_dx": ("lung_pet_ct_dx_all",),
    "deeplesion": ("deeplesion_sample_train", "deeplesion_sample_test"),
}
CLASSES = ("no_lesion", "lesion")
SPLITS = ("train", "val", "test", "all")
_FORMAT = 1


def patch_params(cfg) -> dict:
    """The build parameters of ``cfg.DATASETS.LESION_PATCH`` (plus the window, HU)."""
    p = cfg.DATASETS.LESION_PATCH
    return {"size": int(p.SIZE), "neg_per_image": int(p.NEG_PER_IMAGE), "context": float(p.CONTEXT),
            "min_side": int(p.MIN_SIDE), "seed": int(p.SEED), "max_slices": int(p.MAX_SLICES),
            "fractions": [float(f) for f in p.FRACTIONS], "window": [float(w) for w in cfg.INPUT.WINDOW]}


def default_patch_dir(cfg) -> str:
    """``DATASETS.LESION_PATCH.DIR``, else ``$MDKD_CACHE`` (default ``~/.cache/mdkd_det``) /
    ``lesion_patches_p<size>_n<neg>_s<seed>_<hash of the other parameters>``."""
    if cfg.DATASETS.LESION_PATCH.DIR:
        return os.path.expanduser(cfg.DATASETS.LESION_PATCH.DIR)
    from ...utils.env import dataset_root

    p = patch_params(cfg)
    key = json.dumps({**p, "root": os.path.abspath(dataset_root(cfg)), "format": _FORMAT}, sort_keys=True)
    h = hashlib.sha1(key.encode()).hexdigest()[:8]
    cache = os.path.expanduser(os.environ.get("MDKD_CACHE", "~/.cache/mdkd_det"))
    return os.path.join(cache, f"lesion_patches_p{p['size']}_n{p['neg_per_image']}_s{p['seed']}_{h}")


def _crop(img: np.ndarray, cx: float, cy: float, side: int, size: int) -> np.ndarray:
    """Square crop [side, side] centred at (cx, cy) px, zero padded, resized to [size, size]."""
    h, w = img.shape
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    out = np.zeros((side, side), dtype=np.float32)
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x0 + side), min(h, y0 + side)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img[sy0:sy1, sx0:sx1]
    return cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)


def _overlaps(box, boxes, margin: float) -> bool:
    x0, y0, x1, y1 = box
    for b in boxes:
        if x0 < b[2] + margin and x1 > b[0] - margin and y0 < b[3] + margin and y1 > b[1] - margin:
            return True
    return False


def _patches_of_slice(img: np.ndarray, boxes: List[Sequence[float]], rng: np.random.Generator,
                      p: dict) -> List[Tuple[np.ndarray, int, List[float]]]:
    """(patch [S, S] float in [0, 1], label, crop box xyxy px) of one slice."""
    h, w = img.shape
    out, sides = [], []
    for b in boxes:
        bw, bh = b[2] - b[0], b[3] - b[1]
        side = int(min(max(p["min_side"], p["context"] * max(bw, bh)), min(h, w)))
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        sides.append(side)
        out.append((_crop(img, cx, cy, side, p["size"]), 1,
                    [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]))
    for _ in range(p["neg_per_image"]):
        side = int(sides[rng.integers(len(sides))]) if sides else int(p["min_side"])
        for _try in range(100):
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop_box = [x0, y0, x0 + side, y0 + side]
            if _overlaps(crop_box, boxes, side / 4):
                continue
            patch = img[y0:y0 + side, x0:x0 + side]
            if patch.std() < 0.03 or patch.mean() < 0.05:
                continue
            out.append((cv2.resize(patch, (p["size"], p["size"]), interpolation=cv2.INTER_AREA), 0,
                        [float(c) for c in crop_box]))
            break
    return out


def build_lesion_patches(cfg, out_dir: str, overwrite: bool = False) -> str:
    """Crop the lesion-patch dataset of ``cfg`` (see the module docstring) into ``out_dir``.

    Args:
        cfg: config (``DATASETS.ROOT`` / ``$MDKD_DATASETS``, ``DATASETS.LESION_PATCH.*``,
            ``INPUT.WINDOW`` in HU for the DICOM source, ``DATASETS.BOX_POLICY``).
        out_dir: output folder (created; replaced only with ``overwrite``).
        overwrite: rebuild when ``out_dir`` already holds a manifest.

    Returns:
        ``out_dir``.

    Raises:
        DatasetError: a detection dataset is missing or unreadable (names the file), or a domain
            yields no patch.
    """
    if os.path.isfile(os.path.join(out_dir, "manifest.json")) and not overwrite:
        return out_dir
    from ...utils.env import dataset_root

    p = patch_params(cfg)
    root = os.path.abspath(dataset_root(cfg))
    rng = np.random.default_rng(p["seed"])
    images, labels, meta = [], [], []
    for domain, names in DOMAINS.items():
        records = load_dataset_records(cfg, names)
        if p["max_slices"] and len(records) > p["max_slices"]:
            keep = sorted(np.random.default_rng(p["seed"]).choice(len(records), p["max_slices"], replace=False))
            records = [records[i] for i in keep]
        splits = split_by_patient(records, p["fractions"], p["seed"])
        split_of = {id(r): s for s, rs in splits.items() for r in rs}
        n0 = len(images)
        for r in records:
            img = read_image(r, window=p["window"])
            boxes = [a["bbox"] for a in r.get("annotations", [])]
            for patch, label, crop in _patches_of_slice(img, boxes, rng, p):
                images.append(np.clip(np.round(patch * 255.0), 0, 255).astype(np.uint8))
                labels.append(label)
                meta.append({"domain": domain, "split": split_of[id(r)],
                             "patient_id": str(r.get("patient_id") or r.get("series_id") or r["image_id"]),
                             "source_file": os.path.relpath(r["file_name"], root),
                             "source_image_id": str(r["image_id"]), "crop_xyxy": [round(c, 1) for c in crop]})
        if len(images) == n0:
            raise DatasetError(f"lesion patches: domain '{domain}' ({list(names)}) gave no patch")
        logger.info("lesion patches: %s -> %d patches from %d slices", domain, len(images) - n0, len(records))
    counts = Counter((m["domain"], m["split"], CLASSES[y]) for m, y in zip(meta, labels))
    manifest = {
        "format": _FORMAT, "classes": list(CLASSES), "params": p, "domains": {k: list(v) for k, v in DOMAINS.items()},
        "counts": {f"{d}/{s}/{c}": n for (d, s, c), n in sorted(counts.items())},
        "patients": {f"{d}/{s}": len({m["patient_id"] for m in meta if m["domain"] == d and m["split"] == s})
                     for d in DOMAINS for s in ("train", "val", "test")},
        "patches": meta,
    }
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".lesion_patches_", dir=parent)
    np.savez_compressed(os.path.join(tmp, "patches.npz"), images=np.stack(images),
                        labels=np.asarray(labels, dtype=np.int64))
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    logger.info("lesion patches: wrote %d patches to %s", len(images), out_dir)
    return out_dir


@functools.lru_cache(maxsize=2)
def _npz_images(path: str) -> np.ndarray:
    with np.load(path) as z:
        return z["images"]


def read_patch(record: dict) -> np.ndarray:
    """The grey patch of a lesion-patch record: float32 [S, S] in [0, 1].

    Raises:
        DatasetError: the ``patches.npz`` file is missing or unreadable (names it).
    """
    path = record["file_name"]
    try:
        arr = _npz_images(path)
    except Exception as e:
        raise DatasetError(f"{path}: cannot read lesion patches: {e}") from e
    return arr[int(record["patch_index"])].astype(np.float32) / 255.0


def load_lesion_patches(patch_dir: str, domain: str, split: str) -> List[dict]:
    """Records of one domain/split of a built patch folder.

    Each record: ``file_name`` (the ``patches.npz``), ``patch_index``, ``image_id``
    (``"<domain>/<index>"``), ``height`` = ``width`` = S px, ``label`` (0/1), ``domain``,
    ``patient_id``, ``split``, ``annotations`` = [].

    Raises:
        DatasetError: missing/invalid manifest, unknown domain or split.
    """
    mf = os.path.join(patch_dir, "manifest.json")
    if not os.path.isfile(mf):
        raise DatasetError(f"{mf}: missing; build it with tools/make_lesion_patches.py --out {patch_dir}")
    if domain not in DOMAINS or split not in SPLITS:
        raise DatasetError(f"lesion patches: unknown domain/split {domain}/{split}; "
                           f"domains {list(DOMAINS)}, splits {list(SPLITS)}")
    with open(mf) as f:
        manifest = json.load(f)
    npz = os.path.join(patch_dir, "patches.npz")
    with np.load(npz) as z:
        labels = z["labels"]
    size = int(manifest["params"]["size"])
    out = []
    for i, m in enumerate(manifest["patches"]):
        if m["domain"] != domain or (split != "all" and m["split"] != split):
            continue
        out.append({"file_name": npz, "patch_index": i, "image_id": f"{domain}/{i}", "height": size,
                    "width": size, "label": int(labels[i]), "domain": domain, "patient_id": m["patient_id"],
                    "split": m["split"], "annotations": []})
    return out


def register_lesion_patches(cfg) -> List[str]:
    """Register ``lesion_patch_<domain>_<split>`` for the folder of ``cfg`` (idempotent).

    Each loader builds the folder on first use (:func:`build_lesion_patches`). Metadata:
    ``thing_classes`` = :data:`CLASSES`, ``evaluator_type = "classification"``, ``domain``.
    """
    patch_dir = default_patch_dir(cfg)
    cfg_copy = cfg.clone()
    names = []
    for domain in DOMAINS:
        for split in SPLITS:
            name = f"lesion_patch_{domain}_{split}"
            names.append(name)
            if name in DatasetCatalog and MetadataCatalog.get(name).get("patch_dir") == patch_dir:
                continue
            if name in DatasetCatalog:
                DatasetCatalog.remove(name)

            def load(domain=domain, split=split) -> List[dict]:
                build_lesion_patches(cfg_copy, patch_dir)
                return load_lesion_patches(patch_dir, domain, split)

            DatasetCatalog.register(name, load)
            MetadataCatalog.get(name).set(thing_classes=list(CLASSES), evaluator_type="classification",
                                          domain=domain, patch_dir=patch_dir)
    return names
