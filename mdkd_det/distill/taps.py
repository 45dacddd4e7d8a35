"""Taps: THE one mechanism that captures the tensors KD needs from an unmodified model
(design.md "Taps"; paper_notes A10; engineering_notes §5).

A tap names a submodule by dotted path (``"backbone"``, ``"roi_heads.box_head"``) and what to
keep of its call (output, first input, all inputs, or a custom extractor). A
:class:`TapRecorder` is a context manager: on enter it registers one forward hook per module
tap (``nn.Module.register_forward_hook(with_kwargs=True)``) and replaces each method tap's
bound method with a recording wrapper stored as an instance attribute; on exit it removes
every hook and restores every method, also when the forward raised. Nothing is registered
outside the ``with`` block, so taps cost nothing when KD is off.

    with TapRecorder(student, register_detector_taps("torchvision_faster_rcnn")) as rec:
        losses = student(images, targets)
    feats = rec["features"]                 # OrderedDict of FPN maps (keeps the graph)
    proposals = rec["sampled"][0]           # the student's sampled RoIs, list[Tensor[M_i, 4]]

Records keep autograd history (student taps feed differentiable KD losses); run teachers under
``torch.no_grad()``, or under ``inference_mode()`` and clone what leaves it
(:meth:`~mdkd_det.modeling.frozen_teacher.TeacherRuntime.release`): inference tensors cannot
be saved for backward, so a loss mixing them with student tensors fails (torch 2.14).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

Extractor = Callable[[Optional[nn.Module], tuple, dict, Any], Any]
_WHATS = ("output", "input", "inputs")


@dataclass(frozen=True)
class Tap:
    """Capture from the forward of submodule ``path``.

    Attributes:
        path: dotted submodule path as ``model.get_submodule`` takes it ("" = the model).
        what: ``"output"`` (the return value), ``"input"`` (first positional argument, else the
            first keyword argument), ``"inputs"`` (``(args, kwargs)``), or a callable
            ``f(module, args, kwargs, output) -> value``.
        many: keep every call of the step in a list (default: the last call only).
    """

    path: str
    what: Union[str, Extractor] = "output"
    many: bool = False


@dataclass(frozen=True)
class MethodTap:
    """Capture calls of the instance method ``path`` (e.g. ``"roi_heads.select_training_samples"``).

    The bound method is replaced by a recording wrapper stored as an instance attribute of the
    owner module and restored on exit (engineering_notes §5: assigning the instance attribute
    works for torchvision's RoIHeads). ``what``/``many`` as :class:`Tap`; an extractor
    receives ``module=None``.
    """

    path: str
    what: Union[str, Extractor] = "output"
    many: bool = False


TapSpec = Union[str, Tap, MethodTap]


def _extract(what, module, args: tuple, kwargs: dict, output):
    if callable(what):
        return what(module, args, kwargs, output)
    if what == "output":
        return output
    if what == "input":
        if args:
            return args[0]
        return next(iter(kwargs.values())) if kwargs else None
    return args, kwargs  # "inputs"


def _close_names(model: nn.Module, path: str) -> List[str]:
    names = [n for n, _ in model.named_modules() if n]
    return difflib.get_close_matches(path, names, n=5, cutoff=0.5)


def resolve_tap(model: nn.Module, spec: TapSpec) -> Union[Tap, MethodTap]:
    """Turn a spec into a :class:`Tap` or :class:`MethodTap` checked against ``model``.

    A plain string is a module path (→ ``Tap(path)``) or, when it names a non-module callable
    attribute of a submodule, a method (→ ``MethodTap(path)``).

    Raises:
        KeyError: the path names neither a submodule nor a method; the message lists the
            closest submodule names.
        ValueError: unknown ``what``.
    """
    if isinstance(spec, str):
        spec = Tap(spec)
    if not isinstance(spec, (Tap, MethodTap)):
        raise TypeError(f"tap spec must be str, Tap or MethodTap, got {type(spec).__name__}")
    if not callable(spec.what) and spec.what not in _WHATS:
        raise ValueError(f"tap '{spec.path}': what must be one of {_WHATS} or a callable, "
                         f"got {spec.what!r}")
    if isinstance(spec, Tap):
        try:
            model.get_submodule(spec.path)
            return spec
        except AttributeError:
            pass
    owner_path, _, attr = spec.path.rpartition(".")
    try:
        owner = model.get_submodule(owner_path)
    except AttributeError:
        owner = None
    if owner is not None and attr and callable(getattr(owner, attr, None)) \
            and not isinstance(getattr(owner, attr), nn.Module):
        return MethodTap(spec.path, spec.what, spec.many)
    raise KeyError(f"tap path '{spec.path}' is not a submodule or method of "
                   f"{type(model).__name__}; close names: {_close_names(model, spec.path)}")


class TapRecorder:
    """Context manager recording tapped tensors of ``model`` for one step.

    Args:
        model: an unmodified ``nn.Module`` (torchvision detector, RF-DETR adapter, ...).
        taps: ``{record_name: spec}``; spec is a path string, :class:`Tap` or :class:`MethodTap`.

    Use ``rec[name]`` / ``rec.get(name)`` / ``rec.records`` after (or during) the forward.
    Entering clears previous records; exiting removes every hook and restores every method
    (method taps on the same object must be exited in LIFO order when recorders nest).

    Raises:
        KeyError: on construction, unknown paths (close names listed); on ``rec[name]``, a tap
            that did not fire this step (e.g. ``select_training_samples`` in eval mode).
        RuntimeError: entering a recorder that is already active.
    """

    def __init__(self, model: nn.Module, taps: Mapping[str, TapSpec]) -> None:
        self.model = model
        self.taps: Dict[str, Union[Tap, MethodTap]] = {
            name: resolve_tap(model, spec) for name, spec in taps.items()
        }
        self.records: Dict[str, Any] = {}
        self._handles: List[Any] = []
        self._patched: List[Tuple[nn.Module, str, bool, Any]] = []
        self._active = False

    # -- recording -------------------------------------------------------------------------
    def _store(self, name: str, tap, value) -> None:
        if tap.many:
            self.records.setdefault(name, []).append(value)
        else:
            self.records[name] = value

    def _module_hook(self, name: str, tap: Tap):
        def hook(module, args, kwargs, output):
            self._store(name, tap, _extract(tap.what, module, args, kwargs, output))
        return hook

    def _method_wrapper(self, name: str, tap: MethodTap, bound: Callable):
        def wrapper(*args, **kwargs):
            output = bound(*args, **kwargs)
            self._store(name, tap, _extract(tap.what, None, args, kwargs, output))
            return output
        wrapper.__wrapped__ = bound
        return wrapper

    # -- context ---------------------------------------------------------------------------
    def __enter__(self) -> "TapRecorder":
        if self._active:
            raise RuntimeError("TapRecorder is already active")
        self.records = {}
        self._active = True
        try:
            for name, tap in self.taps.items():
                if isinstance(tap, Tap):
                    module = self.model.get_submodule(tap.path)
                    self._handles.append(
                        module.register_forward_hook(self._module_hook(name, tap), with_kwargs=True)
                    )
                else:
                    owner_path, _, attr = tap.path.rpartition(".")
                    owner = self.model.get_submodule(owner_path)
                    had_own = attr in owner.__dict__
                    previous = owner.__dict__.get(attr)
                    bound = getattr(owner, attr)
                    self._patched.append((owner, attr, had_own, previous))
                    setattr(owner, attr, self._method_wrapper(name, tap, bound))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove all hooks and restore all wrapped methods (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for owner, attr, had_own, previous in reversed(self._patched):
            if had_own:
                object.__setattr__(owner, attr, previous)
            else:
                owner.__dict__.pop(attr, None)
        self._patched.clear()
        self._active = False

    # -- access ----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        if name not in self.records:
            if name not in self.taps:
                raise KeyError(f"no tap named '{name}'; taps: {sorted(self.taps)}")
            raise KeyError(f"tap '{name}' ({self.taps[name].path}) did not fire this step")
        return self.records[name]

    def get(self, name: str, default: Any = None) -> Any:
        """``records.get(name, default)``."""
        return self.records.get(name, default)

    def __contains__(self, name: str) -> bool:
        return name in self.records


# ---------------------------------------------------------------------------------------------
# Presets per detector family
# ---------------------------------------------------------------------------------------------
_DETECTOR_TAPS: Dict[str, Dict[str, TapSpec]] = {
    # torchvision GeneralizedRCNN / FasterRCNN (engineering_notes §5; verified points).
    "torchvision_faster_rcnn": {
        # (ImageList [tensors: B,3,H,W normalised, image_sizes], targets in resized px)
        "images": Tap("transform"),
        # OrderedDict name -> Tensor[B, C, H/s, W/s] (FPN maps)
        "features": Tap("backbone"),
        # (proposals: list[Tensor[M_i, 4]] xyxy px, matched_idxs, labels: list[Tensor[M_i]],
        #  regression_targets); train mode only. M_i = ROI batch size per image.
        "sampled": MethodTap("roi_heads.select_training_samples"),
        # RoI embeddings h: Tensor[sum M_i, representation_size (1024)]
        "box_features": Tap("roi_heads.box_head"),
        # (class_logits z: Tensor[sum M_i, K+1], box_regression: Tensor[sum M_i, 4(K+1)])
        "box_predictor": Tap("roi_heads.box_predictor"),
    },
}


def register_detector_taps(kind: str, taps: Optional[Mapping[str, TapSpec]] = None) -> Dict[str, TapSpec]:
    """Tap preset of a detector family: get it, or register/replace it when ``taps`` is given.

    Built-in ``"torchvision_faster_rcnn"`` records ``images`` (transform output
    ``(ImageList, targets)``), ``features`` (backbone output, OrderedDict of FPN maps),
    ``sampled`` (``roi_heads.select_training_samples`` output ``(proposals, matched_idxs,
    labels, regression_targets)``), ``box_features`` (box_head output ``[sum M_i, 1024]``) and
    ``box_predictor`` (``(class_logits [sum M_i, K+1], box_regression [sum M_i, 4(K+1)])``).

    Returns:
        A copy of the preset ``{record_name: spec}`` for :class:`TapRecorder`.

    Raises:
        KeyError: unknown ``kind`` (the message lists known kinds).
    """
    if taps is not None:
        _DETECTOR_TAPS[kind] = dict(taps)
    if kind not in _DETECTOR_TAPS:
        raise KeyError(f"no tap preset for detector kind '{kind}'; known: {sorted(_DETECTOR_TAPS)}")
    return dict(_DETECTOR_TAPS[kind])


def teacher_roi_outputs(teacher_model: nn.Module, teacher_feats: Mapping[str, torch.Tensor],
                        proposals: List[Any], image_sizes: Optional[List[Tuple[int, int]]] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run a teacher's RoI head on the STUDENT's sampled proposals (paper_notes A10, ClsKD/ROIKD):
    THE one teacher RoI-head forward of the two-stage families (torchvision and detectron2).

    pool -> ``box_head`` -> ``box_predictor`` (its ``cls_score`` only, when it has one: the box
    deltas feed no KD term) under ``torch.no_grad()`` (engineering_notes §5), so region i of the
    teacher outputs is region i of the student's ``box_features`` / ``class_logits`` (M_i per
    image, same order). The pooling is the head's own:

    - torchvision ``RoIHeads``: ``box_roi_pool(teacher_feats, boxes, image_sizes)``;
    - detectron2 ``StandardROIHeads`` (has ``box_pooler``): ``box_pooler([teacher_feats[f] for f
      in box_in_features], boxes)``, as ``StandardROIHeads._forward_box``.

    Args:
        teacher_model: torchvision ``FasterRCNN`` / detectron2 ``GeneralizedRCNN`` (or their
            ``roi_heads``), eval or train mode (TwoMLPHead / FastRCNNPredictor /
            FastRCNNConvFCHead / FastRCNNOutputLayers have no mode-dependent layers).
        teacher_feats: teacher backbone maps on the student's transformed batch,
            ``{name: Tensor[B, C, H/s, W/s]}``.
        proposals: student's sampled boxes per image: torchvision ``list[Tensor[M_i, 4]]`` xyxy
            px of the resized image (``rec["sampled"][0]``); detectron2 ``list[Instances]``
            with ``proposal_boxes`` (or ``list[Boxes]``).
        image_sizes: ``ImageList.image_sizes``, ``[(h, w)]`` px (torchvision pooling only).

    Returns:
        ``(embeddings Tensor[sum M_i, representation_size], class_logits Tensor[sum M_i, K+1])``
        without autograd history (background logit first in torchvision, last in detectron2).

    Raises:
        AttributeError: the model has no ``roi_heads`` with a pooler, box_head and
            box_predictor.
    """
    roi_heads = getattr(teacher_model, "roi_heads", teacher_model)
    with torch.no_grad():
        if hasattr(roi_heads, "box_pooler"):  # detectron2 StandardROIHeads
            boxes = [getattr(p, "proposal_boxes", p) for p in proposals]
            pooled = roi_heads.box_pooler([teacher_feats[f] for f in roi_heads.box_in_features], boxes)
        else:  # torchvision RoIHeads
            pooled = roi_heads.box_roi_pool(teacher_feats, [p.detach() for p in proposals], image_sizes)
        embeddings = roi_heads.box_head(pooled)
        predictor = roi_heads.box_predictor
        # no KD term reads the teacher's box deltas: the predictor's bbox_pred is skipped
        cls_score = getattr(predictor, "cls_score", None)
        if isinstance(cls_score, nn.Module) and embeddings.dim() == 2:
            class_logits = cls_score(embeddings)
        else:
            class_logits, _ = predictor(embeddings)
    return embeddings, class_logits
