"""Dataset loaders (records in the schema of ``mdkd_det/data/catalog.py``) and helpers.

- :mod:`.coco`: any COCO JSON + image folder; ``coco:<json>:<dir>`` names; records -> COCO.
- :mod:`.lung_pet_ct_dx`: Lung-PET-CT-Dx DICOM + PASCAL VOC XML.
- :mod:`.deeplesion`: DeepLesion ``DL_info.csv`` + 16-bit ``Images_png``.
- :mod:`.deeplesion_sample`: DeepLesion JPEG truth samples with ``.tru`` files.
- :mod:`.splits`: seeded patient-level splits, LungCT series overlap.
- :mod:`.validate`: :func:`check_records` (missing files, boxes outside the image, degenerate boxes).
- :mod:`.builtin`: :func:`register_builtin` (lazy names over the shared data layout).
"""

from .builtin import BUILTIN_NAMES, builtin_paths, register_builtin
from .coco import (
    coco_image_ids,
    load_coco_json,
    maybe_register_coco_spec,
    parse_coco_spec,
    records_to_coco_dict,
    register_coco_instances,
)
from .deeplesion import LESION_TYPES, deeplesion_image_path, load_deeplesion
from .deeplesion_sample import load_deeplesion_sample
from .lung_pet_ct_dx import SUBTYPES, load_lung_pet_ct_dx, lung_pet_ct_dx_metadata
from .splits import (
    drop_shared_series,
    group_key,
    lungct_series_id,
    lungct_series_overlap,
    record_series,
    series_overlap_report,
    split_by_patient,
    split_counts,
)
from .validate import BOX_POLICIES, check_records

__all__ = [
    "BOX_POLICIES",
    "BUILTIN_NAMES",
    "LESION_TYPES",
    "SUBTYPES",
    "builtin_paths",
    "check_records",
    "coco_image_ids",
    "deeplesion_image_path",
    "drop_shared_series",
    "group_key",
    "load_coco_json",
    "load_deeplesion",
    "load_deeplesion_sample",
    "load_lung_pet_ct_dx",
    "lung_pet_ct_dx_metadata",
    "lungct_series_id",
    "lungct_series_overlap",
    "maybe_register_coco_spec",
    "parse_coco_spec",
    "record_series",
    "records_to_coco_dict",
    "register_builtin",
    "register_coco_instances",
    "series_overlap_report",
    "split_by_patient",
    "split_counts",
]
