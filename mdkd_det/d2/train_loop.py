"""KD inside detectron2's own training loop (``SimpleTrainer`` / ``AMPTrainer``).

detectron2's ``run_step`` computes the loss dict with ``self.model(data)`` and says "if you
want to do something with the losses, you can wrap the model". :class:`D2KDStepMixin` does
exactly that for the duration of one step: the call is routed through
:meth:`~mdkd_det.distill.mixin.KDTrainerMixin.kd_forward`, THE KD step shared with our own
trainer (same taps, distiller, pure losses and curriculum). Everything else (backward,
``after_backward`` hooks, metrics written to ``EventStorage`` / ``metrics.json``, optimizer
step, AMP scaling) stays detectron2's, and the KD terms are ordinary entries of its loss dict.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from torch import nn

from ..distill.mixin import KDTrainerMixin


class _KDCall:
    """Callable stand-in for the model during one step: ``call(data)`` = ``kd_forward``."""

    def __init__(self, trainer: KDTrainerMixin, model: nn.Module) -> None:
        self._trainer, self._model = trainer, model

    @property
    def training(self) -> bool:
        return self._model.training

    def __call__(self, data) -> Dict[str, torch.Tensor]:
        return self._trainer.kd_forward(self._model, lambda: self._model(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class D2KDStepMixin(KDTrainerMixin):
    """``run_step`` of a detectron2 trainer with the KD step around its model call.

    Attributes (set by :class:`~mdkd_det.d2.trainer.MDKDTrainer`): ``distiller``,
    ``epoch_iters``, ``task_weight`` as :class:`KDTrainerMixin`.
    """

    def run_step(self) -> None:
        model = self.model
        self.model = _KDCall(self, model)
        try:
            super().run_step()
        finally:
            self.model = model


class D2KDSimpleTrainer(D2KDStepMixin, SimpleTrainer):
    """detectron2 ``SimpleTrainer`` with KD terms in its loss dict."""


class D2KDAMPTrainer(D2KDStepMixin, AMPTrainer):
    """detectron2 ``AMPTrainer`` with KD terms in its loss dict."""
