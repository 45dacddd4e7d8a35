"""Generic training loop with hooks (detectron2's ``engine/train_loop.py`` role).

Knows nothing about datasets or model families: a batch is whatever the data loader yields,
and the model returns a dict of scalar losses.

Resume-exactness contract
-------------------------
A run interrupted after checkpointing iteration ``k`` and resumed must produce **bit-identical
weights** to an uninterrupted run (same device, same number of threads, deterministic ops).
This holds when:

1. The checkpoint is written after the LR scheduler stepped for iteration ``k``
   (hook order ``LRScheduler`` before ``PeriodicCheckpointer``) and holds the model, optimizer,
   scheduler, grad scaler, ``iteration=k`` and the global RNG states
   (:class:`~mdkd_det.engine.checkpointer.Checkpointer`).
2. The resumed process rebuilds fresh model/optimizer/scheduler objects, calls
   ``Checkpointer.resume_or_load(..., resume=True)`` (which also restores the RNGs) and
   trains ``train(k + 1, max_iter)``.
3. **The data loader is rebuilt from the checkpoint's iteration by its factory**:
   ``make_loader(start_iter=k + 1)`` must yield exactly the batches the uninterrupted run sees
   from iteration ``k + 1`` on. The stream must therefore be a function of (seed, iteration)
   only, never of how many batches a previous loader object produced, and must not draw from
   the global RNGs. The trainer never re-creates or rewinds a loader: it calls ``iter()`` on it
   once and then ``next()`` once per iteration.
4. Anything else with state that changes during training (hooks such as ``EvalHook``'s best
   value, KD schedules) is saved too, e.g. by registering the trainer as a checkpointable
   (``Checkpointer(..., trainer=trainer)``; see :meth:`TrainerBase.state_dict`).

Under DDP the checkpoint holds rank 0's RNG state only, so exactness is guaranteed for
single-process runs; multi-process resumes continue correctly but not bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch

from ..utils.device import cpu_has_native_bf16, model_device, to_device

from ..utils.errors import ConfigError, DatasetError
from ..utils import comm
from .events import EventStorage
from .hooks import HookBase

__all__ = ["TrainerBase", "SimpleTrainer"]

logger = logging.getLogger(__name__)


class TrainerBase:
    """Iteration loop with hooks.

    ``train(start_iter, max_iter)`` opens an :class:`EventStorage` and runs::

        before_train()
        for self.iter in range(start_iter, max_iter):
            before_step(); run_step(); after_step()
        after_train()      # in a ``finally``: also runs after an exception

    Attributes:
        iter: current iteration (0-based); equals ``max_iter`` after a completed ``train``.
        start_iter, max_iter: bounds of the current ``train`` call.
        storage: the run's :class:`EventStorage` (its ``iter`` follows ``self.iter``).
    """

    def __init__(self) -> None:
        self._hooks: List[HookBase] = []
        self.iter: int = 0
        self.start_iter: int = 0
        self.max_iter: int = 0
        self.storage: Optional[EventStorage] = None

    def register_hooks(self, hooks: Iterable[Optional[HookBase]]) -> None:
        """Append hooks (``None`` entries are skipped); they run in registration order.

        Raises:
            TypeError: an entry is not a :class:`HookBase`.
        """
        hooks = [h for h in hooks if h is not None]
        for h in hooks:
            if not isinstance(h, HookBase):
                raise TypeError(f"{type(h).__name__} is not a HookBase")
            # a proxy avoids a reference cycle trainer <-> hook
            h.trainer = weakref.proxy(self)
        self._hooks.extend(hooks)

    @property
    def hooks(self) -> List[HookBase]:
        return list(self._hooks)

    def train(self, start_iter: int, max_iter: int) -> None:
        """Run iterations ``start_iter .. max_iter - 1``.

        Raises:
            whatever ``run_step`` or a hook raises (after ``after_train`` ran), e.g.
            ``FloatingPointError`` for a non-finite loss.
        """
        logger.info("Starting training from iteration %d to %d", start_iter, max_iter)
        self.iter = self.start_iter = int(start_iter)
        self.max_iter = int(max_iter)
        with EventStorage(self.start_iter) as self.storage:
            try:
                self.before_train()
                for self.iter in range(self.start_iter, self.max_iter):
                    self.before_step()
                    self.run_step()
                    self.after_step()
                # after a completed loop, iter == max_iter (not max_iter - 1)
                self.iter = self.max_iter
            except Exception:
                logger.exception("Exception during training at iteration %d:", self.iter)
                raise
            finally:
                self.after_train()

    def before_train(self) -> None:
        for h in self._hooks:
            h.before_train()

    def after_train(self) -> None:
        self.storage.iter = self.iter
        for h in self._hooks:
            h.after_train()

    def before_step(self) -> None:
        self.storage.iter = self.iter
        for h in self._hooks:
            h.before_step()

    def after_backward(self) -> None:
        for h in self._hooks:
            h.after_backward()

    def after_step(self) -> None:
        for h in self._hooks:
            h.after_step()

    def run_step(self) -> None:
        raise NotImplementedError

    # ---- checkpointable ------------------------------------------------------------------
    def _hook_keys(self) -> List[str]:
        keys, seen = [], {}
        for h in self._hooks:
            k = type(h).__qualname__
            n = seen.get(k, 0)
            seen[k] = n + 1
            keys.append(k if n == 0 else f"{k}#{n}")
        return keys

    def state_dict(self) -> Dict[str, Any]:
        """``{"iteration": iter, "hooks": {hook class name: hook.state_dict()}}`` (hooks with
        an empty state are omitted). Pass the trainer to ``Checkpointer(trainer=...)`` to keep
        hook state across resumes."""
        hooks = {}
        for k, h in zip(self._hook_keys(), self._hooks):
            st = h.state_dict()
            if st:
                hooks[k] = st
        return {"iteration": self.iter, "hooks": hooks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``iter`` and the state of registered hooks (unknown entries are logged)."""
        self.iter = int(state.get("iteration", self.iter))
        known = dict(zip(self._hook_keys(), self._hooks))
        for k, st in state.get("hooks", {}).items():
            if k in known:
                known[k].load_state_dict(st)
            else:
                logger.warning("No registered hook '%s' to restore its state", k)


class SimpleTrainer(TrainerBase):
    """One optimizer step per iteration on a model that returns a loss dict.

    ``run_step``: next batch from ``iter(data_loader)`` -> ``loss_dict = compute_losses(batch)``
    (under autocast when ``amp``) -> sum -> non-finite check -> ``zero_grad`` -> backward ->
    ``after_backward`` hooks -> optional ``clip_grad_norm_`` -> ``optimizer.step()``.
    Each loss, ``total_loss``, ``data_time`` (s) and, with clipping, ``grad_norm`` (the norm
    before clipping) go to the storage (averaged over processes under DDP; ``data_time`` is
    the maximum).

    Mixed precision (``amp=True``): on CUDA ``torch.autocast("cuda", float16)`` around
    ``compute_losses`` plus ``torch.amp.GradScaler`` (``self.grad_scaler``, save it with the
    checkpointer); on CPU ``torch.autocast("cpu", bfloat16)`` and no scaler.

    See the module docstring for the resume-exactness contract (the loader must be rebuilt at
    ``start_iter`` by its factory).

    Args:
        model: ``nn.Module`` (or DDP wrapper) in train mode; ``model(images, targets)`` returns
            ``dict[str, scalar Tensor]``.
        data_loader: an infinite iterable of batches; ``iter()`` is called once.
        optimizer: a torch optimizer over (a subset of) the model's parameters.
        grad_clip: max global L2 norm of the gradients of the optimizer's parameters
            (``torch.nn.utils.clip_grad_norm_``); ``None``/0 = off. Paper §6.3 uses 5.0.
        amp: mixed precision as above.
        grad_scaler: a custom ``GradScaler`` for CUDA AMP.

    Raises:
        ConfigError: ``amp`` on a device other than CPU/CUDA.
    """

    def __init__(self, model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                 grad_clip: Optional[float] = None, amp: bool = False, grad_scaler=None) -> None:
        super().__init__()
        model.train()
        self.model = model
        self.data_loader = data_loader
        self._data_iter = None
        self.optimizer = optimizer
        self.grad_clip = float(grad_clip) if grad_clip else None
        self.amp = bool(amp)
        self.device = model_device(model)
        self.grad_scaler = None
        if self.amp:
            if self.device.type == "cuda":
                self.grad_scaler = grad_scaler if grad_scaler is not None else torch.amp.GradScaler("cuda")
            elif self.device.type != "cpu":
                raise ConfigError(f"SOLVER.AMP.ENABLED: mixed precision is supported on cpu/cuda, "
                                  f"not on device '{self.device}'")
            elif not cpu_has_native_bf16():
                logger.warning("SOLVER.AMP.ENABLED on a CPU without native bf16 (AVX512-BF16/AMX): bf16 is "
                               "emulated here and the step is many times slower than fp32 (docs/benchmarks.md)")
        self.last_eval_results: Dict[str, Any] = {}

    # ---- override point ------------------------------------------------------------------
    def compute_losses(self, batch: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        """Forward one batch and return the loss dict (override point for mixins: KD calls
        ``super().compute_losses(batch)`` and adds its terms).

        Default: ``self.model([d["image"] ...], [d["target"] ...])`` with tensors moved to the
        model's device. Runs under autocast when ``amp``.
        """
        images, targets = self.detector_inputs(batch)
        return self.model(images, targets)

    def detector_inputs(self, batch: List[Dict[str, Any]]):
        """``(images, targets)`` of a mapped batch, on the model's device (torchvision API)."""
        return ([to_device(d["image"], self.device) for d in batch],
                [to_device(d["target"], self.device) for d in batch])

    # ---- loop ----------------------------------------------------------------------------
    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def _next_batch(self):
        if self._data_iter is None:
            self._data_iter = iter(self.data_loader)
        try:
            return next(self._data_iter)
        except StopIteration:
            raise DatasetError(
                f"the training data loader ran out of batches at iteration {self.iter}; "
                "SimpleTrainer needs an infinite loader (e.g. a TrainingSampler-based one)"
            ) from None

    def _params(self) -> List[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def clip_gradients(self) -> torch.Tensor:
        """Clip the gradients of all the optimizer's parameters to the global L2 norm
        ``grad_clip`` (unscaled first under CUDA AMP); return the norm before clipping (0-dim).
        Override point (the Stage-1 mixin clips the discriminator apart)."""
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(self._params(), self.grad_clip)

    def run_step(self) -> None:
        """One iteration; see the class docstring.

        Raises:
            FloatingPointError: the summed loss is NaN/inf (message: iteration and each term).
            TypeError: ``compute_losses`` did not return a dict of scalar tensors.
            DatasetError: the data loader is exhausted.
        """
        assert self.model.training, "SimpleTrainer: model is in eval mode (an eval hook must restore train())"
        t0 = time.perf_counter()
        batch = self._next_batch()
        data_time = time.perf_counter() - t0

        with self._autocast():
            loss_dict = self.compute_losses(batch)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        if not isinstance(loss_dict, Mapping) or not loss_dict:
            raise TypeError(f"compute_losses must return a non-empty dict of losses, got {type(loss_dict).__name__}")
        for k, v in loss_dict.items():
            if not isinstance(v, torch.Tensor) or v.numel() != 1:
                raise TypeError(f"loss '{k}' must be a scalar tensor, got {type(v).__name__}"
                                + (f" of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else ""))
        losses = sum(v.float().reshape(()) for v in loss_dict.values())
        if not torch.isfinite(losses).item():
            terms = {k: float(v.detach().float()) for k, v in loss_dict.items()}
            raise FloatingPointError(f"loss became non-finite at iteration {self.iter}: loss_dict = {terms}")

        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        self.after_backward()

        grad_norm = self.clip_gradients() if self.grad_clip else None

        self._write_metrics(loss_dict, data_time, grad_norm)

        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def _write_metrics(self, loss_dict: Mapping[str, torch.Tensor], data_time: float,
                       grad_norm: Optional[torch.Tensor] = None) -> None:
        metrics = {k: float(v.detach().float()) for k, v in loss_dict.items()}
        metrics["data_time"] = data_time
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        all_metrics = comm.all_gather(metrics)
        if len(all_metrics) > 1:
            merged = {k: sum(m[k] for m in all_metrics) / len(all_metrics) for k in metrics if k != "data_time"}
            merged["data_time"] = max(m["data_time"] for m in all_metrics)
            metrics = merged
        loss_keys = [k for k in loss_dict]
        total = sum(metrics[k] for k in loss_keys)
        scalars = {k: metrics[k] for k in loss_keys if k != "total_loss"}
        scalars["total_loss"] = total
        scalars["data_time"] = metrics["data_time"]
        if "grad_norm" in metrics:
            scalars["grad_norm"] = metrics["grad_norm"]
        self.storage.put_scalars(**scalars)
