"""DeepLesion truth samples: ``DeepLesion_Truth_Samples/{train,test}/*.jpg`` + ``.tru`` files.

Each ``<name>.jpg`` (8-bit, RGB copies of one grey channel, a very wide -1024..3071 HU window)
has a ``<name>.tru`` text file with one lesion per line::

    label ymin xmin ymax xmax        # normalised to 0..1, note the y-first order

``label`` follows DeepLesion's coarse lesion types (5 = lung, see
:data:`~mdkd_det.data.datasets.deeplesion.LESION_TYPES`). Boxes become
``[xmin*W, ymin*H, xmax*W, ymax*H]`` px with the image size read from the JPEG header (PIL,
no decoding). File names follow ``<Patient>_<Study>_<Series>_<Slice>``, so
``patient_id = str(int(Patient))`` and ``series_id = "<Patient>_<Study>_<Series>"``, the same
ids as :func:`~mdkd_det.data.datasets.deeplesion.load_deeplesion`.

Source: NIH Clinical Center DeepLesion release (Yan K. et al., J. Med. Imaging 5(3), 2018).
"""

from __future__ import annotations

import os
import re
from typing import List

from ...utils.errors import DatasetError

__all__ = ["LUNG_LABEL", "load_deeplesion_sample"]

#: DeepLesion coarse lesion type of the lung.
LUNG_LABEL = 5

_NAME_RE = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)$")


def _image_size(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size  # (width, height)
    except (OSError, UnidentifiedImageError) as e:
        raise DatasetError(f"cannot read image header of {path} ({e})") from e


def _parse_tru(tru: str):
    out = []
    try:
        with open(tru, "r", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {tru} ({e})") from e
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 5:
                raise ValueError
            label = int(float(parts[0]))
            ymin, xmin, ymax, xmax = (float(p) for p in parts[1:])
        except ValueError:
            raise DatasetError(
                f"{tru}, line {n}: expected 'label ymin xmin ymax xmax', got {line!r}"
            ) from None
        if not all(0.0 <= v <= 1.0 for v in (ymin, xmin, ymax, xmax)):
            raise DatasetError(f"{tru}, line {n}: coordinates must be normalised to 0..1: {line!r}")
        if xmax < xmin or ymax < ymin:
            raise DatasetError(f"{tru}, line {n}: max < min in {line!r}")
        out.append((label, ymin, xmin, ymax, xmax))
    return out


def load_deeplesion_sample(root: str, split: str = "train", lung_only: bool = False) -> List[dict]:
    """Load the DeepLesion JPEG truth samples of one split.

    Args:
        root: the ``DeepLesion_Truth_Samples`` folder (holding ``train/`` and ``test/``).
        split: sub-folder name, ``"train"`` or ``"test"``.
        lung_only: keep only lung lesions (label 5); images without one are dropped (their
            other lesions are not lung nodules, and would be unannotated positives).

    Returns:
        Records sorted by file name: ``file_name`` (JPEG), ``height``/``width`` (px),
        ``image_id`` (file stem, str), ``reader="image"``, ``patient_id``, ``series_id``,
        ``annotations`` = ``[{"bbox": [x1, y1, x2, y2] px, "category_id": 0,
        "lesion_type": label}]``.

    Raises:
        DatasetError: split folder missing; JPEG without ``.tru``; malformed ``.tru`` line
            (names file and line); unreadable JPEG header; file name not
            ``<P>_<S>_<Se>_<slice>``.
    """
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DatasetError(f"DeepLesion sample folder not found: {folder}")
    records = []
    for fn in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(fn)
        if ext.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        m = _NAME_RE.match(stem)
        if m is None:
            raise DatasetError(f"{os.path.join(folder, fn)}: name is not <P>_<S>_<Se>_<slice>")
        path = os.path.join(folder, fn)
        tru = os.path.join(folder, stem + ".tru")
        if not os.path.isfile(tru):
            raise DatasetError(f"{path}: annotation file {tru} not found")
        width, height = _image_size(path)
        anns = []
        for label, ymin, xmin, ymax, xmax in _parse_tru(tru):
            if lung_only and label != LUNG_LABEL:
                continue
            anns.append(
                {
                    "bbox": [xmin * width, ymin * height, xmax * width, ymax * height],
                    "category_id": 0,
                    "lesion_type": label,
                }
            )
        if lung_only and not anns:
            continue
        records.append(
            {
                "file_name": path,
                "height": int(height),
                "width": int(width),
                "image_id": stem,
                "reader": "image",
                "patient_id": str(int(m.group(1))),
                "series_id": "_".join(m.group(1, 2, 3)),
                "annotations": anns,
            }
        )
    return records
