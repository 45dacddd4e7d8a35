"""Loaders that combine several training streams into one batch per step.

- :class:`PairedLoader`: ``{"source": batch, "target": batch}`` per step, the paired mini-batches
  of the Stage-1 domain-adversarial source teachers (paper Eq. 2 / Algorithm 1 line 15, C2;
  decision A12: b1 source + b2 target images per step).
- :class:`RoundRobinLoader`: ``{name: batch, ...}`` per step, one mini-batch from every dataset
  ("sampled in turn", paper C38 multi-head baseline; proposal: one batch per dataset per
  optimisation step, so each dataset contributes equally).

Both wrap *infinite* loaders (``build_detection_train_loader``). They hold no position of their
own: resuming at iteration ``k`` means building every underlying loader at ``start_iter=k``
(each underlying stream is a function of (seed, iteration) only, see
:mod:`mdkd_det.engine.trainer`), which the ``build_*`` helpers below do.

Resume-exactness: every underlying torch ``DataLoader`` has its own seeded ``generator``
(``build_detection_train_loader``), so ``iter()`` does not draw from the global torch RNG.

Per-dataset seeds: dataset ``i`` of a combined loader uses ``SEED + 100003 * i``
(:func:`stream_seed`); index 0 is the target, so the target stream of a paired / multi-dataset
run equals that of a plain target-only run with the same batch size.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

from ..utils.errors import ConfigError, DatasetError

__all__ = [
    "PairedLoader",
    "RoundRobinLoader",
    "stream_seed",
    "build_paired_train_loader",
    "build_round_robin_train_loader",
]

_SEED_STRIDE = 100_003


def stream_seed(base_seed: int, index: int) -> int:
    """Seed of the ``index``-th stream of a combined loader: ``base_seed + 100003 * index``.

    Index 0 keeps ``base_seed`` (the target stream equals a plain run's); other indices get
    permutation/augmentation seeds far apart from it (``TrainingSampler`` seeds epoch ``e`` with
    ``seed + e``, so streams only collide after 100003 epochs).
    """
    return int(base_seed) + _SEED_STRIDE * int(index)


def _next(it: Iterator, what: str) -> Any:
    try:
        return next(it)
    except StopIteration:
        raise DatasetError(
            f"{what} ran out of batches; combined loaders need infinite loaders "
            "(e.g. build_detection_train_loader)"
        ) from None


class PairedLoader:
    """Infinite iterable of ``{"source": batch_s, "target": batch_t}`` (paper Eq. 2, A12).

    Each step draws the next batch of each loader (``list[dict]`` of ``DatasetMapper`` outputs:
    b1 source images, b2 target images). Iterating again restarts from the loaders' own start
    (``iter()`` is called on both), so build both loaders at the same ``start_iter``.

    Args:
        source_loader: infinite iterable of source batches.
        target_loader: infinite iterable of target batches.

    Raises:
        TypeError: an argument is not iterable.
        DatasetError: (while iterating) one of the loaders is exhausted; the message names it.
    """

    def __init__(self, source_loader: Iterable, target_loader: Iterable) -> None:
        for name, obj in (("source_loader", source_loader), ("target_loader", target_loader)):
            if not hasattr(obj, "__iter__"):
                raise TypeError(f"PairedLoader: {name} must be iterable, got {type(obj).__name__}")
        self.source_loader = source_loader
        self.target_loader = target_loader

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        src, tgt = iter(self.source_loader), iter(self.target_loader)
        while True:
            yield {"source": _next(src, "PairedLoader: the source loader"),
                   "target": _next(tgt, "PairedLoader: the target loader")}


class RoundRobinLoader:
    """Infinite iterable of ``{name: batch, ...}``: one batch of every dataset per step, in the
    order of ``loaders`` (paper C38 "sampled in turn"; proposal: all D batches feed one
    optimisation step).

    Args:
        loaders: ``{dataset_name: infinite iterable of batches}`` (non-empty; insertion order
            is kept, target first by convention).

    Raises:
        ValueError: ``loaders`` is empty.
        TypeError: a value is not iterable.
        DatasetError: (while iterating) a loader is exhausted; the message names its dataset.
    """

    def __init__(self, loaders: Mapping[str, Iterable]) -> None:
        if not loaders:
            raise ValueError("RoundRobinLoader: needs at least one loader")
        for name, obj in loaders.items():
            if not hasattr(obj, "__iter__"):
                raise TypeError(f"RoundRobinLoader: loader '{name}' must be iterable, got {type(obj).__name__}")
        self.loaders: Dict[str, Iterable] = dict(loaders)

    @property
    def names(self) -> List[str]:
        """Dataset names in step order."""
        return list(self.loaders)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        its = {name: iter(loader) for name, loader in self.loaders.items()}
        while True:
            yield {name: _next(it, f"RoundRobinLoader: the loader of '{name}'") for name, it in its.items()}


# ------------------------------------------------------------------------------------------------
# builders from config
# ------------------------------------------------------------------------------------------------
def _per_process(total: int, key: str) -> int:
    from ..utils.comm import get_world_size

    world = get_world_size()
    total = int(total)
    if total < 1 or total % world:
        raise ConfigError(f"{key}={total} must be a positive multiple of the world size {world} "
                          "(it is the total over all processes)")
    return total // world


def _names(names: Sequence[str] | str, key: str) -> List[str]:
    if isinstance(names, str):
        names = [names]
    names = [str(n) for n in names]
    if not names:
        raise ConfigError(f"{key}: no dataset name given")
    return names


def build_paired_train_loader(cfg, source_names: Sequence[str], target_names: Optional[Sequence[str]] = None,
                              start_iter: int = 0, mapper=None) -> PairedLoader:
    """Paired source/target training loader for Stage 1 (A12).

    Source batch b1 = ``ADVERSARIAL.SOURCE_IMS_PER_BATCH``, target batch b2 =
    ``ADVERSARIAL.TARGET_IMS_PER_BATCH`` (totals over processes, like ``SOLVER.IMS_PER_BATCH``).
    The target stream uses seed ``SEED``, the source stream ``stream_seed(SEED, 1)``. Both
    respect ``DATASETS.TRAIN_LIMIT`` (per domain) and are built at ``start_iter`` (resume).

    Args:
        cfg: config (DATASETS.*, DATALOADER.*, ADVERSARIAL.*_IMS_PER_BATCH, SEED).
        source_names: catalog names concatenated into the source domain (``ADVERSARIAL.SOURCE``).
        target_names: catalog names of the target domain; default ``DATASETS.TRAIN``.
        start_iter: iteration to start the streams at.
        mapper: optional mapper for both domains (default ``DatasetMapper(cfg, is_train=True)``).

    Returns:
        :class:`PairedLoader` yielding ``{"source": list[dict], "target": list[dict]}``.

    Raises:
        ConfigError: no source/target name, or a batch size that is not a positive multiple of
            the world size.
        DatasetError: unknown dataset / unreadable records (from ``get_dataset_records``).
    """
    from .build import build_detection_train_loader

    source_names = _names(source_names, "ADVERSARIAL.SOURCE")
    target_names = _names(cfg.DATASETS.TRAIN if target_names is None else target_names, "DATASETS.TRAIN")
    b1 = _per_process(cfg.ADVERSARIAL.SOURCE_IMS_PER_BATCH, "ADVERSARIAL.SOURCE_IMS_PER_BATCH")
    b2 = _per_process(cfg.ADVERSARIAL.TARGET_IMS_PER_BATCH, "ADVERSARIAL.TARGET_IMS_PER_BATCH")
    seed_t, seed_s = stream_seed(cfg.SEED, 0), stream_seed(cfg.SEED, 1)
    target = build_detection_train_loader(cfg, target_names, start_iter=start_iter, mapper=mapper,
                                          batch_size=b2, seed=seed_t)
    source = build_detection_train_loader(cfg, source_names, start_iter=start_iter, mapper=mapper,
                                          batch_size=b1, seed=seed_s)
    return PairedLoader(source, target)


def build_round_robin_train_loader(cfg, dataset_names: Sequence[str], start_iter: int = 0,
                                   mapper=None) -> RoundRobinLoader:
    """One infinite loader per dataset, combined by :class:`RoundRobinLoader` (C38).

    Each dataset's batch is ``SOLVER.IMS_PER_BATCH`` (total over processes); dataset ``i`` uses
    seed ``stream_seed(SEED, i)``; ``DATASETS.TRAIN_LIMIT`` applies per dataset.

    Args:
        cfg: config (DATASETS.*, DATALOADER.*, SOLVER.IMS_PER_BATCH, SEED).
        dataset_names: catalog names, one stream (and one model head) each, target first.
        start_iter: iteration to start every stream at (resume).
        mapper: optional shared mapper.

    Returns:
        :class:`RoundRobinLoader` yielding ``{name: list[dict]}`` in ``dataset_names`` order.

    Raises:
        ConfigError: empty or duplicated ``dataset_names``; bad ``SOLVER.IMS_PER_BATCH``.
        DatasetError: unknown dataset / unreadable records.
    """
    from .build import build_detection_train_loader

    names = _names(dataset_names, "dataset_names")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"round-robin loader: dataset names {dup} are listed more than once")
    bs = _per_process(cfg.SOLVER.IMS_PER_BATCH, "SOLVER.IMS_PER_BATCH")
    loaders = {
        name: build_detection_train_loader(cfg, [name], start_iter=start_iter, mapper=mapper,
                                           batch_size=bs, seed=stream_seed(cfg.SEED, i))
        for i, name in enumerate(names)
    }
    return RoundRobinLoader(loaders)
