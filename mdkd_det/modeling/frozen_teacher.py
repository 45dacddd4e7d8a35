"""How a frozen teacher is prepared and run: THE one mechanism for the Stage-3 KD teacher and
the frozen teachers inside the Stage-2 :class:`~mdkd_det.modeling.fusion.FusionBackbone`
(docs/benchmarks.md; issue 11).

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
  the maps (bf16 has an 8-bit mantissa); off by default.

Config: ``FROZEN_TEACHER.{FOLD_BN, CHANNELS_LAST, INFERENCE_MODE, BF16}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, List, Tuple

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class TeacherRuntime:
    """Switches for preparing and running a frozen teacher (see the module docstring).

    Attributes:
        fold_bn, channels_last, inference_mode, bf16: ``FROZEN_TEACHER.*``.

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

    @classmethod
    def from_config(cls, cfg) -> "TeacherRuntime":
        """From ``cfg.FROZEN_TEACHER`` (all off when the node is absent, e.g. detectron2 cfgs)."""
        node = getattr(cfg, "FROZEN_TEACHER", None)
        if node is None:
            return cls()
        return cls(fold_bn=bool(node.FOLD_BN), channels_last=bool(node.CHANNELS_LAST),
                   inference_mode=bool(node.INFERENCE_MODE), bf16=bool(node.BF16))

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
