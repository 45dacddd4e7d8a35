"""Data loaders from config: records -> mapped, augmented, batched inputs.

Train loader: infinite, seeded, resumable (:class:`TrainingSampler`), aspect-ratio grouped,
``DATALOADER.NUM_WORKERS`` workers, each batch a ``list`` of mapper dicts (the detector pads).
Test loader: in order, sharded over ranks.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..utils.env import dataset_root
from .catalog import DatasetCatalog, MetadataCatalog
from .datasets.builtin import register_builtin
from .datasets.validate import check_records
from .samplers import GroupedBatchSampler, InferenceSampler, TrainingSampler

logger = logging.getLogger(__name__)


def get_dataset_records(cfg, names: Sequence[str], limit: int = 0, check_classes: bool = False,
                        drop_labels: bool = False) -> List[dict]:
    """Load, validate (``DATASETS.BOX_POLICY``, ``KEEP_EMPTY``) and concatenate datasets.

    Built-in names are registered under ``dataset_root(cfg)`` first; ``coco:<json>:<dir>``
    names register themselves. With ``check_classes`` (training sets) every annotation's
    ``category_id`` must lie in ``[0, NUM_CLASSES)`` of the task's ``num_classes_key``.
    With ``drop_labels`` (the unlabelled stream of ``KD.UNLABELED``, paper 003) every record's
    ``annotations`` are replaced by ``[]`` before anything reads them and empty records are
    kept; each dataset must be unlabelled (metadata ``unlabeled``, or no record has annotations).

    Raises:
        DatasetError: unknown name, missing image, bad box (policy "error"), category id beyond
            the model's class count (naming the file and the key), empty result.
        ConfigError: with ``drop_labels``, a labelled dataset (named, with
            ``DATASETS.TRAIN_UNLABELED``).
    """
    from ..utils.errors import ConfigError, DatasetError

    register_builtin(dataset_root(cfg), split_seed=int(cfg.DATASETS.SPLIT_SEED),
                     split_fractions=tuple(cfg.DATASETS.SPLIT_FRACTIONS),
                     label_fraction=float(cfg.DATASETS.LABEL_FRACTION))
    from ..tasks import get_task  # tasks import data modules: import lazily

    task = get_task(cfg)
    task.register_datasets(cfg)
    key = task.num_classes_key if check_classes else ""
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


class _MappedDataset(Dataset):
    """``dataset[(index, position)] -> mapper(records[index], seed=base_seed + position)``."""

    def __init__(self, records: List[dict], mapper: Callable, seed: int):
        self.records, self.mapper, self.seed = records, mapper, int(seed)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            idx, pos = item
            return self.mapper(self.records[idx], seed=(self.seed * 1_000_003 + pos) % (2**31))
        return self.mapper(self.records[item])


def _task_mapper(cfg, is_train: bool) -> Callable:
    """The mapper of ``MODEL.TASK`` (detection: :class:`DatasetMapper`)."""
    from ..tasks import get_task  # tasks import data modules: import lazily

    return get_task(cfg).build_mapper(cfg, is_train)


def trivial_batch_collator(batch: list) -> list:
    """Keep a batch as a list of dicts (images may differ in size; the detector pads)."""
    return batch


def build_detection_train_loader(
    cfg,
    dataset_names: Optional[Sequence[str]] = None,
    start_iter: int = 0,
    mapper: Optional[Callable] = None,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    records: Optional[List[dict]] = None,
) -> DataLoader:
    """Infinite training loader.

    Args:
        cfg: config (DATASETS.*, DATALOADER.*, SOLVER.IMS_PER_BATCH, SEED).
        dataset_names: default ``DATASETS.TRAIN``.
        start_iter: resume position in iterations; the stream restarts exactly there.
        mapper: default: the task's mapper (``MODEL.TASK``; detection: ``DatasetMapper``).
        batch_size: per-process batch; default ``SOLVER.IMS_PER_BATCH / world_size``.
        seed: stream seed; default ``SEED``.
        records: use these records instead of loading ``dataset_names``.

    Returns:
        DataLoader yielding ``list[dict]`` batches (see :class:`DatasetMapper`).
    """
    from ..engine.comm import get_rank, get_world_size

    world, rank = get_world_size(), get_rank()
    if records is None:
        records = get_dataset_records(cfg, dataset_names or cfg.DATASETS.TRAIN, cfg.DATASETS.TRAIN_LIMIT,
                                      check_classes=True)
    if batch_size is None:
        total = int(cfg.SOLVER.IMS_PER_BATCH)
        if total % world:
            raise ValueError(f"SOLVER.IMS_PER_BATCH={total} must be divisible by world size {world}")
        batch_size = total // world
    seed = int(cfg.SEED if seed is None else seed)
    mapper = mapper or _task_mapper(cfg, is_train=True)
    sampler = TrainingSampler(len(records), seed=seed, start=start_iter * batch_size * world,
                              rank=rank, world_size=world)
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        groups = [0 if r["width"] >= r["height"] else 1 for r in records]
    else:
        groups = [0] * len(records)
    batch_sampler = GroupedBatchSampler(sampler, groups, batch_size)
    workers = int(cfg.DATALOADER.NUM_WORKERS)
    return DataLoader(
        _MappedDataset(records, mapper, seed),
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=trivial_batch_collator,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        # DataLoader.__iter__ draws a base seed; a private generator keeps that draw out of the
        # global RNG, so a resumed run (which restores the global RNG) stays bit-exact.
        generator=torch.Generator().manual_seed(seed),
    )


def build_detection_test_loader(cfg, dataset_name: str, mapper: Optional[Callable] = None,
                                records: Optional[List[dict]] = None, batch_size: int = 1) -> DataLoader:
    """In-order test loader over ``dataset_name`` (sharded by rank), batches of ``list[dict]``.

    ``DATASETS.TEST_LIMIT`` caps the number of images (0 = all).
    """
    from ..engine.comm import get_rank, get_world_size

    if records is None:
        records = get_dataset_records(cfg, [dataset_name], cfg.DATASETS.TEST_LIMIT)
    mapper = mapper or _task_mapper(cfg, is_train=False)
    sampler = InferenceSampler(len(records), get_rank(), get_world_size())
    return DataLoader(
        _MappedDataset(records, mapper, 0),
        sampler=sampler,
        batch_size=batch_size,
        num_workers=min(int(cfg.DATALOADER.NUM_WORKERS), 2),
        collate_fn=trivial_batch_collator,
    )

