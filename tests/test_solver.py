"""mdkd_det.solver.build: optimizer choice/filtering and per-iteration LR schedules."""

import math

import pytest
import torch
from _engine_toy import ToyModel, solver_cfg

from mdkd_det.solver import build_lr_scheduler, build_optimizer
from mdkd_det.utils.errors import ConfigError


def _lrs(cfg, n):
    """LR used at iterations 0..n-1 when stepping once per iteration."""
    opt = build_optimizer(cfg, [torch.zeros(1, requires_grad=True)])
    sched = build_lr_scheduler(cfg, opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_reference_values():
    cfg = solver_cfg(**{"SOLVER.BASE_LR": 2.0, "SOLVER.MAX_ITER": 100, "SOLVER.WARMUP_ITERS": 10,
                        "SOLVER.WARMUP_FACTOR": 0.1, "SOLVER.LR_SCHEDULER_NAME": "WarmupCosineLR"})
    lrs = _lrs(cfg, 101)
    cos = lambda it: 0.5 * (1 + math.cos(math.pi * it / 100))  # noqa: E731
    assert lrs[0] == pytest.approx(2.0 * 0.1)  # warmup factor at iteration 0
    assert lrs[5] == pytest.approx(2.0 * (0.1 * 0.5 + 0.5) * cos(5))  # halfway through warmup
    assert lrs[10] == pytest.approx(2.0 * cos(10))  # warmup over
    assert lrs[50] == pytest.approx(1.0)  # half of BASE_LR at mid-training
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)  # reaches 0 at MAX_ITER
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone after warmup


def test_multistep_with_warmup_reference_values():
    cfg = solver_cfg(**{"SOLVER.BASE_LR": 1.0, "SOLVER.MAX_ITER": 100, "SOLVER.WARMUP_ITERS": 4,
                        "SOLVER.WARMUP_FACTOR": 0.2, "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR",
                        "SOLVER.STEPS": (30, 60), "SOLVER.GAMMA": 0.5})
    lrs = _lrs(cfg, 100)
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[2] == pytest.approx(0.6)  # 0.2 + 0.8 * 2/4
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[29] == pytest.approx(1.0)
    assert lrs[30] == pytest.approx(0.5)
    assert lrs[59] == pytest.approx(0.5)
    assert lrs[60] == pytest.approx(0.25)
    assert lrs[99] == pytest.approx(0.25)


def test_steps_beyond_max_iter_are_ignored_and_bad_steps_rejected():
    cfg = solver_cfg(**{"SOLVER.BASE_LR": 1.0, "SOLVER.MAX_ITER": 10, "SOLVER.WARMUP_ITERS": 0,
                        "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR", "SOLVER.STEPS": (5, 700)})
    assert _lrs(cfg, 10)[4:7] == pytest.approx([1.0, 0.1, 0.1])
    cfg.SOLVER.STEPS = (6, 3)
    with pytest.raises(ConfigError, match="SOLVER.STEPS"):
        _lrs(cfg, 1)


@pytest.mark.parametrize("key,value", [
    ("SOLVER.LR_SCHEDULER_NAME", "WarmupPolyLR"),
    ("SOLVER.MAX_ITER", 0),
    ("SOLVER.WARMUP_FACTOR", 1.5),
])
def test_bad_scheduler_config_names_the_key(key, value):
    cfg = solver_cfg(**{key: value})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_lr_scheduler(cfg, build_optimizer(cfg, ToyModel()))


def test_unknown_optimizer_names_the_key():
    with pytest.raises(ConfigError, match=r"SOLVER\.OPTIMIZER.*Adam2"):
        build_optimizer(solver_cfg(**{"SOLVER.OPTIMIZER": "Adam2"}), ToyModel())


def test_optimizer_types_and_hyperparameters():
    model = ToyModel()
    opt = build_optimizer(solver_cfg(**{"SOLVER.OPTIMIZER": "SGD", "SOLVER.MOMENTUM": 0.8,
                                        "SOLVER.BASE_LR": 0.3, "SOLVER.WEIGHT_DECAY": 0.01}), model)
    assert isinstance(opt, torch.optim.SGD)
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.3, 0.8, 0.01)
    opt = build_optimizer(solver_cfg(**{"SOLVER.OPTIMIZER": "adamw"}), model)
    assert isinstance(opt, torch.optim.AdamW)


def test_detectron2_param_groups_and_nesterov():
    """detectron2's trainer builds its optimizer here (issue 14): its per-group LR / weight
    decay (``get_default_optimizer_params``) are kept; ``SOLVER.NESTEROV`` when present."""
    model = ToyModel()
    groups = [{"params": [model.reg.weight], "lr": 0.1, "weight_decay": 0.0},
              {"params": [model.reg.bias], "lr": 0.2, "weight_decay": 1e-4}]
    cfg = solver_cfg(**{"SOLVER.OPTIMIZER": "SGD", "SOLVER.MOMENTUM": 0.9})
    opt = build_optimizer(cfg, groups)
    assert [(g["lr"], g["weight_decay"], g["nesterov"]) for g in opt.param_groups] == \
        [(0.1, 0.0, False), (0.2, 1e-4, False)]
    cfg.SOLVER.set_new_allowed(True)
    cfg.SOLVER.NESTEROV = True  # a detectron2 key
    assert build_optimizer(cfg, groups).param_groups[0]["nesterov"] is True


def test_only_trainable_params_and_subsets():
    model = ToyModel()
    model.fc1.requires_grad_(False)
    cfg = solver_cfg()
    opt = build_optimizer(cfg, model)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in [*model.reg.parameters(), *model.cls.parameters()]}
    # an iterable subset (later stages pass e.g. only a connector), with a duplicate
    sub = build_optimizer(cfg, [model.reg.weight, model.reg.weight, model.fc1.weight])
    assert [p for g in sub.param_groups for p in g["params"]] == [model.reg.weight]
    # param-group dicts keep their options
    grp = build_optimizer(cfg, [{"params": list(model.cls.parameters()), "lr": 0.5}])
    assert grp.param_groups[0]["lr"] == 0.5 and len(grp.param_groups[0]["params"]) == 2
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="requires_grad"):
        build_optimizer(cfg, model)


def test_scheduler_state_is_resumable_and_config_shaped():
    cfg = solver_cfg(**{"SOLVER.BASE_LR": 1.0, "SOLVER.MAX_ITER": 20})
    a = build_optimizer(cfg, ToyModel())
    sa = build_lr_scheduler(cfg, a)
    for _ in range(7):
        a.step()
        sa.step()
    b = build_optimizer(cfg, ToyModel())
    sb = build_lr_scheduler(cfg, b)
    state = sa.state_dict()
    assert state["lr_lambdas"] == [None]  # the schedule's shape is not pickled
    assert all(isinstance(v, (int, float, list, bool, type(None))) for v in state.values()), state
    b.load_state_dict(a.state_dict())
    sb.load_state_dict(state)
    for _ in range(3):
        a.step(); sa.step(); b.step(); sb.step()  # noqa: E702
        assert b.param_groups[0]["lr"] == a.param_groups[0]["lr"]
