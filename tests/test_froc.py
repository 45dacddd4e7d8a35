"""Tests of mdkd_det.evaluation.froc against hand-computed FROC curves."""

import math

import numpy as np
import pytest

from mdkd_det.evaluation.froc import froc, froc_key

RATES = (0.125, 0.25, 0.5, 1, 2, 4, 8)


def _case():
    """Three images, three GT boxes, seven detections (see the hand computation below)."""
    gt = [
        np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float),  # image A: g1, g2
        np.array([[0, 0, 10, 10]], float),  # image B: g3
        np.zeros((0, 4)),  # image C: no lesion
    ]
    det = [
        np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [21, 21, 31, 31]], float),  # d1 d2 d3 d6
        np.array([[4, 0, 14, 10], [0, 0, 10, 10]], float),  # d4 d7
        np.array([[0, 0, 5, 5]], float),  # d5
    ]
    sc = [np.array([0.9, 0.8, 0.7, 0.4]), np.array([0.6, 0.3]), np.array([0.5])]
    return gt, det, sc


def test_hand_computed_iou():
    # IoU hits (threshold 0.5), detections in score order:
    #  d1 .9 A [0,0,10,10]   IoU(g1)=1                               -> TP (g1)
    #  d2 .8 A [1,1,11,11]   IoU(g1)=81/119=0.68, g1 already hit     -> ignored
    #  d3 .7 A [50,50,60,60] no overlap                              -> FP
    #  d4 .6 B [4,0,14,10]   IoU(g3)=60/140=0.43 < 0.5               -> FP
    #  d5 .5 C [0,0,5,5]     image without GT                        -> FP
    #  d6 .4 A [21,21,31,31] IoU(g2)=0.68                            -> TP (g2)
    #  d7 .3 B [0,0,10,10]   IoU(g3)=1, g3 not yet hit               -> TP (g3)
    # cumulative (TP, FP): (1,0) (1,0) (1,1) (1,2) (1,3) (2,3) (3,3); 3 images, 3 GT
    # operating points (FP/img, sens): (0,0) (0,1/3) (1/3,1/3) (2/3,1/3) (1,1/3) (1,2/3) (1,1)
    # sens@0.125 = sens@0.25 = sens@0.5 = 1/3 (only FP=0 allowed: 0.5 img*3 = 1.5 -> FP<=1 -> still 1/3)
    # sens@1 = sens@2 = sens@4 = sens@8 = 1
    # CPM = (3 * 1/3 + 4 * 1) / 7 = 5/7
    r = froc(*_case(), fps_per_image=RATES, hit="iou", iou_thresh=0.5)
    expected = [1 / 3, 1 / 3, 1 / 3, 1, 1, 1, 1]
    for rate, e in zip(RATES, expected):
        assert r[froc_key(rate)] == pytest.approx(e), rate
    assert r["CPM"] == pytest.approx(5 / 7)
    assert (r["num_images"], r["num_gt"], r["num_tp"], r["num_fp"]) == (3, 3, 3, 3)
    assert set(r) >= {"sens@0.125", "sens@0.25", "sens@0.5", "sens@1", "sens@2", "sens@4", "sens@8", "CPM"}


def test_hand_computed_center():
    # centre-inside hits (borders included):
    #  d1 .9 centre (5,5) in g1                 -> TP (g1)
    #  d2 .8 centre (6,6) in g1, already hit    -> ignored
    #  d3 .7 centre (55,55) in nothing          -> FP
    #  d4 .6 centre (9,5) in g3                 -> TP (g3)   (was an FP with IoU hits)
    #  d5 .5 image C has no GT                  -> FP
    #  d6 .4 centre (26,26) in g2               -> TP (g2)
    #  d7 .3 centre (5,5) in g3, already hit    -> ignored   (was a TP with IoU hits)
    # cumulative (TP, FP): (1,0) (1,0) (1,1) (2,1) (2,2) (3,2) (3,2)
    # sens@0.125, sens@0.25: FP <= 0.375/0.75 -> FP = 0 -> 1/3
    # sens@0.5: FP <= 1.5 -> FP = 1 -> best sens 2/3 (after d4)
    # sens@1..8: FP <= 3 -> 1
    # CPM = (1/3 + 1/3 + 2/3 + 4) / 7 = 16/21
    r = froc(*_case(), fps_per_image=RATES, hit="center")
    expected = [1 / 3, 1 / 3, 2 / 3, 1, 1, 1, 1]
    for rate, e in zip(RATES, expected):
        assert r[froc_key(rate)] == pytest.approx(e), rate
    assert r["CPM"] == pytest.approx(16 / 21)
    assert (r["num_tp"], r["num_fp"]) == (3, 2)


def test_tied_scores_enter_together():
    # image 1: GT + TP at score .5; image 2: no GT, FP at the same score .5. Thresholds are
    # scores, so both enter at once: operating points (0,0) and (FP/img 0.5, sens 1).
    # sens@0.25 must be 0 whatever the input order, sens@0.5 = 1.
    gt = [np.array([[0, 0, 10, 10]], float), np.zeros((0, 4))]
    for order in (0, 1):
        det = [np.array([[0, 0, 10, 10]], float), np.array([[30, 30, 40, 40]], float)]
        sc = [np.array([0.5]), np.array([0.5])]
        if order:
            gt, det, sc = gt[::-1], det[::-1], sc[::-1]
        r = froc(gt, det, sc, fps_per_image=(0.25, 0.5))
        assert r["sens@0.25"] == 0.0
        assert r["sens@0.5"] == 1.0


def test_detection_claims_best_unhit_gt():
    # a=[0,0,10,10], b=[3,0,13,10]. d1 [2,0,12,10] s.9 hits a (IoU 80/120=.67) and b (90/110=.82)
    # -> claims b (higher IoU). d2 [0,0,9,10] s.8 hits only a (IoU .9; with b 60/130=.46) -> TP.
    # Claiming the first hit box instead would leave d2 ignored and sensitivity 0.5.
    gt = [np.array([[0, 0, 10, 10], [3, 0, 13, 10]], float)]
    det = [np.array([[2, 0, 12, 10], [0, 0, 9, 10]], float)]
    r = froc(gt, det, [np.array([0.9, 0.8])], fps_per_image=(1,))
    assert r["sens@1"] == 1.0 and r["num_fp"] == 0


def test_no_gt_gives_nan():
    r = froc([np.zeros((0, 4))] * 2, [np.array([[0, 0, 5, 5]], float)] * 2, [np.array([0.5])] * 2)
    assert all(math.isnan(r[froc_key(x)]) for x in RATES) and math.isnan(r["CPM"])
    assert r["num_fp"] == 2
    r = froc([], [], [])
    assert math.isnan(r["CPM"]) and r["num_images"] == 0


def test_no_detections_gives_zero():
    gt = [np.array([[0, 0, 10, 10]], float), np.zeros((0, 4))]
    r = froc(gt, [np.zeros((0, 4)), []], [np.zeros(0), []])
    assert all(r[froc_key(x)] == 0.0 for x in RATES) and r["CPM"] == 0.0


def test_bad_input_raises():
    gt = [np.array([[0, 0, 10, 10]], float)]
    with pytest.raises(ValueError, match="one entry per image"):
        froc(gt, [], [])
    with pytest.raises(ValueError, match="hit"):
        froc(gt, [np.zeros((0, 4))], [np.zeros(0)], hit="centre-ish")
    with pytest.raises(ValueError, match="scores"):
        froc(gt, [np.zeros((2, 4))], [np.zeros(1)])
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        froc([np.zeros((1, 3))], [np.zeros((0, 4))], [np.zeros(0)])


def test_hand_computed_per_scan():
    # the case of test_hand_computed_iou with images A and B in scan s1, C in scan s2 (2 scans):
    # operating points (FP, sens) (0,0) (0,1/3) (1,1/3) (2,1/3) (3,1/3) (3,2/3) (3,1)
    # FP/scan = FP/2: 0, 0, .5, 1, 1.5, 1.5, 1.5
    # sens@0.125 = sens@0.25 = sens@0.5 = sens@1 = 1/3; sens@2 = sens@4 = sens@8 = 1
    # CPM = (4 * 1/3 + 3 * 1) / 7 = 13/21 (per image it is 5/7: sens@1 = 1 there)
    r = froc(*_case(), fps_per_image=RATES, hit="iou", iou_thresh=0.5, scan_ids=["s1", "s1", "s2"])
    expected = [1 / 3, 1 / 3, 1 / 3, 1 / 3, 1, 1, 1]
    for rate, e in zip(RATES, expected):
        assert r[froc_key(rate)] == pytest.approx(e), rate
    assert r["CPM"] == pytest.approx(13 / 21)
    assert (r["num_images"], r["num_scans"], r["num_gt"], r["num_tp"], r["num_fp"]) == (3, 2, 3, 3, 3)
    # one scan per image is the per-image FROC
    per_image = froc(*_case(), fps_per_image=RATES, scan_ids=["a", "b", "c"])
    assert per_image["CPM"] == pytest.approx(5 / 7)
    with pytest.raises(ValueError, match="scan_ids needs one entry per image"):
        froc(*_case(), scan_ids=["s1"])
