"""Tests for mdkd_det.modeling.fusion.fusion_backbone (paper C8, C12, A20)."""

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN

from mdkd_det.config import get_cfg
from mdkd_det.config.config import CfgNode as CN
from mdkd_det.modeling.backbone import Backbone, build_backbone
from mdkd_det.modeling.fusion import FusionBackbone, TeacherInput, load_teacher_backbone
from mdkd_det.utils.errors import CheckpointError, ConfigError

FPN_CH = 16
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _cfg(fpn=FPN_CH):
    cfg = get_cfg()
    cfg.MODEL.FPN.OUT_CHANNELS = fpn
    return cfg


@pytest.fixture(scope="module")
def teachers():
    torch.manual_seed(0)
    return [build_backbone(_cfg(), "resnet18_fpn") for _ in range(3)]


@pytest.fixture
def fb(teachers):
    torch.manual_seed(0)
    return FusionBackbone(copy.deepcopy(teachers), "concat1x1", out_channels=8)


def _bn_stats(module):
    return {k: v.clone() for k, v in module.state_dict().items()
            if "running_" in k or "num_batches" in k}


def test_shapes_64px(fb):
    out = fb(torch.randn(2, 3, 64, 64))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape) for v in out.values()] == [
        (2, 8, 16, 16), (2, 8, 8, 8), (2, 8, 4, 4), (2, 8, 2, 2), (2, 8, 1, 1)]
    assert fb.out_channels == 8 and fb.num_teachers == 3
    shape = fb.output_shape()
    for name, t in out.items():
        assert shape[name].channels == t.shape[1]
        assert shape[name].stride == 64 // t.shape[-1]
    assert fb.size_divisibility == 64


def test_only_fusion_trainable(fb):
    trainable = {n for n, p in fb.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("fusion.") for n in trainable)
    assert {id(p) for p in fb.fusion_parameters()} == {
        id(p) for n, p in fb.named_parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in fb.teachers.parameters())


def test_teachers_stay_eval_and_bn_frozen(fb):
    before = _bn_stats(fb.teachers)
    fb.train()
    assert fb.training and all(m.training for m in fb.fusion.modules())
    assert not any(m.training for m in fb.teachers.modules())
    for _ in range(3):
        fb(torch.rand(2, 3, 64, 64) * 4 - 2)
    after = _bn_stats(fb.teachers)
    assert before.keys() == after.keys() and len(before) > 0
    assert all(torch.equal(before[k], after[k]) for k in before)
    fb.eval()
    assert not fb.training and not any(m.training for m in fb.modules())


def test_gradients_reach_fusion_not_teachers(fb):
    fb.train()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    out = fb(x)
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fb.fusion_parameters())
    assert all(p.grad is None for p in fb.teachers.parameters())
    assert x.grad is None  # teachers run under no_grad: no graph through them at all


def test_as_faster_rcnn_backbone_train_step(fb):
    model = FasterRCNN(fb, num_classes=2, min_size=64, max_size=64, image_mean=MEAN,
                       image_std=STD, rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=20,
                       rpn_batch_size_per_image=16, box_batch_size_per_image=8,
                       representation_size=32)
    model.train()
    assert not any(m.training for m in fb.teachers.modules())
    teacher_w = {k: v.clone() for k, v in fb.teachers.state_dict().items()}
    fusion_w = {k: v.clone() for k, v in fb.fusion.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 20.0, 25.0, 50.0]]), "labels": torch.tensor([1])}]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    assert all(torch.equal(teacher_w[k], v) for k, v in fb.teachers.state_dict().items())
    assert any(not torch.equal(fusion_w[k], v) for k, v in fb.fusion.state_dict().items())


def test_teacher_input_math():
    x01 = torch.rand(2, 3, 4, 4)
    jm, js = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    tm, ts = [0.5, 0.5, 0.5], [0.25, 0.5, 1.0]
    ti = TeacherInput(tm, ts, MEAN, STD)
    expected = (x01 - torch.tensor(tm).view(1, 3, 1, 1)) / torch.tensor(ts).view(1, 3, 1, 1)
    assert torch.allclose(ti((x01 - jm) / js), expected, atol=1e-5)
    assert not ti.identity
    same = TeacherInput(MEAN, STD, MEAN, STD)
    assert same.identity and same(x01) is x01
    assert TeacherInput(MEAN, STD).identity
    assert "scale" not in ti.state_dict()  # from config, not checkpoints
    with pytest.raises(ValueError, match="lengths"):
        TeacherInput([0.5], [0.5, 0.5])
    with pytest.raises(ValueError, match="positive"):
        TeacherInput([0.5], [0.0])


def test_each_teacher_gets_its_normalisation(teachers):
    inputs = [None, TeacherInput([0.5] * 3, [0.5] * 3, MEAN, STD), TeacherInput(MEAN, STD, MEAN, STD)]
    fb = FusionBackbone(copy.deepcopy(teachers), out_channels=8, teacher_inputs=inputs)
    seen = {}
    for i, t in enumerate(fb.teachers):
        t.register_forward_pre_hook(lambda m, a, i=i: seen.update({i: a[0]}))
    x01 = torch.rand(1, 3, 64, 64)
    x = (x01 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    fb(x)
    assert torch.equal(seen[0], x) and torch.equal(seen[2], x)
    assert torch.allclose(seen[1], (x01 - 0.5) / 0.5, atol=1e-5)


class _Toy(Backbone):
    def __init__(self, keys, strides, ch=4):
        super().__init__()
        self.out_channels = ch
        self.conv = nn.Conv2d(3, ch, 1)
        for k, s in zip(keys, strides):
            self._out_feature_channels[k] = ch
            self._out_feature_strides[k] = s

    def forward(self, x):
        return OrderedDict((k, nn.functional.avg_pool2d(self.conv(x), s))
                           for k, s in self._out_feature_strides.items())


def test_teacher_key_and_stride_mismatch():
    with pytest.raises(ValueError, match=r"teacher 1 has output keys \['a', 'c'\]"):
        FusionBackbone([_Toy("ab", [2, 4]), _Toy("ac", [2, 4])])
    with pytest.raises(ValueError, match="teacher 2 has strides"):
        FusionBackbone([_Toy("ab", [2, 4]), _Toy("ab", [2, 4]), _Toy("ab", [2, 8])])
    with pytest.raises(ValueError, match="at least one"):
        FusionBackbone([])
    fb = FusionBackbone([_Toy("ab", [2, 4], ch=4), _Toy("ab", [2, 4], ch=6)], "cross_attention",
                        out_channels=4)
    assert fb.fusion["a"].in_channels == [4, 6]
    assert fb(torch.randn(1, 3, 8, 8))["b"].shape == (1, 4, 2, 2)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    torch.manual_seed(1)
    det = FasterRCNN(build_backbone(_cfg(), "resnet18_fpn"), num_classes=2)
    path = tmp_path_factory.mktemp("ckpt") / "teacher_r18.pth"
    torch.save({"model": det.state_dict(), "iteration": 3}, path)
    return path, det


def test_load_teacher_backbone(teacher_ckpt):
    path, det = teacher_ckpt
    bb = load_teacher_backbone(build_backbone(_cfg(), "resnet18_fpn"), str(path))
    ref = det.backbone.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in bb.state_dict().items())


def test_load_teacher_backbone_mismatches(teacher_ckpt, tmp_path):
    path, det = teacher_ckpt
    with pytest.raises(CheckpointError, match=r"teacher_r18\.pth.*missing.*layer1\.2"):
        load_teacher_backbone(build_backbone(_cfg(), "resnet34_fpn"), str(path))
    with pytest.raises(CheckpointError, match=r"teacher_r18\.pth.*shape mismatch.*fpn\.inner_blocks"):
        load_teacher_backbone(build_backbone(_cfg(fpn=8), "resnet18_fpn"), str(path))
    sd = det.state_dict()
    sd["backbone.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "extra.pth"
    torch.save({"model": sd}, bad)
    with pytest.raises(CheckpointError, match=r"extra\.pth.*unexpected.*backbone\.extra\.weight"):
        load_teacher_backbone(build_backbone(_cfg(), "resnet18_fpn"), str(bad))
    with pytest.raises(CheckpointError, match="not found: .*nothere.pth"):
        load_teacher_backbone(build_backbone(_cfg(), "resnet18_fpn"), str(tmp_path / "nothere.pth"))
    torch.save({"model": {"rpn.x": torch.zeros(1)}}, tmp_path / "nobb.pth")
    with pytest.raises(CheckpointError, match="nobb.pth.*no keys starting with 'backbone.'"):
        load_teacher_backbone(build_backbone(_cfg(), "resnet18_fpn"), str(tmp_path / "nobb.pth"))


def test_builder_from_cfg(teacher_ckpt):
    path, det = teacher_ckpt
    cfg = _cfg()
    cfg.FUSION = CN()
    cfg.FUSION.OP = "concat1x1"
    cfg.FUSION.OUT_CHANNELS = 8
    cfg.FUSION.TEACHERS = [str(path), ""]
    cfg.FUSION.TEACHER_BACKBONES = ["resnet18_fpn"]
    cfg.FUSION.TEACHER_PIXEL_MEAN = [[0.5, 0.5, 0.5]]
    cfg.FUSION.TEACHER_PIXEL_STD = []
    fb = build_backbone(cfg, "fusion")
    assert isinstance(fb, FusionBackbone) and fb.num_teachers == 2 and fb.out_channels == 8
    ref = det.backbone.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in fb.teachers[0].state_dict().items())
    ti = fb.teacher_inputs[1]
    assert torch.allclose(ti.scale.flatten(), torch.ones(3)) and not ti.identity
    cfg.FUSION.TEACHER_BACKBONES = []
    with pytest.raises(ConfigError, match="TEACHER_BACKBONES"):
        build_backbone(cfg, "fusion")
    cfg.FUSION.TEACHER_BACKBONES = ["resnet18_fpn"] * 3
    with pytest.raises(ConfigError, match="FUSION.TEACHERS has 2 entries for 3"):
        build_backbone(cfg, "fusion")
