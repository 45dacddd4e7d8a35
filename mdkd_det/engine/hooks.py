"""Training hooks (detectron2's ``engine/hooks.py`` role).

A hook is called by :class:`mdkd_det.engine.trainer.TrainerBase` at fixed points::

    hook.before_train()
    for iter in range(start_iter, max_iter):
        hook.before_step()
        trainer.run_step()          # calls hook.after_backward() between backward and step
        hook.after_step()
    hook.after_train()              # also after an exception

Hooks run in registration order. The recommended order (what ``DefaultTrainer`` builds) is
``IterationTimer, LRScheduler, PeriodicCheckpointer, EvalHook, PeriodicWriter``: the scheduler
is stepped before a checkpoint is written, so the checkpoint holds the state *after* the
iteration, and writers see the eval metrics of the same iteration.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import torch

from ..utils import comm
from .checkpointer import atomic_write_text, get_rng_state, set_rng_state
from .events import EventWriter, JSONWriter, ProgressWriter, TensorboardWriter

__all__ = [
    "HookBase",
    "CallbackHook",
    "IterationTimer",
    "LRScheduler",
    "PeriodicCheckpointer",
    "EvalHook",
    "PeriodicWriter",
    "default_writers",
    "flatten_results",
]

logger = logging.getLogger(__name__)


class HookBase:
    """Base class of training hooks; override any of the five callbacks.

    ``self.trainer`` is set (as a weak proxy) by ``TrainerBase.register_hooks``; it gives
    ``trainer.iter`` (current iteration, 0-based), ``trainer.start_iter``, ``trainer.max_iter``,
    ``trainer.storage`` (the :class:`~mdkd_det.engine.events.EventStorage`), and for
    :class:`~mdkd_det.engine.trainer.SimpleTrainer` also ``model``, ``optimizer``.

    Hooks with resumable state override :meth:`state_dict` / :meth:`load_state_dict`; the
    trainer's own ``state_dict`` collects them.
    """

    trainer: Any = None

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class CallbackHook(HookBase):
    """Hook built from plain functions ``f(trainer)`` (for tests and quick experiments)."""

    def __init__(self, *, before_train=None, after_train=None, before_step=None,
                 after_backward=None, after_step=None) -> None:
        self._fns = dict(before_train=before_train, after_train=after_train, before_step=before_step,
                         after_backward=after_backward, after_step=after_step)

    def _call(self, name: str) -> None:
        fn = self._fns[name]
        if fn is not None:
            fn(self.trainer)

    def before_train(self) -> None:
        self._call("before_train")

    def after_train(self) -> None:
        self._call("after_train")

    def before_step(self) -> None:
        self._call("before_step")

    def after_backward(self) -> None:
        self._call("after_backward")

    def after_step(self) -> None:
        self._call("after_step")


class IterationTimer(HookBase):
    """Put ``time`` (s/iteration, wall clock ``time.perf_counter``) into the storage after each
    step, skipping the first ``warmup_iter`` steps of a run (slow startup); log the total and
    per-iteration training time at the end.

    Args:
        warmup_iter: number of initial iterations excluded from the timing statistics.
    """

    def __init__(self, warmup_iter: int = 3) -> None:
        self._warmup_iter = int(warmup_iter)
        self._step_start = 0.0
        self._train_start = 0.0
        self._timed_total = 0.0
        self._timed_count = 0

    def before_train(self) -> None:
        self._train_start = time.perf_counter()
        self._timed_total, self._timed_count = 0.0, 0

    def before_step(self) -> None:
        self._step_start = time.perf_counter()

    def after_step(self) -> None:
        dt = time.perf_counter() - self._step_start
        if self.trainer.iter - self.trainer.start_iter >= self._warmup_iter:
            self.trainer.storage.put_scalars(time=dt)
            self._timed_total += dt
            self._timed_count += 1

    def after_train(self) -> None:
        total = time.perf_counter() - self._train_start
        done = self.trainer.iter - self.trainer.start_iter
        per = (self._timed_total / self._timed_count) if self._timed_count else float("nan")
        logger.info("Training: %d iterations in %.1f s (%.4f s/it after warmup)", done, total, per)


class LRScheduler(HookBase):
    """Step a per-iteration LR scheduler after every iteration and log the LR in use.

    ``lr`` (smoothing_hint False) is the LR of the param group with the most parameters,
    read *before* stepping, i.e. the LR of the iteration that just ran.

    Args:
        scheduler: a ``torch.optim.lr_scheduler.LRScheduler`` (e.g. from
            :func:`mdkd_det.solver.build_lr_scheduler`).
        optimizer: default ``scheduler.optimizer``.
    """

    def __init__(self, scheduler, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        self.scheduler = scheduler
        self.optimizer = optimizer if optimizer is not None else scheduler.optimizer
        self._group = max(range(len(self.optimizer.param_groups)),
                          key=lambda i: len(self.optimizer.param_groups[i]["params"]))

    def after_step(self) -> None:
        lr = self.optimizer.param_groups[self._group]["lr"]
        self.trainer.storage.put_scalar("lr", lr, smoothing_hint=False)
        self.scheduler.step()


class PeriodicCheckpointer(HookBase):
    """Save a checkpoint every ``period`` iterations (``model_0000499.pth`` for iteration 499)
    and ``model_final.pth`` after the last iteration, each with ``iteration=trainer.iter``
    (resume then starts at ``iteration + 1``).

    Args:
        checkpointer: :class:`~mdkd_det.engine.checkpointer.Checkpointer` (writes on rank 0 only).
        period: ``SOLVER.CHECKPOINT_PERIOD`` (iter); <= 0 -> only the final checkpoint.
        max_iter: default ``trainer.max_iter``.
        max_to_keep: keep only this many periodic checkpoints (``model_final``/``model_best``
            are never deleted); ``None`` keeps all.
        file_prefix: name prefix of periodic checkpoints.
    """

    def __init__(self, checkpointer, period: int, max_iter: Optional[int] = None,
                 max_to_keep: Optional[int] = None, file_prefix: str = "model") -> None:
        self.checkpointer = checkpointer
        self.period = int(period)
        self.max_iter = max_iter
        self.max_to_keep = max_to_keep
        self.file_prefix = file_prefix
        self._recent: List[str] = []

    def before_train(self) -> None:
        if self.max_iter is None:
            self.max_iter = self.trainer.max_iter

    def after_step(self) -> None:
        it = self.trainer.iter
        if self.period > 0 and (it + 1) % self.period == 0 and it + 1 < self.max_iter:
            path = self.checkpointer.save(f"{self.file_prefix}_{it:07d}", iteration=it)
            if path and self.max_to_keep is not None:
                self._recent.append(path)
                while len(self._recent) > self.max_to_keep:
                    old = self._recent.pop(0)
                    if os.path.exists(old):
                        os.remove(old)
        if it + 1 >= self.max_iter:
            self.checkpointer.save(f"{self.file_prefix}_final", iteration=it)


def flatten_results(results: Mapping[str, Any], prefix: str = "") -> Dict[str, float]:
    """Flatten ``{"bbox": {"AP": 31.2}}`` to ``{"bbox/AP": 31.2}``.

    Numbers (Python, numpy or 1-element torch) are kept; other leaves (lists, strings, arrays)
    are dropped.
    """
    out: Dict[str, float] = {}
    for k, v in results.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_results(v, key + "/"))
            continue
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                continue
            v = v.item()
        elif hasattr(v, "item") and getattr(v, "size", 2) == 1:  # numpy scalar
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[key] = float(v)
    return out


class EvalHook(HookBase):
    """Run ``eval_function()`` every ``eval_period`` iterations and after the last iteration;
    keep ``model_best.pth`` by ``metric`` (higher is better).

    ``eval_function()`` returns a nested dict of numbers (e.g. ``{"bbox": {"AP": 31.2}}``); it
    is flattened with "/" (``bbox/AP``), each value put into the storage (smoothing_hint False)
    and the nested dict kept as ``trainer.last_eval_results``. It is called on every process
    (evaluation may be distributed) followed by a barrier; processes without results may
    return ``{}``. The model is put in ``eval()`` mode by the function if needed; this hook
    restores ``train()`` mode afterwards, and restores the global RNGs (Python, NumPy, torch,
    CUDA) to their state before the evaluation, so evaluation never changes the training
    stream and kill-and-resume stays bit-exact with ``TEST.EVAL_PERIOD`` on (issue 13).

    When ``metric`` improves (strictly), ``checkpointer.save("model_best", iteration=it,
    best_metric=..., best_value=...)`` is called and a small ``model_best.json`` sidecar
    written; on a resumed run the best value is taken from that sidecar (or from
    :meth:`load_state_dict`), so a worse model never overwrites the best one.

    Args:
        eval_period: ``TEST.EVAL_PERIOD`` (iter); <= 0 -> only after the last iteration.
        eval_function: ``() -> dict``.
        metric: flattened key to track; missing/non-finite -> warning, no best checkpoint.
        checkpointer: ``Checkpointer`` for ``model_best.pth``; ``None`` -> no best tracking
            on disk (the best value is still tracked).
        eval_at_start: also evaluate the initial model before the first step of a fresh run
            (``TEST.EVAL_AT_START``; recorded as iteration -1), so a model that starts from a
            good state (a joint teacher initialised as the target teacher, issue 10) can never
            be selected worse than its starting point.
    """

    def __init__(self, eval_period: int, eval_function: Callable[[], Mapping[str, Any]],
                 metric: str = "bbox/AP", checkpointer=None, eval_at_start: bool = False) -> None:
        self.eval_at_start = bool(eval_at_start)
        self.eval_period = int(eval_period)
        self.eval_function = eval_function
        self.metric = metric
        self.checkpointer = checkpointer
        self.best_value: Optional[float] = None
        self.best_iter: Optional[int] = None

    def _sidecar(self) -> Optional[str]:
        d = getattr(self.checkpointer, "save_dir", None)
        return os.path.join(d, "model_best.json") if d else None

    def before_train(self) -> None:
        side = self._sidecar()
        if self.best_value is None and self.trainer.start_iter > 0 and side and os.path.isfile(side):
            try:
                with open(side) as f:
                    info = json.load(f)
                if info.get("metric") == self.metric and int(info.get("iteration", 1 << 62)) < self.trainer.start_iter:
                    self.best_value, self.best_iter = float(info["value"]), int(info["iteration"])
                    logger.info("Resumed best %s = %.4f (iteration %d) from %s",
                                self.metric, self.best_value, self.best_iter, side)
            except (OSError, ValueError, KeyError) as e:
                logger.warning("Ignoring unreadable %s: %s", side, e)
        if self.eval_at_start and self.trainer.start_iter == 0:
            self._do_eval(iteration=-1)

    def _do_eval(self, iteration: Optional[int] = None) -> None:
        it = self.trainer.iter if iteration is None else iteration
        model = getattr(self.trainer, "model", None)
        was_training = model.training if model is not None else None
        # Evaluation (test DataLoader, visualiser, samplers) may draw from the global RNGs. The
        # periodic checkpoint of this iteration already holds the pre-evaluation RNG state, so
        # restore it: training continues identically whether or not the run was resumed.
        rng = get_rng_state()
        try:
            results = self.eval_function() or {}
        finally:
            set_rng_state(rng)
        if model is not None:
            model.train(was_training)
        if not isinstance(results, Mapping):
            raise TypeError(f"eval_function must return a dict of metrics, got {type(results).__name__}")
        try:
            self.trainer.last_eval_results = results
        except AttributeError:
            pass
        flat = flatten_results(results)
        if flat:
            self.trainer.storage.put_scalars(smoothing_hint=False, **flat)
        comm.synchronize()
        if not comm.is_main_process() and not flat:
            return
        value = flat.get(self.metric)
        if value is None or not math.isfinite(value):
            logger.warning("EvalHook: metric '%s' %s at iteration %d; available: %s", self.metric,
                           "missing" if value is None else f"is {value}", it, sorted(flat))
            return
        if self.best_value is None or value > self.best_value:
            self.best_value, self.best_iter = value, it
            logger.info("New best %s = %.4f at iteration %d", self.metric, value, it)
            if self.checkpointer is not None:
                self.checkpointer.save("model_best", iteration=it, best_metric=self.metric, best_value=value)
                side = self._sidecar()
                if side and comm.is_main_process():
                    atomic_write_text(side, json.dumps({"metric": self.metric, "value": value, "iteration": it}))

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        is_final = next_iter >= self.trainer.max_iter
        if is_final or (self.eval_period > 0 and next_iter % self.eval_period == 0):
            self._do_eval()

    def state_dict(self) -> Dict[str, Any]:
        return {"best_value": self.best_value, "best_iter": self.best_iter, "metric": self.metric}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("metric", self.metric) == self.metric:
            self.best_value = state.get("best_value")
            self.best_iter = state.get("best_iter")


class PeriodicWriter(HookBase):
    """Drive :class:`~mdkd_det.engine.events.EventWriter` objects: ``tick()`` after every
    iteration, ``write()`` every ``period`` iterations and after the last one, and
    ``write(); close()`` at the end of training (also after an exception).

    Args:
        writers: e.g. ``[JSONWriter(...), TensorboardWriter(...), ProgressWriter(max_iter)]``.
        period: ``LOG_PERIOD`` (iter).
    """

    def __init__(self, writers: Iterable[EventWriter], period: int = 20) -> None:
        self.writers = list(writers)
        for w in self.writers:
            if not callable(getattr(w, "write", None)):
                raise TypeError(f"{type(w).__name__} is not an EventWriter (no write())")
        self.period = max(int(period), 1)

    def after_step(self) -> None:
        it = self.trainer.iter
        for w in self.writers:
            if hasattr(w, "tick"):
                w.tick()
        if (it + 1) % self.period == 0 or it + 1 >= self.trainer.max_iter:
            for w in self.writers:
                w.write()

    def after_train(self) -> None:
        for w in self.writers:
            try:
                w.write()
            finally:
                if hasattr(w, "close"):
                    w.close()


def default_writers(output_dir: str, max_iter: int, window_size: int = 20) -> List[EventWriter]:
    """``[JSONWriter(output_dir/metrics.json), TensorboardWriter(output_dir),
    ProgressWriter(max_iter)]`` on the main process, ``[]`` elsewhere."""
    if not comm.is_main_process():
        return []
    return [
        JSONWriter(os.path.join(output_dir, "metrics.json"), window_size=window_size),
        TensorboardWriter(output_dir, window_size=window_size),
        ProgressWriter(max_iter, window_size=window_size),
    ]
