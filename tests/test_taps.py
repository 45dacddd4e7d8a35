"""Tests for mdkd_det.distill.taps on a real (small) torchvision Faster R-CNN (A10, eng. notes §5)."""

import pytest
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads

from mdkd_det.config import get_cfg
from mdkd_det.distill.taps import (MethodTap, Tap, TapRecorder, register_detector_taps,
                                   resolve_tap, teacher_roi_outputs)
from mdkd_det.modeling.backbone import build_backbone

ROI_BATCH = 16
FPN_CH = 32


def _detector(seed):
    torch.manual_seed(seed)
    cfg = get_cfg()
    cfg.MODEL.FPN.OUT_CHANNELS = FPN_CH
    return FasterRCNN(build_backbone(cfg, "resnet18_fpn"), num_classes=2, min_size=128,
                      max_size=128, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                      rpn_batch_size_per_image=32, box_batch_size_per_image=ROI_BATCH)


@pytest.fixture(scope="module")
def model():
    return _detector(0).train()


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 128, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[60.0, 50.0, 90.0, 100.0], [5.0, 5.0, 20.0, 25.0]]),
                "labels": torch.tensor([1, 1])}]
    return images, targets


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def recorded(model):
    images, targets = _batch()
    before = _hook_count(model)
    rec = TapRecorder(model, register_detector_taps("torchvision_faster_rcnn"))
    assert _hook_count(model) == before  # nothing registered until entered
    with rec:
        assert _hook_count(model) == before + 4
        assert "select_training_samples" in model.roi_heads.__dict__
        losses = model(images, targets)
    return rec, losses, before


def test_capture_shapes(recorded):
    rec, losses, _ = recorded
    assert set(rec.records) == {"images", "features", "sampled", "box_features", "box_predictor"}
    image_list, _ = rec["images"]
    assert isinstance(image_list, ImageList) and image_list.tensors.shape == (2, 3, 128, 128)
    feats = rec["features"]
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape) for f in feats.values()] == [
        (2, FPN_CH, s, s) for s in (32, 16, 8, 4, 2)]
    proposals, matched_idxs, labels, reg_targets = rec["sampled"]
    assert [p.shape for p in proposals] == [(ROI_BATCH, 4)] * 2
    assert [len(lab) for lab in labels] == [ROI_BATCH] * 2
    m = sum(len(p) for p in proposals)
    assert rec["box_features"].shape == (m, 1024)
    logits, deltas = rec["box_predictor"]
    assert logits.shape == (m, 2) and deltas.shape == (m, 8)
    assert rec["box_features"].requires_grad  # student taps keep the graph for KD losses
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def test_cleanup_after_exit(model, recorded):
    rec, _, before = recorded
    assert _hook_count(model) == before
    assert "select_training_samples" not in model.roi_heads.__dict__
    assert model.roi_heads.select_training_samples.__func__ is RoIHeads.select_training_samples
    n = len(rec.records)
    images, targets = _batch()
    kept = rec["box_features"]
    model(images, targets)  # a forward outside the context records nothing
    assert rec["box_features"] is kept and len(rec.records) == n


def test_cleanup_when_forward_raises(model):
    before = _hook_count(model)
    with pytest.raises(Exception):
        with TapRecorder(model, register_detector_taps("torchvision_faster_rcnn")):
            model([torch.rand(3, 128, 128)], [{"boxes": torch.zeros(1, 3), "labels": torch.ones(1)}])
    assert _hook_count(model) == before
    assert "select_training_samples" not in model.roi_heads.__dict__


def test_existing_instance_attribute_restored(model):
    original = model.roi_heads.select_training_samples
    calls = []

    def custom(*a, **k):
        calls.append(1)
        return original(*a, **k)

    model.roi_heads.select_training_samples = custom
    try:
        images, targets = _batch()
        with TapRecorder(model, {"s": "roi_heads.select_training_samples"}) as rec:
            model(images, targets)
        assert calls == [1] and len(rec["s"][0]) == 2
        assert model.roi_heads.__dict__["select_training_samples"] is custom
    finally:
        del model.roi_heads.select_training_samples
    assert "select_training_samples" not in model.roi_heads.__dict__


def test_resolve_and_errors(model):
    assert isinstance(resolve_tap(model, "roi_heads.box_head"), Tap)
    assert isinstance(resolve_tap(model, "roi_heads.select_training_samples"), MethodTap)
    with pytest.raises(KeyError, match="roi_heads.box_head"):
        TapRecorder(model, {"x": "roi_heads.box_hed"})
    with pytest.raises(ValueError, match="what must be"):
        TapRecorder(model, {"x": Tap("backbone", what="outptu")})
    with pytest.raises(KeyError, match="no tap preset.*torchvision_faster_rcnn"):
        register_detector_taps("yolo")
    rec = TapRecorder(model, {"x": "backbone"})
    with rec:
        with pytest.raises(RuntimeError, match="already active"):
            rec.__enter__()


def test_input_many_and_eval_mode(model):
    taps = {"pool_in": Tap("roi_heads.box_roi_pool", what="inputs"),
            "bb_in": Tap("backbone", what="input", many=True),
            "n": Tap("roi_heads.box_head", what=lambda m, a, k, o: o.shape[0]),
            "sampled": MethodTap("roi_heads.select_training_samples")}
    model.eval()
    try:
        with TapRecorder(model, taps) as rec, torch.no_grad():
            model([torch.rand(3, 128, 128)])
            model([torch.rand(3, 128, 128)])
    finally:
        model.train()
    (feats, boxes, image_shapes), kwargs = rec["pool_in"]
    assert list(feats) == ["0", "1", "2", "3", "pool"] and image_shapes == [(128, 128)]
    assert len(rec["bb_in"]) == 2 and rec["bb_in"][0].shape == (1, 3, 128, 128)
    assert rec["n"] == boxes[0].shape[0]
    with pytest.raises(KeyError, match="did not fire"):
        rec["sampled"]  # eval mode does not sample training RoIs


def test_teacher_roi_outputs(model, recorded):
    rec, _, _ = recorded
    image_list, _ = rec["images"]
    proposals = rec["sampled"][0]
    # Same model as "teacher": outputs must equal what the student produced on its RoIs.
    emb, logits = teacher_roi_outputs(model, rec["features"], proposals, image_list.image_sizes)
    assert torch.allclose(emb, rec["box_features"], atol=1e-5)
    assert torch.allclose(logits, rec["box_predictor"][0], atol=1e-5)
    # A different teacher, fed the student's transformed batch.
    teacher = _detector(1).eval()
    with torch.no_grad():
        t_feats = teacher.backbone(image_list.tensors)
    emb, logits = teacher_roi_outputs(teacher, t_feats, proposals, image_list.image_sizes)
    assert emb.shape == rec["box_features"].shape and logits.shape == rec["box_predictor"][0].shape
    assert not emb.requires_grad and not logits.requires_grad
    assert not torch.allclose(emb, rec["box_features"])
    # Usable in a differentiable KD loss against the student's taps (ROIKD-style MSE).
    s = rec["box_features"]
    torch.nn.functional.mse_loss(s, emb).backward()
    assert model.roi_heads.box_head.fc6.weight.grad is not None
