"""Paper 004 (CMEDL) concurrent teacher-student training: KD.ONLINE_TEACHER (issue 15)."""

import json
import os

import pytest
import torch

from mdkd_det.distill.trainer import KDTrainer
from mdkd_det.utils.errors import ConfigError

from _tiny import crashing_kd_trainer, tiny_kd_cfg

ON = {"KD.ONLINE_TEACHER.ENABLED": True, "SOLVER.CHECKPOINT_PERIOD": 2}


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_teacher_trains_on_its_task_loss_and_kd_terms_do_not_reach_it(tmp_path, data_root):
    cfg = tiny_kd_cfg(tmp_path, max_iter=3, **ON)
    trainer = KDTrainer(cfg)
    teacher = trainer.teacher
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    start = _state(teacher)
    # the loaded start is the teacher checkpoint
    saved = torch.load(cfg.KD.TEACHER_WEIGHTS, weights_only=True)["model"]
    assert all(torch.equal(start[k], saved[k]) for k in saved)
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in teacher.parameters()} <= opt_params
    # one KD step's terms alone give the teacher no gradient; its own loss does
    trainer.resume_or_load(resume=False)
    trainer._trainer = trainer.build_trainer(trainer.model, trainer.build_train_loader(0))
    st = trainer._trainer
    st.iter = 100  # cf = 1
    batch = next(iter(st.data_loader))
    losses = st.compute_losses(batch)
    kd = [v for k, v in losses.items() if k in ("loss_FAlgn", "loss_ClsKD", "loss_ROIKD")]
    own = [v for k, v in losses.items() if k.startswith("loss_teacher_")]
    assert len(kd) == 3 and {"loss_teacher_classifier", "loss_teacher_objectness"} <= set(losses)
    sum(kd).backward(retain_graph=True)
    assert all(p.grad is None for p in teacher.parameters())
    sum(own).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in teacher.parameters())
    assert teacher.training  # back in train mode after the KD forward ran it in eval()


def test_online_run_trains_both_exports_the_teacher_and_resumes_exactly(tmp_path, data_root):
    Crashing = crashing_kd_trainer(3)

    base = tiny_kd_cfg(tmp_path, max_iter=4, **ON)

    def cfg(run):
        c = base.clone()
        c.OUTPUT_DIR = str(tmp_path / run)
        return c

    straight = KDTrainer(cfg("straight"))
    start = _state(straight.teacher)
    straight.resume_or_load(resume=False)
    straight.train()
    out = tmp_path / "straight"
    assert (out / "model_teacher.pth").is_file() and (out / "model_student.pth").is_file()
    rows = [json.loads(r) for r in (out / "metrics.json").read_text().splitlines()]
    assert sum("loss_teacher_classifier" in r for r in rows) == 4
    moved = _state(straight.teacher)
    assert any(not torch.equal(start[k], moved[k]) for k in start if start[k].is_floating_point())
    exported = torch.load(out / "model_teacher.pth", weights_only=True)["model"]
    assert all(torch.equal(exported[k], moved[k]) for k in moved)

    crash = Crashing(cfg("crash"))
    crash.resume_or_load(resume=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crash.train()
    torch.manual_seed(999)  # a new process: other RNG state, restored by the checkpoint
    resumed = KDTrainer(cfg("crash"))
    assert resumed.resume_or_load(resume=True) == 2
    resumed.train()
    for a, b in ((straight.model, resumed.model), (straight.teacher, resumed.teacher)):
        sa, sb = _state(a), _state(b)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_teacher_from_scratch_when_no_weights(tmp_path, data_root):
    cfg = tiny_kd_cfg(tmp_path, max_iter=1, **ON)
    cfg.KD.TEACHER_WEIGHTS = ""
    trainer = KDTrainer(cfg)
    saved = torch.load(os.path.join(tmp_path, "teacher", "model_final.pth"), weights_only=True)["model"]
    own = trainer.teacher.state_dict()
    assert any(not torch.equal(own[k], saved[k]) for k in saved if saved[k].is_floating_point())


@pytest.mark.parametrize("over, match", [
    ({"FROZEN_TEACHER.FOLD_BN": True}, "FOLD_BN and FROZEN_TEACHER.CACHE_DIR must be off"),
    ({"FROZEN_TEACHER.CACHE_DIR": "/tmp/x"}, "must be off"),
    ({"MODEL.META_ARCHITECTURE": "rfdetr"}, "'rfdetr' is not supported"),
])
def test_config_errors_before_anything_is_built(tmp_path, over, match):
    from mdkd_det.distill.online_teacher import check_online_teacher_config
    from _tiny import tiny_cfg

    cfg = tiny_cfg(tmp_path, **{"KD.ENABLED": True, **ON, **over})
    with pytest.raises(ConfigError, match=match) as e:
        check_online_teacher_config(cfg)
    assert "\n" not in str(e.value)
