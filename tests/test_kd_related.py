"""Related papers' KD terms (issue 15): hand-computed or independent-numpy values for KMM (002),
DCGD / MSAN / FSD (001), contextual loss / hint (004), LM / AAM (002), and their wiring in the
Distiller (views, MSAN heads, late levels, segmentation pixel logits)."""

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from mdkd_det.distill import losses as L
from mdkd_det.distill.adapters import EncoderFeaturesAdapter, KDInputs
from mdkd_det.distill.distiller import Distiller
from mdkd_det.distill.taps import TapRecorder
from mdkd_det.distill.views import photometric_views
from mdkd_det.evaluation.fsd import fsd_report, frechet_distance, main as fsd_main
from mdkd_det.modeling.shape_spec import ShapeSpec


# ------------------------------------------------------------------------------- 002 KMM (Eq. 6)
def test_kmm_hand_computed():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    # K_s = [[1, 1/sqrt2], [1/sqrt2, 1]], K_t = all ones; D off-diagonal a = 1/sqrt2 - 1
    a = 1 / math.sqrt(2) - 1
    assert L.kmm(s, t).item() == pytest.approx(a * a / 2 + abs(a) / 2, abs=1e-7)  # 0.1893398
    assert L.kmm(s, t, reduction="paper").item() == pytest.approx(a * a + 2 * abs(a), rel=1e-6)
    # pooled maps give the same; channel counts may differ (Gram is B x B)
    assert L.kmm(s[:, :, None, None].expand(2, 2, 3, 3), torch.tensor([[0.0, 1, 0], [0, 2, 0]])[:, :, None, None]).item() == \
        pytest.approx(a * a / 2 + abs(a) / 2, abs=1e-7)
    with pytest.warns(RuntimeWarning, match="batch size >= 2"):
        assert L.kmm(s[:1], t[:1]).item() == 0.0


# ------------------------------------------------------------------------------ 001 DCGD (Eqs. 5-8)
def _dcgd_numpy(zs, zt, inter_weight):
    """Independent formula: explicit outer-product nodes and cosine of the flattened nodes."""
    def unit(z):
        return z / np.linalg.norm(z, axis=-1, keepdims=True)
    zs, zt = unit(zs.astype(np.float64)), unit(zt.astype(np.float64))
    V, B, D = zs.shape
    ns = np.einsum("vbi,vbj->vbij", zs, zs)
    nt = np.einsum("vbi,vbj->vbij", zt, zt)

    def cos(a, b):
        return (a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b))
    intra_n = np.abs(nt - ns).mean()
    intra_e = np.mean([abs(cos(nt[0, b], nt[v, b]) - cos(ns[0, b], ns[v, b])) for v in range(1, V) for b in range(B)])

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    pt, ps = softmax(nt[1:]), softmax(ns[1:])
    inter_n = (pt * (np.log(pt) - np.log(ps))).sum(-1).mean()
    pairs = [(u, v) for u in range(1, V) for v in range(u + 1, V)]
    inter_e = np.mean([abs(cos(nt[u, b], nt[v, b]) - cos(ns[u, b], ns[v, b])) for u, v in pairs for b in range(B)]) \
        if pairs else 0.0
    return intra_n + intra_e + inter_weight * (inter_n + inter_e)


@pytest.mark.parametrize("V", [2, 4])
def test_dcgd_matches_independent_numpy(V):
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(V, 3, 5, generator=g), torch.randn(V, 3, 5, generator=g)
    got = L.dcgd(zs, zt, inter_weight=0.7).item()
    assert got == pytest.approx(_dcgd_numpy(zs.numpy(), zt.numpy(), 0.7), rel=1e-5)
    assert L.dcgd(zt, zt).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="V >= 2"):
        L.dcgd(zs[:1], zt[:1])


# ------------------------------------------------------------------------------ 001 MSAN (Eqs. 2-4)
def test_msan_hand_computed():
    f = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)
    # L_rec = mean |F - 0| = 2, L_regu = mean |1 - 0| = 1, lambda 0.5 -> 2.5
    assert L.msan(f, torch.zeros_like(f), torch.zeros(1, 2), torch.ones(1, 2), lam=0.5).item() == 2.5


# ----------------------------------------------------------------------------- 004 CX (Eqs. 3-4)
def _cx_numpy(x, y, h, eps=1e-5):
    """Mechrez et al. with loops: x [N, C] student, y [M, C] teacher."""
    mu = y.mean(0)
    x, y = x - mu, y - mu
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    d = np.array([[1 - x[i] @ y[j] for j in range(len(y))] for i in range(len(x))])
    dt = d / (d.min(axis=1, keepdims=True) + eps)
    w = np.exp((1 - dt) / h)
    cx = w / w.sum(axis=1, keepdims=True)
    return -np.log(cx.max(axis=0).mean())


def test_contextual_loss_matches_numpy_on_unaligned_maps_and_is_zero_on_equal_maps():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 2, 2, generator=g)  # different H x W
    want = np.mean([_cx_numpy(s[b].flatten(1).T.double().numpy(), t[b].flatten(1).T.double().numpy(), 0.5)
                    for b in range(2)])
    assert L.contextual(s, t, h=0.5, positions=0).item() == pytest.approx(want, rel=1e-4)
    # identical sets: each y_j's best match is itself, CX_jj -> 1, loss -> 0
    assert L.contextual(t, t, h=0.5).item() == pytest.approx(0.0, abs=1e-4)
    # subsampling keeps min(positions, H*W) positions
    assert L.contextual(torch.randn(1, 4, 8, 8), t[:1], positions=5).item() > 0
    with pytest.raises(ValueError, match="channels differ"):
        L.contextual(torch.randn(1, 3, 2, 2), t[:1])


# -------------------------------------------------------------------------- 002 LM / AAM (Eqs. 1-4, 7)
def test_pixel_kl_binary_hand_computed():
    z_s = torch.zeros(2, 1, 3, 3)  # p_fg = 0.5
    z_t = torch.full((2, 1, 3, 3), math.log(3.0))  # p_fg = 0.75
    # KL(s || t) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3)
    assert L.pixel_kl(z_s, z_t).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    # softmax heads: K = 2 logits (0, log 3) vs (0, 0) -> p = (.25,.75) vs (.5,.5)
    zs2, zt2 = torch.zeros(1, 2, 1, 1), torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)
    assert L.pixel_kl(zs2, zt2).item() == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), abs=1e-6)


def test_affinity_hand_computed():
    z_s = torch.tensor([0.0, math.log(3.0)]).view(1, 1, 1, 2)  # F_0 = (.5, .5), F_1 = (.25, .75)
    w01 = 0.5 * math.log(4 / 3)  # KL(F_0 || F_1)
    w10 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)  # KL(F_1 || F_0)
    # teacher labels differ (0 | 1): both ordered pairs in P-, margin 3
    diff = L.affinity(z_s, torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2), margin=3.0).item()
    assert diff == pytest.approx(3.0 - (w01 + w10) / 2, abs=1e-6)
    # teacher labels equal: both in P+
    same = L.affinity(z_s, torch.tensor([1.0, 2.0]).view(1, 1, 1, 2), margin=3.0).item()
    assert same == pytest.approx((w01 + w10) / 2, abs=1e-6)


# ------------------------------------------------------------------------------------ 001 FSD (Eq. 11)
def test_frechet_distance_hand_computed_and_report(tmp_path, capsys):
    a, b = np.array([[-1.0], [1.0]]), np.array([[0.0], [4.0]])  # mean 0, var 2 | mean 2, var 8
    assert frechet_distance(a, b) == pytest.approx(4 + 2 + 8 - 2 * 4)  # 6
    assert frechet_distance(a, b, squared_mean=False) == pytest.approx(2 + 2 + 8 - 2 * 4)  # 4 (Eq. 11 printed)
    # 2-D, diagonal covariances diag(2, 8) and diag(8, 2), equal means: 10 + 10 - 2 (4 + 4) = 4
    x = np.array([[-1.0, -2.0], [1.0, 2.0]])
    y = np.array([[-2.0, -1.0], [2.0, 1.0]])
    assert frechet_distance(x, y) == pytest.approx(4.0, abs=1e-6)
    embs = {"teacher": {"lungct": a, "lungpet": b}, "student": {"lungct": b, "lungpet": b}}
    rep = fsd_report(embs, reference="teacher")
    assert rep["domain_gap"] == {"teacher: lungct|lungpet": pytest.approx(6.0), "student: lungct|lungpet": pytest.approx(0.0, abs=1e-9)}
    assert rep["to_reference"] == {"student @ lungct": pytest.approx(6.0), "student @ lungpet": pytest.approx(0.0, abs=1e-9)}
    np.savez(tmp_path / "t.npz", lungct=a, lungpet=b)
    np.savez(tmp_path / "s.npz", lungct=b, lungpet=b)
    assert fsd_main([f"teacher={tmp_path / 't.npz'}", f"student={tmp_path / 's.npz'}", "--ref", "teacher"]) == 0
    assert '"student @ lungct": 6.0' in capsys.readouterr().out


# ------------------------------------------------------------------------------- views and wiring
def test_photometric_views_keep_shape_and_zero_strength_is_identity():
    x = torch.randn(2, 3, 8, 8)
    v = photometric_views(x, 3, generator=torch.Generator().manual_seed(0))
    assert len(v) == 3 and all(t.shape == x.shape and not torch.allclose(t, x) for t in v)
    same = photometric_views(x, 1, strength=0.0)[0]
    assert torch.allclose(same, x, atol=1e-5)


class _Bb(nn.Module):
    def __init__(self, c_in=3, c=4):
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        a = self.c1(x)
        return OrderedDict([("a", a), ("b", self.c2(a))])

    def output_shape(self):
        return {"a": ShapeSpec(4, stride=2), "b": ShapeSpec(4, stride=4)}


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = _Bb()
        self.decoder = nn.Conv2d(4, 1, 1)  # stands for a segmenter's decoder (pixel logits)


class _Adapter:
    cls_kind = "softmax"


def _distiller(student, teacher, **kw):
    shapes = student.backbone.output_shape()
    return Distiller(teacher, _Adapter(), shapes, shapes, None, None, cf=lambda e: 1.0, **kw).attach_student(student)


def test_dcgd_term_runs_views_through_both_backbones():
    torch.manual_seed(0)
    student, teacher = _Model(), _Model()
    teacher.load_state_dict(student.state_dict())  # same network: every graph matches
    d = _distiller(student, teacher, weights={"dcgd": 100.0}, terms=[],
                   kd_options={"dcgd_views": 2, "dcgd_strength": 1.0})
    x = torch.randn(2, 3, 16, 16)
    s = KDInputs(features=student.backbone(x), images=x)
    with torch.no_grad():
        t = KDInputs(features=teacher.backbone(x))
    z_s, z_t = d.view_latents(__import__("mdkd_det.distill.kd_terms", fromlist=["KDContext"]).KDContext(d, s, t, 2.0, 0))
    assert [z.shape for z in z_s] == [(3, 2, 4), (3, 2, 4)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(z_s, z_t))
    assert d(s, t, 0.0)["loss_DCGD"].item() == pytest.approx(0.0, abs=1e-4)
    # a different student: positive loss, gradients reach the student backbone, never the teacher
    student2 = _Model()
    d2 = _distiller(student2, teacher, weights={"dcgd": 100.0}, terms=[])
    s2 = KDInputs(features=student2.backbone(x), images=x)
    out = d2(s2, t, 0.0)["loss_DCGD"]
    assert out.item() > 0
    out.backward()
    assert student2.backbone.c1.weight.grad is not None and teacher.backbone.c1.weight.grad is None
    # without images (an adapter that does not give them) the term is skipped
    assert d2(KDInputs(features=s2.features), t, 0.0) == {}


def test_msan_heads_exist_only_when_on_and_train():
    student, teacher = _Model(), _Model()
    off = _distiller(student, teacher, weights={"con": 1.0})
    assert not any(k.startswith("latent_heads") for k in off.state_dict())
    d = _distiller(student, teacher, weights={"msan": 1.0}, terms=[], kd_options={"msan_lambda": 0.5})
    x = torch.randn(2, 3, 16, 16)
    s = KDInputs(features=student.backbone(x))
    with torch.no_grad():
        t = KDInputs(features=teacher.backbone(x))
    out = d(s, t, 0.0)["loss_MSAN"]
    # by hand from the heads: mean over the two levels of L_rec + 0.5 L_regu
    want = 0.0
    for k in ("a", "b"):
        z, fh = d.latent_heads[k](s.features[k])
        want += L.msan(s.features[k], fh, nn.functional.normalize(z, dim=1),
                       nn.functional.normalize(t.features[k].mean(dim=(2, 3)), dim=1), 0.5) / 2
    assert out.item() == pytest.approx(want.item(), rel=1e-6)
    out.backward()
    assert d.latent_heads["a"].enc_fc.weight.grad is not None


def test_hint_and_ctx_read_the_late_levels():
    shapes = {k: ShapeSpec(4, stride=2 ** (i + 1)) for i, k in enumerate("abc")}
    d = Distiller(nn.Linear(1, 1), _Adapter(), shapes, shapes, None, None, weights={"hint": 1.0, "ctx": 1.0},
                  cf=lambda e: 1.0, terms=[], kd_options={"late_levels": 2, "ctx_positions": 0, "ctx_bandwidth": 0.5})
    g = torch.Generator().manual_seed(2)
    f = lambda: OrderedDict((k, torch.randn(2, 4, 6 - i, 6 - i, generator=g)) for i, k in enumerate("abc"))  # noqa: E731
    s, t = KDInputs(features=f()), KDInputs(features=f())
    out = d(s, t, 0.0)
    late_s, late_t = [s.features["b"], s.features["c"]], [t.features["b"], t.features["c"]]
    assert torch.equal(out["loss_Hint"], L.falgn(late_s, late_t))
    assert torch.equal(out["loss_CX"], L.contextual(late_s, late_t, h=0.5, positions=0))


def test_seg_adapter_gives_pixel_logits_for_lm_and_aam_only_when_on():
    torch.manual_seed(0)

    class Seg(_Model):
        def forward(self, x):
            return self.decoder(self.backbone(x)["a"])

    def decoder_with_size(dec):  # the Segmenter's decoder signature: decoder(feats, size=...)
        class D(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = dec

            def forward(self, feats, size=None):
                return self.conv(feats["a"] if isinstance(feats, dict) else feats)
        return D()

    student, teacher = Seg(), Seg()
    student.decoder, teacher.decoder = decoder_with_size(student.decoder), decoder_with_size(teacher.decoder)
    ad = EncoderFeaturesAdapter()
    assert "pixel_logits" not in ad.student_taps()
    shapes = student.backbone.output_shape()
    d = Distiller(teacher, ad, shapes, shapes, None, None, weights={"lm": 0.2, "aam": 0.9}, cf=lambda e: 1.0, terms=[])
    assert "pixel_logits" in ad.student_taps()
    x = torch.randn(2, 3, 16, 16)
    with TapRecorder(student, ad.student_taps()) as rec:
        student(x)
    s_in, t_in = ad.student_inputs(rec), d.teacher_inputs(rec)
    assert s_in.pixel_logits.shape == t_in.pixel_logits.shape == (2, 1, 8, 8)
    out = d(s_in, t_in, 0.0)
    assert torch.equal(out["loss_LM"], 0.2 * L.pixel_kl(s_in.pixel_logits, t_in.pixel_logits))
    assert torch.equal(out["loss_AA"], 0.9 * L.affinity(s_in.pixel_logits, t_in.pixel_logits))


# --------------------------------------------------------------- real students (tiny, synthetic data)
def test_related_terms_in_a_real_faster_rcnn_kd_step(tmp_path):
    """+KMM +DCGD +MSAN +hint +CX on torchvision Faster R-CNNs through the shared mixin step."""
    from mdkd_det.distill.distiller import freeze_teacher
    from mdkd_det.distill.trainer import KDSimpleTrainer, build_distiller
    from mdkd_det.engine.defaults import build_model

    from _tiny import tiny_cfg

    cfg = tiny_cfg(tmp_path / "s", **{"KD.W_KMM": 3.0, "KD.W_DCGD": 3.0, "KD.W_MSAN": 0.1, "KD.W_HINT": 0.01,
                                      "KD.W_CTX": 0.1, "KD.CF.SCHEDULE": "constant"})
    tcfg = tiny_cfg(tmp_path / "t", **{"MODEL.FPN.OUT_CHANNELS": 48})
    torch.manual_seed(0)
    student, teacher = build_model(cfg), freeze_teacher(build_model(tcfg))
    d = build_distiller(cfg, student, teacher)
    g = torch.Generator().manual_seed(1)
    batch = [{"image": torch.rand(3, 96, 96, generator=g),
              "target": {"boxes": torch.tensor([[20.0, 24.0, 44.0, 50.0]]), "labels": torch.tensor([1])}}
             for _ in range(2)]
    opt = torch.optim.AdamW(list(student.parameters()) + list(d.parameters()), lr=1e-4)
    t = KDSimpleTrainer(student, iter([]), opt)
    t.distiller, t.epoch_iters, t.task_weight = d, 1, 1.0
    t.iter = 10
    losses = t.compute_losses(batch)
    new = {"loss_KMM", "loss_DCGD", "loss_MSAN", "loss_Hint", "loss_CX"}
    assert new <= set(losses) and {"loss_Con", "loss_ClsKD"} <= set(losses)
    assert all(torch.isfinite(losses[k]) and losses[k] > 0 for k in new)
    sum(losses.values()).backward()
    assert d.latent_heads["0"].enc_fc.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_lm_and_aam_on_a_real_unet_student():
    from mdkd_det.config import get_cfg
    from mdkd_det.distill.trainer import KDSimpleTrainer, build_distiller
    from mdkd_det.engine.defaults import build_model

    cfg = get_cfg()
    cfg.merge_from_file("configs/MSD-Lung/mdkd_unet_demo.yaml")
    cfg.MODEL.SEG.BASE_CHANNELS = 4
    cfg.merge_from_list(["KD.W_LM", 0.2, "KD.W_AAM", 0.9, "KD.W_DCGD", 3.0, "KD.CF.SCHEDULE", "constant"])
    torch.manual_seed(0)
    student = build_model(cfg)
    tc = cfg.clone()
    tc.MODEL.SEG.BASE_CHANNELS = 8
    teacher = build_model(tc)
    d = build_distiller(cfg, student, teacher)
    g = torch.Generator().manual_seed(0)
    batch = [{"image": torch.rand(3, 48, 48, generator=g),
              "target": {"masks": (torch.rand(1, 48, 48, generator=g) > 0.8).float()}} for _ in range(2)]
    opt = torch.optim.AdamW(list(student.parameters()) + list(d.parameters()), lr=1e-4)
    t = KDSimpleTrainer(student, iter([]), opt)
    t.distiller, t.epoch_iters, t.task_weight = d, 1, 1.0
    losses = t.compute_losses(batch)
    assert {"loss_LM", "loss_AA", "loss_DCGD", "loss_Con"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_fsd_extract_cli_on_real_slices(tmp_path, data_root):
    from mdkd_det.engine.checkpointer import Checkpointer
    from mdkd_det.engine.defaults import build_model

    from _tiny import tiny_cfg

    cfg = tiny_cfg(tmp_path)
    model = build_model(cfg)
    Checkpointer(model, str(tmp_path)).save("m")
    (tmp_path / "c.yaml").write_text(cfg.dump())
    out = tmp_path / "e.npz"
    assert fsd_main(["extract", "--config-file", str(tmp_path / "c.yaml"), "--weights", str(tmp_path / "m.pth"),
                     "--datasets", "lungct_disjoint_test", "--limit", "3", "--out", str(out)]) == 0
    with np.load(out) as z:
        assert z.files == ["lungct_disjoint_test"] and z["lungct_disjoint_test"].shape == (3, 32)  # FPN 32 ch
