"""COCO JSON + image folder -> records, and records -> COCO JSON.

Any COCO detection export works (Roboflow's LungCT export is the built-in case). Decisions:

- **Image ids** are the JSON's own (``image_id`` = ``images[i]["id"]``), so predictions written
  with them match the original file.
- **Unused supercategories are dropped.** Roboflow writes the project itself as a category
  (LungCT: id 0 ``lung_ct``, the supercategory of id 1 ``nodule``, with no boxes). A category
  with no annotations whose name is the ``supercategory`` of another category is removed.
- **Contiguous ids** ``0..K-1`` follow ascending source category id over the kept categories;
  ``thing_dataset_id_to_contiguous_id`` maps back. ``single_class="lesion"`` maps every kept
  category to contiguous id 0 named ``"lesion"`` (paper_notes A24).
- Boxes are converted from COCO ``[x, y, w, h]`` to ``[x1, y1, x2, y2]`` (float px).
  Crowd annotations (``iscrowd=1``) are dropped with a counted warning: the record schema has
  no crowd flag and medical exports have none.
- Images without annotations are kept with an empty list (negatives).
- Annotation ids of the source are not kept: :func:`records_to_coco_dict` numbers them from 1,
  because pycocotools / faster-coco-eval treat id 0 as "unmatched" (README of the data: the
  Roboflow export starts at 0).
- The loader opens only the JSON; missing image files are found by
  :func:`~mdkd_det.data.datasets.validate.check_records` or when reading.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ...utils.errors import DatasetError
from ..catalog import DatasetCatalog, MetadataCatalog
from ..io import reader_for_path

__all__ = [
    "COCO_SPEC_PREFIX",
    "coco_image_ids",
    "load_coco_json",
    "maybe_register_coco_spec",
    "parse_coco_spec",
    "records_to_coco_dict",
    "register_coco_instances",
]

logger = logging.getLogger(__name__)

#: Prefix of dataset names registered on the fly: ``coco:<path/to/ann.json>:<image_dir>``.
COCO_SPEC_PREFIX = "coco:"


def _load_json(json_file: str) -> dict:
    if not os.path.isfile(json_file):
        raise DatasetError(f"COCO JSON not found: {json_file}")
    try:
        with open(json_file, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{json_file}: not readable JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{json_file}: not a COCO JSON (no 'images' list)")
    if not data["images"]:
        raise DatasetError(f"{json_file}: empty COCO JSON (no images)")
    return data


def _is_id(v: Any) -> bool:
    """A usable COCO id: an int or a string (not bool/float/list/dict/None)."""
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _kept_categories(data: dict, json_file: str) -> List[dict]:
    """Categories minus unused supercategories, sorted by source id."""
    cats = data.get("categories") or []
    if not isinstance(cats, list):
        raise DatasetError(f"{json_file}: 'categories' must be a list")
    for c in cats:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DatasetError(f"{json_file}: category without id/name: {c!r}")
        if not _is_id(c["id"]) or not isinstance(c["name"], str):
            raise DatasetError(f"{json_file}: category id must be an int or string and name a string: {c!r}")
    anns = data.get("annotations") or []
    if not isinstance(anns, list):
        raise DatasetError(f"{json_file}: 'annotations' must be a list")
    used = {a.get("category_id") for a in anns if isinstance(a, dict) and _is_id(a.get("category_id"))}
    supers = {c.get("supercategory") for c in cats if isinstance(c.get("supercategory"), str)}
    kept = [c for c in cats if c["id"] in used or c["name"] not in supers]
    ids = [c["id"] for c in kept]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{json_file}: duplicate category ids {sorted(map(str, ids))}")
    if len({type(i) for i in ids}) > 1:
        raise DatasetError(f"{json_file}: category ids mix integers and strings: {ids}")
    return sorted(kept, key=lambda c: c["id"])


def load_coco_json(
    json_file: str,
    image_root: str,
    dataset_name: Optional[str] = None,
    single_class: Optional[str] = None,
) -> List[dict]:
    """Load a COCO detection JSON into records (schema: ``mdkd_det/data/catalog.py``).

    Args:
        json_file: COCO JSON path.
        image_root: folder that ``images[i]["file_name"]`` is relative to.
        dataset_name: if given, sets ``MetadataCatalog.get(dataset_name)``: ``thing_classes``,
            ``thing_dataset_id_to_contiguous_id``, ``json_file``, ``image_root``,
            ``evaluator_type="coco"``.
        single_class: if given (e.g. ``"lesion"``), every kept category maps to contiguous id 0
            with this name.

    Returns:
        One record per image, in the JSON's image order: ``file_name`` (image_root joined),
        ``height``/``width`` (px), ``image_id`` (the JSON id), ``reader`` from the file
        (:func:`~mdkd_det.data.io.reader_for_path`: ``.dcm`` -> ``"dicom"``, 16-bit PNG ->
        ``"png16_hu"``, JPEG/8-bit PNG -> ``"image"``),
        ``annotations`` = ``[{"bbox": [x1, y1, x2, y2] float px, "category_id": int}]``.

    Raises:
        DatasetError: JSON missing or unreadable; not COCO or without images ("empty COCO JSON");
            image without id/file_name/height/width; ids that are not ints or strings; duplicate
            image id; annotation referring to an unknown image or category; bbox that is not 4
            finite numbers.

    Source: the COCO format (cocodataset.org/#format-data); detectron2's ``load_coco_json``
    behaviour for ids and metadata (re-implemented).
    """
    data = _load_json(json_file)
    cats = _kept_categories(data, json_file)
    if single_class:
        id_map = {c["id"]: 0 for c in cats}
        classes = [str(single_class)]
    else:
        id_map = {c["id"]: i for i, c in enumerate(cats)}
        classes = [str(c["name"]) for c in cats]

    records: List[dict] = []
    by_id: Dict[Any, dict] = {}
    for img in data["images"]:
        if not isinstance(img, dict) or any(k not in img for k in ("id", "file_name")):
            raise DatasetError(f"{json_file}: image entry without id/file_name: {img!r}")
        if not _is_id(img["id"]) or not isinstance(img["file_name"], str) or not img["file_name"]:
            raise DatasetError(f"{json_file}: image id must be an int or string and file_name a "
                               f"non-empty string: {img!r}")
        if img["id"] in by_id:
            raise DatasetError(f"{json_file}: duplicate image id {img['id']!r}")
        try:
            h, w = int(img["height"]), int(img["width"])
        except (KeyError, TypeError, ValueError, OverflowError):
            raise DatasetError(
                f"{json_file}: image id {img['id']!r} ({img['file_name']}) needs integer "
                "'height' and 'width'"
            ) from None
        path = os.path.join(image_root, img["file_name"])
        rec = {
            "file_name": path,
            "height": h,
            "width": w,
            "image_id": img["id"],
            "reader": reader_for_path(path),
            "annotations": [],
        }
        by_id[img["id"]] = rec
        records.append(rec)

    n_crowd = 0
    for ann in data.get("annotations") or []:
        aid = ann.get("id") if isinstance(ann, dict) else None
        if not isinstance(ann, dict) or not _is_id(ann.get("image_id")):
            raise DatasetError(f"{json_file}: annotation without an int or string image_id: {ann!r}")
        rec = by_id.get(ann["image_id"])
        if rec is None:
            raise DatasetError(
                f"{json_file}: annotation id {aid!r} refers to unknown image id {ann['image_id']!r}"
            )
        if ann.get("iscrowd", 0):
            n_crowd += 1
            continue
        cid = ann.get("category_id")
        if not _is_id(cid) or cid not in id_map:
            raise DatasetError(
                f"{json_file}: annotation id {aid!r} has unknown category_id {cid!r} "
                f"(categories: {sorted(id_map)})"
            )
        bbox = ann.get("bbox")
        try:
            x, y, bw, bh = (float(v) for v in bbox)
        except (TypeError, ValueError, OverflowError):
            raise DatasetError(
                f"{json_file}: annotation id {aid!r} bbox must be [x, y, w, h], got {bbox!r}"
            ) from None
        if not all(math.isfinite(v) for v in (x, y, x + bw, y + bh)):
            raise DatasetError(f"{json_file}: annotation id {aid!r} has a non-finite bbox {bbox!r}")
        rec["annotations"].append({"bbox": [x, y, x + bw, y + bh], "category_id": id_map[cid]})
    if n_crowd:
        logger.warning("%s: dropped %d crowd annotation(s) (iscrowd=1)", json_file, n_crowd)

    if dataset_name is not None:
        MetadataCatalog.get(dataset_name).set(
            thing_classes=classes,
            thing_dataset_id_to_contiguous_id=dict(id_map),
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
        )
    return records


def register_coco_instances(
    name: str, json_file: str, image_root: str, single_class: Optional[str] = None
) -> None:
    """Register a COCO JSON + image folder under ``name`` (lazy: nothing is read now).

    Metadata ``json_file``, ``image_root`` and ``evaluator_type="coco"`` are set now (and
    ``thing_classes=[single_class]`` when given); the class list and id map of a multi-class
    JSON are set when the dataset is first loaded.

    Raises:
        DatasetError: ``name`` is already registered.
    """
    DatasetCatalog.register(
        name, lambda: load_coco_json(json_file, image_root, name, single_class=single_class)
    )
    meta = MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco"
    )
    if single_class:
        meta.set(thing_classes=[str(single_class)])


def parse_coco_spec(name: str) -> Optional[tuple]:
    """Split ``"coco:<ann.json>:<image_dir>"`` into ``(json_file, image_dir)``; else ``None``.

    The split is at the first ``".json:"``, so both paths may contain ``:`` elsewhere
    (Windows drive letters, for instance).
    """
    if not isinstance(name, str) or not name.startswith(COCO_SPEC_PREFIX):
        return None
    rest = name[len(COCO_SPEC_PREFIX):]
    if ".json:" not in rest:
        return None
    head, image_dir = rest.split(".json:", 1)
    if not head or not image_dir:
        return None
    return head + ".json", image_dir


def maybe_register_coco_spec(name: str) -> bool:
    """Register ``name`` if it has the form ``coco:<path/to/ann.json>:<image_dir>``.

    Returns:
        True if ``name`` is (now) registered as such a spec, False if it is not of that form.
        Nothing is read until the dataset is loaded (a missing JSON then raises DatasetError).
    """
    parsed = parse_coco_spec(name)
    if parsed is None:
        return False
    if name not in DatasetCatalog:
        register_coco_instances(name, parsed[0], parsed[1])
    return True


def coco_image_ids(records: Sequence[Mapping[str, Any]]) -> Dict[Any, int]:
    """Map each record's ``image_id`` to the integer id written to COCO JSON.

    Integer ids are kept when every record has a distinct ``int`` id (COCO sources keep the
    JSON's ids). Otherwise (string ids such as DeepLesion's ``"000089_01_01_037"`` or
    Lung-PET-CT-Dx SOPInstanceUIDs, or duplicates) all images are numbered ``1..N`` in record
    order. The evaluator uses this same mapping for predictions.

    Raises:
        DatasetError: a record has no ``image_id``.
    """
    ids = []
    for i, r in enumerate(records):
        if "image_id" not in r:
            raise DatasetError(f"record {i} ({r.get('file_name')}) has no image_id")
        ids.append(r["image_id"])
    all_int = all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
    if all_int and len(set(ids)) == len(ids):
        return {i: i for i in ids}
    if len(set(ids)) != len(ids):
        # duplicates cannot be told apart by id; callers must then map by record position
        raise DatasetError("records have duplicate image_id values; cannot build COCO image ids")
    return {orig: n for n, orig in enumerate(ids, start=1)}


def _meta_get(metadata: Any, key: str, default: Any = None) -> Any:
    if metadata is None:
        return default
    if isinstance(metadata, Mapping):
        return metadata.get(key, default)
    return getattr(metadata, key, default)


def _category_ids(metadata: Any, num_classes: int) -> List[int]:
    """COCO category id of each contiguous id (source ids when unambiguous, else c + 1)."""
    mapping = _meta_get(metadata, "thing_dataset_id_to_contiguous_id") or {}
    inverse: Dict[int, List[Any]] = {}
    for src, c in mapping.items():
        inverse.setdefault(int(c), []).append(src)
    ok = all(len(inverse.get(c, [])) == 1 for c in range(num_classes))
    if ok:
        out = [inverse[c][0] for c in range(num_classes)]
        if all(isinstance(s, int) and not isinstance(s, bool) for s in out) and len(set(out)) == len(out):
            return out
    return [c + 1 for c in range(num_classes)]


def records_to_coco_dict(
    records: Sequence[Mapping[str, Any]],
    metadata: Any = None,
    file_name_root: Optional[str] = None,
) -> dict:
    """Convert records to a COCO detection dict (ground truth).

    Args:
        records: records (schema in ``catalog.py``), boxes XYXY_ABS px.
        metadata: ``Metadata`` or dict with ``thing_classes`` and optionally
            ``thing_dataset_id_to_contiguous_id``. ``None`` -> classes named ``class_<c>``
            for every contiguous id seen.
        file_name_root: if given, image ``file_name`` is written relative to this folder.

    Returns:
        ``{"info", "licenses", "images", "annotations", "categories"}`` where:

        - image ids come from :func:`coco_image_ids` (the records' own ids if all are distinct
          ints, else 1..N in record order);
        - category ids are the source ids from ``thing_dataset_id_to_contiguous_id`` when every
          contiguous id has exactly one distinct integer source id, else ``contiguous + 1``;
        - annotation ids run 1..M in record order, then box order (never 0);
        - ``bbox`` is ``[x1, y1, x2 - x1, y2 - y1]`` (px), ``area`` = w * h (px²),
          ``iscrowd`` = 0.

    Raises:
        DatasetError: a record without ``image_id``/``height``/``width``, duplicate image ids,
            or a category id outside ``thing_classes``.

    Source: the COCO format (cocodataset.org/#format-data); consumable by pycocotools and
    faster-coco-eval (``COCO(dataset)``).
    """
    classes = _meta_get(metadata, "thing_classes")
    if classes is None:
        seen = {int(a["category_id"]) for r in records for a in r.get("annotations", [])}
        n = (max(seen) + 1) if seen else 1
        classes = [f"class_{c}" for c in range(n)]
    classes = list(classes)
    cat_ids = _category_ids(metadata, len(classes))
    img_ids = coco_image_ids(records)

    images, annotations = [], []
    ann_id = 1
    for r in records:
        try:
            h, w = int(r["height"]), int(r["width"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"record {r.get('file_name')} needs integer height and width") from None
        fname = r.get("file_name", "")
        if file_name_root is not None and fname:
            fname = os.path.relpath(fname, file_name_root)
        iid = img_ids[r["image_id"]]
        images.append({"id": iid, "file_name": fname, "height": h, "width": w})
        for a in r.get("annotations", []):
            c = int(a["category_id"])
            if not 0 <= c < len(classes):
                raise DatasetError(
                    f"{r.get('file_name')}: category_id {c} outside thing_classes {classes}"
                )
            x1, y1, x2, y2 = (float(v) for v in a["bbox"])
            bw, bh = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": iid,
                    "category_id": cat_ids[c],
                    "bbox": [x1, y1, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    categories = [
        {"id": cat_ids[c], "name": str(name), "supercategory": "none"}
        for c, name in enumerate(classes)
    ]
    info = {"description": "written by mdkd_det records_to_coco_dict"}
    name = _meta_get(metadata, "name")
    if name:
        info["dataset"] = str(name)
    return {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


DatasetCatalog.add_name_resolver(maybe_register_coco_spec)
