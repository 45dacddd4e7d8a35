"""Tests for mdkd_det.distill.losses: hand-computed cases (plain Python math), degenerate inputs,
gradient flow (student yes, teacher no)."""

import math
import warnings
from collections import OrderedDict

import pytest
import torch

from mdkd_det.distill import losses
from mdkd_det.distill.losses import att, cls_kd, con, cos_sim, falgn, kld, roi_kd

ALL_FEATURE_LOSSES = [con, falgn, cos_sim, att]


def _t(x):
    return torch.tensor(x, dtype=torch.float32)


def _kl(p, q):
    """Plain-Python KL(p || q) of two probability lists."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


@pytest.fixture(autouse=True)
def _reset_warn_once(monkeypatch):
    monkeypatch.setattr(losses, "_WARNED", set())


# ------------------------------------------------------------------------------------ con
def test_con_hand_example_vectors():
    # student rows e1, e2 -> S = I ; teacher rows e1, e1 -> T = all ones.  T = 2:
    # P_s[0] = softmax([1/2, 0]) = [e^.5/(e^.5+1), 1/(e^.5+1)], P_s[1] mirrored,
    # P_t rows = [1/2, 1/2]  ->  loss = mean_i KL(P_t[i] || P_s[i]) = KL(row 0) (symmetric).
    s, t = _t([[1.0, 0.0], [0.0, 1.0]]), _t([[3.0, 0.0], [2.0, 0.0]])
    a = math.exp(0.5)
    ps0 = [a / (a + 1), 1 / (a + 1)]
    expected = 0.5 * math.log(0.5 / ps0[0]) + 0.5 * math.log(0.5 / ps0[1])
    assert con([s], [t], T=2.0).item() == pytest.approx(expected, abs=1e-6)
    # reverse direction (Eq. 11 as printed): KL(P_s || P_t)
    rev = ps0[0] * math.log(ps0[0] / 0.5) + ps0[1] * math.log(ps0[1] / 0.5)
    assert con([s], [t], T=2.0, direction="s||t").item() == pytest.approx(rev, abs=1e-6)
    assert rev != pytest.approx(expected, abs=1e-4)  # directions really differ
    # t2_scale multiplies by T^2
    assert con([s], [t], T=2.0, t2_scale=True).item() == pytest.approx(4 * expected, abs=1e-6)


def test_con_gap_of_maps_and_scale_invariance():
    # maps [B=2, C=2, 2, 2] whose GAP is e1 (image 0) and e2 (image 1): same as the vector case
    s = torch.zeros(2, 2, 2, 2)
    s[0, 0] = _t([[1.0, 3.0], [0.0, 0.0]])  # mean 1
    s[1, 1] = _t([[0.0, 0.0], [2.0, 2.0]])  # mean 1
    t = torch.zeros(2, 2, 3, 3)  # teacher spatial size may differ
    t[:, 0] = 5.0  # both teacher descriptors = 5 * e1
    a = math.exp(0.5)
    ps0 = [a / (a + 1), 1 / (a + 1)]
    expected = 0.5 * math.log(0.5 / ps0[0]) + 0.5 * math.log(0.5 / ps0[1])
    assert con(s, t, T=2.0).item() == pytest.approx(expected, abs=1e-6)
    assert con(7 * s, t, T=2.0).item() == pytest.approx(expected, abs=1e-6)


def _con_reference(zs, zt, T, mask_diag=False):
    """Plain-Python A1 construction for one level of vectors."""

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    zs, zt = [unit(v) for v in zs], [unit(v) for v in zt]
    B = len(zs)
    total = 0.0
    for i in range(B):
        js = [j for j in range(B) if not (mask_diag and j == i)]
        rs = [sum(a * b for a, b in zip(zs[i], zs[j])) / T for j in js]
        rt = [sum(a * b for a, b in zip(zt[i], zt[j])) / T for j in js]
        total += _kl(_softmax(rt), _softmax(rs))
    return total / B


def test_con_b3_levels_mask_diag_and_dict_inputs():
    zs1 = [[1.0, 2.0], [2.0, -1.0], [0.5, 0.5]]
    zt1 = [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]  # teacher C may differ
    zs2 = [[1.0, 0.0], [1.0, 1.0], [0.0, 3.0]]
    zt2 = [[2.0, 1.0], [1.0, 2.0], [-1.0, 1.0]]
    for mask in (False, True):
        expected = 0.5 * (
            _con_reference(zs1, zt1, 2.0, mask) + _con_reference(zs2, zt2, 2.0, mask)
        )
        got = con(
            OrderedDict(p3=_t(zs1), p4=_t(zs2)),
            OrderedDict(p3=_t(zt1), p4=_t(zt2)),
            T=2.0,
            mask_diag=mask,
        )
        assert got.item() == pytest.approx(expected, abs=1e-6)


def test_con_mask_diag_b2_is_zero():
    s, t = torch.randn(2, 4), torch.randn(2, 4)
    assert con([s], [t], mask_diag=True).item() == pytest.approx(0.0, abs=1e-7)


def test_con_batch1_returns_zero_and_warns_once():
    s = torch.randn(1, 4, 3, 3, requires_grad=True)
    t = torch.randn(1, 4, 3, 3)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = con([s], [t])
        con([s], [t])
    assert [w for w in rec if "batch size" in str(w.message)].__len__() == 1
    assert out.dim() == 0 and out.item() == 0.0
    out.backward()
    assert s.grad is not None and torch.all(s.grad == 0)


def test_con_bad_args():
    with pytest.raises(ValueError, match="direction"):
        con([torch.randn(2, 3)], [torch.randn(2, 3)], direction="x")
    with pytest.raises(ValueError, match="T must"):
        con([torch.randn(2, 3)], [torch.randn(2, 3)], T=0)
    with pytest.raises(ValueError, match="batch"):
        con([torch.randn(2, 3)], [torch.randn(3, 3)])
    with pytest.raises(ValueError, match="levels"):
        con([torch.randn(2, 3)], [torch.randn(2, 3), torch.randn(2, 3)])


# ------------------------------------------------------------------------------------ falgn
def test_falgn_hand_example_two_levels():
    # level 0: student [[1,2],[3,4]] vs teacher 0 -> (1+4+9+16)/4 = 7.5
    # level 1: student 2 vs teacher 0 (1x1) -> 4 ; mean over levels = 5.75 ; paper = sum = 11.5
    s = [_t([[[[1.0, 2.0], [3.0, 4.0]]]]), _t([[[[2.0]]]])]
    t = [torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 1, 1)]
    assert falgn(s, t).item() == pytest.approx(5.75)
    assert falgn(s, t, reduction="paper").item() == pytest.approx(11.5)


def test_falgn_resizes_student_to_teacher():
    # constant student 3 (1x1) resized bilinearly to 2x2 stays 3; teacher 1 -> (3-1)^2 = 4
    s = torch.full((1, 1, 1, 1), 3.0)
    t = torch.ones(1, 1, 2, 2)
    assert falgn([s], [t]).item() == pytest.approx(4.0)


def test_falgn_channel_mismatch_names_level():
    s = [torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)]
    t = [torch.zeros(1, 4, 2, 2), torch.zeros(1, 8, 2, 2)]
    with pytest.raises(ValueError, match="level 1"):
        falgn(s, t)


# ------------------------------------------------------------------------------------ cos_sim
def test_cos_sim_hand_example():
    # image 0: GAP s = [1, 0], t = [1, 1] -> 1 - 1/sqrt(2); image 1: s = [0, 2], t = [0, 3] -> 0
    s = torch.zeros(2, 2, 2, 2)
    s[0, 0] = _t([[2.0, 0.0], [0.0, 2.0]])  # mean 1
    s[1, 1] = 2.0
    t = torch.zeros(2, 2, 1, 1)
    t[0, :, 0, 0] = _t([1.0, 1.0])
    t[1, 1, 0, 0] = 3.0
    expected = (1 - 1 / math.sqrt(2)) / 2
    assert cos_sim([s], [t]).item() == pytest.approx(expected, abs=1e-6)
    # vectors directly, two levels: level 2 opposite vectors -> 2 ; mean of (expected, 2)
    v = [_t([[1.0, 0.0], [0.0, 2.0]]), _t([[1.0, 0.0], [1.0, 0.0]])]
    w = [_t([[1.0, 1.0], [0.0, 3.0]]), _t([[-1.0, 0.0], [-2.0, 0.0]])]
    assert cos_sim(v, w).item() == pytest.approx((expected + 2.0) / 2, abs=1e-6)
    assert cos_sim(v, w, reduction="paper").item() == pytest.approx(expected + 2.0, abs=1e-6)


# ------------------------------------------------------------------------------------ att
def test_att_hand_example():
    # student channels [[1,0],[0,0]] and [[1,0],[0,1]] -> A = [2,0,0,1], |A| = sqrt(5)
    # teacher one channel [[0,0],[0,3]] -> A = [0,0,0,9] -> normalised [0,0,0,1]
    # loss = (2/sqrt5)^2 + (1/sqrt5 - 1)^2
    s = _t([[[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]]])
    t = _t([[[[0.0, 0.0], [0.0, 3.0]]]])
    expected = 4 / 5 + (1 / math.sqrt(5) - 1) ** 2
    assert att([s], [t]).item() == pytest.approx(expected, abs=1e-6)
    # second image identical to the teacher -> 0; mean over N = expected / 2
    s2 = torch.cat([s, torch.cat([t, torch.zeros_like(t)], 1)])
    t2 = torch.cat([t, t])
    assert att([s2], [t2]).item() == pytest.approx(expected / 2, abs=1e-6)


def test_att_resizes_student_energy_map():
    # student 1x1 value 2 -> A = 4, resized to 2x2 constant 4 -> normalised [.5,.5,.5,.5]
    # teacher A = [0,0,0,9] -> [0,0,0,1]; loss = 3 * .25 + (.5 - 1)^2 = 1.0
    s = torch.full((1, 3, 1, 1), 2.0 / math.sqrt(3))  # sum_c f^2 = 4
    t = _t([[[[0.0, 0.0], [0.0, 3.0]]]])
    assert att([s], [t]).item() == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------------ cls_kd
def test_cls_kd_softmax_hand_example():
    # T = 2, teacher logits [0, 2 ln 3] -> softmax(z/2) = [1/4, 3/4]; student [0, 0] -> [1/2, 1/2]
    # region 0: KL = 1/4 ln(1/2) + 3/4 ln(3/2); region 1 identical logits -> 0; mean over M = 2
    zt = _t([[0.0, 2 * math.log(3)], [1.0, -1.0]])
    zs = _t([[0.0, 0.0], [1.0, -1.0]])
    kl0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert cls_kd(zs, zt, T=2.0).item() == pytest.approx(kl0 / 2, abs=1e-6)
    rev = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert cls_kd(zs, zt, T=2.0, direction="s||t").item() == pytest.approx(rev / 2, abs=1e-6)
    # leading dims are flattened: [1, 2, K] == [2, K]
    assert cls_kd(zs[None], zt[None]).item() == pytest.approx(kl0 / 2, abs=1e-6)


def test_cls_kd_binary_hand_example():
    # T = 2; class 0: teacher sigma(0) = 1/2, student sigma(2 ln 3 / 2) = 3/4
    #   KL(Bern(1/2) || Bern(3/4)) = 1/2 ln(1/2 / 3/4) + 1/2 ln(1/2 / 1/4)
    # class 1 identical -> 0 ; region 2 identical -> 0 ; mean over 2 classes x 2 regions
    zt = _t([[0.0, 1.0], [5.0, -3.0]])
    zs = _t([[2 * math.log(3), 1.0], [5.0, -3.0]])
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert cls_kd(zs, zt, T=2.0, kind="binary").item() == pytest.approx(kl / 4, abs=1e-6)
    # single logit sigmoid head: softmax would be identically 0, binary is not (A10)
    assert cls_kd(zs[:1, :1], zt[:1, :1], kind="softmax").item() == pytest.approx(0.0, abs=1e-7)
    assert cls_kd(zs[:1, :1], zt[:1, :1], kind="binary").item() == pytest.approx(kl, abs=1e-6)


def test_cls_kd_bad_args():
    with pytest.raises(ValueError, match="kind"):
        cls_kd(torch.zeros(2, 3), torch.zeros(2, 3), kind="focal")
    with pytest.raises(ValueError, match="same shape"):
        cls_kd(torch.zeros(2, 3), torch.zeros(2, 4))


# ------------------------------------------------------------------------------------ roi_kd
def test_roi_kd_hand_example():
    # h_s = [[1,2],[3,4]], h_t = 0 -> mean of squares = 30/4 = 7.5; paper: (5 + 25)/2 = 15
    hs, ht = _t([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 2)
    assert roi_kd(hs, ht).item() == pytest.approx(7.5)
    assert roi_kd(hs, ht, reduction="paper").item() == pytest.approx(15.0)


# ------------------------------------------------------------------------------------ kld
def test_kld_hand_example():
    # row 0 as in cls_kd: KL = 1/4 ln(1/2) + 3/4 ln(3/2); row 1 -> 0; batchmean /2; * T^2 = 4
    zt = _t([[0.0, 2 * math.log(3)], [1.0, -1.0]])
    zs = _t([[0.0, 0.0], [1.0, -1.0]])
    kl0 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert kld(zs, zt, T=2.0).item() == pytest.approx(kl0 / 2 * 4, abs=1e-6)
    assert kld(zs, zt, T=2.0, t2_scale=False).item() == pytest.approx(kl0 / 2, abs=1e-6)


# ------------------------------------------------------------------------------------ degenerate
@pytest.mark.parametrize("fn", ALL_FEATURE_LOSSES)
def test_zero_features_are_finite_with_finite_grads(fn):
    s = torch.zeros(2, 4, 3, 3, requires_grad=True)
    t = torch.zeros(2, 4, 3, 3)
    out = fn([s], [t])
    assert out.dim() == 0 and torch.isfinite(out)
    out.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("fn", [falgn, cos_sim, att])
def test_batch_size_one(fn):
    s = torch.randn(1, 4, 3, 3, requires_grad=True)
    out = fn([s], [torch.randn(1, 4, 3, 3)])
    assert out.dim() == 0 and torch.isfinite(out) and out.item() > 0


@pytest.mark.parametrize(
    "fn,kw", [(cls_kd, {}), (cls_kd, {"kind": "binary"}), (roi_kd, {}), (kld, {})]
)
def test_empty_regions_give_zero_with_grad(fn, kw):
    zs = torch.zeros(0, 5, requires_grad=True)
    out = fn(zs, torch.zeros(0, 5), **kw)
    assert out.dim() == 0 and out.item() == 0.0
    out.backward()
    assert zs.grad is not None and zs.grad.shape == (0, 5)


CASES = [
    (con, lambda: (torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)), True),
    (falgn, lambda: (torch.randn(2, 4, 2, 2), torch.randn(2, 4, 4, 4)), True),
    (cos_sim, lambda: (torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)), True),
    (att, lambda: (torch.randn(2, 4, 2, 2), torch.randn(2, 6, 4, 4)), True),
    (cls_kd, lambda: (torch.randn(6, 3), torch.randn(6, 3)), False),
    (roi_kd, lambda: (torch.randn(6, 8), torch.randn(6, 8)), False),
    (kld, lambda: (torch.randn(6, 3), torch.randn(6, 3)), False),
]


@pytest.mark.parametrize("fn,make,multilevel", CASES, ids=[c[0].__name__ for c in CASES])
def test_gradient_reaches_student_not_teacher(fn, make, multilevel):
    torch.manual_seed(0)
    s, t = make()
    s.requires_grad_(True)
    t.requires_grad_(True)
    out = fn([s], [t]) if multilevel else fn(s, t)
    assert out.dim() == 0 and out.dtype == torch.float32
    out.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    if fn is cls_kd:  # the binary variant too
        s.grad = None
        cls_kd(s, t, kind="binary").backward()
        assert s.grad.abs().sum() > 0 and t.grad is None
