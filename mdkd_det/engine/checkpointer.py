"""Checkpoints: atomic save, strict load, resume with RNG state (detectron2/fvcore
``Checkpointer`` role, written on ``torch.save`` / ``torch.load``).

Checkpoint layout (one ``.pth`` file, ``torch.save`` of a dict)::

    {"model": state_dict,                       # DDP wrapper removed
     "<name>": obj.state_dict(), ...            # each checkpointable: optimizer, scheduler, ...
     "rng": {"python", "numpy", "torch"[, "cuda"]},
     "<extra>": ...}                            # save(name, iteration=..., ...) keywords

``OUTPUT_DIR/last_checkpoint`` holds the file name of the newest checkpoint (detectron2's
convention). Every file is written atomically: a temporary file in the same directory,
``fsync``, then ``os.replace``, so a crash mid-write leaves the previous file intact; the
temporary file such a crash leaves behind is removed when the next :class:`Checkpointer` for that
directory is created (:func:`remove_stale_temp_files`).
"""

from __future__ import annotations

import logging
import os
import random
import re
import uuid
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..utils.checkpoint_io import load_checkpoint_file
from ..utils.errors import CheckpointError
from ..utils import comm

__all__ = [
    "Checkpointer",
    "export_model",
    "atomic_write_text",
    "atomic_torch_save",
    "remove_stale_temp_files",
    "get_rng_state",
    "set_rng_state",
    "unwrap_model",
]

logger = logging.getLogger(__name__)

_LIST_LIMIT = 20


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Return ``model.module`` for ``DistributedDataParallel`` / ``DataParallel``, else ``model``."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write_fn: Callable[[Any], None], binary: bool = True) -> None:
    """Write ``path`` via ``write_fn(file)`` on a temp file in the same dir + fsync + replace."""
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb" if binary else "x") as f:  # honours the umask, unlike mkstemp
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)


_TMP_RE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def remove_stale_temp_files(directory: str) -> List[str]:
    """Delete the temp files (``.<name>.<pid>.<hex>.tmp``) that :func:`_atomic_write` left in
    ``directory`` when its process was killed mid-write; files of a running process (this one
    included) are kept. Returns the removed paths."""
    removed: List[str] = []
    if not directory or not os.path.isdir(directory):
        return removed
    for e in os.scandir(directory):
        m = _TMP_RE.match(e.name)
        if not (m and e.is_file()):
            continue
        if _pid_alive(int(m.group(1))):
            continue
        try:
            os.remove(e.path)
            removed.append(e.path)
        except OSError:
            pass
    if removed:
        logger.info("Removed %d temp file(s) of an interrupted write in %s", len(removed), directory)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temp file in the same dir, fsync, os.replace)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same dir, fsync, os.replace)."""
    _atomic_write(path, lambda f: f.write(text), binary=False)


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


# ---- state-dict matching ----------------------------------------------------------------------
def _fmt_list(items: Sequence[str]) -> str:
    items = list(items)
    more = f", ... (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else ""
    return ", ".join(items[:_LIST_LIMIT]) + more


def _extract_model_state(ckpt: Any, path: str) -> Tuple[Mapping[str, torch.Tensor], bool]:
    """Return (model state dict, is_our_format)."""
    if isinstance(ckpt, Mapping):
        if isinstance(ckpt.get("model"), Mapping):
            return ckpt["model"], True
        if isinstance(ckpt.get("state_dict"), Mapping):
            return ckpt["state_dict"], False
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return ckpt, False
        keys = list(ckpt)[:10]
        raise CheckpointError(
            f"{path}: not a model checkpoint: expected a state dict or a dict with a 'model' "
            f"state dict, got top-level keys {keys}"
        )
    raise CheckpointError(f"{path}: not a model checkpoint: top-level object is {type(ckpt).__name__}")


def _strip_prefix_if_all(state: Mapping[str, torch.Tensor], model_keys: Iterable[str],
                         prefix: str = "module.") -> Mapping[str, torch.Tensor]:
    model_keys = list(model_keys)
    if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in model_keys):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


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


class Checkpointer:
    """Save/load a model plus any objects with ``state_dict()``/``load_state_dict()``.

    Args:
        model: the model (a DDP/DataParallel wrapper is unwrapped for saving and loading).
        save_dir: directory for checkpoints and ``last_checkpoint`` (usually ``OUTPUT_DIR``).
        save_to_disk: write files; default: only on the main process (rank 0).
        trust_checkpoints: load with ``torch.load(weights_only=False)`` (arbitrary pickles;
            ``MODEL.TRUST_CHECKPOINTS``). Default False: ``weights_only=True`` through
            :func:`mdkd_det.utils.checkpoint_io.load_checkpoint_file`, which reads our
            checkpoints and plain state dicts (torchvision) but refuses arbitrary objects.
        **checkpointables: name -> object with ``state_dict``/``load_state_dict``, e.g.
            ``optimizer=..., scheduler=..., grad_scaler=..., trainer=...``.

    Raises:
        ValueError: a checkpointable named "model" or "rng", or without ``state_dict``.
    """

    _RESERVED = ("model", "rng")

    def __init__(self, model: torch.nn.Module, save_dir: str = "", *, save_to_disk: Optional[bool] = None,
                 trust_checkpoints: bool = False, **checkpointables: Any) -> None:
        self.model = model
        self.save_dir = save_dir
        self.save_to_disk = comm.is_main_process() if save_to_disk is None else bool(save_to_disk)
        self.trust_checkpoints = bool(trust_checkpoints)
        self.checkpointables: Dict[str, Any] = {}
        for k, v in checkpointables.items():
            self.add_checkpointable(k, v)
        if self.save_dir and self.save_to_disk:  # a checkpoint write killed in a previous run
            remove_stale_temp_files(self.save_dir)

    def add_checkpointable(self, name: str, obj: Any) -> None:
        """Register one more object to save/load under ``name`` (e.g. the trainer, created
        after the checkpointer)."""
        if name in self._RESERVED:
            raise ValueError(f"checkpointable name '{name}' is reserved")
        if obj is None:
            return
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise ValueError(f"checkpointable '{name}' ({type(obj).__name__}) lacks state_dict/load_state_dict")
        self.checkpointables[name] = obj

    # ---- saving ----------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        fname = name if name.endswith(".pth") else f"{name}.pth"
        return os.path.join(self.save_dir, fname)

    def save(self, name: str, **extra: Any) -> str:
        """Atomically write ``save_dir/<name>.pth`` (model, checkpointables, RNG, ``extra``)
        and point ``last_checkpoint`` at it.

        Args:
            name: file stem, e.g. ``"model_0000499"`` or ``"model_final"``.
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
        data: Dict[str, Any] = {"model": unwrap_model(self.model).state_dict()}
        for k, obj in self.checkpointables.items():
            data[k] = obj.state_dict()
        data["rng"] = get_rng_state()
        data.update(extra)
        path = self._path(name)
        atomic_torch_save(data, path)
        self.tag_last_checkpoint(os.path.basename(path))
        logger.info("Saved checkpoint %s", path)
        return path

    def tag_last_checkpoint(self, filename: str) -> None:
        """Atomically write ``filename`` (relative to ``save_dir``) into ``save_dir/last_checkpoint``."""
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), filename)

    def has_checkpoint(self) -> bool:
        """True if ``save_dir/last_checkpoint`` exists."""
        return bool(self.save_dir) and os.path.isfile(os.path.join(self.save_dir, "last_checkpoint"))

    def get_checkpoint_file(self) -> str:
        """Path of the checkpoint named in ``last_checkpoint``.

        Raises:
            CheckpointError: ``last_checkpoint`` is unreadable or names a missing file.
        """
        tag = os.path.join(self.save_dir, "last_checkpoint")
        try:
            with open(tag) as f:
                name = f.read().strip()
        except OSError as e:
            raise CheckpointError(f"{tag}: cannot read ({e})") from e
        path = name if os.path.isabs(name) else os.path.join(self.save_dir, name)
        if not name or not os.path.isfile(path):
            raise CheckpointError(f"{tag} names '{name}', but {path} does not exist")
        return path

    # ---- loading ---------------------------------------------------------------------------
    def _read(self, path: str) -> Any:
        return load_checkpoint_file(path, trust=self.trust_checkpoints)

    def _load_model(self, state: Mapping[str, torch.Tensor], path: str, strict: bool) -> None:
        model = unwrap_model(self.model)
        model_state = model.state_dict()
        state = _strip_prefix_if_all(state, model_state.keys())
        missing, unexpected, mismatched = match_state_dict(model_state, state)
        if strict and (missing or unexpected or mismatched):
            parts = []
            if missing:
                parts.append(f"missing keys ({len(missing)}): {_fmt_list(missing)}")
            if unexpected:
                parts.append(f"unexpected keys ({len(unexpected)}): {_fmt_list(unexpected)}")
            if mismatched:
                parts.append(f"shape mismatches ({len(mismatched)}): {_fmt_list(mismatched)}")
            raise CheckpointError(
                f"{path} does not match the model ({type(model).__name__}): " + "; ".join(parts)
                + ". Use strict=False to load only the matching tensors."
            )
        bad = {m.split(":", 1)[0] for m in mismatched}
        filtered = {k: v for k, v in state.items() if k in model_state and k not in bad}
        model.load_state_dict(filtered, strict=False)
        if missing:
            logger.warning("%s: %d model keys not in checkpoint (left as is): %s", path, len(missing), _fmt_list(missing))
        if unexpected:
            logger.warning("%s: %d checkpoint keys not in model (ignored): %s", path, len(unexpected), _fmt_list(unexpected))
        if mismatched:
            logger.warning("%s: %d shape mismatches (skipped): %s", path, len(mismatched), _fmt_list(mismatched))

    def load(self, path: str, checkpointables: Optional[Sequence[str]] = None, strict: bool = True,
             restore_rng: Optional[bool] = None) -> Dict[str, Any]:
        """Load ``path`` into the model and (some) checkpointables.

        Args:
            path: checkpoint file: ours (``{"model": ...}``), a dict with ``state_dict``, or a
                plain state dict (e.g. torchvision weights). ``""`` -> nothing loaded.
                A ``module.`` prefix on every key (a saved DDP model) is removed.
            checkpointables: names to restore; ``None`` -> all registered ones present in the
                file (a missing one is logged); ``[]`` -> model only.
            strict: require the checkpoint's model keys and shapes to equal the model's.
                ``False``: load the matching tensors, log the rest.
            restore_rng: restore the RNG snapshot; default: when ``checkpointables is None``
                (a full resume). Under DDP only rank 0 restores (the file holds rank 0's state).

        Returns:
            the remaining top-level entries (e.g. ``{"iteration": 499}``); ``{}`` for plain
            state dicts.

        Raises:
            CheckpointError: missing/unreadable file; keys or shapes that do not match the
                model (strict; message names the file and lists missing, unexpected and
                mismatched keys); a requested checkpointable absent from the file or refusing
                its state.
        """
        if not path:
            logger.info("No checkpoint given; model is left as initialised")
            return {}
        ckpt = self._read(path)
        model_state, ours = _extract_model_state(ckpt, path)
        self._load_model(model_state, path, strict)
        logger.info("Loaded model weights from %s", path)
        if not ours:
            return {}
        ckpt = dict(ckpt)
        ckpt.pop("model")
        names = list(self.checkpointables) if checkpointables is None else list(checkpointables)
        for name in names:
            if name not in self.checkpointables:
                raise CheckpointError(f"{path}: '{name}' is not a registered checkpointable "
                                      f"(registered: {sorted(self.checkpointables)})")
            if name not in ckpt:
                if checkpointables is None:
                    logger.warning("%s: no '%s' state in checkpoint; left as is", path, name)
                    continue
                raise CheckpointError(f"{path}: no '{name}' state in checkpoint (keys: {sorted(ckpt)})")
            try:
                self.checkpointables[name].load_state_dict(ckpt.pop(name))
            except Exception as e:
                raise CheckpointError(f"{path}: cannot restore '{name}': {type(e).__name__}: {e}") from e
            logger.info("Restored '%s' from %s", name, path)
        rng = ckpt.pop("rng", None)
        if restore_rng is None:
            restore_rng = checkpointables is None
        if restore_rng:
            if rng is None:
                logger.warning("%s: no RNG state in checkpoint; RNGs not restored", path)
            elif comm.get_world_size() == 1 or comm.is_main_process():
                set_rng_state(rng)
        for name in self.checkpointables:  # drop states we did not restore from the extra dict
            ckpt.pop(name, None)
        return ckpt

    def resume_or_load(self, path: str, resume: bool = True) -> Dict[str, Any]:
        """With ``resume`` and a ``last_checkpoint`` in ``save_dir``: full restore from it
        (model, all checkpointables, RNG). Otherwise load only the model weights from ``path``
        (``""`` -> nothing).

        Returns:
            the extra dict of :meth:`load`; on resume ``extra["iteration"]`` is the last
            finished iteration, so training continues at ``extra["iteration"] + 1``.

        Raises:
            CheckpointError: see :meth:`load` and :meth:`get_checkpoint_file`.
        """
        if resume and self.has_checkpoint():
            return self.load(self.get_checkpoint_file())
        if resume:
            logger.info("No last_checkpoint in '%s'; starting from %s", self.save_dir, path or "scratch")
        return self.load(path, checkpointables=[])


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
