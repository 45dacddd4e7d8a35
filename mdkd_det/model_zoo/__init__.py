"""Model zoo: the configs that ship inside the package (detectron2's ``model_zoo`` API).

``get_config_file("LungCT/mdkd_faster_rcnn_R18_cpu.yaml")`` returns the absolute path of a
shipped config; ``get_config(name)`` returns the merged :class:`~mdkd_det.config.CfgNode`. Both
work from a wheel install and from any working directory: the files live in
``mdkd_det/model_zoo/configs/`` (in the source tree a link to the repository's ``configs/``,
in a wheel real files; ``[tool.setuptools.package-data]``). The list of configs with their
measured metrics is ``model_zoo/MODEL_ZOO.md``.

Nothing is downloaded: trained weights are the user's own checkpoints, given as
``MODEL.WEIGHTS`` (``get_config(name, weights=...)``), by the convention of
``model_zoo/MODEL_ZOO.md`` (``OUTPUT_DIR/model_final.pth``, ``model_best.pth`` or, for a
distilled student, ``OUTPUT_DIR/student/model_student.pth``).
"""

from __future__ import annotations

import difflib
import os
from typing import List, Optional

from ..utils.errors import ConfigError

__all__ = ["config_root", "list_configs", "get_config_file", "get_config", "load_config"]


def config_root() -> str:
    """Absolute path of the shipped configs folder (``mdkd_det/model_zoo/configs``)."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
    if os.path.isdir(here):
        return here
    # a checkout whose link was not created (e.g. a copy without symlinks): the repo's configs/
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def list_configs() -> List[str]:
    """Every shipped config name (``"LungCT/mdkd_faster_rcnn_R18_cpu.yaml"``, ...), sorted."""
    root = config_root()
    names = []
    for d, _, files in os.walk(root, followlinks=True):
        for f in files:
            if f.endswith(".yaml"):
                names.append(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
    return sorted(names)


def get_config_file(config_path: str) -> str:
    """Absolute path of the shipped config ``config_path`` (relative to the configs folder; a
    leading ``configs/`` is accepted).

    Raises:
        ConfigError: no such shipped config; the message lists the closest names.
    """
    name = config_path.replace("\\", "/")
    if name.startswith("configs/"):
        name = name[len("configs/"):]
    path = os.path.join(config_root(), name)
    if not os.path.isfile(path):
        close = difflib.get_close_matches(name, list_configs(), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"model zoo: no config '{config_path}' in {config_root()}{hint} "
                          "(list: mdkd_det.model_zoo.list_configs())")
    return path


def get_config(config_path: str, weights: Optional[str] = None):
    """The merged config (defaults <- shipped ``config_path`` with its ``_BASE_`` chain).

    Args:
        config_path: a shipped config name (see :func:`get_config_file`).
        weights: optional checkpoint path written to ``MODEL.WEIGHTS`` (nothing is downloaded).

    Returns:
        an unfrozen :class:`~mdkd_det.config.CfgNode`.

    Raises:
        ConfigError: unknown config name, or a config key the defaults do not have.
    """
    return load_config(get_config_file(config_path), weights=weights)


def load_config(path_or_name: str, weights: Optional[str] = None):
    """Config from a YAML file path, or else from a shipped model-zoo name.

    Raises:
        ConfigError: neither an existing file nor a shipped config name.
    """
    from ..config import get_cfg

    path = str(path_or_name)
    if not os.path.isfile(path):
        path = get_config_file(path)
    cfg = get_cfg()
    cfg.merge_from_file(path)
    if weights is not None:
        cfg.MODEL.WEIGHTS = str(weights)
    return cfg
