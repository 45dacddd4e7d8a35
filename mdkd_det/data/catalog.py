"""``DatasetCatalog`` / ``MetadataCatalog`` in detectron2's style.

A dataset is a *name* mapped to a zero-argument function returning ``list[dict]`` records.
Record schema (all coordinates in original-image pixels):

``file_name``    str, path of the image (JPEG/PNG, 16-bit PNG or DICOM).
``height``, ``width``  int, original image size in px.
``image_id``     int (COCO sources keep the JSON's own image id) or str.
``annotations``  list of ``{"bbox": [x1, y1, x2, y2] (float px, XYXY_ABS),
                 "category_id": int (contiguous, 0-based; 0 = "lesion")}``; may be empty
                 (negative image).
``reader``       "image" (8-bit JPEG/PNG, RGB or grey), "png16_hu" (16-bit PNG, HU = value -
                 32768) or "dicom" (HU via RescaleSlope/Intercept).
``window``       optional ``(level, width)`` in HU for HU readers (per-record override).
``patient_id``, ``series_id``  optional str, where the source knows them.

Metadata (``MetadataCatalog.get(name)``): ``thing_classes`` (list[str]),
``thing_dataset_id_to_contiguous_id`` (dict: source category id -> contiguous id, used to
write COCO results with the source's own category ids), ``json_file`` (for COCO sources),
``evaluator_type`` ("coco").
"""

from __future__ import annotations

import types
from typing import Any, Callable, Dict, List

from ..utils.errors import DatasetError


class _DatasetCatalog:
    """Global name -> loader registry (detectron2 ``DatasetCatalog`` API)."""

    def __init__(self) -> None:
        self._funcs: Dict[str, Callable[[], List[dict]]] = {}
        self._defaults: List[Callable[[], None]] = []
        self._resolvers: List[Callable[[str], bool]] = []

    def add_default_registration(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` before a lookup of an unknown name and before :meth:`list` (registers
        default names lazily; :mod:`mdkd_det.data.datasets.builtin` adds the built-ins)."""
        self._defaults.append(fn)

    def add_name_resolver(self, fn: Callable[[str], bool]) -> None:
        """Ask ``fn(name) -> bool`` (registered ``name`` now?) for a still unknown name
        (:mod:`mdkd_det.data.datasets.coco` adds the ``coco:<json>:<dir>`` names)."""
        self._resolvers.append(fn)

    def _register_defaults(self) -> None:
        for fn in list(self._defaults):
            fn()

    def register(self, name: str, func: Callable[[], List[dict]]) -> None:
        """Register ``func`` (no arguments, returns records) under ``name``.

        Raises:
            DatasetError: ``name`` is already registered.
        """
        if not callable(func):
            raise TypeError("DatasetCatalog.register needs a callable")
        if name in self._funcs:
            raise DatasetError(f"dataset '{name}' is already registered")
        self._funcs[name] = func

    def get(self, name: str) -> List[dict]:
        """Call the loader of ``name`` and return its records.

        Raises:
            DatasetError: unknown name (the message lists the registered names), or whatever
                the loader raises for bad input.
        """
        if name not in self._funcs:
            self._register_defaults()
        if name not in self._funcs:
            if not any(resolve(name) for resolve in list(self._resolvers)):
                raise DatasetError(
                    f"dataset '{name}' is not registered. Registered: {sorted(self._funcs)}. "
                    "Any COCO dataset can be named 'coco:<annotations.json>:<image_dir>'."
                )
        return self._funcs[name]()

    def list(self) -> List[str]:
        """Registered names (the built-ins included), sorted."""
        self._register_defaults()
        return sorted(self._funcs)

    def remove(self, name: str) -> None:
        """Unregister ``name`` and its metadata (no error if absent)."""
        self._funcs.pop(name, None)
        MetadataCatalog.remove(name)

    def __contains__(self, name: str) -> bool:
        return name in self._funcs


class Metadata(types.SimpleNamespace):
    """Attribute bag for one dataset; ``get(key, default)`` as detectron2's ``Metadata``."""

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def set(self, **kwargs: Any) -> "Metadata":
        for k, v in kwargs.items():
            setattr(self, k, v)
        return self


class _MetadataCatalog:
    def __init__(self) -> None:
        self._meta: Dict[str, Metadata] = {}

    def get(self, name: str) -> Metadata:
        """Return (creating if needed) the metadata of ``name``."""
        if name not in self._meta:
            self._meta[name] = Metadata(name=name)
        return self._meta[name]

    def remove(self, name: str) -> None:
        self._meta.pop(name, None)


DatasetCatalog = _DatasetCatalog()
MetadataCatalog = _MetadataCatalog()
