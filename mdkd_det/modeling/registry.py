"""Registries with entry-point plugin discovery.

Source: fvcore ``Registry`` (the class detectron2's registries are built on). We add:
- an error for unknown names that lists the registered names;
- lazy discovery of third-party entries through the Python entry-point group
  ``mdkd_det.<registry>`` (e.g. ``mdkd_det.backbones``), as timm's ``register_model`` lets
  packages add models. A plugin package declares, in its ``pyproject.toml``::

      [project.entry-points."mdkd_det.backbones"]
      my_backbone = "my_pkg.backbones:build_my_backbone"

  The target is imported when a name is first looked up; importing it must register the name
  (with ``@BACKBONE_REGISTRY.register("my_backbone")``) or be the builder itself, in which case
  it is registered under the entry point's name.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any, Iterator, Optional, Tuple

from fvcore.common.registry import Registry as _FvRegistry

from ..utils.errors import RegistryError

logger = logging.getLogger(__name__)


class Registry(_FvRegistry):
    """fvcore ``Registry`` + entry-point plugins + helpful unknown-name errors.

    Args:
        name: registry name, e.g. ``"BACKBONE"``.
        entry_point_group: entry-point group scanned for plugins (None = no plugins).

    Raises:
        RegistryError: from :meth:`get` for an unknown name; lists the registered names.
    """

    def __init__(self, name: str, entry_point_group: Optional[str] = None) -> None:
        super().__init__(name)
        self._entry_point_group = entry_point_group
        self._plugins_loaded = False

    def register(self, name_or_obj: Any = None) -> Any:
        """Register under a given name or the object's ``__name__``.

        Forms: ``@R.register("name")``, ``@R.register()``, ``R.register(obj)``.

        Raises:
            AssertionError: (fvcore) the name is already registered.
        """
        if name_or_obj is None or isinstance(name_or_obj, str):
            name = name_or_obj

            def deco(obj: Any) -> Any:
                self._do_register(name or obj.__name__, obj)
                return obj

            return deco
        self._do_register(name_or_obj.__name__, name_or_obj)
        return name_or_obj

    def load_plugins(self) -> None:
        """Import every entry point of this registry's group once (idempotent)."""
        if self._plugins_loaded or self._entry_point_group is None:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self._entry_point_group):
            try:
                obj = ep.load()
            except Exception as e:  # a broken plugin must not break built-ins
                logger.warning("could not load %s plugin %r: %s", self._name, ep.name, e)
                continue
            if ep.name not in self and callable(obj):
                self._do_register(ep.name, obj)

    def get(self, name: str) -> Any:
        """The object registered as ``name`` (plugins are loaded on the first miss).

        Raises:
            RegistryError: unknown name; the message lists the registered names.
        """
        if name not in self._obj_map:
            self.load_plugins()
        if name not in self._obj_map:
            raise RegistryError(
                f"unknown {self._name.lower()} '{name}'. Registered: {sorted(self._obj_map)}"
            )
        return self._obj_map[name]

    def names(self) -> Tuple[str, ...]:
        """All registered names (built-ins and loaded plugins), sorted."""
        self.load_plugins()
        return tuple(sorted(self._obj_map))

    def __iter__(self) -> Iterator[Tuple[str, Any]]:
        self.load_plugins()
        return iter(self._obj_map.items())


BACKBONE_REGISTRY = Registry("BACKBONE", entry_point_group="mdkd_det.backbones")
BACKBONE_REGISTRY.__doc__ = """Backbones: ``builder(cfg) -> Backbone``.

Contract (torchvision and detectron2 at once), see :class:`mdkd_det.modeling.backbone.Backbone`:
``forward(x: Tensor[B, C, H, W]) -> OrderedDict[str, Tensor]``, ``out_channels: int`` equal for
every map, and ``output_shape() -> {name: ShapeSpec(channels, stride)}``.
"""

META_ARCH_REGISTRY = Registry("META_ARCH", entry_point_group="mdkd_det.detectors")
META_ARCH_REGISTRY.__doc__ = """Meta-architectures (``MODEL.META_ARCHITECTURE``: detectors, segmenters,
classifiers; detectron2's name): ``builder(cfg, backbone=None) -> nn.Module`` (torchvision API:
``model(images, targets)`` -> loss dict in train mode, list of detections in eval mode)."""


def __getattr__(name):  # PEP 562: deprecated names (issue 14), one release
    if name == "DETECTOR_REGISTRY":
        import warnings

        warnings.warn("DETECTOR_REGISTRY is deprecated: use META_ARCH_REGISTRY", DeprecationWarning, stacklevel=2)
        return META_ARCH_REGISTRY
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
