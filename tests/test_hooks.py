"""mdkd_det.engine.hooks: LR logging, periodic/final checkpoints, EvalHook best model."""

import json
import os

import pytest
import torch
from _engine_toy import ToyModel, make_loader, solver_cfg

from mdkd_det.engine import hooks
from mdkd_det.engine.checkpointer import Checkpointer
from mdkd_det.engine.trainer import SimpleTrainer
from mdkd_det.solver import build_lr_scheduler, build_optimizer


def _setup(tmp_path, max_iter=6):
    model = ToyModel()
    cfg = solver_cfg(**{"SOLVER.MAX_ITER": max_iter, "SOLVER.BASE_LR": 1.0, "SOLVER.WARMUP_ITERS": 0})
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    ck = Checkpointer(model, str(tmp_path), optimizer=opt, scheduler=sched)
    return SimpleTrainer(model, make_loader(), opt), sched, ck


def test_lr_hook_logs_lr_used_then_steps(tmp_path):
    t, sched, _ = _setup(tmp_path, max_iter=4)
    t.register_hooks([hooks.LRScheduler(sched)])
    t.train(0, 4)
    lrs = [v for v, _ in t.storage.history("lr").values()]
    assert lrs == pytest.approx([1.0, 0.5 * (1 + 2 ** -0.5), 0.5, 0.5 * (1 - 2 ** -0.5)])
    assert sched.last_epoch == 4


def test_periodic_and_final_checkpoints(tmp_path):
    t, sched, ck = _setup(tmp_path, max_iter=7)
    t.register_hooks([hooks.LRScheduler(sched), hooks.PeriodicCheckpointer(ck, period=3, max_to_keep=1)])
    t.train(0, 7)
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth")) == ["model_0000005.pth", "model_final.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    data = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert data["iteration"] == 6 and data["scheduler"]["last_epoch"] == 7


def test_eval_hook_period_final_and_best(tmp_path):
    t, sched, ck = _setup(tmp_path, max_iter=7)
    aps = iter([10.0, 30.0, 20.0])
    calls = []

    def eval_fn():
        calls.append(t.iter)
        t.model.eval()  # an evaluator switches mode; the hook must switch back
        return {"bbox": {"AP": next(aps), "AP50": 50.0, "per_class": [1, 2]}, "froc": {"sens@1": 0.5}}

    ev = hooks.EvalHook(3, eval_fn, metric="bbox/AP", checkpointer=ck)
    t.register_hooks([ev])
    t.train(0, 7)
    assert calls == [2, 5, 6]  # every 3 iterations and after the last one
    assert (ev.best_value, ev.best_iter) == (30.0, 5)
    assert [v for v, _ in t.storage.history("bbox/AP").values()] == [10.0, 30.0, 20.0]
    assert "bbox/per_class" not in t.storage.latest() and t.storage.latest()["froc/sens@1"][0] == 0.5
    assert t.last_eval_results["bbox"]["AP"] == 20.0
    best = torch.load(tmp_path / "model_best.pth", weights_only=True)
    assert best["iteration"] == 5 and best["best_value"] == 30.0 and best["best_metric"] == "bbox/AP"
    assert json.loads((tmp_path / "model_best.json").read_text()) == {"metric": "bbox/AP", "value": 30.0, "iteration": 5}
    assert t.model.training


def test_eval_hook_resume_keeps_best(tmp_path):
    (tmp_path / "model_best.json").write_text(json.dumps({"metric": "bbox/AP", "value": 50.0, "iteration": 2}))
    t, sched, ck = _setup(tmp_path, max_iter=6)
    t.model.fc1.weight.data.fill_(0.0)
    ev = hooks.EvalHook(0, lambda: {"bbox": {"AP": 40.0}}, checkpointer=ck)
    t.register_hooks([ev])
    t.train(3, 6)  # a resumed run: 40 < 50 must not overwrite model_best
    assert ev.best_value == 50.0 and not (tmp_path / "model_best.pth").exists()


def test_eval_hook_missing_metric_warns(tmp_path, caplog):
    t, _, ck = _setup(tmp_path, max_iter=2)
    t.register_hooks([hooks.EvalHook(0, lambda: {"segm": {"AP": 1.0}}, checkpointer=ck)])
    t.train(0, 2)
    assert "metric 'bbox/AP' missing" in caplog.text and "segm/AP" in caplog.text
    assert not (tmp_path / "model_best.pth").exists()


def test_flatten_results():
    import numpy as np

    flat = hooks.flatten_results({"a": {"b": np.float32(1.5), "c": torch.tensor(2.0), "d": "x", "e": True},
                                  "f": 3})
    assert flat == {"a/b": 1.5, "a/c": 2.0, "f": 3.0}


def test_eval_hook_restores_global_rngs(tmp_path):
    """Evaluation drawing from torch/NumPy/Python RNGs (test loader, visualiser) leaves them as
    they were, also when it raises (issue 13: exact resume with TEST.EVAL_PERIOD on)."""
    import random

    import numpy as np

    from mdkd_det.engine.checkpointer import get_rng_state

    t, _, _ = _setup(tmp_path, max_iter=2)
    seen = []

    def eval_fn():
        seen.append(get_rng_state())
        torch.rand(3), np.random.rand(), random.random()
        return {"bbox": {"AP": 1.0}}

    ev = hooks.EvalHook(1, eval_fn)
    t.register_hooks([ev])
    t.train(0, 1)
    after = get_rng_state()
    assert torch.equal(after["torch"], seen[0]["torch"]) and after["python"] == seen[0]["python"]
    assert torch.equal(after["numpy"][1], seen[0]["numpy"][1]) and after["numpy"][2] == seen[0]["numpy"][2]

    def failing():
        torch.rand(3)
        raise RuntimeError("eval failed")

    before = torch.get_rng_state()
    bad = hooks.EvalHook(1, failing)
    bad.trainer = t
    with pytest.raises(RuntimeError, match="eval failed"):
        bad._do_eval()
    assert torch.equal(torch.get_rng_state(), before)
