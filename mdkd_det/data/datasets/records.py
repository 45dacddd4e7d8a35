"""Records of registered datasets, validated and concatenated (the data layer's one loading
function; :func:`mdkd_det.data.build.get_dataset_records` adds the config's derived names)."""

from __future__ import annotations

import functools
from typing import List, Sequence

from ...utils.env import dataset_root
from ...utils.errors import ConfigError, DatasetError
from ..catalog import DatasetCatalog, MetadataCatalog
from .builtin import register_builtin
from .validate import check_records

__all__ = ["load_dataset_records"]


def load_dataset_records(cfg, names: Sequence[str], limit: int = 0, check_classes: bool = False,
                         drop_labels: bool = False, num_classes_key: str = "") -> List[dict]:
    """Load, validate (``DATASETS.BOX_POLICY``, ``KEEP_EMPTY``) and concatenate datasets.

    Built-in names are registered under ``dataset_root(cfg)`` first; ``coco:<json>:<dir>``
    names register themselves. With ``check_classes`` (training sets) unlabelled datasets are
    refused and, when ``num_classes_key`` names the model's class count in ``cfg`` (e.g.
    :attr:`~mdkd_det.data.mapper.DatasetMapper.num_classes_key`), every annotation's
    ``category_id`` must lie in ``[0, NUM_CLASSES)``. With ``drop_labels`` (the unlabelled
    stream of ``KD.UNLABELED``, paper 003) every record's ``annotations`` are replaced by ``[]``
    before anything reads them and empty records are kept; each dataset must be unlabelled
    (metadata ``unlabeled``, or no record has annotations).

    Returns:
        the records (dicts of the catalog schema), at most ``limit`` when ``limit > 0``.

    Raises:
        DatasetError: unknown name, missing image, bad box (policy "error"), category id beyond
            the model's class count (naming the file and the key), empty result.
        ConfigError: with ``drop_labels``, a labelled dataset (named, with
            ``DATASETS.TRAIN_UNLABELED``).
    """
    register_builtin(dataset_root(cfg), split_seed=int(cfg.DATASETS.SPLIT_SEED),
                     split_fractions=tuple(cfg.DATASETS.SPLIT_FRACTIONS),
                     label_fraction=float(cfg.DATASETS.LABEL_FRACTION))
    key = num_classes_key if check_classes else ""
    num_classes = int(functools.reduce(lambda node, k: node[k], key.split("."), cfg)) if key else None
    records: List[dict] = []
    for name in names:
        if check_classes and MetadataCatalog.get(name).get("unlabeled", False):
            raise DatasetError(f"dataset '{name}' is unlabelled (its boxes were removed): it cannot "
                               f"be a supervised training set; list it in DATASETS.TRAIN_UNLABELED")
        recs = DatasetCatalog.get(name)
        if drop_labels:
            if not MetadataCatalog.get(name).get("unlabeled", False) and any(r.get("annotations") for r in recs):
                raise ConfigError(f"DATASETS.TRAIN_UNLABELED: dataset '{name}' is labelled; list "
                                  "unlabelled sets only (e.g. lungct_disjoint_train_unlabeled)")
            recs = [dict(r, annotations=[]) for r in recs]  # boxes are never read
        recs = check_records(
            recs, name, box_policy=cfg.DATASETS.BOX_POLICY, keep_empty=cfg.DATASETS.KEEP_EMPTY or drop_labels,
            num_classes=num_classes, num_classes_key=key,
        )
        records.extend(recs)
    if limit and limit > 0:
        records = records[:limit]
    if not records:
        raise DatasetError(f"datasets {list(names)} contain no usable images")
    return records
