"""Lung-PET-CT-Dx (TCIA): DICOM tree + PASCAL VOC XML -> records.

Layout (TCIA download; folder names contain spaces, even double spaces)::

    <dicom_root>/.../Lung_Dx-A0001/<study>/<series>/1-NN.dcm
    <annotation_dir>/A0001/<SOPInstanceUID>.xml

An XML is matched to its DICOM by the DICOM's ``SOPInstanceUID`` tag (the XML file name is
that UID), never by DICOM file name. Headers are read with pydicom
(``stop_before_pixels=True``); XML with :mod:`xml.etree.ElementTree`. Only ``*.dcm`` files
are indexed, and subject folders ``Lung_Dx-<id>`` without an ``<annotation_dir>/<id>`` folder
are not walked (the full collection has ~250k DICOMs, most without boxes).

**Pixel convention.** PASCAL VOC boxes are 1-based, inclusive pixel indices (the VOC devkit;
detectron2's ``pascal_voc`` loader subtracts 1 from xmin/ymin for the same reason). With
``voc_one_based=True`` (default) a box ``xmin..xmax`` becomes the continuous 0-based box
``[xmin - 1, ymin - 1, xmax, ymax]``: its width ``xmax - xmin + 1`` equals the number of
annotated pixel columns. ``voc_one_based=False`` takes the numbers as given.

**Classes.** The collection's subtypes are A (adenocarcinoma), B (small cell carcinoma),
E (large cell carcinoma) and G (squamous cell carcinoma). By default every box is one class
``"lesion"`` (paper_notes A24); ``keep_subtypes=True`` keeps four classes in the fixed order
A, B, E, G (so ids do not depend on which subtypes a subset contains).

Source: Li P. et al., "A Large-Scale CT and PET/CT Dataset for Lung Cancer Diagnosis", TCIA
2020, DOI 10.7937/TCIA.2020.NNC20461.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Tuple

from ...utils.errors import DatasetError

__all__ = ["SUBTYPES", "SUBJECT_PREFIX", "load_lung_pet_ct_dx", "lung_pet_ct_dx_metadata"]

#: Histologic subtype codes of Lung-PET-CT-Dx, in contiguous-id order for ``keep_subtypes``.
SUBTYPES: Tuple[str, ...] = ("A", "B", "E", "G")
#: Prefix of a subject folder in the TCIA tree: ``Lung_Dx-A0001`` -> patient ``A0001``.
SUBJECT_PREFIX = "Lung_Dx-"

_TAGS = ["SOPInstanceUID", "SeriesInstanceUID", "Rows", "Columns", "PatientID"]


def lung_pet_ct_dx_metadata(keep_subtypes: bool = False) -> dict:
    """Metadata of this dataset: ``thing_classes`` and ``thing_dataset_id_to_contiguous_id``.

    Source ids are 1-based positions in :data:`SUBTYPES` (A=1, B=2, E=3, G=4); the single-class
    mapping is ``{1: 0}`` (``"lesion"``).
    """
    if keep_subtypes:
        return {
            "thing_classes": list(SUBTYPES),
            "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(SUBTYPES))},
        }
    return {"thing_classes": ["lesion"], "thing_dataset_id_to_contiguous_id": {1: 0}}


def _index_dicoms(
    dicom_root: str, patients: Optional[set], skip_dir: Optional[str]
) -> Dict[str, dict]:
    """SOPInstanceUID -> header facts for every ``*.dcm`` under ``dicom_root``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    index: Dict[str, dict] = {}
    skip_real = os.path.realpath(skip_dir) if skip_dir else None
    for dirpath, dirnames, filenames in os.walk(dicom_root):
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if skip_real and os.path.realpath(full) == skip_real:
                continue
            # subjects without any annotation cannot match: skip their (large) folders
            if patients is not None and d.startswith(SUBJECT_PREFIX):
                if d[len(SUBJECT_PREFIX):] not in patients:
                    continue
            keep.append(d)
        dirnames[:] = keep
        for fn in sorted(filenames):
            if not fn.lower().endswith(".dcm"):
                continue
            path = os.path.join(dirpath, fn)
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
            except InvalidDicomError as e:
                raise DatasetError(f"{path}: not a DICOM file ({e})") from e
            except Exception as e:  # truncated / corrupt header
                raise DatasetError(f"{path}: unreadable DICOM ({type(e).__name__}: {e})") from e
            uid = ds.get("SOPInstanceUID")
            if not uid:
                raise DatasetError(f"{path}: DICOM has no SOPInstanceUID")
            uid = str(uid)
            if uid in index:
                raise DatasetError(
                    f"SOPInstanceUID {uid} appears in two files: {index[uid]['path']} and {path}"
                )
            index[uid] = {
                "path": path,
                "series": str(ds.get("SeriesInstanceUID", "")),
                "rows": ds.get("Rows"),
                "columns": ds.get("Columns"),
            }
    return index


def _xml_float(obj: ET.Element, tag: str, xml_file: str) -> float:
    node = obj.find(f"bndbox/{tag}")
    if node is None or node.text is None:
        raise DatasetError(f"{xml_file}: <object> without <bndbox><{tag}>")
    try:
        v = float(node.text.strip())
    except ValueError:
        raise DatasetError(f"{xml_file}: <{tag}> is not a number: {node.text!r}") from None
    if not math.isfinite(v):
        raise DatasetError(f"{xml_file}: <{tag}> is not a finite number: {node.text!r}")
    return v


def _parse_xml(xml_file: str) -> Tuple[Optional[Tuple[int, int]], List[Tuple[str, List[float]]]]:
    """Return ((width, height) from <size> or None, [(name, [xmin, ymin, xmax, ymax])])."""
    try:
        root = ET.parse(xml_file).getroot()
    except (ET.ParseError, OSError) as e:
        raise DatasetError(f"{xml_file}: unreadable PASCAL VOC XML ({e})") from e
    size = None
    w_node, h_node = root.find("size/width"), root.find("size/height")
    if w_node is not None and h_node is not None and w_node.text and h_node.text:
        try:
            size = (int(float(w_node.text)), int(float(h_node.text)))
        except (ValueError, OverflowError):
            raise DatasetError(f"{xml_file}: <size> is not numeric") from None
    objects = []
    for obj in root.findall("object"):
        name_node = obj.find("name")
        name = (name_node.text or "").strip() if name_node is not None else ""
        box = [_xml_float(obj, t, xml_file) for t in ("xmin", "ymin", "xmax", "ymax")]
        objects.append((name, box))
    return size, objects


def load_lung_pet_ct_dx(
    dicom_root: str,
    annotation_dir: Optional[str] = None,
    keep_subtypes: bool = False,
    voc_one_based: bool = True,
) -> List[dict]:
    """Load annotated Lung-PET-CT-Dx slices as records.

    Args:
        dicom_root: folder walked for ``*.dcm`` (e.g. the ``Lung-PET-CT-Dx`` download folder,
            or its parent).
        annotation_dir: ``Annotation`` folder with ``<patient>/<SOPInstanceUID>.xml``;
            default ``<dicom_root>/Annotation``.
        keep_subtypes: four classes A/B/E/G instead of one ``"lesion"`` class.
        voc_one_based: treat VOC boxes as 1-based inclusive pixels (see module docstring).

    Returns:
        One record per XML, sorted by patient then DICOM path: ``file_name`` (DICOM path),
        ``height``/``width`` (Rows/Columns, px), ``image_id`` (SOPInstanceUID, str),
        ``reader="dicom"``, ``patient_id`` (``"A0001"``), ``series_id`` (SeriesInstanceUID),
        ``annotations`` (XYXY_ABS float px).

    Raises:
        DatasetError: missing folders; unreadable or non-DICOM ``.dcm`` file; duplicate
            SOPInstanceUID; unreadable XML or box; XML without a matching DICOM (names the XML);
            DICOM without Rows/Columns; XML <size> different from the DICOM size; unknown
            subtype name with ``keep_subtypes``.
    """
    if annotation_dir is None:
        annotation_dir = os.path.join(dicom_root, "Annotation")
    for d, what in ((dicom_root, "DICOM root"), (annotation_dir, "annotation folder")):
        if not os.path.isdir(d):
            raise DatasetError(f"Lung-PET-CT-Dx {what} not found: {d}")

    xml_files: List[Tuple[str, str]] = []  # (patient, path)
    for patient in sorted(os.listdir(annotation_dir)):
        pdir = os.path.join(annotation_dir, patient)
        if not os.path.isdir(pdir):
            continue
        for fn in sorted(os.listdir(pdir)):
            if fn.lower().endswith(".xml"):
                xml_files.append((patient, os.path.join(pdir, fn)))
    patients = {p for p, _ in xml_files}
    index = _index_dicoms(dicom_root, patients, skip_dir=annotation_dir)

    records = []
    for patient, xml_file in xml_files:
        uid = os.path.basename(xml_file)[: -len(".xml")]
        info = index.get(uid)
        if info is None:
            raise DatasetError(
                f"{xml_file}: no DICOM with SOPInstanceUID {uid} under {dicom_root}"
            )
        if info["rows"] is None or info["columns"] is None:
            raise DatasetError(f"{info['path']}: DICOM has no Rows/Columns (not an image)")
        height, width = int(info["rows"]), int(info["columns"])
        size, objects = _parse_xml(xml_file)
        if size is not None and size != (width, height):
            raise DatasetError(
                f"{xml_file}: <size> {size[0]}x{size[1]} (WxH) differs from its DICOM "
                f"{info['path']} ({width}x{height})"
            )
        anns = []
        for name, (xmin, ymin, xmax, ymax) in objects:
            if keep_subtypes:
                if name not in SUBTYPES:
                    raise DatasetError(
                        f"{xml_file}: unknown subtype <name>{name}</name>; expected one of {SUBTYPES}"
                    )
                cid = SUBTYPES.index(name)
            else:
                cid = 0
            off = 1.0 if voc_one_based else 0.0
            anns.append({"bbox": [xmin - off, ymin - off, xmax, ymax], "category_id": cid})
        records.append(
            {
                "file_name": info["path"],
                "height": height,
                "width": width,
                "image_id": uid,
                "reader": "dicom",
                "patient_id": patient,
                "series_id": info["series"],
                "annotations": anns,
            }
        )
    records.sort(key=lambda r: (r["patient_id"], r["file_name"]))
    return records
