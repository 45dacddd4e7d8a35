"""``KDTrainerMixin``: Stage-3 distillation inside any ``SimpleTrainer`` (design.md "Distiller").

    class KDSimpleTrainer(KDTrainerMixin, SimpleTrainer): ...

The step itself is :meth:`KDTrainerMixin.kd_forward`, which wraps any "task-loss forward"
callable; our ``SimpleTrainer`` reaches it through ``compute_losses`` and detectron2's
``SimpleTrainer``/``AMPTrainer`` through ``run_step`` (:mod:`mdkd_det.d2.train_loop`), so the
KD step exists once for both loops.

Per step: (1) the student's own forward runs unmodified with the adapter's taps recording;
(2) the frozen teacher runs without autograd (``Distiller.teacher_inputs``: ``FROZEN_TEACHER.*``)
on the same transformed batch (and on the student's regions); (3) the distiller returns the weighted KD terms, scaled by cf; (4) they are
added to the task loss dict (task terms scaled by alpha = ``KD.W_TASK``). When cf = 0 (warm-up)
the teacher is not run at all. Each KD term is its own loss-dict entry, so it is logged
separately to metrics.json and TensorBoard by the trainer.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List

import torch
from torch import nn

from .distiller import Distiller
from .taps import TapRecorder


class KDTrainerMixin:
    """Mixin over :class:`~mdkd_det.engine.trainer.SimpleTrainer` adding KD terms.

    Attributes set by the builder (:class:`~mdkd_det.distill.trainer.KDTrainer`):
        distiller: :class:`Distiller` (teacher, adapter, connectors, schedules).
        epoch_iters: iterations per schedule "epoch" (A7), > 0.
        task_weight: alpha of Eq. 24.
    """

    distiller: Distiller
    epoch_iters: int = 1
    task_weight: float = 1.0

    @property
    def epoch(self) -> float:
        """0-based, fractional epoch of the current iteration (A7)."""
        return float(self.iter) / float(max(1, self.epoch_iters))

    def kd_forward(self, student: nn.Module,
                   forward: Callable[[], Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """THE KD step, shared by every training loop: ``forward()`` is the student's own
        task-loss forward (``model(images, targets)`` here, ``model(batched_inputs)`` in
        detectron2); it runs with the adapter's taps on ``student``, then the frozen teacher runs
        and the distiller's terms are added.

        Args:
            student: the model ``forward`` calls (a DDP wrapper is unwrapped for the taps).
            forward: zero-argument callable returning the task loss dict.

        Returns:
            ``{task loss: alpha * value} | {KD term: weight * cf * value}`` (KD terms absent
            while cf = 0, when the teacher is not run at all).
        """
        epoch = self.epoch
        if not self.distiller.active(epoch):
            return {k: self.task_weight * v for k, v in forward().items()}
        student = student.module if hasattr(student, "module") else student
        adapter = self.distiller.adapter
        with TapRecorder(student, adapter.student_taps()) as rec:
            losses = forward()
        s_in = adapter.student_inputs(rec)
        t_in = self.distiller.teacher_inputs(rec)
        kd = self.distiller(s_in, t_in, epoch)
        out = {k: self.task_weight * v for k, v in losses.items()}
        out.update(kd)
        return out

    def compute_losses(self, batch: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        """:meth:`kd_forward` around :meth:`SimpleTrainer.compute_losses` (our trainer's
        override point)."""
        return self.kd_forward(self.model, functools.partial(super().compute_losses, batch))

    def after_backward(self) -> None:
        """Hooks, then average connector gradients over ranks (connectors are outside DDP)."""
        super().after_backward()
        # Connector parameters live outside the DDP-wrapped student: average their grads.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                for p in self.distiller.parameters():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= world
