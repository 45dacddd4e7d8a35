"""Multi-head multi-dataset baseline training (paper C38).

Each optimisation step draws one mini-batch per dataset (round robin,
:func:`mdkd_det.data.multi.build_round_robin_train_loader`), runs each batch through its own
detection head on the shared backbone (:class:`~mdkd_det.modeling.meta_arch.multi_head.MultiHeadModel`)
and optimises::

    L = (1/D) * sum_{d=1..D} sum_k L_det_k(head_d, batch_d)

with one backward pass and one optimizer step, so "each dataset contributes equally before the
shared backbone is updated" (C38 proposal). The target head (the first dataset) is evaluated on
``DATASETS.TEST``; :meth:`MultiHeadTrainer.export_head` writes any head as a plain detector
checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..config import CfgNode
from ..data.multi import build_round_robin_train_loader
from ..modeling.meta_arch.multi_head import MultiHeadModel
from ..tasks import get_task
from ..utils.errors import ConfigError, DatasetError
from .checkpointer import export_model, unwrap_model
from ..utils import comm
from .defaults import DefaultTrainer, do_test, seed_all_rng
from .trainer import SimpleTrainer

__all__ = ["MultiDatasetMixin", "MultiHeadSimpleTrainer", "MultiHeadTrainer"]


class MultiDatasetMixin:
    """``compute_losses`` for a round-robin batch ``{dataset_name: list[dict]}`` (C38).

    The model is called as ``model(images, targets, dataset=name)`` for each dataset (a
    :class:`MultiHeadModel`, possibly DDP wrapped). Returns every term of every dataset,
    already weighted by 1/D, under the key ``"<loss name>/<dataset>"`` (e.g.
    ``"loss_classifier/lungct_train"``), so the trainer's sum is
    ``(1/D) sum_d sum_k L_k(d)`` and each dataset's terms are logged.

    Raises (from ``compute_losses``):
        DatasetError: the batch is not a non-empty dict of non-empty lists.
        ConfigError: a dataset without a head in the model.
    """

    def compute_losses(self, batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """Mean over datasets of each dataset's summed detector losses; see the class docstring."""
        if not isinstance(batch, Mapping) or not batch:
            raise DatasetError("multi-dataset step expects a non-empty dict {dataset_name: batch} "
                               f"(RoundRobinLoader), got {type(batch).__name__}")
        weight = 1.0 / len(batch)
        out: Dict[str, torch.Tensor] = {}
        for name, b in batch.items():
            if not isinstance(b, (list, tuple)) or not b:
                raise DatasetError(f"multi-dataset step: the batch of '{name}' must be a non-empty list "
                                   f"of mapper dicts, got {type(b).__name__}")
            images, targets = self.detector_inputs(b)
            for k, v in self.model(images, targets, dataset=name).items():
                out[f"{k}/{name}"] = weight * v
        return out


class MultiHeadSimpleTrainer(MultiDatasetMixin, SimpleTrainer):
    """:class:`SimpleTrainer` with the multi-dataset step (``MultiHeadTrainer.trainer_class``)."""


class MultiHeadTrainer(DefaultTrainer):
    """Train the multi-head baseline from config (paper C38).

    - model: :class:`MultiHeadModel` with one head per name of ``dataset_names`` (default
      ``DATASETS.TRAIN``: here each entry is its own dataset and head, not a concatenation),
      target first, on ``MODEL.DEVICE``;
    - data: :func:`build_round_robin_train_loader` (``SOLVER.IMS_PER_BATCH`` images of every
      dataset per step), rebuilt at ``start_iter`` on resume;
    - optimizer / LR schedule / checkpoints as :class:`DefaultTrainer` (the checkpoint's
      ``"model"`` is the whole multi-head model; :meth:`export_head` extracts one detector);
    - evaluation: the target head (first name) on ``DATASETS.TEST``.

    Args:
        cfg: config.
        dataset_names: one dataset per head, target first; default ``DATASETS.TRAIN``.
        model: a prebuilt :class:`MultiHeadModel` over the same names.

    Raises:
        ConfigError: empty/duplicated names, or a ``model`` whose heads differ from the names.
    """

    trainer_class = MultiHeadSimpleTrainer

    def __init__(self, cfg: CfgNode, dataset_names: Optional[Sequence[str]] = None,
                 model: Optional[nn.Module] = None) -> None:
        names = [str(n) for n in (cfg.DATASETS.TRAIN if dataset_names is None else dataset_names)]
        if model is None:
            seed_all_rng(int(cfg.SEED) + comm.get_rank())
            model = self.build_multi_head_model(cfg, names)
        inner = unwrap_model(model)
        if not isinstance(inner, MultiHeadModel) or list(inner.dataset_names) != names:
            have = getattr(inner, "dataset_names", type(inner).__name__)
            raise ConfigError(f"MultiHeadTrainer: model heads {have} differ from dataset_names {names}")
        self.dataset_names: List[str] = names
        super().__init__(cfg, model)

    @classmethod
    def build_multi_head_model(cls, cfg: CfgNode, dataset_names: Sequence[str]) -> MultiHeadModel:
        """:class:`MultiHeadModel` over ``dataset_names`` on ``MODEL.DEVICE``."""
        return MultiHeadModel(cfg, dataset_names).to(torch.device(cfg.MODEL.DEVICE))

    @classmethod
    def build_model(cls, cfg: CfgNode) -> nn.Module:
        """Multi-head model over ``DATASETS.TRAIN`` (one head per name)."""
        return cls.build_multi_head_model(cfg, cfg.DATASETS.TRAIN)

    @property
    def target_name(self) -> str:
        """The first dataset (its head is evaluated)."""
        return self.dataset_names[0]

    def build_train_loader(self, start_iter: int):
        """Round-robin loader at ``start_iter`` (checks each dataset's class count)."""
        loader = build_round_robin_train_loader(self.cfg, self.dataset_names, start_iter,
                                                mapper=get_task(self.cfg).build_mapper(self.cfg, is_train=True))
        for name in self.dataset_names:
            get_task(self.cfg).check_dataset(self.cfg, name)
        return loader

    def test(self, model: Optional[nn.Module] = None) -> Dict[str, dict]:
        """Evaluate the target head on ``DATASETS.TEST`` (``do_test``)."""
        m = unwrap_model(model if model is not None else self.model)
        head = m.head(self.target_name) if isinstance(m, MultiHeadModel) else m
        return do_test(self.cfg, head)

    def export_head(self, name: str, path: str) -> str:
        """Write ``{"model": state_dict}`` of the head of ``name`` (a plain torchvision
        ``FasterRCNN``, loadable with ``strict=True`` into ``build_model`` of the same config)
        with :func:`~mdkd_det.engine.checkpointer.export_model`.

        Returns:
            ``path``.

        Raises:
            ConfigError: ``name`` has no head.
        """
        return export_model(unwrap_model(self.model).head(name), path)
