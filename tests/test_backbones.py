"""Built-in backbones: torchvision contract (out_channels, OrderedDict) + detectron2 output_shape()."""

import pytest
import torch

from mdkd_det.config import get_cfg
from mdkd_det.modeling.backbone import build_backbone


@pytest.mark.parametrize("name,strides", [
    ("resnet18_fpn", {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}),
    ("resnet34_fpn", {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}),
    ("resnet50_fpn", {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}),
    ("mobilenet_v3_large_fpn", {"0": 32, "1": 32, "pool": 64}),
    ("timm_fpn", {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}),
])
def test_backbone_contract(name, strides):
    cfg = get_cfg()
    cfg.MODEL.FPN.OUT_CHANNELS = 64 if name not in ("mobilenet_v3_large_fpn",) else 256
    bb = build_backbone(cfg, name)
    x = torch.zeros(2, 3, 128, 128)
    bb.eval()
    with torch.no_grad():
        out = bb(x)
    assert list(out) == list(strides)
    shapes = bb.output_shape()
    for k, f in out.items():
        assert f.shape[1] == bb.out_channels == shapes[k].channels
        assert shapes[k].stride == strides[k]
        assert f.shape[-1] == 128 // strides[k]
    assert bb.size_divisibility == 64


def test_trainable_layers_freeze_stem():
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.TRAINABLE_LAYERS = 2
    bb = build_backbone(cfg, "resnet18_fpn")
    frozen = [n for n, p in bb.named_parameters() if not p.requires_grad]
    assert any("layer1" in n for n in frozen) and not any("layer4" in n for n in frozen)
    cfg.MODEL.BACKBONE.TRAINABLE_LAYERS = 9
    with pytest.raises(ValueError, match="TRAINABLE_LAYERS"):
        build_backbone(cfg, "resnet18_fpn")
