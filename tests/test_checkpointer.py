"""mdkd_det.engine.checkpointer: atomic save, strict load, RNG restore, formats, export."""

import datetime
import os
import random

import numpy as np
import pytest
import torch
from _engine_toy import ToyModel, solver_cfg
from torch import nn

from mdkd_det.engine.checkpointer import Checkpointer, export_model, get_rng_state, set_rng_state
from mdkd_det.solver import build_lr_scheduler, build_optimizer
from mdkd_det.utils.errors import CheckpointError


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _setup(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = ToyModel()
    cfg = solver_cfg()
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    return model, opt, sched, Checkpointer(model, str(tmp_path), optimizer=opt, scheduler=sched)


def _train_a_bit(model, opt, sched, n=2):
    for _ in range(n):
        loss = sum(model([torch.randn(8)] * 2, [{"y": torch.tensor(1.0), "c": torch.tensor(1)}] * 2).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_save_load_roundtrip_with_extra_and_last_checkpoint(tmp_path):
    model, opt, sched, ck = _setup(tmp_path)
    _train_a_bit(model, opt, sched)
    path = ck.save("model_0000001", iteration=1, note="x")
    assert os.path.basename(path) == "model_0000001.pth"
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    saved, opt_state = _params(model), opt.state_dict()

    model2, opt2, sched2, ck2 = _setup(tmp_path, seed=1)
    assert not _same(_params(model2), saved)
    extra = ck2.resume_or_load("", resume=True)
    assert extra == {"iteration": 1, "note": "x"}
    assert _same(_params(model2), saved)
    assert sched2.last_epoch == 2 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt_state["state"][0]["exp_avg"])
    # no leftover temporary files
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


def test_crash_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    model, opt, sched, ck = _setup(tmp_path)
    ck.save("model_final", iteration=0)
    before = _params(model)
    with torch.no_grad():
        model.fc1.weight.add_(1.0)  # would be visible if the broken save overwrote the file
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial data")  # half-written zip
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="simulated"):
        ck.save("model_final", iteration=1)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]  # tmp file removed
    model2, *_ , ck2 = _setup(tmp_path, seed=5)
    assert ck2.load(str(tmp_path / "model_final.pth"), checkpointables=[])["iteration"] == 0
    assert _same(_params(model2), before)


class _Renamed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)  # shape differs
        self.reg = nn.Linear(32, 1)  # shape differs
        self.head = nn.Linear(32, 3)  # name differs from ToyModel.cls


def test_key_mismatch_error_names_file_and_keys(tmp_path):
    model, *_, ck = _setup(tmp_path)
    path = ck.save("model_final")
    other = _Renamed()
    with pytest.raises(CheckpointError) as ei:
        Checkpointer(other, str(tmp_path / "o")).load(path)
    msg = str(ei.value)
    assert path in msg
    assert "missing keys (2): head.weight, head.bias" in msg
    assert "unexpected keys (2): cls.weight, cls.bias" in msg
    assert "fc1.weight: checkpoint (16, 8) vs model (32, 8)" in msg
    # non-strict: loads what matches (nothing changes shape), leaves the rest
    small = ToyModel(hidden=16)
    small.cls = nn.Linear(16, 5)  # only the cls shapes differ
    before_cls = small.cls.weight.clone()
    Checkpointer(small, "").load(path, strict=False)
    assert torch.equal(small.fc1.weight, model.fc1.weight)
    assert torch.equal(small.cls.weight, before_cls)


def test_rng_restored_on_resume_not_on_weights_load(tmp_path):
    model, opt, sched, ck = _setup(tmp_path)
    random.seed(1); np.random.seed(1); torch.manual_seed(1)  # noqa: E702
    ck.save("model_0000000", iteration=0)
    expected = (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3))
    random.seed(99); np.random.seed(99); torch.manual_seed(99)  # noqa: E702
    ck.resume_or_load("", resume=True)
    got = (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])
    # loading weights only (not a resume) leaves the RNGs alone
    torch.manual_seed(99)
    ref = torch.rand(3)
    torch.manual_seed(99)
    ck.resume_or_load(str(tmp_path / "model_0000000.pth"), resume=False)
    assert torch.equal(torch.rand(3), ref)


def test_rng_state_roundtrip_with_cached_gaussian():
    np.random.seed(3)
    np.random.randn()  # leaves a cached Gaussian (has_gauss=1)
    st = get_rng_state()
    a = np.random.randn(4)
    set_rng_state(st)
    assert np.array_equal(np.random.randn(4), a)


def test_plain_state_dicts_and_ddp_prefix(tmp_path):
    torch.manual_seed(0)
    src = ToyModel()
    torch.save(src.state_dict(), tmp_path / "plain.pth")  # e.g. torchvision weights
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "ddp.pth")
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, tmp_path / "lightning.pth")
    for name in ("plain.pth", "ddp.pth", "lightning.pth"):
        dst = ToyModel()
        assert Checkpointer(dst, "").load(str(tmp_path / name)) == {}
        assert _same(_params(dst), _params(src)), name


def test_unreadable_and_untrusted_files(tmp_path):
    model, *_, ck = _setup(tmp_path)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad.pth \(checkpoint\): unreadable"):
        ck.load(str(tmp_path / "bad.pth"))
    with pytest.raises(CheckpointError, match="not found: .*nope.pth"):
        ck.load(str(tmp_path / "nope.pth"))
    torch.save({"model": model.state_dict(), "when": datetime.date(2026, 1, 1)}, tmp_path / "obj.pth")
    with pytest.raises(CheckpointError, match="datetime.date.*MODEL.TRUST_CHECKPOINTS"):
        ck.load(str(tmp_path / "obj.pth"))
    trusted = Checkpointer(model, "", trust_checkpoints=True)
    assert trusted.load(str(tmp_path / "obj.pth"))["when"] == datetime.date(2026, 1, 1)
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="odd.pth: not a model checkpoint"):
        ck.load(str(tmp_path / "odd.pth"))
    (tmp_path / "last_checkpoint").write_text("gone.pth")
    with pytest.raises(CheckpointError, match="gone.pth"):
        ck.resume_or_load("", resume=True)


def test_requested_checkpointable_missing(tmp_path):
    model, opt, sched, ck = _setup(tmp_path)
    export_model(model, str(tmp_path / "weights_only.pth"))
    with pytest.raises(CheckpointError, match="no 'optimizer' state"):
        ck.load(str(tmp_path / "weights_only.pth"), checkpointables=["optimizer"])


def test_export_model_drops_prefixes(tmp_path):
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = ToyModel()
            self.teacher = ToyModel()
            self.connectors = nn.Linear(2, 2)

    w = Wrapper()
    path = export_model(w, str(tmp_path / "student.pth"), drop_prefixes=("teacher.", "connectors."))
    data = torch.load(path, weights_only=True)
    assert list(data) == ["model"]
    assert set(data["model"]) == {f"student.{k}" for k in ToyModel().state_dict()}
    with pytest.raises(CheckpointError, match="remove every key"):
        export_model(w, str(tmp_path / "x.pth"), drop_prefixes=("",))


def test_non_main_process_does_not_write(tmp_path):
    model, *_ = _setup(tmp_path)
    ck = Checkpointer(model, str(tmp_path), save_to_disk=False)
    assert ck.save("model_final") == ""
    assert os.listdir(tmp_path) == []
