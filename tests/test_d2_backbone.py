"""mdkd_det.d2 backbone: build_fusion_backbone in detectron2's registry, teachers of both kinds."""

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone, build_model  # noqa: E402

from mdkd_det.d2 import D2BackboneAdapter, build_fusion_backbone  # noqa: E402
from mdkd_det.modeling.fusion import FusionBackbone  # noqa: E402
from mdkd_det.utils.errors import ConfigError  # noqa: E402

from _d2tiny import joint_opts, tiny_d2_cfg, write_teachers  # noqa: E402


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return write_teachers(tmp_path_factory.mktemp("d2_teachers"))


@pytest.fixture(scope="module")
def joint_cfg(tmp_path_factory, teachers):
    return tiny_d2_cfg(tmp_path_factory.mktemp("joint"), *joint_opts(teachers))


def test_registered_and_builds_from_d2_config(joint_cfg, teachers):
    assert BACKBONE_REGISTRY.get("build_fusion_backbone") is build_fusion_backbone
    bb = build_backbone(joint_cfg)
    assert isinstance(bb, D2BackboneAdapter) and isinstance(bb.body, FusionBackbone)
    assert bb.body.num_teachers == 2
    # each teacher holds its checkpoint's backbone weights (not random ones)
    for teacher, ckpt in zip(bb.body.teachers, teachers[2]):
        sd = torch.load(ckpt, weights_only=True)["model"]
        own = teacher.body.state_dict()
        assert len(own) > 0
        for k, v in own.items():
            assert torch.equal(v, sd["backbone." + k]), k


def test_output_shape_matches_tensors(joint_cfg):
    bb = build_backbone(joint_cfg).eval()
    shapes = bb.output_shape()
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    assert bb.size_divisibility == 64
    x = torch.randn(2, 3, 128, 192)
    out = bb(x)
    assert list(out) == list(shapes)
    for name, t in out.items():
        s = shapes[name]
        assert t.shape == (2, s.channels, 128 // s.stride, 192 // s.stride), name
        assert s.channels == joint_cfg.FUSION.OUT_CHANNELS


def test_teachers_frozen_in_train_mode(joint_cfg):
    model = build_model(joint_cfg)
    model.train()
    fusion = model.backbone.body
    assert all(not t.training for t in fusion.teachers)
    assert all(not p.requires_grad for p in fusion.teachers.parameters())
    assert all(p.requires_grad for p in fusion.fusion_parameters())
    bn = [m for m in fusion.teachers.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn, "the tiny teachers use trainable-style BatchNorm"
    before = [m.running_mean.clone() for m in bn]
    fusion(torch.rand(2, 3, 128, 128))
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bn))


def test_config_errors(tmp_path, teachers):
    cfg = tiny_d2_cfg(tmp_path, "MODEL.BACKBONE.NAME", "build_fusion_backbone")
    with pytest.raises(ConfigError, match="TEACHERS"):
        build_backbone(cfg)
    cfg = tiny_d2_cfg(tmp_path, "MODEL.BACKBONE.NAME", "build_fusion_backbone",
                      "FUSION.TEACHER_FORMATS", ("d2",), "FUSION.TEACHERS", (teachers[2][1],))
    with pytest.raises(ConfigError, match="needs its detectron2 config"):
        build_backbone(cfg)
