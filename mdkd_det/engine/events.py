"""Training metrics: an event storage and the writers that publish it (detectron2's
``utils/events.py`` role).

- :class:`EventStorage` collects scalars per iteration (``put_scalar``); code anywhere inside
  the training loop reaches it with :func:`get_event_storage`. Each scalar keeps a history
  (fvcore ``HistoryBuffer``); writers smooth "hinted" scalars (losses, times) with the median
  over a window of recent iterations and publish non-hinted ones (LR, eval metrics) as is.
- Writers (:class:`EventWriter` protocol: ``tick()`` every iteration, ``write()`` every log
  period, ``close()``), driven by :class:`mdkd_det.engine.hooks.PeriodicWriter`:
  :class:`JSONWriter` (``metrics.json``, one JSON object per line), :class:`TensorboardWriter`
  (``torch.utils.tensorboard``), :class:`ProgressWriter` (tqdm bar + plain log line).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

from fvcore.common.history_buffer import HistoryBuffer

__all__ = [
    "EventStorage",
    "get_event_storage",
    "EventWriter",
    "JSONWriter",
    "TensorboardWriter",
    "ProgressWriter",
]

logger = logging.getLogger(__name__)

_STORAGE_STACK: List["EventStorage"] = []


def get_event_storage() -> "EventStorage":
    """Return the innermost active :class:`EventStorage`.

    Raises:
        RuntimeError: called outside a ``with EventStorage(...)`` block (the trainer opens one
            around ``train()``).
    """
    if not _STORAGE_STACK:
        raise RuntimeError("get_event_storage() must be called inside a 'with EventStorage(...)' block")
    return _STORAGE_STACK[-1]


def _to_float(name: str, value) -> float:
    if hasattr(value, "item"):  # torch / numpy scalars
        if getattr(value, "numel", lambda: 1)() != 1:
            raise ValueError(f"scalar '{name}' must be a single number, got shape {tuple(value.shape)}")
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"scalar '{name}' is not a number: {value!r}") from e


class EventStorage:
    """Per-run store of scalar metrics keyed by name, with the current iteration.

    Use as a context manager; inside it :func:`get_event_storage` returns this object.

    Args:
        start_iter: iteration the storage starts at (the trainer's ``start_iter``).
        max_length: values kept per scalar (older ones are dropped; global average kept).
    """

    def __init__(self, start_iter: int = 0, max_length: int = 1_000_000) -> None:
        self.iter = int(start_iter)
        self.start_iter = int(start_iter)
        self._max_length = int(max_length)
        self._history: Dict[str, HistoryBuffer] = defaultdict(lambda: HistoryBuffer(self._max_length))
        self._smoothing_hints: Dict[str, bool] = {}
        self._latest: Dict[str, Tuple[float, int]] = {}

    # ---- writing -----------------------------------------------------------------------
    def put_scalar(self, name: str, value, smoothing_hint: bool = True, cur_iter: Optional[int] = None) -> None:
        """Record ``value`` (Python/torch/numpy scalar) for ``name`` at ``cur_iter`` (default
        the current iteration).

        Args:
            smoothing_hint: True -> writers publish the median over their window (losses,
                timings); False -> writers publish the latest value (LR, eval metrics).

        Raises:
            ValueError: non-scalar value, or a different ``smoothing_hint`` than before for
                the same name.
        """
        v = _to_float(name, value)
        it = self.iter if cur_iter is None else int(cur_iter)
        self._history[name].update(v, it)
        self._latest[name] = (v, it)
        prev = self._smoothing_hints.get(name)
        if prev is not None and prev != smoothing_hint:
            raise ValueError(f"scalar '{name}' was put with smoothing_hint={prev} before, now {smoothing_hint}")
        self._smoothing_hints[name] = bool(smoothing_hint)

    def put_scalars(self, *, smoothing_hint: bool = True, cur_iter: Optional[int] = None, **kwargs) -> None:
        """``put_scalar`` for each ``name=value`` keyword."""
        for k, v in kwargs.items():
            self.put_scalar(k, v, smoothing_hint=smoothing_hint, cur_iter=cur_iter)

    def step(self) -> None:
        """Advance the current iteration by one."""
        self.iter += 1

    # ---- reading -----------------------------------------------------------------------
    def history(self, name: str) -> HistoryBuffer:
        """The fvcore ``HistoryBuffer`` of ``name`` (``values()`` -> list of (value, iter)).

        Raises:
            KeyError: nothing was recorded under ``name``.
        """
        if name not in self._history:
            raise KeyError(f"no history for scalar '{name}'; known: {sorted(self._history)}")
        return self._history[name]

    def histories(self) -> Dict[str, HistoryBuffer]:
        """All histories, by name."""
        return dict(self._history)

    def latest(self) -> Dict[str, Tuple[float, int]]:
        """``{name: (latest value, iteration it was put at)}``."""
        return dict(self._latest)

    def latest_with_smoothing_hint(self, window_size: int = 20) -> Dict[str, Tuple[float, int]]:
        """Like :meth:`latest`, but hinted scalars are the median of their last
        ``window_size`` values."""
        out = {}
        for k, (v, it) in self._latest.items():
            if self._smoothing_hints[k]:
                v = float(self._history[k].median(window_size))
            out[k] = (v, it)
        return out

    def smoothing_hints(self) -> Dict[str, bool]:
        """``{name: smoothing_hint}``."""
        return dict(self._smoothing_hints)

    # ---- context -----------------------------------------------------------------------
    def __enter__(self) -> "EventStorage":
        _STORAGE_STACK.append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert _STORAGE_STACK and _STORAGE_STACK[-1] is self, "EventStorage contexts closed out of order"
        _STORAGE_STACK.pop()


class EventWriter:
    """Base class of writers driven by :class:`mdkd_det.engine.hooks.PeriodicWriter`.

    ``tick()`` runs after every iteration (cheap; default no-op), ``write()`` every log period
    and after the last iteration, ``close()`` at the end of training.
    """

    def tick(self) -> None:
        pass

    def write(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _NewScalarsMixin:
    """Tracks which scalars changed since this writer last wrote them."""

    def _init_new(self, window_size: int) -> None:
        self._window_size = int(window_size)
        self._last_written: Dict[str, int] = {}

    def _new_scalars(self, storage: EventStorage) -> Dict[str, Tuple[float, int]]:
        out = {}
        for k, (v, it) in storage.latest_with_smoothing_hint(self._window_size).items():
            if it > self._last_written.get(k, -1):
                out[k] = (v, it)
                self._last_written[k] = it
        return out


class JSONWriter(_NewScalarsMixin, EventWriter):
    """Append one JSON object per ``write()`` to ``json_file`` (detectron2's ``metrics.json``).

    Each line is ``{"iteration": <it>, <name>: <value>, ...}`` holding the scalars updated since
    the previous write (``it`` = the latest 0-based iteration among them) (hinted ones as window medians). Non-finite values are
    written as ``null``. The file is opened in append mode, so a resumed run continues it; the
    line is flushed immediately (readable while training runs). Before its first line, the
    writer drops the file's lines from the iteration it starts at on (written by an interrupted
    run after its last checkpoint, and computed again now), so no iteration appears twice.

    Args:
        json_file: output path, usually ``OUTPUT_DIR/metrics.json`` (parent dirs are created).
        window_size: median window (iterations) for hinted scalars.
    """

    def __init__(self, json_file: str, window_size: int = 20) -> None:
        self._init_new(window_size)
        self.json_file = json_file
        d = os.path.dirname(os.path.abspath(json_file))
        os.makedirs(d, exist_ok=True)
        self._file = open(json_file, "a")
        self._first = True

    def _drop_from(self, first_iter: int) -> None:
        """Rewrite the file without lines whose iteration is >= ``first_iter``."""
        self._file.close()
        with open(self.json_file) as f:
            lines = f.readlines()
        keep = []
        for ln in lines:
            try:
                it = json.loads(ln).get("iteration")
            except (ValueError, AttributeError):
                it = None
            if not (isinstance(it, int) and it >= first_iter):
                keep.append(ln)
        if len(keep) != len(lines):
            tmp = self.json_file + ".rewrite"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.json_file)
        self._file = open(self.json_file, "a")

    def write(self) -> None:
        storage = get_event_storage()
        new = self._new_scalars(storage)
        if not new:
            return
        if self._first:
            self._first = False
            if self._file.tell() > 0:
                self._drop_from(min([it for _, it in new.values()] + [getattr(storage, "start_iter", 1 << 62)]))
        line = {"iteration": max(it for _, it in new.values())}
        for k, (v, _) in sorted(new.items()):
            line[k] = v if math.isfinite(v) else None
        self._file.write(json.dumps(line, sort_keys=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class TensorboardWriter(_NewScalarsMixin, EventWriter):
    """Write scalars to TensorBoard event files (``torch.utils.tensorboard.SummaryWriter``).

    Each scalar updated since the last write is added at the iteration it was put at
    (hinted scalars as window medians).

    Args:
        log_dir: directory for ``events.out.tfevents.*`` (usually ``OUTPUT_DIR``).
        window_size: median window (iterations) for hinted scalars.
        **kwargs: passed to ``SummaryWriter``.
    """

    def __init__(self, log_dir: str, window_size: int = 20, **kwargs) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._init_new(window_size)
        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir, **kwargs)

    def write(self) -> None:
        storage = get_event_storage()
        for k, (v, it) in self._new_scalars(storage).items():
            self._writer.add_scalar(k, v, it)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _fmt(v: float) -> str:
    return f"{v:.4g}"


class ProgressWriter(EventWriter):
    """Console progress: a tqdm bar (ETA, latest losses) updated every iteration, plus one
    plain ``logging`` line per ``write()`` (every log period), so non-interactive logs (CI,
    ``log.txt``) still show progress.

    The bar is created lazily at the first ``tick()`` starting at the storage's iteration and
    is disabled automatically when stderr is not a TTY (tqdm ``disable=None``).
    The log line reads (``iter`` = completed iterations) ``iter: 120/1000  eta: 0:05:12  total_loss: 0.53  loss_x: ...  lr: 1e-4
    time: 0.231  data_time: 0.004``; ETA uses the median ``time`` (s/iter, from
    :class:`mdkd_det.engine.hooks.IterationTimer`) over the window.

    Args:
        max_iter: total iterations of the run.
        window_size: median window for the displayed values.
        enable_bar: force the bar on/off; ``None`` -> on only for a TTY.
    """

    def __init__(self, max_iter: int, window_size: int = 20, enable_bar: Optional[bool] = None) -> None:
        self.max_iter = int(max_iter)
        self._window_size = int(window_size)
        self._enable_bar = enable_bar
        self._bar = None
        self._last_logged = -1

    def _bar_obj(self, storage: EventStorage):
        if self._bar is None:
            from tqdm import tqdm

            disable = None if self._enable_bar is None else not self._enable_bar
            self._bar = tqdm(total=self.max_iter, initial=storage.iter, desc="train", unit="it",
                             dynamic_ncols=True, disable=disable, file=sys.stderr, leave=True)
        return self._bar

    def _losses(self, storage: EventStorage) -> Dict[str, float]:
        vals = storage.latest_with_smoothing_hint(self._window_size)
        return {k: v for k, (v, _) in vals.items() if "loss" in k}

    def tick(self) -> None:
        storage = get_event_storage()
        bar = self._bar_obj(storage)
        if bar.disable:
            return
        bar.n = min(storage.iter + 1, self.max_iter)
        post = {k: _fmt(v) for k, v in self._losses(storage).items()}
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    def _eta(self, storage: EventStorage, cur: int) -> Optional[str]:
        try:
            t = float(storage.history("time").median(self._window_size))
        except KeyError:
            return None
        remaining = max(self.max_iter - cur - 1, 0)
        return str(datetime.timedelta(seconds=int(t * remaining)))

    def write(self) -> None:
        storage = get_event_storage()
        self.tick()
        vals = storage.latest_with_smoothing_hint(self._window_size)
        if not vals:
            return
        cur = max(it for _, it in vals.values())  # last iteration that produced a value
        if cur <= self._last_logged:
            return
        self._last_logged = cur
        parts = [f"iter: {cur + 1}/{self.max_iter}"]
        eta = self._eta(storage, cur)
        if eta is not None:
            parts.append(f"eta: {eta}")
        parts += [f"{k}: {_fmt(v)}" for k, (v, _) in sorted(vals.items()) if "loss" in k]
        for k in ("lr", "grad_norm", "time", "data_time"):
            if k in vals:
                parts.append(f"{k}: {_fmt(vals[k][0])}")
        logger.info("  ".join(parts))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
