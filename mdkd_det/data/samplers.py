"""Deterministic, resumable samplers (detectron2's TrainingSampler / InferenceSampler idea).

The training stream is infinite: epoch ``e`` is a permutation of ``range(size)`` drawn from
``torch.Generator().manual_seed(seed + e)``. Position ``k`` in the stream identifies one sample
draw; it seeds that sample's augmentation, so a run that resumes at iteration ``i`` (stream
position ``i * batch``) sees exactly the images *and* augmentations it would have seen.
"""

from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import Sampler


class TrainingSampler(Sampler):
    """Infinite stream of ``(index, position)`` pairs, sharded over ``world_size`` ranks.

    Args:
        size: dataset length (> 0).
        seed: base seed (``SEED``).
        start: stream position (in samples, global over ranks) to resume from.
        rank, world_size: this process and the number of processes; rank r takes positions
            r, r + world, ...

    Raises:
        ValueError: empty dataset.
    """

    def __init__(self, size: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1):
        if size <= 0:
            raise ValueError("TrainingSampler needs a non-empty dataset")
        self.size, self.seed, self.start = size, int(seed), int(start)
        self.rank, self.world_size = rank, world_size

    def _perm(self, epoch: int) -> List[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        pos = self.start + self.rank
        while True:
            epoch, off = divmod(pos, self.size)
            perm = self._perm(epoch)
            while off < self.size:
                yield perm[off], pos
                pos += self.world_size
                off += self.world_size


class GroupedBatchSampler(Sampler):
    """Batches of ``batch_size`` draws whose images share an aspect-ratio group.

    Group 0 holds images with width >= height, group 1 the others (detectron2's
    AspectRatioGroupedDataset rule), so padding to a common size in the detector wastes little.
    With one group (square CT slices) this is plain batching.

    Args:
        sampler: yields ``(index, position)``.
        group_ids: group of each dataset index.
        batch_size: per-process batch size (>= 1).

    Raises:
        ValueError: ``batch_size < 1`` (it would never yield and loop forever; the CLI refuses
            ``SOLVER.IMS_PER_BATCH 0`` earlier, in :func:`mdkd_det.config.validate.validate_config`).
    """

    def __init__(self, sampler: Sampler, group_ids: Sequence[int], batch_size: int):
        self.sampler, self.group_ids, self.batch_size = sampler, list(group_ids), int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"GroupedBatchSampler: batch_size must be >= 1, got {batch_size}")

    def __iter__(self):
        buckets = {}
        for item in self.sampler:
            b = buckets.setdefault(self.group_ids[item[0]], [])
            b.append(item)
            if len(b) == self.batch_size:
                yield list(b)
                b.clear()


class InferenceSampler(Sampler):
    """Each rank takes a contiguous shard of ``range(size)``, in order (no padding)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        shard = (size + world_size - 1) // world_size
        self.indices = list(range(rank * shard, min(size, (rank + 1) * shard)))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

