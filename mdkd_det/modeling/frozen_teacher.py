"""How a teacher is frozen, prepared and run: THE one mechanism for the Stage-3 KD teacher (every
family: torchvision, RF-DETR, detectron2, seg, cls) and the frozen teachers inside the Stage-2
:class:`~mdkd_det.modeling.fusion.FusionBackbone` (docs/benchmarks.md; issues 11 and 14).

Freezing (:func:`freeze_teacher`): ``requires_grad=False``, ``eval()`` (BatchNorm statistics and
dropout fixed), and the module made a :class:`KeepsTeachersFrozen`, whose ``train(mode)`` keeps
a frozen module in ``eval()``, so neither a parent's ``train()`` nor a direct call flips it back.

A frozen teacher is only ever evaluated, so it may be rewritten for speed as long as its
outputs do not change:

- ``fold_bn``: every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` (found by
  ``torch.fx`` tracing, subtree by subtree) is folded into the conv with
  ``torch.nn.utils.fusion.fuse_conv_bn_eval`` and replaced by ``Identity``. Equal to fp32
  rounding (measured max relative error 1e-6 on a ResNet-18-FPN).
- ``channels_last``: weights and the input in NHWC (oneDNN's native conv layout). Equal to fp32
  rounding (3e-6).
- ``inference_mode``: ``torch.inference_mode()`` instead of ``torch.no_grad()``. Bitwise equal.
  Inference tensors cannot be saved for backward, so :meth:`TeacherRuntime.release` clones what
  leaves the teacher (KD losses and fusion ops save their inputs).
- ``bf16``: ``torch.autocast("cpu", torch.bfloat16)`` around the teacher forward; outputs are
  cast back to fp32 by :meth:`TeacherRuntime.release`. NOT exact: ~1 % max relative error of
  the maps (bf16 has an 8-bit mantissa); off by default, and only used on a CPU with native
  bf16 (AVX512-BF16/AMX, D11.1).

- ``cache_dir``: the teacher's per-image maps are stored on disk and read back when the same
  transformed image comes again (:mod:`mdkd_det.modeling.teacher_cache`; D11.2). An entry holds
  the maps the run used (``--resume`` stays bitwise exact); maps another run computed in other
  batches differ by fp32 rounding (5e-6).

Config: ``FROZEN_TEACHER.{FOLD_BN, CHANNELS_LAST, INFERENCE_MODE, BF16, CACHE_DIR, CACHE_MAX_GB}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Tuple, Type

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..utils.device import cpu_has_native_bf16
from ..utils.errors import ConfigError

logger = logging.getLogger(__name__)


class KeepsTeachersFrozen:
    """``nn.Module`` mixin: ``train(mode)`` sets ``mode`` on the module tree as usual, except
    that a module frozen by :func:`freeze_teacher` (this one, or any submodule) stays in
    ``eval()`` (paper_notes A20: frozen teachers never update BatchNorm statistics).

    :func:`freeze_teacher` gives a frozen module this mixin, so every frozen module, and every
    module holding one, follows the rule; a class may also inherit it directly.
    """

    def train(self, mode: bool = True):
        """``nn.Module.train(mode)`` (``mode=False`` when this module is frozen); frozen
        submodules are then put back in ``eval()``. Returns self."""
        super().train(bool(mode) and not is_frozen(self))  # type: ignore[misc]
        for m in self.modules():  # type: ignore[attr-defined]
            if m is not self and m.training and is_frozen(m):
                m.train(False)
        return self


#: attribute :func:`freeze_teacher` sets on a frozen module.
FROZEN_ATTR = "_mdkd_frozen_teacher"
_FROZEN_CLASSES: Dict[type, type] = {}


def is_frozen(module: nn.Module) -> bool:
    """True if :func:`freeze_teacher` froze ``module``."""
    return bool(getattr(module, FROZEN_ATTR, False))


def _frozen_class(cls: Type[nn.Module]) -> type:
    """``cls`` with the :class:`KeepsTeachersFrozen` mixin first (one class per ``cls``, cached;
    same name, module and qualname as ``cls``)."""
    if issubclass(cls, KeepsTeachersFrozen):
        return cls
    if cls not in _FROZEN_CLASSES:
        _FROZEN_CLASSES[cls] = type(cls.__name__, (KeepsTeachersFrozen, cls),
                                    {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _FROZEN_CLASSES[cls]


def freeze_teacher(module: nn.Module) -> nn.Module:
    """Freeze a teacher (or a container of teachers) for inference-only use, in place: THE one
    way teachers are frozen (KD teacher of every family, ``FusionBackbone`` teachers).

    ``requires_grad_(False)`` on every parameter, ``eval()`` on the whole tree, and the module
    made a :class:`KeepsTeachersFrozen` (its class swapped for a cached subclass with the mixin,
    as detectron2's ``maybe_add_gradient_clipping`` does for optimizers), so a later
    ``train()``, direct or from a parent, leaves it in ``eval()``. Weights, ``state_dict`` keys
    and outputs are unchanged. Idempotent.

    Returns:
        ``module``.
    """
    module.requires_grad_(False)
    setattr(module, FROZEN_ATTR, True)
    module.__class__ = _frozen_class(type(module))
    module.train(False)
    return module


def conv_bn_pairs(module: nn.Module, prefix: str = "") -> List[Tuple[str, str]]:
    """``(conv path, bn path)`` of every ``Conv2d -> BatchNorm2d`` whose conv output feeds only
    the BN, found by ``torch.fx.symbolic_trace``; a subtree that does not trace (data-dependent
    control flow, e.g. a whole torchvision detector) is searched child by child.

    Args:
        module: any ``nn.Module``.
        prefix: dotted path of ``module`` inside the root (for recursion).

    Returns:
        Dotted paths relative to the root, in graph order.
    """
    if not any(isinstance(m, nn.BatchNorm2d) for m in module.modules()):
        return []
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception:  # noqa: BLE001 - untraceable subtree: search its children
        return [p for name, child in module.named_children()
                for p in conv_bn_pairs(child, f"{prefix}{name}.")]
    mods = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and isinstance(mods.get(src.target), nn.Conv2d) and len(src.users) == 1):
            pairs.append((prefix + src.target, prefix + node.target))
    return pairs


def fold_batchnorm(module: nn.Module) -> int:
    """Fold each eval-mode BatchNorm of :func:`conv_bn_pairs` into its conv, in place
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``; the BN becomes ``Identity``).

    A conv or BN reached through two paths, or a BN in training mode, is left alone.

    Returns:
        The number of folded pairs.
    """
    n = 0
    for conv_path, bn_path in conv_bn_pairs(module):
        conv, bn = module.get_submodule(conv_path), module.get_submodule(bn_path)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d) or bn.training \
                or bn.running_mean is None:
            continue
        module.set_submodule(conv_path, fuse_conv_bn_eval(conv, bn))
        module.set_submodule(bn_path, nn.Identity())
        n += 1
    return n


def has_foldable_batchnorm(module: nn.Module) -> bool:
    """True if :func:`fold_batchnorm` would fold at least one pair of ``module``."""
    return bool(conv_bn_pairs(module))


def _map_tensors(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj)})
    return obj


def _bf16_if_native(requested: bool) -> bool:
    """``FROZEN_TEACHER.BF16`` as it can run here: on a CPU without native bf16
    (:func:`~mdkd_det.utils.device.cpu_has_native_bf16`) bf16 is emulated and several times
    SLOWER than fp32, so the switch is dropped with one warning (decision D11.1)."""
    if requested and not cpu_has_native_bf16():
        _warn_no_native_bf16()
        return False
    return requested


@functools.lru_cache(maxsize=1)
def _warn_no_native_bf16() -> None:
    logger.warning("FROZEN_TEACHER.BF16 ignored: this CPU has no native bf16 (AVX512-BF16/AMX), where "
                   "bf16 is several times slower than fp32; the teacher runs in fp32")


@dataclass(frozen=True)
class TeacherRuntime:
    """Switches for preparing and running a frozen teacher (see the module docstring).

    Attributes:
        fold_bn, channels_last, inference_mode, bf16: ``FROZEN_TEACHER.*``.
        cache_dir, cache_max_gb: ``FROZEN_TEACHER.CACHE_DIR`` ("" = no cache) and
            ``CACHE_MAX_GB`` (:meth:`cached`).

    Usage::

        rt = TeacherRuntime.from_config(cfg)
        rt.prepare(teacher)                 # once, after the weights are loaded (in place)
        with rt.context():
            out = teacher(rt.input(x))
        out = rt.release(out)               # fp32, autograd-ready tensors
    """

    fold_bn: bool = False
    channels_last: bool = False
    inference_mode: bool = False
    bf16: bool = False
    cache_dir: str = ""
    cache_max_gb: float = 10.0

    @classmethod
    def from_config(cls, cfg) -> "TeacherRuntime":
        """From ``cfg.FROZEN_TEACHER`` (all off when the node is absent, e.g. detectron2 cfgs);
        ``BF16`` only where the CPU has native bf16 (:func:`_bf16_if_native`)."""
        node = getattr(cfg, "FROZEN_TEACHER", None)
        if node is None:
            return cls()
        return cls(fold_bn=bool(node.FOLD_BN), channels_last=bool(node.CHANNELS_LAST),
                   inference_mode=bool(node.INFERENCE_MODE), bf16=_bf16_if_native(bool(node.BF16)),
                   cache_dir=str(getattr(node, "CACHE_DIR", "")),
                   cache_max_gb=float(getattr(node, "CACHE_MAX_GB", 10.0)))

    def prepare(self, module: nn.Module) -> nn.Module:
        """Fold BatchNorm and/or convert to channels_last, in place; ``module`` must already be
        in ``eval()`` with its final weights (a later ``load_state_dict`` would not match the
        folded layers). Returns ``module``."""
        if self.fold_bn:
            n = fold_batchnorm(module)
            logger.debug("folded %d BatchNorm layers of %s", n, type(module).__name__)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def cached(self, backbone: nn.Module) -> nn.Module:
        """``backbone`` (prepared, frozen; ``backbone(x [B, C, H, W])`` -> ``OrderedDict`` of
        maps) behind a :class:`~mdkd_det.modeling.teacher_cache.CachedBackbone` in
        :attr:`cache_dir`, or unchanged when the cache is off.

        Raises:
            ConfigError: :attr:`cache_dir` cannot be created (one line naming it).
        """
        if not self.cache_dir:
            return backbone
        from .teacher_cache import CachedBackbone

        try:
            os.makedirs(self.cache_dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"FROZEN_TEACHER.CACHE_DIR '{self.cache_dir}': cannot create the folder "
                              f"({e.strerror or e})") from None

        return CachedBackbone(backbone, self.cache_dir, int(self.cache_max_gb * 1e9),
                              tag=f"fold_bn={self.fold_bn} bf16={self.bf16}")

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """``inference_mode`` (or ``no_grad``) and, with ``bf16``, CPU bf16 autocast."""
        grad_ctx = torch.inference_mode() if self.inference_mode else torch.no_grad()
        with grad_ctx, torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            yield

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, C, H, W] in the teacher's memory format (a copy only with channels_last)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def release(self, obj: Any) -> Any:
        """Tensors of ``obj`` (tensor / dict / list / tuple / dataclass, nested) made safe for
        autograd consumers; call outside :meth:`context`: bf16 -> fp32; an inference tensor is
        cloned unless inference mode is still on (no copy when ``inference_mode`` and ``bf16``
        are off)."""
        if not (self.bf16 or self.inference_mode):
            return obj
        # inside an enclosing inference_mode (a FusionBackbone within the KD teacher) nothing
        # will be saved for backward: no clone
        clone = not torch.is_inference_mode_enabled()

        def fix(t: torch.Tensor) -> torch.Tensor:
            if t.dtype == torch.bfloat16:
                return t.float()  # a new tensor
            return t.clone() if clone and t.is_inference() else t

        return _map_tensors(obj, fix)
