"""DiceBCE (paper Eq. 10) and HD95 / IoU / DSC / precision / recall against hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from mdkd_det.evaluation.seg_metrics import SegEvaluator, hd95, patch_metrics
from mdkd_det.modeling.seg.losses import bce_loss, dice_loss, seg_task_losses

BIG = 30.0  # sigmoid(30) = 1 - 9.4e-14


def test_dice_bce_hand_computed():
    # p = [0.5, 0.5, 1, 0], y = [1, 0, 1, 0]
    logits = torch.tensor([0.0, 0.0, BIG, -BIG]).view(1, 1, 2, 2)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 2, 2)
    # Dice: 1 - (2 * (0.5 + 1) + 1) / ((0.5 + 0.5 + 1) + 2 + 1) = 1 - 4/5
    assert float(dice_loss(logits, y, smooth=1.0)) == pytest.approx(0.2, abs=1e-6)
    # Dice without smoothing: 1 - 3/4
    assert float(dice_loss(logits, y, smooth=0.0)) == pytest.approx(0.25, abs=1e-6)
    # BCE: mean of [-log .5, -log .5, ~0, ~0]
    assert float(bce_loss(logits, y)) == pytest.approx(2 * math.log(2) / 4, abs=1e-6)
    d = seg_task_losses(logits, y, "dice_bce")
    assert set(d) == {"loss_dice", "loss_bce"}
    assert float(sum(d.values())) == pytest.approx(0.2 + math.log(2) / 2, abs=1e-6)
    assert set(seg_task_losses(logits, y, "dice")) == {"loss_dice"}
    with pytest.raises(ValueError, match="MODEL.SEG.LOSS"):
        seg_task_losses(logits, y, "focal")
    with pytest.raises(ValueError, match="same shape"):
        dice_loss(logits, y.view(1, 1, 4, 1))


def test_dice_bce_gradient_and_batch_flattening():
    logits = torch.zeros(2, 1, 4, 4, requires_grad=True)
    y = torch.zeros(2, 1, 4, 4)
    y[0, 0, :2, :2] = 1  # second image empty: flattening over the batch keeps Dice defined
    loss = dice_loss(logits, y) + bce_loss(logits, y)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # p = 0.5 everywhere: 1 - (2 * 0.5 * 4 + 1) / (16 + 4 + 1)
    assert float(dice_loss(logits, y)) == pytest.approx(1 - 5 / 21, abs=1e-6)


def _reference_dice_bce(logits, y, smooth):
    """The hand-written formula the MONAI calls replaced (paper Eq. 1 / Eq. 10, batch-flattened)."""
    p = torch.sigmoid(logits.float()).reshape(-1)
    t = y.float().reshape(-1)
    dice = 1.0 - (2.0 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)
    return dice, torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), t.view_as(logits))


@pytest.mark.parametrize("smooth", [1.0, 0.5, 0.0])
def test_monai_dice_bce_equals_the_formula(smooth):
    """MONAI's DiceCELoss(sigmoid=True, batch=True) parts equal Eq. 1 / Eq. 10 written out: BCE
    bitwise, Dice up to float32 rounding (MONAI sums tp, fp, fn: at most ~1 ulp apart)."""
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(0)
    for b, h, w in [(1, 4, 4), (2, 17, 23), (4, 64, 48)]:
        logits = torch.randn(b, 1, h, w, generator=g) * 3
        y = (torch.rand(b, 1, h, w, generator=g) < 0.3).float()
        y[0, 0, 0, 0] = 1.0  # smooth=0 needs a positive pixel
        ref_dice, ref_bce = _reference_dice_bce(logits, y, smooth)
        d = seg_task_losses(logits, y, "dice_bce", smooth)
        torch.testing.assert_close(d["loss_dice"], ref_dice, rtol=0, atol=2e-7)
        assert torch.equal(d["loss_bce"], ref_bce)
        total = DiceCELoss(sigmoid=True, batch=True, smooth_nr=smooth, smooth_dr=smooth)(logits, y)
        assert torch.equal(d["loss_dice"] + d["loss_bce"], total)
        # integer masks and a bf16 prediction are computed in float32, as before
        assert torch.equal(dice_loss(logits, y.long(), smooth), d["loss_dice"])
        assert dice_loss(logits.bfloat16(), y, smooth).dtype == torch.float32


def _square(n, y0, x0, side):
    m = np.zeros((n, n), bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


def test_hd95_hand_computed():
    gt = _square(20, 5, 5, 5)
    # the same square moved down by 2 px: every boundary point is 0 or 2 px away; the 95th
    # percentile of the symmetric distances is 2
    assert hd95(_square(20, 7, 5, 5), gt) == pytest.approx(2.0)
    assert hd95(gt, gt) == pytest.approx(0.0)
    # single pixels 3 px apart
    a, b = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    a[2, 2], b[2, 5] = True, True
    assert hd95(a, b) == pytest.approx(3.0)
    # empty prediction -> patch diagonal (A19); both empty -> 0
    assert hd95(np.zeros_like(gt), gt) == pytest.approx(math.hypot(20, 20))
    assert hd95(np.zeros_like(gt), np.zeros_like(gt)) == 0.0


def test_patch_metrics_hand_computed():
    gt = np.zeros((8, 8), bool)
    gt[2:4, 2:6] = True          # 8 px
    pred = np.zeros((8, 8), bool)
    pred[2:4, 2:4] = True        # 4 px, all inside
    m = patch_metrics(pred, gt)
    assert (m["tp"], m["fp"], m["fn"]) == (4, 0, 4)
    assert m["IoU"] == pytest.approx(50.0)
    assert m["DSC"] == pytest.approx(100 * 8 / 12)
    assert m["precision"] == pytest.approx(100.0)
    assert m["recall"] == pytest.approx(50.0)
    assert m["HD95"] == pytest.approx(2.0)
    miss = patch_metrics(np.zeros_like(gt), gt)
    assert (miss["IoU"], miss["DSC"], miss["precision"], miss["recall"]) == (0.0, 0.0, 0.0, 0.0)
    assert miss["HD95"] == pytest.approx(math.hypot(8, 8))


def test_seg_evaluator_aggregates_over_foreground_patches(tmp_path):
    gt = {"a": _square(8, 2, 2, 4), "b": np.zeros((8, 8), bool)}
    ev = SegEvaluator(lambda r: gt[r["image_id"]], threshold=0.5, output_dir=str(tmp_path))
    ev.reset()
    perfect = torch.from_numpy(gt["a"].astype(np.float32))[None]
    fp_only = torch.zeros(1, 8, 8)
    fp_only[0, 0, 0] = 0.9
    ev.process([{"image_id": "a"}, {"image_id": "b"}], [{"sem_seg": perfect}, {"sem_seg": fp_only}])
    r = ev.evaluate()["sem_seg"]
    # means over the one patch with foreground; the empty-GT patch is counted separately
    assert r["DSC"] == pytest.approx(100.0) and r["HD95"] == pytest.approx(0.0)
    assert (r["fg_patches"], r["empty_gt_patches"], r["empty_gt_fp_rate"]) == (1, 1, 100.0)
    assert r["DSC_global"] == pytest.approx(100 * 32 / 33)
    assert (tmp_path / "seg_metrics.json").is_file()
