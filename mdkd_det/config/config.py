"""Strict fvcore config with file-naming errors: :func:`get_cfg` (defaults + config plugins)
and the merge helpers. :class:`CfgNode` lives in :mod:`.cfg_node` (re-exported here).
"""

from __future__ import annotations

from typing import List

from ..utils.errors import ConfigError
from .cfg_node import CfgNode, yaml_error
from .defaults import _C

__all__ = ["CfgNode", "CONFIG_ENTRY_POINT_GROUP", "config_plugins", "get_cfg", "merge_from_file",
           "merge_from_list", "yaml_error"]

#: Entry-point group of config plugins: ``fn(cfg) -> None`` adds a plugin's keys (detectron2's
#: ``add_*_config`` pattern), called by :func:`get_cfg` on every fresh config, before any merge.
CONFIG_ENTRY_POINT_GROUP = "mdkd_det.config"
_plugin_cache: dict = {}


def config_plugins() -> List[tuple]:
    """The ``(name, function)`` pairs of the ``mdkd_det.config`` entry-point group, sorted by
    name (loaded once per ``sys.path``). A plugin that fails to import is logged and skipped,
    as registry plugins are (``mdkd_det.modeling.registry``)."""
    import logging
    import sys
    from importlib.metadata import entry_points

    key = tuple(sys.path)
    if key not in _plugin_cache:
        found = []
        for ep in sorted(entry_points(group=CONFIG_ENTRY_POINT_GROUP), key=lambda e: e.name):
            try:
                found.append((ep.name, ep.load()))
            except Exception as e:  # a broken plugin must not break the built-in configs
                logging.getLogger(__name__).warning("could not load config plugin %r (%s): %s", ep.name, ep.value, e)
        _plugin_cache.clear()
        _plugin_cache[key] = found
    return _plugin_cache[key]


def get_cfg() -> CfgNode:
    """Return a fresh copy of the documented defaults (``mdkd_det/config/defaults.py``), with
    the keys of every installed config plugin added.

    A plugin package declares, in its ``pyproject.toml``::

        [project.entry-points."mdkd_det.config"]
        my_plugin = "my_pkg.config:add_my_config"

    and ``add_my_config(cfg)`` adds its keys (``cfg.MY_PLUGIN = CfgNode(); cfg.MY_PLUGIN.SIZE =
    3``), so YAML files and ``KEY VALUE`` overrides may set them like built-in keys.

    Raises:
        ConfigError: a plugin function raised (names the plugin).
    """
    cfg = _C.clone()
    for name, fn in config_plugins():
        try:
            fn(cfg)
        except Exception as e:
            raise ConfigError(f"config plugin '{name}' ({CONFIG_ENTRY_POINT_GROUP}) failed: "
                              f"{type(e).__name__}: {e}") from e
    return cfg


def merge_from_file(cfg: CfgNode, path: str) -> CfgNode:
    """Merge YAML ``path`` (with ``_BASE_`` chain) into ``cfg``; return ``cfg``.

    Raises:
        ConfigError: see :class:`CfgNode`.
    """
    cfg.merge_from_file(path)
    return cfg


def merge_from_list(cfg: CfgNode, opts: list) -> CfgNode:
    """Merge ``KEY VALUE`` pairs from the command line into ``cfg``; return ``cfg``."""
    cfg.merge_from_list(list(opts))
    return cfg
