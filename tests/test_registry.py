"""Registry: built-ins, unknown names, entry-point plugin discovery (mdkd_det.backbones)."""

import sys
import textwrap

import pytest
import torch

from mdkd_det.config import get_cfg
from mdkd_det.modeling import BACKBONE_REGISTRY
from mdkd_det.modeling.backbone import build_backbone
from mdkd_det.modeling.registry import Registry
from mdkd_det.utils.errors import RegistryError


def test_unknown_backbone_lists_names():
    with pytest.raises(RegistryError) as e:
        build_backbone(get_cfg(), "resnet19_fpn")
    msg = str(e.value)
    assert "resnet19_fpn" in msg and "resnet18_fpn" in msg and "timm_fpn" in msg


def test_register_forms():
    reg = Registry("THING")

    @reg.register("named")
    def f():
        return 1

    @reg.register()
    def g():
        return 2

    reg.register(len)
    assert reg.get("named") is f and reg.get("g") is g and reg.get("len") is len
    assert reg.names() == ("g", "len", "named")


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    """A third-party package declaring ``[mdkd_det.backbones]`` is found by name."""
    pkg = tmp_path / "mdkd_toy_plugin.py"
    pkg.write_text(textwrap.dedent('''
        from collections import OrderedDict
        import torch
        from mdkd_det.modeling.backbone import WrappedBackbone

        class _Body(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 16, 3, stride=8, padding=1)
            def forward(self, x):
                return OrderedDict([("0", self.conv(x))])

        def build_toy(cfg):
            return WrappedBackbone(_Body(), 16)
    '''))
    dist = tmp_path / "mdkd_toy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mdkd-toy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mdkd_det.backbones]\ntoy_plugin_bb = mdkd_toy_plugin:build_toy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(BACKBONE_REGISTRY, "_plugins_loaded", False)
    try:
        bb = build_backbone(get_cfg(), "toy_plugin_bb")
        assert "toy_plugin_bb" in BACKBONE_REGISTRY.names()
        out = bb(torch.zeros(1, 3, 64, 64))
        assert list(out) == ["0"] and out["0"].shape == (1, 16, 8, 8)
        assert bb.output_shape()["0"].stride == 8
    finally:
        BACKBONE_REGISTRY._obj_map.pop("toy_plugin_bb", None)
        sys.modules.pop("mdkd_toy_plugin", None)
