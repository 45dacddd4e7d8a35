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

Semi-supervised KD (``KD.UNLABELED``, paper 003 Eq. 3; :mod:`mdkd_det.distill.unlabeled`): when
an ``unlabeled_loader`` is attached, every step draws one unlabelled batch (also during the
warm-up, so the stream stays a function of the iteration and resumes exactly) and, when KD is
active, :meth:`KDTrainerMixin.unlabeled_kd` adds its ``loss_unlabeled_<term>`` entries.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from ..utils.device import model_device, to_device
from .distiller import Distiller
from .taps import TapRecorder


class KDTrainerMixin:
    """Mixin over :class:`~mdkd_det.engine.trainer.SimpleTrainer` adding KD terms.

    Attributes set by the builder (:class:`~mdkd_det.distill.trainer.KDTrainer`):
        distiller: :class:`Distiller` (teacher, adapter, connectors, schedules).
        epoch_iters: iterations per schedule "epoch" (A7), > 0.
        task_weight: alpha of Eq. 24.
        unlabeled_loader: optional infinite loader of unlabelled batches (``KD.UNLABELED``);
            ``iter()`` is called once, one batch is drawn per step.
        unlabeled_weight: ``KD.UNLABELED.WEIGHT``.
        unlabeled_terms: distiller loss keys kept for unlabelled images (``"loss_ClsKD"``...).
        online_teacher_weight: ``KD.ONLINE_TEACHER.WEIGHT`` (used when the distiller's teacher
            trains online).
    """

    distiller: Distiller
    epoch_iters: int = 1
    task_weight: float = 1.0
    unlabeled_loader: Optional[Iterable] = None
    unlabeled_weight: float = 1.0
    unlabeled_terms: Sequence[str] = ()
    online_teacher_weight: float = 1.0
    _unlabeled_iter = None

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
        unlabeled = self._next_unlabeled()  # every step: the stream follows the iteration
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
        if unlabeled is not None:
            out.update(self.unlabeled_kd(student, unlabeled, epoch))
        return out

    def _next_unlabeled(self) -> Optional[List[Dict[str, Any]]]:
        if self.unlabeled_loader is None:
            return None
        if self._unlabeled_iter is None:
            self._unlabeled_iter = iter(self.unlabeled_loader)
        return next(self._unlabeled_iter)

    def unlabeled_kd(self, student: nn.Module, batch: List[Dict[str, Any]],
                     epoch: float) -> Dict[str, torch.Tensor]:
        """KD terms on one unlabelled batch (paper 003 Eq. 3, detection form; ``KD.UNLABELED``).

        The adapter's ``student_forward_unlabeled`` runs the student on ``batch``'s images
        without targets (no task loss; ``d["target"]`` is never read), the frozen teacher runs
        on the same transformed images and the student's regions (``Distiller.teacher_inputs``)
        and the distiller computes its terms at ``epoch``.

        Args:
            student: the student (unwrapped).
            batch: mapped records ``[{"image": Tensor[C, H, W], ...}]``.
            epoch: schedule epoch (A7).

        Returns:
            ``{"loss_unlabeled_<term>": unlabeled_weight * cf * w * term}`` for the distiller
            terms named in :attr:`unlabeled_terms` (``loss_ClsKD`` -> ``loss_unlabeled_ClsKD``).
        """
        device = model_device(student)
        images = [to_device(d["image"], device) for d in batch]
        rec = self.distiller.adapter.student_forward_unlabeled(student, images)
        s_in = self.distiller.adapter.student_inputs(rec)
        t_in = self.distiller.teacher_inputs(rec)
        kd = self.distiller(s_in, t_in, epoch)
        w = float(self.unlabeled_weight)
        return {"loss_unlabeled_" + k[len("loss_"):]: w * v for k, v in kd.items()
                if k in self.unlabeled_terms}

    def compute_losses(self, batch: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        """:meth:`kd_forward` around :meth:`SimpleTrainer.compute_losses` (our trainer's
        override point); with an online teacher also its own task loss
        (:meth:`online_teacher_losses`)."""
        out = self.kd_forward(self.model, functools.partial(super().compute_losses, batch))
        if self.distiller.online_teacher:
            out.update(self.online_teacher_losses(batch))
        return out

    def online_teacher_losses(self, batch: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        """Paper 004 concurrent training (``KD.ONLINE_TEACHER``,
        :mod:`mdkd_det.distill.online_teacher`): the teacher's task loss on the labelled
        ``batch``, in train mode with autograd, as ``{"loss_teacher_<name>": weight * value}``
        (``loss_classifier`` -> ``loss_teacher_classifier``)."""
        teacher = self.distiller.teacher
        teacher.train()
        images, targets = self.detector_inputs(batch)
        w = float(self.online_teacher_weight)
        return {"loss_teacher_" + k[len("loss_"):] if k.startswith("loss_") else "loss_teacher_" + k: w * v
                for k, v in teacher(images, targets).items()}

    def clip_gradients(self) -> torch.Tensor:
        """As :meth:`SimpleTrainer.clip_gradients`; with an online teacher its parameters are
        clipped apart (to the same norm), so the teacher's gradient does not scale the
        student's. Returns the student side's norm."""
        if not self.distiller.online_teacher:
            return super().clip_gradients()
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        own = {id(p) for p in self.distiller.teacher.parameters()}
        params = self._params()
        torch.nn.utils.clip_grad_norm_([p for p in params if id(p) in own], self.grad_clip)
        return torch.nn.utils.clip_grad_norm_([p for p in params if id(p) not in own], self.grad_clip)

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
