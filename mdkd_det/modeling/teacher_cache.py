"""A disk cache of a frozen teacher's feature maps (``FROZEN_TEACHER.CACHE_DIR``; issue 11).

A frozen teacher is a pure function of its input image: its weights never change and it runs in
``eval()`` (:func:`~mdkd_det.modeling.frozen_teacher.freeze_teacher`). Training sees each image
many times (epochs, seeds, the pipeline's extra student rows, the unlabelled stream), and with
the default augmentation (horizontal flip only) an image has only two transformed versions. So
the teacher's maps of each transformed image can be computed once and read back from disk: a
step whose images are all cached costs a plain step plus the KD terms (the "KD floor"). The hit
rate is the share of (image, flip) pairs seen before: about 1 - 0.5^(e - 1) in epoch e of one
run, and more for every further run on the same teacher (seeds, extra student rows).

Exactness (decision D11.2). An entry holds exactly the maps the run used: the images of a
batch that are not cached are run together (one batched forward, as without the cache) and
each image's maps are stored. So ``--resume`` is bitwise exact: steps redone after the last
checkpoint read the maps their first execution computed. oneDNN convolutions are not bitwise
batch-invariant (max abs 5e-6 on a 3-teacher joint teacher at 256 px), so a run that reads maps
another run computed (in other batches) can differ from a run with a cold cache by that
rounding. Computing each image alone would make every map independent of the batch, but
cost 21 % more teacher time on a miss (0.63 s against 0.52 s for 4 images, FROZEN_TEACHER
switches on; docs/benchmarks.md).

Keys. A teacher's *digest* (blake2b of its weights, dtypes and shapes, the runtime switches that
change its values, the torch version and the CPU capability oneDNN dispatches on) names a
folder; an image's key is the blake2b of that digest and the exact bytes, shape and dtype of the
image tensor the backbone receives (after normalisation and padding). Retraining a teacher,
changing ``FROZEN_TEACHER.FOLD_BN``/``BF16`` or the input size gives new keys; identical
teachers share entries. Entries are written atomically (no ``fsync``: a lost entry is recomputed)
and read with ``torch.load(weights_only=True)``; an unreadable entry is recomputed and replaced.

Size. Every map of every level is stored in the teacher's dtype (fp32: 5.6 MB per 256 px image for
an FPN with 256 channels). Writing stops, with one warning, when the cache folder holds
``FROZEN_TEACHER.CACHE_MAX_GB`` or the disk has less than 1 GB free; reads go on.

Where it applies: the Stage-2 :class:`~mdkd_det.modeling.fusion.FusionBackbone` (each frozen
teacher) and the Stage-3 KD teacher's ``backbone`` for the adapters that run the teacher
backbone on the student's batch (torchvision Faster R-CNN, detectron2, segmentation,
classification). RF-DETR's adapter runs the whole teacher (backbone inside its decoder), so its
Stage-3 teacher is not cached. Photometric views (DCGD) are never cached (:func:`uncached`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import weakref
from collections import OrderedDict
from typing import Dict, Optional

import torch
from torch import nn

from ..utils.checkpoint_io import atomic_torch_save

logger = logging.getLogger(__name__)

#: bytes in use per cache root, scanned once per process, then counted
_ROOT_BYTES: Dict[str, int] = {}
#: every live cached backbone, for :func:`cache_stats`
_LIVE: "weakref.WeakSet[CachedBackbone]" = weakref.WeakSet()
_MIN_FREE_BYTES = 1 << 30


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _scan(root: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


class FeatureCache:
    """One teacher's entries under ``root/<digest>/`` (module docstring).

    Args:
        root: the cache folder (``FROZEN_TEACHER.CACHE_DIR``), shared by every teacher.
        digest: the teacher's digest (:meth:`CachedBackbone.digest`).
        max_bytes: stop writing when ``root`` holds this many bytes (all teachers together).

    Raises:
        OSError: ``root/<digest>`` cannot be created.
    """

    def __init__(self, root: str, digest: str, max_bytes: int) -> None:
        self.root = os.path.abspath(root)
        self.dir = os.path.join(self.root, digest)
        self.max_bytes = int(max_bytes)
        self._full = False
        self._puts = 0
        os.makedirs(self.dir, exist_ok=True)
        if self.root not in _ROOT_BYTES:
            _ROOT_BYTES[self.root] = _scan(self.root)

    def path(self, key: str) -> str:
        """File of entry ``key`` (hex digest)."""
        return os.path.join(self.dir, key[:2], key + ".pt")

    def get(self, key: str) -> Optional["OrderedDict[str, torch.Tensor]"]:
        """The stored maps of ``key``, or None (absent or unreadable: logged, then recomputed)."""
        path = self.path(key)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception as e:  # a damaged entry costs one recomputation, never the run
            logger.warning("teacher cache: unreadable entry %s (%s: %s); recomputing it",
                           path, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return None

    def put(self, key: str, maps: "OrderedDict[str, torch.Tensor]") -> bool:
        """Store ``maps`` under ``key`` unless the size limit or the disk is reached; True if
        written."""
        if self._full:
            return False
        size = sum(v.numel() * v.element_size() for v in maps.values())
        self._puts += 1
        if _ROOT_BYTES[self.root] + size > self.max_bytes or (
                self._puts % 64 == 1 and shutil.disk_usage(self.dir).free < _MIN_FREE_BYTES):
            self._full = True
            logger.warning("teacher cache %s: full (FROZEN_TEACHER.CACHE_MAX_GB = %.1f, or under 1 GB "
                           "free on the disk); new maps are no longer stored", self.root, self.max_bytes / 1e9)
            return False
        atomic_torch_save(maps, self.path(key), durable=False)
        _ROOT_BYTES[self.root] += size
        return True


class CachedBackbone(nn.Module):
    """A frozen backbone whose per-image maps are read from a :class:`FeatureCache` when present
    (module docstring; D11.2).

    Args:
        backbone: the frozen (and prepared) backbone; ``backbone(x)`` ->
            ``OrderedDict[name, Tensor[B, C, H/s, W/s]]``.
        root: cache folder.
        max_bytes: size limit of the folder (bytes).
        tag: extra text of the digest (the runtime switches that change the maps' values).

    Forward: ``x: Tensor[B, C, H, W]`` (the backbone's input, any memory format) -> the
    backbone's maps ``OrderedDict[name, Tensor[B, C_l, H/s, W/s]]`` (contiguous): cached images
    are read, the others run as one batch and stored. Attributes the wrapper does not have
    (``output_shape``, ``out_channels``, ...) are the backbone's.
    """

    def __init__(self, backbone: nn.Module, root: str, max_bytes: int, tag: str = "") -> None:
        super().__init__()
        self.inner = backbone
        self.root, self.max_bytes, self.tag = root, int(max_bytes), tag
        self._cache: Optional[FeatureCache] = None
        self.hits = self.misses = 0
        _LIVE.add(self)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "inner" not in modules:
                raise
            return getattr(modules["inner"], name)

    def digest(self) -> str:
        """blake2b (32 hex) of the backbone's weights and everything else its maps depend on."""
        h = hashlib.blake2b(digest_size=16)
        cpu = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
        h.update(f"{type(self.inner).__qualname__}|{self.tag}|{torch.__version__}|{cpu}".encode())
        for k, v in self.inner.state_dict().items():
            h.update(f"|{k}|{v.dtype}|{tuple(v.shape)}|".encode())
            h.update(_tensor_bytes(v))
        return h.hexdigest()

    @property
    def cache(self) -> FeatureCache:
        """The :class:`FeatureCache` of this backbone (digest taken at first use, when the
        weights are final)."""
        if self._cache is None:
            self._cache = FeatureCache(self.root, self.digest(), self.max_bytes)
        return self._cache

    def image_key(self, xi: torch.Tensor) -> str:
        """Key of one image ``xi: Tensor[1, C, H, W]``."""
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{self.cache.dir}|{tuple(xi.shape)}|{xi.dtype}|".encode())
        h.update(_tensor_bytes(xi))
        return h.hexdigest()

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        keys = [self.image_key(x[i:i + 1]) for i in range(x.shape[0])]
        found = [self.cache.get(k) for k in keys]
        miss = [i for i, m in enumerate(found) if m is None]
        self.hits += len(keys) - len(miss)
        self.misses += len(miss)
        if miss:
            idx = torch.tensor(miss, device=x.device)
            computed = self.inner(x if len(miss) == len(keys) else x.index_select(0, idx))
            for j, i in enumerate(miss):  # one file per image: clone the slice out of the batch
                found[i] = OrderedDict((k, v[j:j + 1].contiguous().clone()) for k, v in computed.items())
                self.cache.put(keys[i], found[i])
        return OrderedDict((k, torch.cat([m[k] for m in found])) for k in found[0])


def uncached(backbone: nn.Module) -> nn.Module:
    """The backbone under a :class:`CachedBackbone` (``backbone`` itself otherwise): for inputs
    seen once, e.g. random photometric views."""
    return backbone.inner if isinstance(backbone, CachedBackbone) else backbone


def cache_stats() -> Dict[str, int]:
    """``{"hits", "misses"}`` summed over the live cached backbones of this process."""
    live = list(_LIVE)
    return {"hits": sum(b.hits for b in live), "misses": sum(b.misses for b in live)}


def log_cache_stats() -> None:
    """Log the hit rate of this process's teacher caches (nothing when none is in use)."""
    s = cache_stats()
    n = s["hits"] + s["misses"]
    if n:
        logger.info("frozen-teacher cache: %d of %d image lookups were hits (%.0f %%)",
                    s["hits"], n, 100.0 * s["hits"] / n)
