"""RF-DETR in the MDKD pipeline (issue 4): builder, box boundary, query pairing, binary ClsKD,
joint teacher, KD step, pipeline rows, export -> plain RF-DETR."""

import json
import math
import socket

import pytest
import torch

from mdkd_det.config import get_cfg
from mdkd_det.distill.losses import cls_kd
from mdkd_det.distill.query_matching import hungarian_pairs, pair_queries, query_pair_cost
from mdkd_det.engine.defaults import build_model
from mdkd_det.modeling.meta_arch.rfdetr_boxes import (
    cxcywh_norm_to_xyxy_px,
    to_rfdetr_targets,
    xyxy_px_to_cxcywh_norm,
)

from _tiny import tiny_cfg

pytest.importorskip("rfdetr")

#: tiny plugin RF-DETR: R18-FPN (32 ch) strides 8/16 at 64 px, 8 queries x 2 groups, 1 layer.
TINY_RFDETR = {
    "MODEL.META_ARCHITECTURE": "rfdetr", "MODEL.FPN.OUT_CHANNELS": 32,
    "MODEL.RFDETR.HIDDEN_DIM": 32, "MODEL.RFDETR.RESOLUTION": 64,
    "MODEL.RFDETR.IN_FEATURES": "['1', '2']", "MODEL.RFDETR.NUM_QUERIES": 8,
    "MODEL.RFDETR.GROUP_DETR": 2, "MODEL.RFDETR.DEC_LAYERS": 1, "FUSION.OUT_CHANNELS": 32,
}


def _cfg(**over):
    cfg = get_cfg()
    cfg.merge_from_list([x for kv in {**TINY_RFDETR, **over}.items() for x in kv])
    return cfg


def _batch():
    imgs = [torch.rand(3, 80, 64), torch.rand(3, 64, 64)]
    tgts = [{"boxes": torch.tensor([[8.0, 10.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    return imgs, tgts


# ---- builder -----------------------------------------------------------------------------
def test_builder_offline_plain_and_plugin(monkeypatch):
    def no_net(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_net)
    imgs, tgts = _batch()
    for over in ({"MODEL.BACKBONE.NAME": "rfdetr_dinov2", "MODEL.RFDETR.IN_FEATURES": "[]",
                  "MODEL.RFDETR.HIDDEN_DIM": 0}, {}):
        model = build_model(_cfg(**over))
        model.train()
        losses = model(imgs, tgts)
        assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_enc"} <= set(losses)
        assert all(torch.isfinite(v) for v in losses.values())
        model.eval()
        with torch.no_grad():
            dets = model(imgs)
        assert len(dets) == 2 and dets[0]["boxes"].shape[1] == 4
        assert set(dets[0]["labels"].tolist()) <= {1}
        assert float(dets[0]["boxes"][:, 2].max()) <= 64 + 1e-4 and float(dets[0]["boxes"][:, 3].max()) <= 80 + 1e-4
    assert type(model.backbone).__name__ == "LevelSelect" and list(model.backbone.output_shape()) == ["1", "2"]


def test_builder_config_errors():
    from mdkd_det.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="IN_FEATURES"):
        build_model(_cfg(**{"MODEL.RFDETR.IN_FEATURES": "['0', '1', '2', '3']"}))  # > 3 levels
    with pytest.raises(ConfigError, match="VARIANT"):
        build_model(_cfg(**{"MODEL.RFDETR.VARIANT": "huge"}))


# ---- box boundary ------------------------------------------------------------------------
def test_box_round_trip_and_labels():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 200.0, 100.0]])
    n = xyxy_px_to_cxcywh_norm(boxes, (100, 200))  # h=100, w=200
    assert torch.allclose(n, torch.tensor([[0.15, 0.4, 0.2, 0.4], [0.5, 0.5, 1.0, 1.0]]))
    assert torch.allclose(cxcywh_norm_to_xyxy_px(n, (100, 200)), boxes)
    t = to_rfdetr_targets([{"boxes": boxes, "labels": torch.tensor([1, 2])}], [(100, 200)])[0]
    assert t["labels"].tolist() == [0, 1] and torch.allclose(t["boxes"], n)
    with pytest.raises(ValueError, match="1..K"):
        to_rfdetr_targets([{"boxes": boxes, "labels": torch.tensor([0, 1])}], [(100, 200)])


def test_model_boundary_detections_in_input_pixels():
    model = build_model(_cfg()).eval()
    out = {"pred_logits": torch.tensor([[[3.0, -9.0], [-3.0, 9.0]]]),  # 2nd logit: never a target
           "pred_boxes": torch.tensor([[[0.25, 0.5, 0.1, 0.2], [0.5, 0.5, 0.5, 0.5]]])}
    det = model.detections(out, [(80, 64)])[0]
    top = det["scores"].argmax()
    assert det["labels"].tolist() == [1] * len(det["labels"])
    # cx .25*64=16, cy .5*80=40, w 6.4, h 16 -> xyxy (12.8, 32, 19.2, 48)
    assert torch.allclose(det["boxes"][top], torch.tensor([12.8, 32.0, 19.2, 48.0]), atol=1e-4)
    assert float(det["scores"][top]) == pytest.approx(1 / (1 + math.exp(-3.0)), rel=1e-5)


# ---- query pairing and binary ClsKD --------------------------------------------------------
def test_hungarian_pairs_hand_example():
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    # all 6 permutations: (0,1,2)=4+0+2=6, (1,0,2)=1+2+2=5, (2,0,1)=3+2+2=7, (0,2,1)=4+5+2=11,
    # (1,2,0)=1+5+3=9, (2,1,0)=3+0+3=6  -> optimum rows 0,1,2 -> cols 1,0,2 (cost 5)
    rows, cols = hungarian_pairs(cost)
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 0, 2]


def test_query_pair_cost_hand_example():
    s_p, s_b = torch.tensor([[0.5]]), torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    t_p = torch.tensor([[0.9], [0.5]])
    t_b = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2]])
    c = query_pair_cost(s_p, s_b, t_p, t_b)
    # q0: |.5-.9| = .4, same box -> 0 + 2(1-1) -> 0.4
    # q1: class 0; box L1 0.1 -> 5*0.1 = 0.5; IoU = .02/.06 = 1/3, hull .06 -> GIoU 1/3 -> 2*(2/3)
    assert c.tolist()[0] == pytest.approx([0.4, 0.5 + 4 / 3], rel=1e-5)


def test_pair_queries_top_k_and_order():
    logit = torch.logit
    # teacher: query 0 confident at box A, query 1 unconfident at box B, query 2 confident at B
    t_logits = logit(torch.tensor([[[0.9], [0.05], [0.8]]]))
    A, B = [0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.1, 0.1]
    t_boxes = torch.tensor([[A, B, B]])
    s_logits = logit(torch.tensor([[[0.8], [0.9]]]))  # student q0 at B, q1 at A
    s_boxes = torch.tensor([[B, A]])
    b, s, t = pair_queries(s_logits, s_boxes, t_logits, t_boxes, top_k=2)
    assert b.tolist() == [0, 0] and s.tolist() == [0, 1] and t.tolist() == [2, 0]
    # without the top-k restriction q0 still prefers teacher 2 (class cost .0 vs .75)
    assert pair_queries(s_logits, s_boxes, t_logits, t_boxes, top_k=3)[2].tolist() == [2, 0]
    with pytest.raises(ValueError, match="cannot pair"):
        pair_queries(s_logits, s_boxes, t_logits[:, :1], t_boxes[:, :1])


def test_binary_clskd_hand_example():
    # T = 2: teacher logit 2 ln 3 -> sigma(ln 3) = 3/4; student 0 -> 1/2
    # KL(Bern(.75) || Bern(.5)) = .75 ln 1.5 + .25 ln .5
    zt, zs = torch.tensor([[2 * math.log(3.0)]]), torch.zeros(1, 1)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert cls_kd(zs, zt, T=2.0, kind="binary").item() == pytest.approx(expected, rel=1e-5)
    assert cls_kd(zs, zt, T=2.0, kind="softmax").item() == pytest.approx(0.0, abs=1e-7)


# ---- Stage 2 and Stage 3 -----------------------------------------------------------------
def _joint_cfg():
    return _cfg(**{"MODEL.BACKBONE.NAME": "fusion", "FUSION.TEACHERS": "()",
                   "FUSION.TEACHER_BACKBONES": "('resnet18_fpn', 'resnet18_fpn', 'resnet18_fpn')"})


def test_joint_teacher_trainable_parameters():
    model = build_model(_joint_cfg())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and frozen
    assert all(n.startswith(("backbone.fusion.", "detr.")) for n in trainable), sorted(trainable)[:5]
    assert all(n.startswith("backbone.teachers.") for n in frozen)
    assert any(n.startswith("detr.transformer.decoder") for n in trainable)
    assert any(n.startswith("backbone.fusion.2.") for n in trainable)  # stride-16 fusion
    model.train()
    assert not any(m.training for m in model.backbone.inner.teachers.modules())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in frozen}
    imgs, tgts = _batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sum(model(imgs, tgts).values()).backward()
    opt.step()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n in frozen)
    assert all(p.grad is not None for p in model.backbone.inner.fusion["2"].parameters())


def test_kd_step_all_terms_with_paired_queries():
    from mdkd_det.distill.distiller import freeze_teacher
    from mdkd_det.distill.taps import TapRecorder
    from mdkd_det.distill.trainer import KDSimpleTrainer, build_distiller

    cfg = _cfg(**{"KD.CF.SCHEDULE": "constant"})
    teacher = freeze_teacher(build_model(_joint_cfg()))
    student = build_model(cfg)
    distiller = build_distiller(cfg, student, teacher)
    assert distiller.cls_kind == "binary"
    imgs, tgts = _batch()
    adapter = distiller.adapter
    student.train()
    with TapRecorder(student, adapter.student_taps()) as rec:
        student(imgs, tgts)
    s_in, t_in = adapter.student_inputs(rec), adapter.teacher_inputs(teacher, rec)
    assert s_in.region_logits.shape == t_in.region_logits.shape == (2 * 8, 1)
    assert s_in.region_embeddings.shape == t_in.region_embeddings.shape == (2 * 8, 32)
    assert list(s_in.features) == list(t_in.features) == ["1", "2"]
    data = iter([[{"image": i, "target": t} for i, t in zip(imgs, tgts)]] * 3)
    opt = torch.optim.AdamW(list(student.parameters()) + list(distiller.parameters()), lr=1e-4)
    trainer = KDSimpleTrainer(student, data, opt, grad_clip=1.0)
    trainer.distiller, trainer.epoch_iters, trainer.task_weight = distiller, 1, 1.0
    trainer.iter = 0
    losses = trainer.compute_losses(next(data))
    for key in ("loss_Con", "loss_FAlgn", "loss_CosSim", "loss_Att", "loss_ClsKD", "loss_ROIKD"):
        assert key in losses and torch.isfinite(losses[key]) and losses[key].requires_grad, key
    sum(losses.values()).backward()


def test_kd_identical_teacher_gives_zero_clskd_roikd_and_identity_pairing():
    """A teacher that is a copy of the student: every student query pairs with the same teacher
    query (A10) and ClsKD / ROIKD are 0 (to float rounding); a perturbed teacher gives non-zero
    terms."""
    import copy

    from mdkd_det.distill.distiller import freeze_teacher
    from mdkd_det.distill.taps import TapRecorder
    from mdkd_det.distill.trainer import build_distiller

    cfg = _cfg(**{"KD.CF.SCHEDULE": "constant"})
    torch.manual_seed(0)
    student = build_model(cfg)
    student.eval()  # BN statistics and dropout as in the (eval-mode) teacher forward
    imgs, _ = _batch()
    terms = {}
    for name in ("copy", "perturbed"):
        teacher = copy.deepcopy(student)
        if name == "perturbed":
            with torch.no_grad():
                for p in teacher.detr.class_embed.parameters():
                    p.add_(0.5)
        teacher = freeze_teacher(teacher)
        distiller = build_distiller(cfg, student, teacher)
        adapter = distiller.adapter
        with TapRecorder(student, adapter.student_taps()) as rec:
            student(imgs)
        s_in, t_in = adapter.student_inputs(rec), adapter.teacher_inputs(teacher, rec)
        out = distiller(s_in, t_in, epoch=0.0)
        terms[name] = {k: out[k].item() for k in ("loss_ClsKD", "loss_ROIKD")}
        if name == "copy":
            q = student.num_queries
            s_logits, s_boxes, _ = adapter._group0(student, rec["outputs"], rec["hs"])
            b, si, ti = pair_queries(s_logits, s_boxes, s_logits.clone(), s_boxes.clone(), top_k=adapter.query_topk)
            order = torch.argsort(b * q + si)
            assert b[order].tolist() == [i // q for i in range(2 * q)]
            assert ti[order].tolist() == si[order].tolist() == list(range(q)) * 2  # identity pairing
            # equal to float rounding: the teacher runs without autograd (inference_mode) and the
            # student with it, and oneDNN may pick other kernels for the two (seen on an AVX2 CPU)
            torch.testing.assert_close(t_in.region_logits, s_in.region_logits.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(t_in.region_embeddings, s_in.region_embeddings.detach(),
                                       rtol=1e-5, atol=1e-5)
            assert isinstance(distiller.roi_connector, torch.nn.Identity)  # equal widths: no connector
    assert terms["copy"] == pytest.approx({"loss_ClsKD": 0.0, "loss_ROIKD": 0.0}, abs=1e-6)
    assert terms["perturbed"]["loss_ClsKD"] > 1e-4  # the zero above is not a constant


# ---- pipeline + export ---------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_rfdetr_pipeline_four_rows_and_export(tmp_path, data_root):
    from mdkd_det.engine.checkpointer import Checkpointer
    from mdkd_det.engine.defaults import do_test
    from mdkd_det.pipeline import PipelineRunner

    out = tmp_path / "mdkd"
    cfg = tiny_cfg(out, max_iter=1, **{
        **TINY_RFDETR,
        "PIPELINE.ENABLED": True,
        "PIPELINE.SOURCES": "('lung_pet_ct_dx_all', 'deeplesion_sample_train')",
        "PIPELINE.ITERS.STUDENT": 2, "PIPELINE.REUSE_TARGET_TEACHER_AS_BASELINE": True,
        "PIPELINE.ITERS.BACKBONE_INIT": 1, "PIPELINE.JOINT_TEACHER_HEAD_INIT": "target_teacher",
        "ADVERSARIAL.SOURCE_IMS_PER_BATCH": 1, "ADVERSARIAL.TARGET_IMS_PER_BATCH": 1,
        "DATASETS.TRAIN_LIMIT": 4, "DATASETS.TEST_LIMIT": 2, "TEST.VIS_NUM": 0,
        "KD.CF.SCHEDULE": "constant",
    })
    res = PipelineRunner(cfg).run()
    assert set(res["rows"]) == {"multi_head", "dataset_specific", "joint_teacher", "student"}
    for row in res["rows"].values():
        assert row["AP"] is not None and row["AP50"] is not None
    md = (out / "results.md").read_text()
    assert "paper Table 17" in md and "rfdetr" in md and "65.83" in md
    assert "source_teacher_lung_pet_ct_dx_all" in res["wall_time_s"] and "backbone_init" in res["wall_time_s"]
    # the Faster R-CNN backbone_init stage initialised every non-fusion stage's backbone
    init = str(out / "backbone_init" / "model_final.pth")
    for stage in ("multi_head", "target_teacher", "student"):
        assert init in (out / stage / "config.yaml").read_text(), stage
    assert "META_ARCHITECTURE: faster_rcnn" in (out / "backbone_init" / "config.yaml").read_text()
    assert "HEAD_INIT: " + str(out / "target_teacher" / "model_final.pth") in (
        out / "joint_teacher" / "config.yaml").read_text()
    # the exported student loads (strict) into a plain RF-DETR built from its config, and evaluates
    scfg = get_cfg()
    scfg.merge_from_file(str(out / "student" / "config.yaml"))
    scfg.defrost()
    scfg.KD.ENABLED = False
    scfg.OUTPUT_DIR = str(tmp_path / "eval")
    plain = build_model(scfg)
    Checkpointer(plain, scfg.OUTPUT_DIR).load(str(out / "student" / "model_student.pth"))
    sd = torch.load(out / "student" / "model_student.pth", map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in sd.items())
    r = do_test(scfg, plain.eval())["lungct_disjoint_test"]["bbox"]
    assert r["AP"] == pytest.approx(res["rows"]["student"]["AP"], abs=1e-6)
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]


def test_dinov2_rfdetr_exports_to_plain_lwdetr():
    """Our plain (DINOv2) RF-DETR state dict loads strictly into rfdetr's own LWDETR and gives the
    same predictions."""
    from rfdetr.models.lwdetr import build_model_from_config

    from mdkd_det.modeling.backbone.rfdetr_dinov2 import rfdetr_model_config
    from mdkd_det.modeling.meta_arch.rfdetr import to_lwdetr_state_dict

    cfg = _cfg(**{"MODEL.BACKBONE.NAME": "rfdetr_dinov2", "MODEL.RFDETR.IN_FEATURES": "[]",
                  "MODEL.RFDETR.HIDDEN_DIM": 0})
    ours = build_model(cfg).eval()
    lw = build_model_from_config(rfdetr_model_config(cfg)).eval()
    lw.load_state_dict(to_lwdetr_state_dict(ours.state_dict()), strict=True)
    x = ours.transform([torch.rand(3, 64, 64)])[0].tensors
    with torch.no_grad():
        a, b = ours.detr(x), lw(x)
    assert torch.allclose(a["pred_logits"], b["pred_logits"], atol=1e-5)
    assert torch.allclose(a["pred_boxes"], b["pred_boxes"], atol=1e-5)


def test_unlabeled_kd_rfdetr_equals_the_labelled_path_without_the_criterion():
    """KD.UNLABELED (paper 003): RF-DETR's forward without targets gives the same KD terms as
    the labelled forward's taps (the decoder ignores targets), and never calls the criterion."""
    import copy

    from mdkd_det.distill.distiller import freeze_teacher
    from mdkd_det.distill.mixin import KDTrainerMixin
    from mdkd_det.distill.taps import TapRecorder
    from mdkd_det.distill.trainer import build_distiller

    cfg = _cfg(**{"KD.CF.SCHEDULE": "constant"})
    torch.manual_seed(0)
    student = build_model(cfg)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.detr.class_embed.parameters():
            p.add_(0.5)
    distiller = build_distiller(cfg, student, freeze_teacher(teacher))
    student.train()
    imgs, tgts = _batch()
    torch.manual_seed(1)
    with TapRecorder(student, distiller.adapter.student_taps()) as rec:
        student(imgs, tgts)
    ref = distiller(distiller.adapter.student_inputs(rec), distiller.teacher_inputs(rec), epoch=0.0)

    def no_criterion(*a, **k):
        raise AssertionError("the criterion (task loss) ran on unlabelled images")

    student.criterion.forward = no_criterion
    mixin = KDTrainerMixin()
    mixin.distiller, mixin.unlabeled_weight = distiller, 0.5
    mixin.unlabeled_terms = ("loss_ClsKD", "loss_ROIKD", "loss_FAlgn")
    torch.manual_seed(1)
    out = mixin.unlabeled_kd(student, [{"image": i} for i in imgs], epoch=0.0)
    assert set(out) == {"loss_unlabeled_ClsKD", "loss_unlabeled_ROIKD", "loss_unlabeled_FAlgn"}
    for k, v in out.items():
        assert v.item() == pytest.approx(0.5 * ref["loss_" + k[len("loss_unlabeled_"):]].item(), rel=1e-5)
    assert out["loss_unlabeled_ClsKD"].item() > 1e-6
