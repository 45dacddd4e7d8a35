"""Patient-level splits and LungCT series-leakage helpers (paper_notes A21).

:func:`split_by_patient` gives a deterministic, seeded train/val/test split whose groups never
cross splits. The group of a record is, in order: ``patient_id``; else ``series_id`` (one CT
series; Roboflow's LungCT augments each slice three times, and the copies share a series, so
grouping by image would leak copies across splits); else the image itself (``image_id``, or
``file_name``).

LungCT (Roboflow export of LUNA16/LIDC-IDRI) has no patient ids, but its file names begin with
the LUNA16 series UID written with dashes (``1-3-6-1-4-1-14519-..._<slice>_<n>_png.rf.<hash>.jpg``)
and the official train/valid folders share some series. :func:`lungct_series_overlap`,
:func:`drop_shared_series` and :func:`series_overlap_report` find and remove that overlap.
"""

from __future__ import annotations

import logging
import math
import os
import random
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Set, Tuple

from ...utils.errors import DatasetError

__all__ = [
    "SPLIT_NAMES",
    "drop_shared_series",
    "group_key",
    "lungct_series_id",
    "lungct_series_overlap",
    "lungct_slice_key",
    "record_series",
    "series_overlap_report",
    "split_by_patient",
    "split_counts",
    "split_labeled",
]

logger = logging.getLogger(__name__)

#: Names of the three splits, in the order of ``fractions``.
SPLIT_NAMES = ("train", "val", "test")


def group_key(record: Mapping[str, Any]) -> Tuple[str, str]:
    """Grouping key of a record: ``("patient", id)``, ``("series", id)`` or ``("image", id)``."""
    if record.get("patient_id") not in (None, ""):
        return ("patient", str(record["patient_id"]))
    if record.get("series_id") not in (None, ""):
        return ("series", str(record["series_id"]))
    img = record.get("image_id")
    return ("image", str(img if img is not None else record.get("file_name", "")))


def split_counts(n_groups: int, fractions: Sequence[float]) -> List[int]:
    """Number of groups per split for ``n_groups`` groups.

    Largest-remainder rounding of ``fraction * n_groups``; then every split with a positive
    fraction gets at least one group while another split can spare one (priority train, test,
    val), so tiny datasets (two patients) still get a train and a test split.

    Raises:
        DatasetError: ``fractions`` is not 3 non-negative numbers summing to 1.
    """
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(f < 0 or not math.isfinite(f) for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise DatasetError(
            f"split fractions must be 3 non-negative numbers (train, val, test) summing to 1, "
            f"got {list(fractions)}"
        )
    exact = [f * n_groups for f in fr]
    counts = [int(math.floor(e)) for e in exact]
    rest = n_groups - sum(counts)
    # ties broken by split order train, val, test
    for i in sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))[:rest]:
        counts[i] += 1
    for i in (0, 2, 1):
        if fr[i] > 0 and counts[i] == 0:
            donor = max(range(3), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    return counts


def split_by_patient(
    records: Sequence[dict],
    fractions: Sequence[float] = (0.72, 0.08, 0.20),
    seed: int = 0,
) -> Dict[str, List[dict]]:
    """Deterministic, seeded, group-disjoint train/val/test split.

    Args:
        records: dataset records; grouping by :func:`group_key` (patient, else series, else
            image).
        fractions: (train, val, test) fractions of the *groups* (patients), summing to 1.
            Default 72/8/20 (paper_notes A21: the paper's 80/20 with 10% of train held out).
        seed: ``random.Random(seed)`` shuffles the sorted group keys, so the split depends only
            on the set of groups, the fractions and the seed (not on record order).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``; records keep their input order
        within a split; the same dict objects are returned (not copies).

    Raises:
        DatasetError: bad ``fractions`` (see :func:`split_counts`).
    """
    keys = sorted({group_key(r) for r in records})
    counts = split_counts(len(keys), fractions)
    rng = random.Random(seed)
    rng.shuffle(keys)
    assign: Dict[Tuple[str, str], str] = {}
    start = 0
    for name, n in zip(SPLIT_NAMES, counts):
        for k in keys[start:start + n]:
            assign[k] = name
        start += n
    out: Dict[str, List[dict]] = {n: [] for n in SPLIT_NAMES}
    for r in records:
        out[assign[group_key(r)]].append(r)
    return out


def split_labeled(records: Sequence[dict], fraction: float, seed: int = 0) -> Dict[str, List[dict]]:
    """Group-disjoint labelled/unlabelled split of a training set (paper 003, issue 15).

    A seeded ``fraction`` of the groups (:func:`group_key`: patient, else series, else image)
    keeps its labels; the other groups' records lose theirs. This is the semi-supervised setting
    of paper 003 on one target: few annotated patients, many unannotated ones, never the same
    patient on both sides.

    Args:
        records: dataset records (not modified).
        fraction: share of the groups that keep their labels, in (0, 1]; rounded to the nearest
            group count, at least one group.
        seed: ``random.Random(seed)`` shuffles the sorted group keys (as :func:`split_by_patient`).

    Returns:
        ``{"labeled": [...], "unlabeled": [...]}``, record copies in input order. Unlabelled
        records have ``annotations == []`` and ``unlabeled = True``.

    Raises:
        DatasetError: ``fraction`` not in (0, 1].
    """
    fraction = float(fraction)
    if not (0.0 < fraction <= 1.0):
        raise DatasetError(f"label fraction must be in (0, 1], got {fraction}")
    keys = sorted({group_key(r) for r in records})
    rng = random.Random(seed)
    rng.shuffle(keys)
    labeled_keys = set(keys[:max(1, int(round(fraction * len(keys))))])
    out: Dict[str, List[dict]] = {"labeled": [], "unlabeled": []}
    for r in records:
        r = dict(r)
        if group_key(r) in labeled_keys:
            out["labeled"].append(r)
        else:
            r["annotations"] = []
            r["unlabeled"] = True
            out["unlabeled"].append(r)
    return out


def lungct_series_id(file_name: str) -> str:
    """LUNA16 series UID (dashed) of a LungCT file: the base name up to the first ``_``."""
    return os.path.basename(file_name).split("_", 1)[0]


def lungct_slice_key(file_name: str) -> str:
    """Source-slice key of a LungCT file: the name before Roboflow's ``_png.rf.<hash>.jpg``
    suffix (``<series>_<slice>_<n>``), shared by the augmented copies of one slice."""
    return os.path.basename(file_name).split("_png.rf.", 1)[0]


def record_series(record: Mapping[str, Any]) -> str:
    """``record["series_id"]`` if set, else :func:`lungct_series_id` of its ``file_name``."""
    sid = record.get("series_id")
    return str(sid) if sid not in (None, "") else lungct_series_id(record.get("file_name", ""))


def _series_set(records: Iterable[Mapping[str, Any]]) -> Set[str]:
    return {record_series(r) for r in records}


def lungct_series_overlap(train: Sequence[Mapping], valid: Sequence[Mapping]) -> Set[str]:
    """Series (see :func:`record_series`) present in both ``train`` and ``valid``."""
    return _series_set(train) & _series_set(valid)


def drop_shared_series(records: Sequence[dict], other: Sequence[Mapping]) -> List[dict]:
    """Records of ``records`` whose series does not occur in ``other``.

    Typical use: ``drop_shared_series(lungct_valid, lungct_train)`` gives a series-disjoint
    (hence, for LIDC-IDRI, nearly patient-disjoint) evaluation set. Logs how many were dropped.
    """
    shared = _series_set(other)
    kept = [r for r in records if record_series(r) not in shared]
    logger.info(
        "drop_shared_series: dropped %d of %d records whose series also occur in the other set",
        len(records) - len(kept), len(records),
    )
    return kept


def series_overlap_report(train: Sequence[Mapping], valid: Sequence[Mapping]) -> Dict[str, int]:
    """Count the series overlap between two record lists (LungCT train/valid leakage).

    Returns:
        dict with ``train_images``, ``valid_images``, ``train_series``, ``valid_series``,
        ``shared_series``, ``train_images_in_shared``, ``valid_images_in_shared``. Also logged
        at INFO level.
    """
    shared = lungct_series_overlap(train, valid)
    rep = {
        "train_images": len(train),
        "valid_images": len(valid),
        "train_series": len(_series_set(train)),
        "valid_series": len(_series_set(valid)),
        "shared_series": len(shared),
        "train_images_in_shared": sum(record_series(r) in shared for r in train),
        "valid_images_in_shared": sum(record_series(r) in shared for r in valid),
    }
    logger.info("series overlap: %s", rep)
    return rep
