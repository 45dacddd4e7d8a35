"""Semi-supervised KD on unlabelled target images (paper 003 Eq. 3, detection form; issue 15).

Paper 003 trains the student only on the teacher's temperature-softened predictions, on
labelled source and *unlabelled* target images alike::

    argmin (1/(N+M)) sum_{x in X_U} l( sigma(T^-1 f_s(x)), sigma(f_t(x)) ),   T = 2

Here (``KD.UNLABELED``), each Stage-3 step adds to the labelled KD step one batch of
``DATASETS.TRAIN_UNLABELED`` images: the student runs on it without targets (no task loss; the
family adapter's ``student_forward_unlabeled``), the frozen teacher runs on the same transformed
images and the student's regions (the adapter's ``teacher_inputs``, as for labelled images), and
the :class:`~mdkd_det.distill.distiller.Distiller` computes its terms; those named in
``KD.UNLABELED.TERMS`` are added as ``loss_unlabeled_<term> = KD.UNLABELED.WEIGHT * cf * (w *
term)`` (soft labels only: no hard labels are ever read from unlabelled records).

This module holds the config checks, the unlabelled records and their loader; the step itself
is :meth:`~mdkd_det.distill.mixin.KDTrainerMixin.unlabeled_kd`. See docs/semi_supervised.md.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from torch.utils.data import DataLoader

from ..data.build import build_detection_train_loader, get_dataset_records
from ..tasks import get_task
from ..utils.errors import ConfigError
from .distiller import TERM_KEYS

__all__ = ["UNLABELED_SEED_OFFSET", "build_unlabeled_loader", "check_unlabeled_config",
           "load_unlabeled_records", "unlabeled_loss_keys"]

#: The unlabelled stream is seeded with ``SEED + UNLABELED_SEED_OFFSET`` (sampler order and
#: per-sample augmentation seeds), so it never replays the labelled stream's random draws.
UNLABELED_SEED_OFFSET = 1


def unlabeled_loss_keys(terms: Sequence[str]) -> Tuple[str, ...]:
    """Distiller loss keys (``"loss_ClsKD"``...) of ``KD.UNLABELED.TERMS`` names (``"ClsKD"``).

    Raises:
        ConfigError: a name the distiller does not compute (lists the known names).
    """
    known = {v[len("loss_"):]: v for v in TERM_KEYS.values()}
    bad = [t for t in terms if t not in known]
    if bad:
        raise ConfigError(f"KD.UNLABELED.TERMS {bad}: unknown KD term(s); known: {sorted(known)}")
    return tuple(known[t] for t in terms)


def check_unlabeled_config(cfg) -> None:
    """The checks of ``KD.UNLABELED`` that need no data (run before anything is built).

    Raises:
        ConfigError: ``KD.UNLABELED.ENABLED`` without ``KD.ENABLED`` or without
            ``DATASETS.TRAIN_UNLABELED``; a dataset in both ``DATASETS.TRAIN`` and
            ``DATASETS.TRAIN_UNLABELED``; an unknown ``KD.UNLABELED.TERMS`` name; no term.
    """
    u = cfg.KD.UNLABELED
    if not u.ENABLED:
        return
    if not cfg.KD.ENABLED:
        raise ConfigError("KD.UNLABELED.ENABLED needs KD.ENABLED (it adds KD terms on unlabelled "
                          "images to the Stage-3 student)")
    names = list(cfg.DATASETS.TRAIN_UNLABELED)
    if not names:
        raise ConfigError("KD.UNLABELED.ENABLED needs DATASETS.TRAIN_UNLABELED (the unlabelled "
                          "target sets, e.g. ('lungct_disjoint_train_unlabeled',))")
    both = sorted(set(names) & set(cfg.DATASETS.TRAIN))
    if both:
        raise ConfigError(f"DATASETS.TRAIN_UNLABELED {both} also in DATASETS.TRAIN: a set is "
                          "either labelled or unlabelled")
    if not list(u.TERMS):
        raise ConfigError("KD.UNLABELED.TERMS is empty: name the KD terms applied to unlabelled "
                          "images, e.g. ('FAlgn', 'Att', 'ClsKD', 'ROIKD')")
    unlabeled_loss_keys(u.TERMS)


def _image_key(record: dict) -> tuple:
    """What identifies an image across datasets: its file and, for volumes, its slice."""
    return (record.get("file_name"), record.get("slice_index"))


def load_unlabeled_records(cfg) -> List[dict]:
    """Records of ``DATASETS.TRAIN_UNLABELED`` with their labels dropped before anything reads
    them (``get_dataset_records(..., drop_labels=True)``), capped by ``DATASETS.TRAIN_LIMIT``.

    Raises:
        ConfigError: :func:`check_unlabeled_config`; a labelled set listed in
            ``DATASETS.TRAIN_UNLABELED``; an image both in ``DATASETS.TRAIN`` and in
            ``DATASETS.TRAIN_UNLABELED`` (names the first file and the count).
        DatasetError: unknown name, missing image file.
    """
    check_unlabeled_config(cfg)
    records = get_dataset_records(cfg, cfg.DATASETS.TRAIN_UNLABELED, cfg.DATASETS.TRAIN_LIMIT,
                                  drop_labels=True)
    labeled = {_image_key(r) for r in get_dataset_records(cfg, cfg.DATASETS.TRAIN)}
    shared = [r["file_name"] for r in records if _image_key(r) in labeled]
    if shared:
        raise ConfigError(f"DATASETS.TRAIN and DATASETS.TRAIN_UNLABELED share {len(shared)} image(s), "
                          f"e.g. {shared[0]}: the unlabelled images must be other images")
    return records


def build_unlabeled_loader(cfg, records: List[dict], start_iter: int = 0) -> DataLoader:
    """Infinite, seeded, resumable loader over unlabelled ``records``: the labelled stream's
    loader (:func:`build_detection_train_loader`: task mapper and augmentations, aspect-ratio
    grouping, private generator) with ``KD.UNLABELED.IMS_PER_BATCH`` images per step (0 =
    ``SOLVER.IMS_PER_BATCH``) and seed ``SEED + UNLABELED_SEED_OFFSET``; batch ``k`` is a
    function of (seed, k) only, so ``start_iter`` resumes it exactly.

    Raises:
        ConfigError: the batch is not divisible by the number of processes.
    """
    from ..utils.comm import get_world_size

    total = int(cfg.KD.UNLABELED.IMS_PER_BATCH) or int(cfg.SOLVER.IMS_PER_BATCH)
    world = get_world_size()
    if total % world:
        raise ConfigError(f"KD.UNLABELED.IMS_PER_BATCH = {total}: must be divisible by the {world} processes")
    return build_detection_train_loader(cfg, start_iter=start_iter, records=records,
                                        mapper=get_task(cfg).build_mapper(cfg, is_train=True),
                                        batch_size=total // world,
                                        seed=int(cfg.SEED) + UNLABELED_SEED_OFFSET)
