"""mdkd_det.engine.events: storage, metrics.json lines, TensorBoard files, progress logging."""

import glob
import json
import logging

import pytest
import torch
from _engine_toy import ToyModel, make_loader, solver_cfg

from mdkd_det.engine import hooks
from mdkd_det.engine.events import EventStorage, JSONWriter, ProgressWriter, TensorboardWriter, get_event_storage
from mdkd_det.engine.trainer import SimpleTrainer
from mdkd_det.solver import build_lr_scheduler, build_optimizer


def test_storage_context_smoothing_and_history():
    with pytest.raises(RuntimeError, match="inside a 'with EventStorage"):
        get_event_storage()
    with EventStorage(start_iter=5) as s:
        assert get_event_storage() is s
        for v in (1.0, 9.0, 2.0, 3.0):
            s.put_scalar("loss", torch.tensor(v))
            s.put_scalar("lr", v / 10, smoothing_hint=False)
            s.step()
        assert s.iter == 9
        assert [it for _, it in s.history("loss").values()] == [5, 6, 7, 8]
        smooth = s.latest_with_smoothing_hint(window_size=3)
        assert smooth["loss"] == (3.0, 8)  # median of 9, 2, 3
        assert smooth["lr"] == (0.3, 8)  # not smoothed
        with pytest.raises(ValueError, match="smoothing_hint"):
            s.put_scalar("lr", 1.0)
        with pytest.raises(ValueError, match="single number"):
            s.put_scalar("x", torch.ones(2))
        with pytest.raises(KeyError, match="nope"):
            s.history("nope")
    with pytest.raises(RuntimeError):
        get_event_storage()


def test_writers_during_training(tmp_path, caplog):
    model = ToyModel()
    cfg = solver_cfg()
    opt = build_optimizer(cfg, model)
    t = SimpleTrainer(model, make_loader(), opt)
    writers = [JSONWriter(str(tmp_path / "metrics.json"), window_size=2),
               TensorboardWriter(str(tmp_path)), ProgressWriter(5)]
    t.register_hooks([hooks.IterationTimer(warmup_iter=0), hooks.LRScheduler(build_lr_scheduler(cfg, opt)),
                      hooks.PeriodicWriter(writers, period=2)])
    with caplog.at_level(logging.INFO, logger="mdkd_det.engine.events"):
        t.train(0, 5)

    lines = [json.loads(x) for x in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [d["iteration"] for d in lines] == [1, 3, 4]  # every 2 iterations + the last one
    for d in lines:
        assert {"total_loss", "loss_reg", "loss_cls", "lr", "time", "data_time"} <= set(d)
    losses = [v for v, _ in t.storage.history("total_loss").values()]
    assert lines[1]["total_loss"] == pytest.approx((losses[2] + losses[3]) / 2)  # median of window 2
    assert lines[2]["lr"] == pytest.approx(t.storage.history("lr").values()[-1][0])  # LR unsmoothed

    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [e.step for e in acc.Scalars("total_loss")] == [1, 3, 4]

    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iter: ")]
    assert [m.split("  ")[0] for m in msgs] == ["iter: 2/5", "iter: 4/5", "iter: 5/5"]
    assert "eta: 0:00:00" in msgs[-1] and "total_loss: " in msgs[-1] and "lr: " in msgs[-1]


def test_json_writer_appends_across_runs(tmp_path):
    path = str(tmp_path / "out" / "metrics.json")
    for start in (0, 3):
        with EventStorage(start) as s:
            w = JSONWriter(path)
            s.put_scalar("loss", 1.5)
            s.put_scalar("bad", float("nan"))
            w.write()
            w.write()  # nothing new -> no line
            w.close()
    lines = [json.loads(x) for x in open(path).read().splitlines()]
    assert lines == [{"iteration": 0, "bad": None, "loss": 1.5}, {"iteration": 3, "bad": None, "loss": 1.5}]


def test_progress_bar_when_enabled(tmp_path, capsys):
    with EventStorage(0) as s:
        w = ProgressWriter(3, enable_bar=True)
        for _ in range(3):
            s.put_scalar("loss_a", 0.25)
            w.tick()
            s.step()
        assert w._bar.n == 3
        w.close()
    err = capsys.readouterr().err
    assert "3/3" in err and "loss_a=0.25" in err
