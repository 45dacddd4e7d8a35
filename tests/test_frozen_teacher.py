"""Frozen-teacher runtime switches (FROZEN_TEACHER.*): each leaves the teacher's outputs
unchanged (bitwise, to fp32 rounding, or within the stated bf16 tolerance); issue 11."""

import copy

import pytest
import torch
from torch import nn

from mdkd_det.config import get_cfg
from mdkd_det.distill.adapters import TorchvisionFasterRCNNAdapter
from mdkd_det.distill.distiller import freeze_teacher
from mdkd_det.distill.taps import TapRecorder
from mdkd_det.distill.trainer import build_distiller
from mdkd_det.engine.defaults import build_model
from mdkd_det.modeling.backbone import build_backbone
from mdkd_det.modeling.frozen_teacher import TeacherRuntime, conv_bn_pairs, fold_batchnorm
from mdkd_det.modeling.fusion import FusionBackbone

from _tiny import tiny_cfg

#: fp32 reassociation (BN folding, NHWC kernels): max |a - b| / max |b| per map.
FP32_TOL = 1e-5
#: bf16 autocast (8-bit mantissa through ~20 convs): measured 1.1e-2 on ResNet-18-FPN.
BF16_TOL = 5e-2


def _backbone(seed=0):
    """ResNet-18-FPN (16 channels) in eval mode with non-trivial BatchNorm statistics."""
    cfg = get_cfg()
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    torch.manual_seed(seed)
    bb = build_backbone(cfg, "resnet18_fpn").eval()
    for m in bb.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return bb


def _rel_err(a, b):
    return max(((a[k].float() - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def test_fold_bn_folds_every_resnet18_pair_and_keeps_outputs():
    bb = _backbone()
    with torch.no_grad():
        ref = bb(X)
    # ResNet-18: stem 1 + 8 basic blocks x 2 + 3 downsample convs = 20 conv->BN pairs
    assert len(conv_bn_pairs(bb)) == 20
    assert fold_batchnorm(bb) == 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.modules())
    assert conv_bn_pairs(bb) == []
    with torch.no_grad():
        out = bb(X)
    assert _rel_err(out, ref) < FP32_TOL


def test_fold_bn_recurses_into_untraceable_models(tmp_path):
    # a whole torchvision FasterRCNN does not fx-trace; its backbone's pairs are still found
    model = freeze_teacher(build_model(tiny_cfg(tmp_path)))
    pairs = conv_bn_pairs(model)
    assert len(pairs) == 20 and all(p[0].startswith("backbone.") for p in pairs)


def test_fold_bn_leaves_training_bn_alone():
    bb = _backbone().train()
    assert fold_batchnorm(bb) == 0


@pytest.mark.parametrize("rt,tol", [
    (TeacherRuntime(channels_last=True), FP32_TOL),
    (TeacherRuntime(fold_bn=True, channels_last=True), FP32_TOL),
    (TeacherRuntime(inference_mode=True), 0.0),
    (TeacherRuntime(fold_bn=True, channels_last=True, inference_mode=True, bf16=True), BF16_TOL),
])
def test_runtime_outputs_match_plain_no_grad(rt, tol):
    bb = _backbone()
    with torch.no_grad():
        ref = bb(X)
    fast = rt.prepare(copy.deepcopy(bb))
    with rt.context():
        out = fast(rt.input(X))
    out = rt.release(out)
    assert all(v.dtype == torch.float32 and not v.is_inference() for v in out.values())
    if tol == 0.0:
        assert all(torch.equal(out[k], ref[k]) for k in ref)
    else:
        assert _rel_err(out, ref) < tol


def test_released_inference_tensors_can_be_saved_for_backward():
    rt = TeacherRuntime(inference_mode=True)
    bb = _backbone()
    with rt.context():
        t = bb(X)["0"]
    w = nn.Parameter(torch.ones(1))
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        torch.nn.functional.mse_loss(w * t, t).backward()  # mse saves the target
    t = rt.release(t)
    torch.nn.functional.mse_loss(w * t, t.detach() + 1).backward()
    assert w.grad is not None


def test_fusion_backbone_runtime_same_output_same_state_dict_and_follows_loads():
    teachers = [_backbone(seed=i) for i in range(3)]
    torch.manual_seed(0)
    plain = FusionBackbone(copy.deepcopy(teachers), "concat1x1", out_channels=8)
    rt = TeacherRuntime(fold_bn=True, channels_last=True, inference_mode=True)
    fast = FusionBackbone(copy.deepcopy(teachers), "concat1x1", out_channels=8, runtime=rt)
    fast.load_state_dict(plain.state_dict())
    assert list(fast.state_dict()) == list(plain.state_dict())  # BN layers kept in the tree
    ref, out = plain(X), fast(X)
    assert _rel_err(out, ref) < FP32_TOL
    assert list(fast.state_dict()) == list(plain.state_dict())  # folding used a private copy
    # the trainable fusion ops back-propagate through released teacher maps
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None for p in fast.fusion_parameters())
    # new weights loaded after the first forward are used (the prepared copy is rebuilt)
    other = FusionBackbone([_backbone(seed=7) for _ in range(3)], "concat1x1", out_channels=8)
    sd = plain.state_dict()
    sd.update({k: v for k, v in other.state_dict().items() if k.startswith("teachers.")})
    plain.load_state_dict(sd)
    fast.load_state_dict(sd)
    assert _rel_err(fast(X), plain(X)) < FP32_TOL


def test_build_fusion_backbone_reads_frozen_teacher_config():
    cfg = get_cfg()
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.FUSION.TEACHER_BACKBONES = ("resnet18_fpn",)
    cfg.FUSION.OUT_CHANNELS = 8
    from mdkd_det.modeling.fusion import build_fusion_backbone

    fb = build_fusion_backbone(cfg)  # defaults: only the bitwise-exact switch is on
    assert fb.runtime == TeacherRuntime(fold_bn=False, channels_last=False, inference_mode=True,
                                        bf16=False)
    cfg.FROZEN_TEACHER.FOLD_BN = True
    assert build_fusion_backbone(cfg).runtime.fold_bn is True


@pytest.mark.parametrize("native", [True, False])
def test_bf16_switch_runs_only_where_the_cpu_has_native_bf16(monkeypatch, caplog, native):
    """FROZEN_TEACHER.BF16 on an AVX2-only CPU (emulated bf16, 6x slower there) falls back to
    fp32 with one warning (D11.1); with native bf16 it is kept."""
    import mdkd_det.modeling.frozen_teacher as ft

    monkeypatch.setattr(ft, "cpu_has_native_bf16", lambda: native)
    ft._warn_no_native_bf16.cache_clear()
    cfg = get_cfg()
    cfg.FROZEN_TEACHER.BF16 = True
    with caplog.at_level("WARNING", logger=ft.__name__):
        assert TeacherRuntime.from_config(cfg).bf16 is native
        TeacherRuntime.from_config(cfg)
    assert sum("FROZEN_TEACHER.BF16 ignored" in r.message for r in caplog.records) == (0 if native else 1)
    cfg.FROZEN_TEACHER.BF16 = False
    assert TeacherRuntime.from_config(cfg).bf16 is False


def test_kd_teacher_inputs_unchanged_by_runtime(tmp_path):
    cfg = tiny_cfg(tmp_path / "s")
    tcfg = tiny_cfg(tmp_path / "t", **{"MODEL.FPN.OUT_CHANNELS": 64})
    torch.manual_seed(0)
    student, teacher = build_model(cfg), freeze_teacher(build_model(tcfg))
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    off = cfg.clone()
    off.merge_from_list(["FROZEN_TEACHER.FOLD_BN", False, "FROZEN_TEACHER.CHANNELS_LAST", False,
                         "FROZEN_TEACHER.INFERENCE_MODE", False])
    d_off = build_distiller(off, student, copy.deepcopy(teacher))
    on = cfg.clone()
    on.merge_from_list(["FROZEN_TEACHER.FOLD_BN", True, "FROZEN_TEACHER.CHANNELS_LAST", True,
                        "FROZEN_TEACHER.INFERENCE_MODE", True])
    d_on = build_distiller(on, student, teacher)  # fold + channels_last + inference mode
    assert not any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    student.train()
    g = torch.Generator().manual_seed(1)
    imgs = [torch.rand(3, 96, 96, generator=g) for _ in range(2)]
    tg = [{"boxes": torch.tensor([[20.0, 24.0, 44.0, 50.0]]), "labels": torch.tensor([1])}] * 2
    with TapRecorder(student, TorchvisionFasterRCNNAdapter().student_taps()) as rec:
        student(imgs, tg)
    a, b = d_off.teacher_inputs(rec), d_on.teacher_inputs(rec)
    assert _rel_err(b.features, a.features) < FP32_TOL
    for name in ("region_embeddings", "region_logits"):
        x, y = getattr(b, name), getattr(a, name)
        assert not x.is_inference() and ((x - y).abs().max() / y.abs().max()).item() < FP32_TOL
    # the KD terms back-propagate into the student from the released teacher tensors
    s_in = d_on.adapter.student_inputs(rec)
    sum(d_on(s_in, b, epoch=100.0).values()).backward()
    assert any(p.grad is not None for p in student.backbone.parameters())


def test_freeze_teacher_is_the_one_freezing_mechanism():
    """``freeze_teacher`` (issue 14): no grads, eval, and neither a direct ``train()`` nor a
    parent's flips it back; the class name, state_dict and a deepcopy are unaffected."""
    from mdkd_det.modeling.frozen_teacher import KeepsTeachersFrozen, is_frozen

    t = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    keys = list(t.state_dict())
    assert freeze_teacher(t) is t and is_frozen(t) and isinstance(t, KeepsTeachersFrozen)
    assert type(t).__name__ == "Sequential" and isinstance(t, nn.Sequential)
    assert not any(p.requires_grad for p in t.parameters())
    t.train()
    assert not any(m.training for m in t.modules())
    parent = nn.Sequential(t, nn.BatchNorm2d(4)).train()
    assert parent.training and parent[1].training and not any(m.training for m in t.modules())
    c = copy.deepcopy(t).train()
    assert is_frozen(c) and not any(m.training for m in c.modules())
    assert list(t.state_dict()) == keys and type(freeze_teacher(t)) is type(t)  # idempotent
