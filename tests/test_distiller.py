"""Stage 3: connectors, Distiller and the KD mixin on real torchvision Faster R-CNNs."""

import math

import pytest
import torch
from torch import nn

from mdkd_det.distill import losses as L
from mdkd_det.distill.adapters import TorchvisionFasterRCNNAdapter
from mdkd_det.distill.connectors import feature_connector, match_levels_by_stride
from mdkd_det.distill.distiller import TERM_KEYS, freeze_teacher
from mdkd_det.distill.schedules import ConstantCurriculum, CosineCurriculum
from mdkd_det.distill.taps import TapRecorder
from mdkd_det.distill.trainer import KDSimpleTrainer, KDTrainer, build_distiller, build_teacher
from mdkd_det.engine.checkpointer import Checkpointer
from mdkd_det.engine.defaults import build_model, do_test
from mdkd_det.modeling.shape_spec import ShapeSpec
from mdkd_det.utils.errors import CheckpointError

from _tiny import tiny_cfg, tiny_kd_cfg

ALL_TERMS = set(TERM_KEYS.values()) - {"loss_KLD"}  # detection terms; KLD reads image-level logits (cls)


def _pair(tmp_path, teacher_channels=64):
    cfg = tiny_cfg(tmp_path / "s")
    tcfg = tiny_cfg(tmp_path / "t", **{"MODEL.FPN.OUT_CHANNELS": teacher_channels,
                                       "MODEL.ROI_HEADS.MLP_HEAD_DIM": 96})
    torch.manual_seed(0)
    return cfg, build_model(cfg), freeze_teacher(build_model(tcfg))


def _batch(n=2, size=96):
    g = torch.Generator().manual_seed(1)
    imgs = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    tg = [{"boxes": torch.tensor([[20.0, 24.0, 44.0, 50.0]]), "labels": torch.tensor([1])} for _ in range(n)]
    return [{"image": i, "target": t} for i, t in zip(imgs, tg)]


def test_connectors_and_level_matching():
    assert isinstance(feature_connector(256, 256), nn.Identity)
    conv = feature_connector(32, 64)
    assert conv(torch.zeros(1, 32, 4, 4)).shape == (1, 64, 4, 4)
    s = {"0": ShapeSpec(32, stride=4), "1": ShapeSpec(32, stride=8), "pool": ShapeSpec(32, stride=64)}
    t = {"p2": ShapeSpec(64, stride=4), "p3": ShapeSpec(64, stride=8), "p6": ShapeSpec(64, stride=64)}
    assert match_levels_by_stride(s, t) == {"0": "p2", "1": "p3", "pool": "p6"}
    with pytest.raises(ValueError, match="share no stride"):
        match_levels_by_stride({"a": ShapeSpec(1, stride=2)}, {"b": ShapeSpec(1, stride=3)})


def test_distiller_terms_equal_weighted_pure_losses(tmp_path):
    cfg, student, teacher = _pair(tmp_path)
    d = build_distiller(cfg, student, teacher)
    assert isinstance(d.connectors["0"], nn.Conv2d) and isinstance(d.roi_connector, nn.Linear)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    student.train()
    adapter = TorchvisionFasterRCNNAdapter()
    b = _batch()
    with TapRecorder(student, adapter.student_taps()) as rec:
        student([x["image"] for x in b], [x["target"] for x in b])
    s_in, t_in = adapter.student_inputs(rec), adapter.teacher_inputs(teacher, rec)
    m = s_in.region_logits.shape[0]
    assert m == t_in.region_logits.shape[0] == s_in.region_embeddings.shape[0] == t_in.region_embeddings.shape[0]
    assert t_in.region_embeddings.shape[1] == 96 and s_in.region_embeddings.shape[1] == 64
    epoch = 12.0  # cosine cf with warmup 5 / ramp 10: 0.5 * (1 - cos(0.7 pi))
    cf = 0.5 * (1 - math.cos(math.pi * 0.7))
    out = d(s_in, t_in, epoch)
    assert set(out) == ALL_TERMS
    s_raw = [s_in.features[k] for k in d.level_pairs]
    s_f = [d.connectors[k](s_in.features[k]) for k in d.level_pairs]
    t_f = [t_in.features[v] for v in d.level_pairs.values()]
    expect = {  # Con and Att read the student's own maps; FAlgn and CosSim the connector's (A3)
        "loss_Con": cfg.KD.W_CON * L.con(s_raw, t_f, T=2.0),
        "loss_FAlgn": cfg.KD.W_FALGN * L.falgn(s_f, t_f),
        "loss_CosSim": cfg.KD.W_COS * L.cos_sim(s_f, t_f),
        "loss_Att": cfg.KD.W_ATT * L.att(s_raw, t_f),
        "loss_ClsKD": cfg.KD.W_CLSKD * L.cls_kd(s_in.region_logits, t_in.region_logits, T=2.0),
        "loss_ROIKD": cfg.KD.W_ROIKD * L.roi_kd(d.roi_connector(s_in.region_embeddings), t_in.region_embeddings),
    }
    for k, v in expect.items():
        assert torch.isfinite(out[k])
        assert out[k].item() == pytest.approx(cf * v.item(), rel=1e-5, abs=1e-9), k
    # a trainable connector cannot lower Att or Con: they do not depend on it
    conn_params = list(d.connectors.parameters())
    for key in ("loss_Att", "loss_Con"):
        grads = torch.autograd.grad(out[key], conn_params, retain_graph=True, allow_unused=True)
        assert all(g is None for g in grads), key
    # gradients reach the student and the connectors, never the teacher
    sum(out.values()).backward()
    assert d.connectors["0"].weight.grad is not None
    assert any(p.grad is not None for p in student.backbone.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_mixin_step_logs_terms_cleans_hooks_and_skips_teacher_in_warmup(tmp_path):
    cfg, student, teacher = _pair(tmp_path, teacher_channels=32)
    d = build_distiller(cfg, student, teacher)
    calls = {"n": 0}
    teacher.backbone.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    batches = iter([_batch(), _batch(), _batch()])
    opt = torch.optim.AdamW(list(student.parameters()) + list(d.parameters()), lr=1e-4)
    t = KDSimpleTrainer(student, batches, opt, grad_clip=5.0)
    t.distiller, t.epoch_iters, t.task_weight = d, 1, 1.0
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    t.iter = 5  # cf(5) == 0: plain task loss, teacher not run
    losses = t.compute_losses(_batch())
    assert not (set(losses) & ALL_TERMS) and calls["n"] == 0
    t.iter = 20  # cf == 1
    losses = t.compute_losses(_batch())
    assert ALL_TERMS <= set(losses) and calls["n"] == 1
    assert all(torch.isfinite(v) for v in losses.values())
    n_hooks = sum(len(m._forward_hooks) for m in student.modules())
    assert n_hooks == 0 and "select_training_samples" not in vars(student.roi_heads)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN statistics untouched
    assert not teacher.training


def _kd_trainer(student, distiller, epoch_iters=1, task_weight=1.0):
    opt = torch.optim.AdamW(list(student.parameters()) + list(distiller.parameters()), lr=1e-4)
    t = KDSimpleTrainer(student, iter([]), opt, grad_clip=5.0)
    t.distiller, t.epoch_iters, t.task_weight = distiller, epoch_iters, task_weight
    return t


def test_constant_cf_and_task_weight(tmp_path):
    cfg, student, teacher = _pair(tmp_path, teacher_channels=32)
    d = build_distiller(cfg, student, teacher)
    d.cf = ConstantCurriculum(0.5)
    assert d.active(0.0)
    d.cf = CosineCurriculum(warmup=5, ramp=10)
    assert not d.active(4.0) and d.active(5.5)
    # alpha (Eq. 24) multiplies each task loss; cf multiplies each KD term. The RPN/RoI
    # samplers draw from the global RNG, so each forward is seeded alike.
    b = _batch()
    student.train()
    torch.manual_seed(7)
    plain = {k: v.item() for k, v in student([x["image"] for x in b], [x["target"] for x in b]).items()}
    out = {}
    for alpha, cf in ((0.25, 0.5), (1.0, 1.0)):
        d.cf = ConstantCurriculum(cf)
        t = _kd_trainer(student, d, task_weight=alpha)
        torch.manual_seed(7)
        out[alpha] = {k: v.item() for k, v in t.compute_losses(b).items()}
    assert set(plain) < set(out[0.25]) and ALL_TERMS <= set(out[0.25])
    for k, v in plain.items():
        assert out[0.25][k] == pytest.approx(0.25 * v, rel=1e-5), k
        assert out[1.0][k] == pytest.approx(v, rel=1e-5), k
    for k in ALL_TERMS:  # same student/teacher inputs, cf 0.5 vs 1
        assert out[0.25][k] == pytest.approx(0.5 * out[1.0][k], rel=1e-5, abs=1e-12), k
    assert out[1.0]["loss_ClsKD"] > 0  # the ratio above is not 0 == 0.5 * 0


def test_beta_ramp_and_temperature_used_inside_forward(tmp_path, monkeypatch):
    """The beta (C21) and temperature (C20) schedules are what Distiller.forward passes to the
    losses at a given iteration (epoch = iter / KD.EPOCH_ITERS, A7)."""
    cfg, student, teacher = _pair(tmp_path, teacher_channels=32)
    cfg.KD.CF.SCHEDULE, cfg.KD.CF.MAX = "constant", 1.0
    cfg.KD.BETA_SCHEDULE, cfg.KD.TEMPERATURE_SCHEDULE = "beta", "temperature"
    d = build_distiller(cfg, student, teacher)
    seen = {"con": [], "cls": []}

    def fake(name):
        def loss(*args, T, **kw):
            seen[name].append(T)
            return torch.tensor(1.0)
        return loss

    monkeypatch.setattr(L, "con", fake("con"))
    monkeypatch.setattr(L, "cls_kd", fake("cls"))
    t = _kd_trainer(student, d, epoch_iters=4)
    # hand-computed: beta(e) = 0.1 + 0.4 * clip((e - 5) / 10, 0, 1); T(e) = max(0.5, 2 * 0.9 ** (e / 5))
    for it, beta, temp in ((0, 0.1, 2.0), (30, 0.2, 2 * 0.9 ** 1.5), (40, 0.3, 1.62), (80, 0.5, 1.3122),
                           (400, 0.5, 0.5)):
        t.iter = it
        losses = t.compute_losses(_batch())
        assert seen["con"][-1] == pytest.approx(temp, abs=1e-4), it
        assert seen["cls"][-1] == pytest.approx(temp, abs=1e-4), it
        assert losses["loss_Con"].item() == pytest.approx(beta, abs=1e-6), it  # cf * beta * 1
        assert losses["loss_ClsKD"].item() == pytest.approx(cfg.KD.W_CLSKD, abs=1e-6), it
    assert len(seen["con"]) == len(seen["cls"]) == 5


def test_teacher_checkpoint_mismatch_names_file_and_keys(tmp_path):
    cfg = tiny_cfg(tmp_path / "s")
    other = build_model(tiny_cfg(tmp_path / "o", **{"MODEL.FPN.OUT_CHANNELS": 48}))
    Checkpointer(other, str(tmp_path / "o")).save("model_final")
    tcfg_file = tmp_path / "teacher.yaml"
    tcfg_file.write_text(tiny_cfg(tmp_path / "t").dump())
    cfg.KD.TEACHER_CONFIG = str(tcfg_file)
    cfg.KD.TEACHER_WEIGHTS = str(tmp_path / "o" / "model_final.pth")
    with pytest.raises(CheckpointError) as e:
        build_teacher(cfg)
    assert "model_final.pth" in str(e.value) and "backbone.body.fpn" in str(e.value)


def test_kd_trainer_exports_plain_student_that_evaluates(tmp_path, data_root):
    cfg = tiny_kd_cfg(tmp_path, max_iter=2)
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    lines = (tmp_path / "student" / "metrics.json").read_text()
    for term in ALL_TERMS:
        assert term in lines
    export = torch.load(tmp_path / "student" / "model_student.pth", weights_only=True)
    assert set(export) == {"model"}
    plain = build_model(tiny_cfg(tmp_path / "plain"))
    assert set(export["model"]) == set(plain.state_dict())
    Checkpointer(plain, str(tmp_path / "plain")).load(str(tmp_path / "student" / "model_student.pth"))
    ecfg = tiny_cfg(tmp_path / "eval")
    res = do_test(ecfg, plain)
    assert "AP" in res["lungct_disjoint_test"]["bbox"]


def test_build_teacher_is_shared_with_other_builders_and_loaders(tmp_path):
    """detectron2's teacher comes from the same builder (issue 14): its own config/merge, model
    builder and loader are passed in; the PIXEL_MEAN check and the freezing are shared."""
    from mdkd_det.config import get_cfg
    from mdkd_det.distill.trainer import load_teacher_cfg
    from mdkd_det.modeling.frozen_teacher import is_frozen
    from mdkd_det.utils.errors import ConfigError

    cfg = tiny_cfg(tmp_path / "s")
    tcfg_file = tmp_path / "teacher.yaml"
    tcfg_file.write_text(tiny_cfg(tmp_path / "t").dump())
    cfg.KD.TEACHER_CONFIG, cfg.KD.TEACHER_WEIGHTS = str(tcfg_file), str(tmp_path / "t.pth")
    merged, loaded = [], []
    tcfg = load_teacher_cfg(cfg, base=get_cfg(), merge=lambda c, p: (merged.append(p), c.merge_from_file(p)))
    assert merged == [str(tcfg_file)] and tcfg.MODEL.WEIGHTS == str(tmp_path / "t.pth")
    teacher = build_teacher(cfg, tcfg, build=lambda c: nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)),
                            load=lambda m, c, trust: loaded.append((c.MODEL.WEIGHTS, trust)))
    assert loaded == [(str(tmp_path / "t.pth"), False)] and is_frozen(teacher)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    cfg.MODEL.PIXEL_MEAN = [0.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="PIXEL_MEAN"):
        load_teacher_cfg(cfg, base=get_cfg(), merge=lambda c, p: c.merge_from_file(p))
