"""Data loaders from config: records -> mapped, augmented, batched inputs.

Train loader: infinite, seeded, resumable (:class:`TrainingSampler`), aspect-ratio grouped,
``DATALOADER.NUM_WORKERS`` workers, each batch a ``list`` of mapper dicts (the detector pads).
Test loader: in order, sharded over ranks. The caller hands in the mapper of its task (default:
detection's :class:`DatasetMapper`), as detectron2's ``build_detection_train_loader(cfg, mapper=...)``.
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..utils.comm import get_rank, get_world_size
from .datasets.lesion_patch import register_lesion_patches
from .datasets.records import load_dataset_records
from .mapper import DatasetMapper
from .samplers import GroupedBatchSampler, InferenceSampler, TrainingSampler

logger = logging.getLogger(__name__)


def get_dataset_records(cfg, names: Sequence[str], limit: int = 0, check_classes: bool = False,
                        drop_labels: bool = False, num_classes_key: str = "") -> List[dict]:
    """Records of ``names``: :func:`~mdkd_det.data.datasets.records.load_dataset_records` (same
    arguments, returns and errors), after registering the ``lesion_patch_*`` names of ``cfg``
    (``DATASETS.LESION_PATCH``, built on first use) when ``names`` asks for one."""
    if any(str(n).startswith("lesion_patch_") for n in names):
        register_lesion_patches(cfg)
    return load_dataset_records(cfg, names, limit, check_classes=check_classes, drop_labels=drop_labels,
                                num_classes_key=num_classes_key)


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
        mapper: ``mapper(record, seed) -> dict``; default ``DatasetMapper(cfg, is_train=True)``
            (detection, as detectron2). Callers of other tasks hand in their task's mapper
            (``get_task(cfg).build_mapper(cfg, True)``). A mapper's ``num_classes_key``
            attribute (if any) names the class count that bounds the loaded records' category
            ids (:func:`get_dataset_records` ``check_classes``).
        batch_size: per-process batch; default ``SOLVER.IMS_PER_BATCH / world_size``.
        seed: stream seed; default ``SEED``.
        records: use these records instead of loading ``dataset_names``.

    Returns:
        DataLoader yielding ``list[dict]`` batches (see :class:`DatasetMapper`).
    """
    world, rank = get_world_size(), get_rank()
    mapper = mapper or DatasetMapper(cfg, is_train=True)
    if records is None:
        records = get_dataset_records(cfg, dataset_names or cfg.DATASETS.TRAIN, cfg.DATASETS.TRAIN_LIMIT,
                                      check_classes=True, num_classes_key=getattr(mapper, "num_classes_key", ""))
    if batch_size is None:
        total = int(cfg.SOLVER.IMS_PER_BATCH)
        if total % world:
            raise ValueError(f"SOLVER.IMS_PER_BATCH={total} must be divisible by world size {world}")
        batch_size = total // world
    seed = int(cfg.SEED if seed is None else seed)
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

    ``DATASETS.TEST_LIMIT`` caps the number of images (0 = all). ``mapper`` defaults to
    ``DatasetMapper(cfg, is_train=False)`` (detection); other tasks hand in theirs.
    """
    if records is None:
        records = get_dataset_records(cfg, [dataset_name], cfg.DATASETS.TEST_LIMIT)
    mapper = mapper or DatasetMapper(cfg, is_train=False)
    sampler = InferenceSampler(len(records), get_rank(), get_world_size())
    return DataLoader(
        _MappedDataset(records, mapper, 0),
        sampler=sampler,
        batch_size=batch_size,
        num_workers=min(int(cfg.DATALOADER.NUM_WORKERS), 2),
        collate_fn=trivial_batch_collator,
    )

