"""mdkd_det.engine.trainer: hook order, clipping, AMP (bf16 on CPU), non-finite losses,
bit-exact resume."""

import pytest
import torch
from _engine_toy import ToyModel, make_loader, solver_cfg

from mdkd_det.engine import hooks
from mdkd_det.engine.checkpointer import Checkpointer
from mdkd_det.engine.trainer import SimpleTrainer, TrainerBase
from mdkd_det.solver import build_lr_scheduler, build_optimizer
from mdkd_det.utils.errors import DatasetError


class Recorder(hooks.HookBase):
    def __init__(self, log):
        self.log = log

    def before_train(self):
        self.log.append(("before_train", self.trainer.iter))

    def after_train(self):
        self.log.append(("after_train", self.trainer.iter))

    def before_step(self):
        self.log.append(("before_step", self.trainer.iter))

    def after_backward(self):
        self.log.append(("after_backward", self.trainer.iter))

    def after_step(self):
        self.log.append(("after_step", self.trainer.iter))


def _trainer(model=None, loader=None, **kw):
    model = model or ToyModel()
    opt = build_optimizer(solver_cfg(), model)
    return SimpleTrainer(model, loader if loader is not None else make_loader(), opt, **kw)


def test_hook_order_and_storage():
    log = []
    t = _trainer()
    t.register_hooks([Recorder(log), None])
    t.train(2, 4)
    assert log == [("before_train", 2),
                   ("before_step", 2), ("after_backward", 2), ("after_step", 2),
                   ("before_step", 3), ("after_backward", 3), ("after_step", 3),
                   ("after_train", 4)]
    hist = t.storage.history("total_loss").values()
    assert [it for _, it in hist] == [2, 3]
    assert hist[0][0] == pytest.approx(t.storage.history("loss_reg").values()[0][0]
                                       + t.storage.history("loss_cls").values()[0][0])
    assert "data_time" in t.storage.latest()


def test_after_train_runs_after_exception_and_loader_is_not_recreated():
    calls = {"iter": 0}

    class CountingLoader:
        def __iter__(self):
            calls["iter"] += 1
            return make_loader(crash_at=3)

    log = []
    t = _trainer(loader=CountingLoader())
    t.register_hooks([Recorder(log)])
    with pytest.raises(RuntimeError, match="simulated crash at iteration 3"):
        t.train(0, 10)
    assert calls["iter"] == 1
    assert log[-1] == ("after_train", 3)


def test_exhausted_loader_raises_dataset_error():
    t = _trainer(loader=[next(make_loader())])
    with pytest.raises(DatasetError, match="ran out of batches at iteration 1"):
        t.train(0, 3)


def test_grad_clip_applied():
    def one_step(clip):
        torch.manual_seed(0)
        model = ToyModel(loss_scale=100.0)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        t = SimpleTrainer(model, make_loader(), opt, grad_clip=clip)
        t.train(0, 1)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        return float((after - before).norm()), t.storage.latest()

    step, latest = one_step(0.5)
    assert step == pytest.approx(0.5, rel=1e-4)  # lr 1 * clipped gradient norm
    assert latest["grad_norm"][0] > 0.5  # logged norm is the one before clipping
    unclipped, latest = one_step(None)
    assert unclipped > 5.0 and "grad_norm" not in latest


def test_amp_bf16_on_cpu():
    torch.manual_seed(0)
    model = ToyModel()
    before = model.fc1.weight.detach().clone()
    t = _trainer(model, amp=True)
    t.train(0, 2)
    assert t.grad_scaler is None
    assert model.seen_autocast == [torch.bfloat16, torch.bfloat16]
    assert model.fc1.weight.dtype == torch.float32 and not torch.equal(model.fc1.weight, before)
    assert torch.isfinite(torch.tensor(t.storage.latest()["total_loss"][0]))
    # without amp, no autocast
    model2 = ToyModel()
    _trainer(model2).train(0, 1)
    assert model2.seen_autocast == [None]


def test_non_finite_loss_raises_with_dict_and_iteration():
    class NanAt2(ToyModel):
        calls = 0

        def forward(self, images, targets):
            out = super().forward(images, targets)
            NanAt2.calls += 1
            if NanAt2.calls == 3:
                out["loss_reg"] = out["loss_reg"] * float("nan")
            return out

    t = _trainer(NanAt2())
    with pytest.raises(FloatingPointError, match=r"iteration 2: loss_dict = \{'loss_reg': nan, 'loss_cls': "):
        t.train(0, 5)


def test_compute_losses_override_point():
    class KDLike(SimpleTrainer):
        def compute_losses(self, batch):
            d = super().compute_losses(batch)
            d["loss_kd"] = 0.5 * d["loss_reg"].detach() + 0 * sum(p.sum() for p in self.model.parameters())
            return d

    model = ToyModel()
    t = KDLike(model, make_loader(), build_optimizer(solver_cfg(), model))
    t.train(0, 1)
    latest = t.storage.latest()
    assert latest["loss_kd"][0] == pytest.approx(0.5 * latest["loss_reg"][0])
    assert latest["total_loss"][0] == pytest.approx(
        latest["loss_kd"][0] + latest["loss_reg"][0] + latest["loss_cls"][0])


def test_trainer_state_dict_holds_hook_state():
    t = TrainerBase()
    ev = hooks.EvalHook(0, lambda: {}, metric="bbox/AP")
    ev.best_value, ev.best_iter = 0.7, 9
    t.register_hooks([hooks.IterationTimer(), ev])
    state = t.state_dict()
    assert state["hooks"] == {"EvalHook": {"best_value": 0.7, "best_iter": 9, "metric": "bbox/AP"}}
    t2 = TrainerBase()
    ev2 = hooks.EvalHook(0, lambda: {}, metric="bbox/AP")
    t2.register_hooks([ev2])
    t2.load_state_dict(state)
    assert (ev2.best_value, ev2.best_iter, t2.iter) == (0.7, 9, state["iteration"])


# ---- resume exactness ---------------------------------------------------------------------------
MAX_ITER = 6


def _build(out_dir, init_seed, dropout):
    """Fresh process objects: model, optimizer, scheduler, checkpointer."""
    torch.manual_seed(init_seed)
    model = ToyModel(dropout=dropout)
    cfg = solver_cfg(**{"SOLVER.MAX_ITER": MAX_ITER})
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    ck = Checkpointer(model, str(out_dir), optimizer=opt, scheduler=sched)
    return model, opt, sched, ck


def _train(model, opt, sched, ck, start_iter, crash_at=None):
    t = SimpleTrainer(model, make_loader(start_iter=start_iter, crash_at=crash_at), opt, grad_clip=1.0)
    t.register_hooks([hooks.IterationTimer(), hooks.LRScheduler(sched),
                      hooks.PeriodicCheckpointer(ck, period=3)])
    t.train(start_iter, MAX_ITER)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_resume_is_bit_exact(tmp_path, dropout):
    # uninterrupted run
    model, opt, sched, ck = _build(tmp_path / "straight", 0, dropout)
    torch.manual_seed(1234)
    _train(model, opt, sched, ck, 0)
    straight = _state(model)

    # run that checkpoints iteration 2, then crashes while fetching iteration 4's batch
    model, opt, sched, ck = _build(tmp_path / "crash", 0, dropout)
    torch.manual_seed(1234)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(model, opt, sched, ck, 0, crash_at=4)
    assert (tmp_path / "crash" / "last_checkpoint").read_text() == "model_0000002.pth"

    # "new process": new objects (different init and RNG), resume, rebuild loader at start_iter
    model, opt, sched, ck = _build(tmp_path / "crash", 99, dropout)
    torch.manual_seed(4321)
    start_iter = ck.resume_or_load("", resume=True)["iteration"] + 1
    assert start_iter == 3 and sched.last_epoch == 3
    _train(model, opt, sched, ck, start_iter)
    resumed = _state(model)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k

    if dropout:
        # control: without restoring the RNG, dropout masks differ and so do the weights
        model, opt, sched, ck = _build(tmp_path / "crash", 99, dropout)
        ck.load(str(tmp_path / "crash" / "model_0000002.pth"), restore_rng=False)
        torch.manual_seed(4321)
        _train(model, opt, sched, ck, 3)
        assert not all(torch.equal(straight[k], v) for k, v in _state(model).items())
