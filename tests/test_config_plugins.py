"""Config plugins (issue 12): the entry-point group ``mdkd_det.config`` adds keys before merging,
tested with an installed fake plugin (a dist-info folder on sys.path, as test_registry does)."""

import sys

import pytest

from mdkd_det.config import get_cfg
from mdkd_det.config.config import CONFIG_ENTRY_POINT_GROUP, config_plugins
from mdkd_det.utils.errors import ConfigError


def _install(tmp_path, monkeypatch, body):
    (tmp_path / "mdkd_toy_cfg_plugin.py").write_text(body)
    dist = tmp_path / "mdkd_toy_cfg_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mdkd-toy-cfg-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{CONFIG_ENTRY_POINT_GROUP}]\ntoy = mdkd_toy_cfg_plugin:add_toy_config\n")
    monkeypatch.syspath_prepend(str(tmp_path))


PLUGIN = """
from mdkd_det.config import CfgNode

def add_toy_config(cfg):
    cfg.TOY = CfgNode()
    cfg.TOY.SIZE = 3          # px
    cfg.TOY.NAME = "a"
"""


def test_plugin_keys_merge_from_file_and_list(tmp_path, monkeypatch):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("TOY:\n  SIZE: 5\nSOLVER:\n  MAX_ITER: 7\n")
    with pytest.raises(ConfigError, match="unknown config key 'TOY'"):
        get_cfg().merge_from_file(str(yaml_file))  # not installed yet
    _install(tmp_path, monkeypatch, PLUGIN)
    try:
        assert [n for n, _ in config_plugins()] == ["toy"]
        cfg = get_cfg()
        assert cfg.TOY.SIZE == 3
        cfg.merge_from_file(str(yaml_file))
        cfg.merge_from_list(["TOY.NAME", "b"])
        assert (cfg.TOY.SIZE, cfg.TOY.NAME, cfg.SOLVER.MAX_ITER) == (5, "b", 7)
        # the CLI's setup_cfg sees the plugin's keys too
        from mdkd_det.engine.defaults import default_argument_parser, setup_cfg

        args = default_argument_parser().parse_args(["--config-file", str(yaml_file), "TOY.SIZE", "9"])
        assert setup_cfg(args).TOY.SIZE == 9
    finally:
        sys.modules.pop("mdkd_toy_cfg_plugin", None)


def test_failing_plugin_is_named(tmp_path, monkeypatch):
    _install(tmp_path, monkeypatch, "def add_toy_config(cfg):\n    raise RuntimeError('boom')\n")
    try:
        with pytest.raises(ConfigError, match=r"config plugin 'toy' \(mdkd_det.config\) failed: RuntimeError: boom"):
            get_cfg()
    finally:
        sys.modules.pop("mdkd_toy_cfg_plugin", None)
