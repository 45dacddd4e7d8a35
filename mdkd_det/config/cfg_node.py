"""``CfgNode``: fvcore's config node whose errors name the offending key and file.

Source: fvcore ``CfgNode`` (``_BASE_`` inheritance, ``merge_from_list``), as detectron2 uses it.
We only add error messages that name the offending key and the file (or "command line").
"""

from __future__ import annotations

import os
import re
from typing import List, Sequence

import yaml
from fvcore.common.config import CfgNode as _FvCfgNode

from ..utils.errors import ConfigError

_KEY_RE = re.compile(r"Non-existent (?:config )?key: ([\w.]+)")


def _base_chain(path: str) -> List[str]:
    """Return ``path`` followed by its ``_BASE_`` ancestors (nearest first)."""
    chain, cur = [], path
    while cur and cur not in chain and os.path.isfile(cur):
        chain.append(cur)
        try:
            with open(cur) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError:
            break
        base = data.get("_BASE_") if isinstance(data, dict) else None
        if not base:
            break
        cur = base if os.path.isabs(base) else os.path.join(os.path.dirname(cur), base)
    return chain


def _has_path(path: str, parts: Sequence[str]) -> bool:
    try:
        with open(path) as f:
            node = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return False
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return False
        node = node[p]
    return True


def _file_defining(chain: Sequence[str], dotted_key: str) -> str:
    """Return the first file of ``chain`` whose YAML contains ``dotted_key``."""
    parts = dotted_key.split(".")
    for path in chain:
        if _has_path(path, parts):
            return path
    return chain[0] if chain else "<unknown file>"


def yaml_error(path: str, e: yaml.YAMLError) -> ConfigError:
    """A one-line :class:`ConfigError` for a YAML file that failed to load.

    A Python tag (``!!python/object/apply:os.system``, ``!!python/name:...``) is refused, never
    run: configs are always read with ``yaml.safe_load`` (issue 13). The message names the file
    that holds the tag (the ``_BASE_`` file, if it came from there) and the tag.
    """
    mark = getattr(e, "problem_mark", None)
    where = getattr(mark, "name", None) or path
    if where.startswith("<"):
        where = path
    line = f":{mark.line + 1}" if mark is not None else ""
    if isinstance(e, yaml.constructor.ConstructorError):
        m = re.search(r"tag '([^']+)'", str(e.problem or e))
        tag = m.group(1).replace("tag:yaml.org,2002:", "!!") if m else "?"
        return ConfigError(f"{where}{line}: refused the YAML tag '{tag}': configs are read with "
                           "yaml.safe_load and may hold only plain values, never Python objects")
    first = " ".join(str(e).split())
    return ConfigError(f"{where}{line}: invalid YAML: {first[:300]}")


class CfgNode(_FvCfgNode):
    """fvcore ``CfgNode`` whose merge errors name the key and the file.

    Raises:
        ConfigError: unknown key, wrong value type, unreadable or missing YAML file. The message
            names the key and the YAML file (the ``_BASE_`` file that holds it, if any) or
            ``command line`` for ``KEY VALUE`` overrides.
    """

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        """Merge a YAML file (and its ``_BASE_`` chain), always with ``yaml.safe_load``.

        ``allow_unsafe`` is accepted for fvcore/detectron2 signature compatibility and ignored:
        there is no way to make this load run code from a file.
        """
        if not os.path.isfile(cfg_filename):
            raise ConfigError(f"config file not found: {cfg_filename}")
        try:
            super().merge_from_file(cfg_filename, allow_unsafe=False)
        except yaml.YAMLError as e:
            raise yaml_error(cfg_filename, e) from e
        except (KeyError, ValueError, AssertionError) as e:
            msg = e.args[0] if e.args else str(e)
            m = _KEY_RE.search(str(msg))
            if m:
                key = m.group(1)
                where = _file_defining(_base_chain(cfg_filename), key)
                raise ConfigError(
                    f"unknown config key '{key}' in {where}"
                    + (f" (merged from {cfg_filename})" if where != cfg_filename else "")
                    + "; see mdkd_det/config/defaults.py for the valid keys"
                ) from e
            raise ConfigError(f"{cfg_filename}: {msg}") from e

    def merge_from_list(self, cfg_list: list) -> None:
        if len(cfg_list) % 2:
            raise ConfigError(
                f"command line: overrides must be KEY VALUE pairs, got an odd count: {cfg_list}"
            )
        try:
            super().merge_from_list(cfg_list)
        except (KeyError, ValueError, AssertionError) as e:
            msg = e.args[0] if e.args else str(e)
            m = _KEY_RE.search(str(msg))
            if m:
                raise ConfigError(
                    f"unknown config key '{m.group(1)}' on the command line; "
                    "see mdkd_det/config/defaults.py for the valid keys"
                ) from e
            raise ConfigError(f"command line: {msg}") from e
