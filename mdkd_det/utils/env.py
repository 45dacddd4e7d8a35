"""Where the shared data live: config ``DATASETS.ROOT``, else ``$MDKD_DATASETS``, else ./datasets."""

from __future__ import annotations

import os


def dataset_root(cfg=None) -> str:
    """Return the dataset root directory (not checked for existence).

    Order: ``cfg.DATASETS.ROOT`` if non-empty, then the ``MDKD_DATASETS`` environment variable,
    then ``./datasets``.
    """
    if cfg is not None and getattr(cfg.DATASETS, "ROOT", ""):
        return os.path.expanduser(cfg.DATASETS.ROOT)
    return os.path.expanduser(os.environ.get("MDKD_DATASETS", "datasets"))
