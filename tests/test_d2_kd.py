"""KD in detectron2's training loop: same Distiller/losses/taps, terms in d2's loss dict and
metrics.json, a 5-iteration run, and the student checkpoint in a plain detectron2 model."""

import json

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from mdkd_det.d2 import MDKDTrainer, D2KDSimpleTrainer  # noqa: E402
from mdkd_det.distill import losses as L  # noqa: E402
from mdkd_det.distill.distiller import TERM_KEYS  # noqa: E402
from mdkd_det.distill.taps import TapRecorder  # noqa: E402

from _d2tiny import BASE, TINY, tiny_d2_cfg, write_joint_teacher, write_teachers  # noqa: E402

# the detection terms of Eq. 24 (KD.W_KLD, the image-level KLD of classification, is 0 here)
KD_KEYS = {TERM_KEYS[k] for k in ("con", "falgn", "cos", "att", "clskd", "roikd")}


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("d2_kd")
    return write_joint_teacher(tmp, write_teachers(tmp))


def student_cfg(out_dir, joint, *opts):
    config, weights = joint
    return tiny_d2_cfg(out_dir, "KD.ENABLED", True, "KD.TEACHER_CONFIG", config,
                       "KD.TEACHER_WEIGHTS", weights, "KD.CF.SCHEDULE", "constant",
                       "SOLVER.MAX_ITER", 5, "SOLVER.CHECKPOINT_PERIOD", 100,
                       "DATASETS.TEST", (), *opts)


def test_kd_terms_in_loss_dict_are_finite_and_the_shared_losses(tmp_path, data_root, joint):
    trainer = MDKDTrainer(student_cfg(tmp_path, joint))
    loop = trainer._trainer
    assert isinstance(loop, D2KDSimpleTrainer)
    assert loop.distiller is trainer.distiller
    assert not any(p.requires_grad for p in trainer.distiller.teacher.parameters())
    data = next(iter(loop.data_loader))
    model = loop.model
    adapter = trainer.distiller.adapter
    with EventStorage(0), TapRecorder(model, adapter.student_taps()) as rec:
        losses = loop.kd_forward(model, lambda: model(data))
    assert KD_KEYS <= set(losses), sorted(losses)
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    assert losses["loss_FAlgn"].requires_grad and losses["loss_ROIKD"].requires_grad
    # the teacher's RoI head ran on the student's sampled proposals: rows correspond
    s_in, t_in = adapter.student_inputs(rec), adapter.teacher_inputs(trainer.distiller.teacher, rec)
    m = sum(len(p) for p in rec["sampled"])
    assert s_in.region_logits.shape == t_in.region_logits.shape == (m, 2)
    assert t_in.region_embeddings.shape[0] == m
    # the terms are the pure losses of mdkd_det.distill.losses times weight * cf (cf = 1)
    d = trainer.distiller
    s_f = [d.connectors[s](s_in.features[s]) for s in d.level_pairs]
    t_f = [t_in.features[t] for t in d.level_pairs.values()]
    w = d.weights["falgn"]
    torch.testing.assert_close(losses["loss_FAlgn"].detach(), w * L.falgn(s_f, t_f).detach(),
                               rtol=1e-4, atol=1e-6)
    w = d.weights["clskd"]
    torch.testing.assert_close(losses["loss_ClsKD"].detach(),
                               w * L.cls_kd(s_in.region_logits, t_in.region_logits, T=d.temperature,
                                            kind="softmax", direction=d.kl_direction).detach(),
                               rtol=1e-4, atol=1e-6)


def test_five_iteration_kd_run_and_plain_d2_student(tmp_path, data_root, joint):
    cfg = student_cfg(tmp_path, joint, "KD.CF.SCHEDULE", "linear", "KD.CF.WARMUP", 2.0,
                      "KD.CF.RAMP", 1.0)
    trainer = MDKDTrainer(cfg)
    connectors = {k: v.detach().clone() for k, v in trainer.distiller.state_dict().items()}
    assert connectors, "48-channel teacher vs 32-channel student: 1x1 connectors expected"
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in opt_params for p in trainer.distiller.parameters())
    trainer.resume_or_load(resume=False)
    trainer.train()
    # every term of every step went to detectron2's EventStorage ...
    hist = trainer.storage.histories()
    assert [it for _, it in hist["total_loss"].values()] == [0, 1, 2, 3, 4]
    for k in KD_KEYS:
        # linear cf = clip(epoch - 2, 0, 1) with 1 iteration per "epoch": cf = 0 at iterations
        # 0-2, so the teacher is skipped and no KD term exists there
        assert [it for _, it in hist[k].values()] == [3, 4], k
        assert all(abs(v) < 1e6 for v, _ in hist[k].values()), k
    # ... and its JSONWriter wrote them to metrics.json (last row = the final iteration)
    rows = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert rows[-1]["iteration"] == 4 and KD_KEYS <= set(rows[-1]), rows[-1]
    ckpt = torch.load(tmp_path / "model_final.pth", weights_only=False)
    # the connectors trained and were saved beside (not inside) the student
    assert set(ckpt["distiller"]) == set(connectors)
    assert any(not torch.equal(ckpt["distiller"][k], v) for k, v in connectors.items())
    # the student is a plain detectron2 Faster R-CNN: loads strictly without mdkd keys
    plain = get_cfg()
    plain.set_new_allowed(True)
    plain.merge_from_file(BASE)
    plain.merge_from_list(TINY)
    plain.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    model = build_model(plain)
    model.load_state_dict(ckpt["model"], strict=True)
    model.eval()
    trained = trainer.model.eval()
    x = [{"image": torch.rand(3, 128, 128) * 255, "height": 128, "width": 128}]
    with torch.no_grad():
        a, b = model(x)[0]["instances"], trained(x)[0]["instances"]
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
    torch.testing.assert_close(a.scores, b.scores)
