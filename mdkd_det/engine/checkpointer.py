"""Checkpoints on fvcore's ``Checkpointer`` (the base of detectron2's ``DetectionCheckpointer``),
plus what fvcore lacks: atomic writes, RNG state for an exact resume, ``weights_only`` loading
and a strict-load mismatch report.

Checkpoint layout (one ``.pth`` file, ``torch.save`` of a dict; fvcore's, plus ``"rng"``)::

    {"model": state_dict,                       # DDP wrapper removed
     "<name>": obj.state_dict(), ...            # each checkpointable: optimizer, scheduler, ...
     "rng": {"python", "numpy", "torch"[, "cuda"]},
     "<extra>": ...}                            # save(name, iteration=..., ...) keywords

``OUTPUT_DIR/last_checkpoint`` holds the file name of the newest checkpoint (fvcore/detectron2).

What this module adds to fvcore (``fvcore.common.checkpoint``):

- **Atomic writes.** fvcore writes through ``self.path_manager.open``; ours is an
  :class:`_AtomicPathManager` whose write mode is
  :func:`~mdkd_det.utils.checkpoint_io.atomic_open` (temp file in the same directory, ``fsync``,
  ``os.replace``), so a crash mid-write leaves the previous checkpoint and ``last_checkpoint``
  intact. The temp file such a crash leaves behind is removed when the next :class:`Checkpointer`
  for that directory is created (:func:`~mdkd_det.utils.checkpoint_io.remove_stale_temp_files`).
- **RNG state** (:func:`get_rng_state` / :func:`set_rng_state`), saved with every checkpoint and
  restored on a full resume, so a resumed run is bitwise the uninterrupted one.
- **Safe loading.** ``_load_file`` reads through
  :func:`mdkd_det.utils.checkpoint_io.load_checkpoint_file` (``torch.load(weights_only=True)``
  unless ``MODEL.TRUST_CHECKPOINTS``); fvcore's own ``torch.load`` is never called.
- **Strict loading** (default): keys and shapes must match, checked before anything is loaded;
  the :class:`~mdkd_det.utils.errors.CheckpointError` names the file and every missing,
  unexpected and mismatched key (:func:`mismatch_report`).
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from fvcore.common.checkpoint import Checkpointer as _FvcoreCheckpointer
from fvcore.common.checkpoint import _strip_prefix_if_present
from iopath.common.file_io import PathManager

from ..utils.checkpoint_io import (  # atomic_*, remove_stale_temp_files: re-exported (their old home)
    atomic_open,
    atomic_torch_save,
    atomic_write_text,
    load_checkpoint_file,
    remove_stale_temp_files,
    split_model_state,
)
from ..utils.errors import CheckpointError
from ..utils import comm

__all__ = [
    "Checkpointer",
    "export_model",
    "atomic_open",
    "atomic_write_text",
    "atomic_torch_save",
    "remove_stale_temp_files",
    "get_rng_state",
    "set_rng_state",
    "unwrap_model",
    "mismatch_report",
]

logger = logging.getLogger(__name__)

_LIST_LIMIT = 20


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Return ``model.module`` for ``DistributedDataParallel`` / ``DataParallel``, else ``model``."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


class _AtomicPathManager(PathManager):
    """iopath ``PathManager`` whose ``open`` for writing is :func:`atomic_open`, so that fvcore's
    own ``Checkpointer.save`` and ``tag_last_checkpoint`` write atomically. Local paths only (no
    URL handler: nothing is downloaded)."""

    def open(self, path: str, mode: str = "r", buffering: int = -1, **kwargs: Any) -> Any:
        if "w" in mode:
            return atomic_open(path, binary="b" in mode)
        return super().open(path, mode, buffering=buffering, **kwargs)


# ---- RNG state --------------------------------------------------------------------------------
def get_rng_state() -> Dict[str, Any]:
    """Snapshot of the global RNGs: Python ``random``, NumPy legacy global (``np.random``),
    torch CPU and, if available, every CUDA device. Only tensors, ints, floats and tuples, so it
    loads with ``torch.load(weights_only=True)``."""
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": (str(kind), torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore a :func:`get_rng_state` snapshot (missing parts are left alone; CUDA states are
    restored only if the device count matches)."""
    if "python" in state:
        ver, internal, gauss = state["python"]
        random.setstate((ver, tuple(internal), gauss))
    if "numpy" in state:
        kind, key, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(key, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("CUDA RNG state for %d devices not restored (%d present)",
                           len(cuda), torch.cuda.device_count())


# ---- strict matching: the mismatch report --------------------------------------------------
def _fmt_list(items: Sequence[str]) -> str:
    items = list(items)
    more = f", ... (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else ""
    return ", ".join(items[:_LIST_LIMIT]) + more


def match_state_dict(model_state: Mapping[str, torch.Tensor], ckpt_state: Mapping[str, torch.Tensor]
                     ) -> Tuple[List[str], List[str], List[str]]:
    """Compare key sets and shapes.

    Returns:
        (missing keys: in the model, not in the checkpoint; unexpected keys: in the checkpoint
        only; shape mismatches as ``"key: checkpoint (a, b) vs model (c, d)"``).
    """
    missing = [k for k in model_state if k not in ckpt_state]
    unexpected = [k for k in ckpt_state if k not in model_state]
    mismatched = []
    for k, v in ckpt_state.items():
        if k in model_state and tuple(v.shape) != tuple(model_state[k].shape):
            mismatched.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}")
    return missing, unexpected, mismatched


def mismatch_report(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """One line naming every missing, unexpected and shape-mismatched key of ``state`` against
    ``model.state_dict()`` (at most 20 of each kind); ``""`` if they match exactly."""
    missing, unexpected, mismatched = match_state_dict(model.state_dict(), state)
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_fmt_list(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_fmt_list(unexpected)}")
    if mismatched:
        parts.append(f"shape mismatches ({len(mismatched)}): {_fmt_list(mismatched)}")
    return "; ".join(parts)


_PLAIN = "__plain_state_dict__"  # _load_file's marker: the file held only a state dict


class Checkpointer(_FvcoreCheckpointer):
    """fvcore's ``Checkpointer`` (the base of detectron2's ``DetectionCheckpointer``) with atomic
    writes, RNG state, ``weights_only`` loading, strict loading and :class:`CheckpointError`.

    From fvcore, unchanged: the file layout (see the module docstring), ``save_dir/last_checkpoint``,
    :meth:`has_checkpoint`, :meth:`resume_or_load` (``resume=True`` and a ``last_checkpoint``:
    full restore, model + every checkpointable + RNG; else model weights from ``path``; on resume
    ``extra["iteration"]`` is the last finished iteration), the ``module.`` prefix strip (a saved
    DDP model), skipping tensors of another shape and logging missing/unexpected keys
    (``_load_model`` / ``_log_incompatible_keys``).

    Args:
        model: the model (a DDP/DataParallel wrapper is unwrapped); ``None`` for a checkpointer
            that only reads ``last_checkpoint``.
        save_dir: directory for checkpoints and ``last_checkpoint`` (usually ``OUTPUT_DIR``).
        save_to_disk: write files; default: only on the main process (rank 0).
        trust_checkpoints: load with ``torch.load(weights_only=False)`` (arbitrary pickles;
            ``MODEL.TRUST_CHECKPOINTS``). Default False: ``weights_only=True`` through
            :func:`mdkd_det.utils.checkpoint_io.load_checkpoint_file`, which reads our
            checkpoints and plain state dicts (torchvision) but refuses arbitrary objects.
        **checkpointables: name -> object with ``state_dict``/``load_state_dict``, e.g.
            ``optimizer=..., scheduler=..., grad_scaler=..., trainer=...``; ``None`` values are
            skipped.

    Raises:
        ValueError: a checkpointable named "model" or "rng", or without ``state_dict`` /
            ``load_state_dict``.
    """

    _RESERVED = ("model", "rng")

    def __init__(self, model: Optional[torch.nn.Module], save_dir: str = "", *,
                 save_to_disk: Optional[bool] = None, trust_checkpoints: bool = False,
                 **checkpointables: Any) -> None:
        self.trust_checkpoints = bool(trust_checkpoints)
        super().__init__(unwrap_model(model), save_dir,
                         save_to_disk=comm.is_main_process() if save_to_disk is None else bool(save_to_disk),
                         **checkpointables)
        self.path_manager = _AtomicPathManager()
        if self.save_dir and self.save_to_disk:  # a checkpoint write killed in a previous run
            remove_stale_temp_files(self.save_dir)

    def add_checkpointable(self, key: str, checkpointable: Any) -> None:
        """Register one more object to save/load under ``key`` (e.g. the trainer, created after
        the checkpointer). ``None`` is skipped; registering ``key`` again replaces the object
        (fvcore raises ``KeyError``)."""
        if key in self._RESERVED:
            raise ValueError(f"checkpointable name '{key}' is reserved")
        if checkpointable is None:
            return
        if not (callable(getattr(checkpointable, "state_dict", None))
                and callable(getattr(checkpointable, "load_state_dict", None))):
            raise ValueError(f"checkpointable '{key}' ({type(checkpointable).__name__}) lacks "
                             "state_dict/load_state_dict")
        self.checkpointables.pop(key, None)
        super().add_checkpointable(key, checkpointable)

    # ---- saving ----------------------------------------------------------------------------
    def save(self, name: str, **extra: Any) -> str:
        """Atomically write ``save_dir/<name>.pth`` (model, checkpointables, RNG, ``extra``) and
        point ``last_checkpoint`` at it (fvcore's ``save`` through :class:`_AtomicPathManager`).

        Args:
            name: file stem, e.g. ``"model_0000499"`` or ``"model_final"`` (a ``.pth`` suffix
                is accepted).
            **extra: stored as top-level keys (e.g. ``iteration=499``); returned by :meth:`load`.

        Returns:
            the path written, or ``""`` when this process does not save (non-main rank).

        Raises:
            ValueError: an ``extra`` key collides with "model", "rng" or a checkpointable.
            OSError / RuntimeError: from the file system or ``torch.save`` (the previous file
                with that name, if any, is left intact).
        """
        if not self.save_dir or not self.save_to_disk:
            return ""
        clash = [k for k in extra if k in self._RESERVED or k in self.checkpointables]
        if clash:
            raise ValueError(f"Checkpointer.save: extra keys {clash} collide with reserved/checkpointable names")
        stem = name[: -len(".pth")] if name.endswith(".pth") else name
        super().save(stem, rng=get_rng_state(), **extra)
        return os.path.join(self.save_dir, f"{stem}.pth")

    def has_checkpoint(self) -> bool:
        """True if ``save_dir`` is set and holds ``last_checkpoint``."""
        return bool(self.save_dir) and super().has_checkpoint()

    def get_checkpoint_file(self) -> str:
        """Path of the checkpoint named in ``last_checkpoint``.

        Raises:
            CheckpointError: ``last_checkpoint`` is unreadable or names a missing file (fvcore
                would return ``""`` or the missing path).
        """
        path = super().get_checkpoint_file()
        if not path or not os.path.isfile(path):
            tag = os.path.join(self.save_dir, "last_checkpoint")
            raise CheckpointError(f"{tag} is unreadable or names a missing checkpoint ({path or 'no name'})")
        return path

    # ---- loading ---------------------------------------------------------------------------
    def _load_file(self, f: str) -> Dict[str, Any]:
        """fvcore hook: read ``f`` with :func:`~mdkd_det.utils.checkpoint_io.load_checkpoint_file`
        (``weights_only`` unless trusted; never a bare ``torch.load``) and return the
        ``{"model": state_dict, ...}`` layout; a plain state dict comes back marked ``_PLAIN``."""
        ckpt = load_checkpoint_file(f, trust=self.trust_checkpoints)
        state, has_model_key = split_model_state(ckpt, f)
        return dict(ckpt) if has_model_key else {"model": state, _PLAIN: True}

    def load(self, path: str, checkpointables: Optional[Sequence[str]] = None, strict: bool = True,
             restore_rng: Optional[bool] = None) -> Dict[str, Any]:
        """Load ``path`` into the model and (some) checkpointables.

        Args:
            path: checkpoint file: ours (``{"model": ...}``), a dict with ``state_dict``, or a
                plain state dict (e.g. torchvision weights). ``""`` -> nothing loaded.
                A ``module.`` prefix on every key (a saved DDP model) is removed.
            checkpointables: names to restore; ``None`` -> all registered ones present in the
                file (a missing one is logged); ``[]`` -> model only.
            strict: require the checkpoint's model keys and shapes to equal the model's; checked
                before anything is loaded. ``False``: load the matching tensors, log the rest.
            restore_rng: restore the RNG snapshot; default: when ``checkpointables is None``
                (a full resume). Under DDP only rank 0 restores (the file holds rank 0's state).

        Returns:
            the remaining top-level entries (e.g. ``{"iteration": 499}``); ``{}`` for plain
            state dicts.

        Raises:
            CheckpointError: missing/unreadable file; keys or shapes that do not match the
                model (strict; the message names the file and lists missing, unexpected and
                mismatched keys); a requested checkpointable absent from the file or refusing
                its state.
        """
        if not path:
            return super().load(path)  # logs "No checkpoint found", returns {}
        checkpoint = self._load_file(path)
        plain = checkpoint.pop(_PLAIN, False)
        _strip_prefix_if_present(checkpoint["model"], "module.")  # as fvcore's _load_model does
        if strict:
            report = mismatch_report(self.model, checkpoint["model"])
            if report:
                raise CheckpointError(f"{path} does not match the model ({type(self.model).__name__}): {report}. "
                                      "Use strict=False to load only the matching tensors.")
        self._log_incompatible_keys(self._load_model(checkpoint))
        logger.info("Loaded model weights from %s", path)
        if plain:
            return {}
        self._load_checkpointables(checkpoint, checkpointables, path)
        rng = checkpoint.pop("rng", None)
        if restore_rng is None:
            restore_rng = checkpointables is None
        if restore_rng:
            if rng is None:
                logger.warning("%s: no RNG state in checkpoint; RNGs not restored", path)
            elif comm.get_world_size() == 1 or comm.is_main_process():
                set_rng_state(rng)
        for name in self.checkpointables:  # drop states we did not restore from the extra dict
            checkpoint.pop(name, None)
        return checkpoint

    def _load_checkpointables(self, checkpoint: Dict[str, Any], names: Optional[Sequence[str]], path: str) -> None:
        """Restore (and pop from ``checkpoint``) the states of ``names`` (``None``: all
        registered, a missing one is logged). Raises :class:`CheckpointError` (see :meth:`load`)."""
        for name in list(self.checkpointables) if names is None else list(names):
            if name not in self.checkpointables:
                raise CheckpointError(f"{path}: '{name}' is not a registered checkpointable "
                                      f"(registered: {sorted(self.checkpointables)})")
            if name not in checkpoint:
                if names is None:
                    logger.warning("%s: no '%s' state in checkpoint; left as is", path, name)
                    continue
                raise CheckpointError(f"{path}: no '{name}' state in checkpoint (keys: {sorted(checkpoint)})")
            try:
                self.checkpointables[name].load_state_dict(checkpoint.pop(name))
            except Exception as e:
                raise CheckpointError(f"{path}: cannot restore '{name}': {type(e).__name__}: {e}") from e
            logger.info("Restored '%s' from %s", name, path)


def export_model(model: torch.nn.Module, path: str, drop_prefixes: Sequence[str] = ()) -> str:
    """Atomically write ``{"model": state_dict}`` of ``model`` (DDP unwrapped), without keys
    starting with any of ``drop_prefixes`` (e.g. ``("teacher.", "connectors.")`` to export a
    distilled student).

    Returns:
        ``path``.

    Raises:
        CheckpointError: nothing is left after dropping.
    """
    state = unwrap_model(model).state_dict()
    prefixes = tuple(drop_prefixes)
    kept = {k: v for k, v in state.items() if not (prefixes and k.startswith(prefixes))}
    if not kept:
        raise CheckpointError(f"export_model({path}): drop_prefixes {prefixes} remove every key of the model")
    for p in prefixes:
        if not any(k.startswith(p) for k in state):
            logger.warning("export_model: prefix '%s' matches no key", p)
    atomic_torch_save({"model": kept}, path)
    logger.info("Exported %d tensors (%d dropped) to %s", len(kept), len(state) - len(kept), path)
    return path
