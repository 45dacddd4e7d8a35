"""DeepLesion (NIH Clinical Center), official release: ``DL_info.csv`` + ``Images_png``.

Layout::

    DL_info.csv
    Images_png/<Patient:06d>_<Study:02d>_<Series:02d>/<Slice:03d>.png   (16-bit, HU = v - 32768)

``File_name`` ``000089_01_01_037.png`` is the key slice ``Images_png/000089_01_01/037.png``.
Each CSV row is one lesion; rows of the same key slice become one record. Decisions:

- Boxes: ``Bounding_boxes`` = ``x1, y1, x2, y2`` in px, taken as given (the release already
  pads the RECIST extent by 5 px on each side).
- Class: one class ``"lesion"`` (paper_notes A23/A24); each annotation also carries its
  ``lesion_type`` (``Coarse_lesion_type``: 1 bone, 2 abdomen, 3 mediastinum, 4 liver, 5 lung,
  6 kidney, 7 soft tissue, 8 pelvis, -1 unlabelled).
- Filters act per lesion; a key slice is kept if at least one of its lesions passes. Other
  lesions on a kept slice are then unannotated (e.g. a liver lesion on a lung-filtered slice).
  ``Coarse_lesion_type`` is -1 for the whole official train split, so ``lesion_types=(5,)``
  keeps val/test lesions only (paper_notes A23: re-split these patient-level afterwards).
- ``Image_size`` is read as ``width, height`` (x first, like every other multi-valued column of
  the file). All released slices are 512x512; :func:`~mdkd_det.data.io.read_image` raises if a
  decoded image disagrees with the record.
- ``DICOM_windows`` holds the original window as ``min, max`` HU. Every record carries it as
  ``record["dicom_window"] = (level, width) = ((min + max) / 2, max - min)``; with
  ``use_dicom_window`` it is also ``record["window"]`` (which the reader then uses).
- ``patient_id`` = ``str(Patient_index)``; ``series_id`` = ``"<P:06d>_<S:02d>_<Se:02d>"``
  (one CT volume); ``image_id`` = the file name without ``.png``.

Source: Yan K. et al., "DeepLesion: automated mining of large-scale lesion annotations and
universal lesion detection with deep learning", J. Med. Imaging 5(3), 2018; the CSV is parsed
with the :mod:`csv` module.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from typing import Dict, List, Optional, Sequence

from ...utils.errors import DatasetError

__all__ = ["DL_INFO_COLUMNS", "LESION_TYPES", "SPLITS", "deeplesion_image_path", "load_deeplesion"]

#: Columns this loader needs (the official header has more).
DL_INFO_COLUMNS = (
    "File_name",
    "Patient_index",
    "Bounding_boxes",
    "Coarse_lesion_type",
    "Possibly_noisy",
    "Image_size",
    "DICOM_windows",
    "Train_Val_Test",
)
#: ``Coarse_lesion_type`` codes (DeepLesion label map).
LESION_TYPES = {
    1: "bone", 2: "abdomen", 3: "mediastinum", 4: "liver",
    5: "lung", 6: "kidney", 7: "soft_tissue", 8: "pelvis",
}
#: ``Train_Val_Test`` codes.
SPLITS = {"train": 1, "val": 2, "test": 3}

_FILE_RE = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)\.png$")


def deeplesion_image_path(image_root: str, file_name: str) -> str:
    """``Images_png`` path of a ``File_name`` (``000089_01_01_037.png`` ->
    ``<image_root>/000089_01_01/037.png``).

    Raises:
        DatasetError: ``file_name`` is not ``<P>_<S>_<Se>_<slice>.png``.
    """
    m = _FILE_RE.match(file_name)
    if m is None:
        raise DatasetError(f"DeepLesion File_name {file_name!r} is not <P>_<S>_<Se>_<slice>.png")
    folder = "_".join(m.group(1, 2, 3))
    return os.path.join(image_root, folder, m.group(4) + ".png")


def _numbers(text: str, n: int, where: str, col: str) -> List[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise DatasetError(f"{where}, column {col}: not numbers: {text!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise DatasetError(f"{where}, column {col}: non-finite number in {text!r}")
    if len(vals) != n:
        raise DatasetError(f"{where}, column {col}: expected {n} comma-separated numbers, got {text!r}")
    return vals


def _int(text: str, where: str, col: str, allowed: Optional[Sequence[int]] = None) -> int:
    try:
        v = int(float(text))
    except (TypeError, ValueError, OverflowError):
        raise DatasetError(f"{where}, column {col}: not an integer: {text!r}") from None
    if allowed is not None and v not in allowed:
        raise DatasetError(f"{where}, column {col}: {v} not in {sorted(allowed)}")
    return v


def _rows(reader: "csv.DictReader", csv_file: str):
    """``(row number counted from the header as 1, row)``; a CSV syntax error -> DatasetError."""
    rownum = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DatasetError(f"{csv_file}, row {rownum + 1}: malformed CSV ({e})") from e
        rownum += 1
        yield rownum, row


def load_deeplesion(
    csv_file: str,
    image_root: str,
    split: Optional[str] = None,
    lesion_types: Optional[Sequence[int]] = (5,),
    drop_noisy: bool = False,
    use_dicom_window: bool = False,
    check_images: bool = True,
) -> List[dict]:
    """Load DeepLesion key slices from the official ``DL_info.csv``.

    Args:
        csv_file: ``DL_info.csv`` path.
        image_root: the ``Images_png`` folder.
        split: ``None`` (all rows), ``"train"``, ``"val"`` or ``"test"`` (``Train_Val_Test``
            1/2/3, the official split).
        lesion_types: ``Coarse_lesion_type`` codes to keep (default ``(5,)`` = lung);
            ``None`` keeps all (including -1).
        drop_noisy: drop lesions with ``Possibly_noisy == 1``.
        use_dicom_window: set ``record["window"]`` from ``DICOM_windows`` (HU level, width).
        check_images: raise if a kept key slice's PNG does not exist (``os.path.isfile`` only).

    Returns:
        Records in CSV order of first appearance: ``file_name``, ``height``/``width`` (px),
        ``image_id`` (``"000089_01_01_037"``), ``reader="png16_hu"``, ``patient_id``,
        ``series_id``, ``dicom_window`` (level, width HU), ``window`` (only with
        ``use_dicom_window``), ``annotations`` =
        ``[{"bbox": [x1, y1, x2, y2] px, "category_id": 0, "lesion_type": int}]``.

    Raises:
        DatasetError: missing CSV; not UTF-8; missing columns; malformed row or CSV syntax, or
            a non-finite number (message: CSV path, row number counted from the header as row
            1, column); bad ``split``; missing image with ``check_images``.
    """
    if split is not None and split not in SPLITS:
        raise DatasetError(f"DeepLesion split must be None or one of {sorted(SPLITS)}, got {split!r}")
    if not os.path.isfile(csv_file):
        raise DatasetError(f"DeepLesion DL_info.csv not found: {csv_file}")
    types = None if lesion_types is None else {int(t) for t in lesion_types}

    by_key: Dict[str, dict] = {}
    order: List[str] = []
    try:
        with open(csv_file, "r", newline="", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{csv_file}: not UTF-8 text ({e})") from e
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
    except csv.Error as e:
        raise DatasetError(f"{csv_file}, row 1: malformed CSV header ({e})") from e
    missing = [c for c in DL_INFO_COLUMNS if c not in header]
    if missing:
        raise DatasetError(f"{csv_file}: missing column(s) {missing} (header: {reader.fieldnames})")
    for rownum, row in _rows(reader, csv_file):
        where = f"{csv_file}, row {rownum}"
        fname = (row.get("File_name") or "").strip()
        m = _FILE_RE.match(fname)
        if m is None:
            raise DatasetError(f"{where}, column File_name: not <P>_<S>_<Se>_<slice>.png: {fname!r}")
        patient = _int(row["Patient_index"], where, "Patient_index")
        if patient != int(m.group(1)):
            raise DatasetError(
                f"{where}, column Patient_index: {patient} does not match File_name {fname}"
            )
        box = _numbers(row["Bounding_boxes"] or "", 4, where, "Bounding_boxes")
        if box[2] < box[0] or box[3] < box[1]:
            raise DatasetError(f"{where}, column Bounding_boxes: x2 < x1 or y2 < y1: {box}")
        ltype = _int(row["Coarse_lesion_type"], where, "Coarse_lesion_type", [-1, *LESION_TYPES])
        noisy = _int(row["Possibly_noisy"], where, "Possibly_noisy", [0, 1])
        sp = _int(row["Train_Val_Test"], where, "Train_Val_Test", [1, 2, 3])
        width, height = (int(v) for v in _numbers(row["Image_size"] or "", 2, where, "Image_size"))
        if width <= 0 or height <= 0:
            raise DatasetError(f"{where}, column Image_size: must be positive, got {width}, {height}")
        wmin, wmax = _numbers(row["DICOM_windows"] or "", 2, where, "DICOM_windows")
        if wmax <= wmin:
            raise DatasetError(f"{where}, column DICOM_windows: max <= min: {wmin}, {wmax}")

        if split is not None and sp != SPLITS[split]:
            continue
        if types is not None and ltype not in types:
            continue
        if drop_noisy and noisy:
            continue
        key = fname[: -len(".png")]
        rec = by_key.get(key)
        if rec is None:
            rec = {
                "file_name": deeplesion_image_path(image_root, fname),
                "height": height,
                "width": width,
                "image_id": key,
                "reader": "png16_hu",
                "patient_id": str(patient),
                "series_id": "_".join(m.group(1, 2, 3)),
                "annotations": [],
            }
            dicom_window = ((wmin + wmax) / 2.0, wmax - wmin)
            rec["dicom_window"] = dicom_window
            if use_dicom_window:
                rec["window"] = dicom_window
            by_key[key] = rec
            order.append(key)
        rec["annotations"].append(
            {"bbox": [float(v) for v in box], "category_id": 0, "lesion_type": ltype}
        )

    records = [by_key[k] for k in order]
    if check_images:
        for r in records:
            if not os.path.isfile(r["file_name"]):
                raise DatasetError(
                    f"DeepLesion image not found: {r['file_name']} (key slice {r['image_id']} "
                    f"of {csv_file})"
                )
    return records
