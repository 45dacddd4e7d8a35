"""The one place where the package reads a checkpoint file (issue 13: no code execution) and
writes a file atomically (:func:`atomic_open`: checkpoints, ``last_checkpoint``, results).

Every ``.pth`` the package opens (``MODEL.WEIGHTS``, ``--resume``, ``KD.TEACHER_WEIGHTS``,
``FUSION.TEACHERS``, ``MODEL.RFDETR.PRETRAIN_WEIGHTS / BACKBONE_INIT``, ``MODEL.HEAD_INIT``, detectron2
teachers) goes through :func:`load_checkpoint_file`, which calls
``torch.load(weights_only=True)``: tensors, containers and numbers load, an arbitrary pickled
object (a ``__reduce__`` payload that would run ``os.system``) is refused before it runs.

The only way round it is an explicit opt-in: ``MODEL.TRUST_CHECKPOINTS True`` in the config or
``--trust-checkpoints`` on the command line (both documented in the README), which passes
``trust=True`` here and loads with ``weights_only=False``.

rfdetr's official checkpoints (``{"model", "args": argparse.Namespace, "epoch", ...}``) load without the
opt-in: the few harmless classes they pickle are allow-listed with
``torch.serialization.safe_globals`` (:data:`SAFE_GLOBALS`), so their loading runs no code either.

Writes: :func:`atomic_open` (temp file in the same directory, ``fsync``, ``os.replace``) under
:func:`atomic_torch_save`, :func:`atomic_write_text` and the Checkpointer's fvcore ``save``; a file
is there whole or not at all. :func:`remove_stale_temp_files` deletes the temp files of a killed
writer.

Source: PyTorch ``torch.load`` / ``torch.serialization.safe_globals`` (PyTorch >= 2.4);
``os.replace`` (POSIX ``rename(2)``, atomic within one file system).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import re
import types
import uuid
from typing import IO, Any, Iterator, List, Mapping, Tuple

import torch

from .errors import CheckpointError

__all__ = ["load_checkpoint_file", "load_model_state", "split_model_state", "SAFE_GLOBALS", "TRUST_HINT",
           "atomic_open", "atomic_torch_save", "atomic_write_text", "remove_stale_temp_files"]

logger = logging.getLogger(__name__)

#: Classes that rfdetr's official checkpoints pickle besides tensors (``args`` is an
#: ``argparse.Namespace`` or ``types.SimpleNamespace`` of plain values; the same list as rfdetr's
#: own ``rfdetr.utilities.io._safe_torch_load``). Constructing them runs no user code.
SAFE_GLOBALS = [argparse.Namespace, types.SimpleNamespace]

#: How a user opts in to loading a pickle they trust (named in every refusal).
TRUST_HINT = ("if you trust this file, set MODEL.TRUST_CHECKPOINTS True "
              "(or pass --trust-checkpoints to tools/train_net.py)")

# torch 2.4-2.5: "Unsupported global: GLOBAL x.y"; torch >= 2.6: "unsupported GLOBAL x.y whose ..."
_GLOBAL_RE = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)")


def load_checkpoint_file(path: str, *, trust: bool = False, what: str = "checkpoint") -> Any:
    """Read a ``torch.save`` file onto the CPU without running code from it.

    Args:
        path: the file (``.pth``/``.pt``; zip or legacy pickle format).
        trust: ``True`` loads with ``weights_only=False`` (arbitrary pickled objects; only for
            files the user trusts, via ``MODEL.TRUST_CHECKPOINTS`` / ``--trust-checkpoints``).
        what: what the file is for, named in errors (e.g. ``"MODEL.WEIGHTS"``,
            ``"FUSION.TEACHERS[1]"``).

    Returns:
        the unpickled object (tensors on the CPU).

    Raises:
        CheckpointError: missing file; a file that pickles a Python object other than tensors,
            containers, numbers and :data:`SAFE_GLOBALS` (the message names the object, e.g.
            ``posix.system``, and how to opt in); an unreadable or truncated file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} file not found: {path}")
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = _GLOBAL_RE.search(str(e))
        if m:
            raise CheckpointError(
                f"{path} ({what}): refused: it pickles the Python object '{m.group(1)}', which "
                f"could run code when loaded; {TRUST_HINT}") from e
        raise CheckpointError(f"{path} ({what}): unreadable checkpoint ({_reason(e)})") from e
    except Exception as e:  # truncated / corrupt zip, not a torch.save file
        raise CheckpointError(f"{path} ({what}): unreadable checkpoint ({_reason(e)})") from e


def _reason(e: BaseException) -> str:
    """The informative line of a torch.load error (its WeightsUnpickler line, if any)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    picked = next((ln for ln in lines if ln.startswith(("Unsupported", "WeightsUnpickler"))), None)
    text = picked or (lines[0] if lines else "")
    return f"{type(e).__name__}: {text[:200]}" if text else f"{type(e).__name__}, e.g. an empty or truncated file"


def split_model_state(ckpt: Any, path: str, what: str = "checkpoint") -> Tuple[dict, bool]:
    """The model state dict inside a loaded checkpoint object.

    Accepts our Checkpointer's ``{"model": state_dict, ...}`` (detectron2/fvcore layout),
    Lightning-style ``{"state_dict": ...}`` and a bare state dict (name -> tensor).

    Args:
        ckpt: what :func:`load_checkpoint_file` returned.
        path, what: named in the error.

    Returns:
        ``(state_dict, has_model_key)``; ``has_model_key`` is True for the ``{"model": ...}``
        layout, whose other top-level entries (optimizer, RNG, ``iteration``...) a resume reads.

    Raises:
        CheckpointError: none of the three layouts (the message names the top-level keys).
    """
    if isinstance(ckpt, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(ckpt.get(key), Mapping):
                return ckpt[key], key == "model"
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return ckpt, False
        top = f"top-level keys {list(ckpt)[:10]}"
    else:
        top = f"top-level object {type(ckpt).__name__}"
    raise CheckpointError(f"{path}: not a model checkpoint ({what}): expected a state dict or a dict with a "
                          f"'model' or 'state_dict' state dict, got {top}")


def load_model_state(path: str, trust: bool = False, what: str = "checkpoint") -> dict:
    """The model state dict of a checkpoint file (:func:`load_checkpoint_file`, then
    :func:`split_model_state`).

    Raises:
        CheckpointError: missing, unreadable or refused file, or no state dict inside.
    """
    return split_model_state(load_checkpoint_file(path, trust=trust, what=what), path, what)[0]


# ---- atomic writes ------------------------------------------------------------------------
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


@contextlib.contextmanager
def atomic_open(path: str, binary: bool = True, durable: bool = True) -> Iterator[IO]:
    """Open ``path`` for writing so that it appears whole or not at all.

    Writes go to a temp file ``.<name>.<pid>.<hex>.tmp`` in the same directory (created if
    missing); on a clean exit of the ``with`` block it is flushed, ``fsync``-ed and moved over
    ``path`` with ``os.replace`` (atomic on POSIX), then the directory is ``fsync``-ed. If the block
    raises, the temp file is deleted and ``path`` keeps its previous content. ``durable=False``
    skips both ``fsync`` calls (still atomic; for caches, whose loss after a power cut costs a
    recomputation only).

    Yields:
        the open temp file (``binary``: bytes, else text).
    """
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb" if binary else "x") as f:  # honours the umask, unlike mkstemp
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        _fsync_dir(d)


_TMP_RE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def remove_stale_temp_files(directory: str) -> List[str]:
    """Delete the temp files (``.<name>.<pid>.<hex>.tmp``) that :func:`atomic_open` left in
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


def atomic_torch_save(obj: Any, path: str, durable: bool = True) -> None:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path, durable=durable) as f:
        torch.save(obj, f)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path, binary=False) as f:
        f.write(text)
