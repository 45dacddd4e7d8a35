"""Config system: fvcore ``CfgNode`` with ``_BASE_`` inheritance and strict keys."""

from .config import CfgNode, get_cfg, merge_from_file, merge_from_list

__all__ = ["CfgNode", "get_cfg", "merge_from_file", "merge_from_list"]
