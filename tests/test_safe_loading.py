"""Issue 13, part 1: no code execution from a config or a checkpoint a user is handed.

Each attack plants a payload that would create a marker file when run; every path must refuse
it with a one-line error (status 2 through the CLI) and leave no marker behind.
"""

import argparse
import os
import types

import pytest
import torch

from mdkd_det.config import get_cfg
from mdkd_det.engine.checkpointer import Checkpointer
from mdkd_det.engine.cli import main
from mdkd_det.utils.checkpoint_io import load_checkpoint_file
from mdkd_det.utils.errors import CheckpointError, ConfigError

from _tiny import tiny_cfg


class _Payload:
    """Unpickling this runs ``os.system`` (creates ``marker``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _Benign:
    """A harmless custom class: refused by default, loaded with the explicit opt-in."""

    def __init__(self):
        self.value = 7


def _evil_yaml(path, marker):
    path.write_text(f"OUTPUT_DIR: !!python/object/apply:os.system [\"touch '{marker}'\"]\n")
    return path


def _evil_pth(path, marker):
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    return path


def _check_refused(err, marker, path):
    msg = str(err)
    assert "\n" not in msg and str(path) in msg
    assert "posix.system" in msg or "os.system" in msg
    assert "MODEL.TRUST_CHECKPOINTS" in msg and "not a torch.save file" not in msg
    assert not marker.exists()


# ---- YAML ---------------------------------------------------------------------------------
def test_yaml_python_tag_refused_via_config_file(tmp_path, capsys):
    marker = tmp_path / "pwned"
    cfg_file = _evil_yaml(tmp_path / "evil.yaml", marker)
    assert main(["--config-file", str(cfg_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(cfg_file) in err[0]
    assert "refused the YAML tag '!!python/object/apply:os.system'" in err[0]
    assert not marker.exists()


def test_yaml_python_tag_refused_via_base(tmp_path):
    marker = tmp_path / "pwned"
    base = _evil_yaml(tmp_path / "base.yaml", marker)
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: base.yaml\nSOLVER:\n  MAX_ITER: 3\n")
    with pytest.raises(ConfigError) as e:
        get_cfg().merge_from_file(str(child))
    assert str(base) in str(e.value) and "python/object/apply" in str(e.value)
    assert not marker.exists()


def test_yaml_python_tag_refused_even_if_unsafe_requested(tmp_path):
    marker = tmp_path / "pwned"
    evil = _evil_yaml(tmp_path / "evil.yaml", marker)
    with pytest.raises(ConfigError, match="refused the YAML tag"):
        get_cfg().merge_from_file(str(evil), allow_unsafe=True)
    assert not marker.exists()


def test_yaml_python_tag_refused_via_kd_teacher_config(tmp_path):
    from mdkd_det.distill.trainer import load_teacher_cfg

    marker = tmp_path / "pwned"
    evil = _evil_yaml(tmp_path / "teacher.yaml", marker)
    cfg = get_cfg()
    cfg.KD.TEACHER_CONFIG, cfg.KD.TEACHER_WEIGHTS = str(evil), str(tmp_path / "t.pth")
    with pytest.raises(ConfigError, match="refused the YAML tag"):
        load_teacher_cfg(cfg)
    assert not marker.exists()


def test_invalid_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("SOLVER:\n  MAX_ITER: [1,\n")
    with pytest.raises(ConfigError) as e:
        get_cfg().merge_from_file(str(bad))
    assert "\n" not in str(e.value) and str(bad) in str(e.value) and "invalid YAML" in str(e.value)


# ---- checkpoints --------------------------------------------------------------------------
def test_loader_refuses_payload_and_opt_in_loads_benign(tmp_path):
    marker = tmp_path / "pwned"
    evil = _evil_pth(tmp_path / "evil.pth", marker)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_file(str(evil), what="MODEL.WEIGHTS")
    _check_refused(e.value, marker, evil)
    benign = tmp_path / "benign.pth"
    torch.save({"model": {"w": torch.ones(2)}, "obj": _Benign()}, benign)
    with pytest.raises(CheckpointError, match="_Benign"):
        load_checkpoint_file(str(benign))
    assert load_checkpoint_file(str(benign), trust=True)["obj"].value == 7


def test_loader_allows_rfdetr_official_format(tmp_path):
    """rfdetr's checkpoints pickle ``args`` as a Namespace: allow-listed, no opt-in needed."""
    path = tmp_path / "rf-detr-nano.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(num_classes=90, lr=1e-4),
                "epoch": 11, "ns": types.SimpleNamespace(a=1)}, path)
    ckpt = load_checkpoint_file(str(path))
    assert ckpt["args"].num_classes == 90 and ckpt["epoch"] == 11


def test_checkpointer_model_weights_and_resume_refuse_payload(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = _evil_pth(tmp_path / "evil.pth", marker)
    model = torch.nn.Linear(1, 1)
    with pytest.raises(CheckpointError) as e:
        Checkpointer(model, str(tmp_path)).load(str(evil))
    _check_refused(e.value, marker, evil)
    # --resume reads OUTPUT_DIR/last_checkpoint
    (tmp_path / "last_checkpoint").write_text("evil.pth")
    with pytest.raises(CheckpointError):
        Checkpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert not marker.exists()


def test_cli_eval_only_refuses_payload(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = _evil_pth(tmp_path / "evil.pth", marker)
    rc = main(["--config-file", "configs/LungCT/faster_rcnn_R18_FPN_demo.yaml", "--eval-only",
               "MODEL.WEIGHTS", str(evil), "OUTPUT_DIR", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "MODEL.TRUST_CHECKPOINTS" in err[0]
    assert not marker.exists()


def test_fusion_teachers_refuse_payload(tmp_path):
    from mdkd_det.modeling.backbone.build import build_backbone

    marker = tmp_path / "pwned"
    evil = _evil_pth(tmp_path / "teacher.pth", marker)
    cfg = tiny_cfg(tmp_path)
    cfg.FUSION.TEACHERS = [str(evil)]
    cfg.FUSION.TEACHER_BACKBONES = [cfg.MODEL.BACKBONE.NAME]
    with pytest.raises(CheckpointError) as e:
        build_backbone(cfg, "fusion")
    _check_refused(e.value, marker, evil)


def test_kd_teacher_weights_refuse_payload(tmp_path):
    from mdkd_det.distill.trainer import build_teacher

    marker = tmp_path / "pwned"
    evil = _evil_pth(tmp_path / "teacher.pth", marker)
    tcfg_file = tmp_path / "teacher.yaml"
    tcfg_file.write_text(tiny_cfg(tmp_path).dump())
    cfg = tiny_cfg(tmp_path)
    cfg.KD.TEACHER_CONFIG, cfg.KD.TEACHER_WEIGHTS = str(tcfg_file), str(evil)
    with pytest.raises(CheckpointError) as e:
        build_teacher(cfg)
    _check_refused(e.value, marker, evil)


@pytest.mark.parametrize("key", ["MODEL.RFDETR.PRETRAIN_WEIGHTS", "MODEL.RFDETR.BACKBONE_INIT",
                                 "MODEL.HEAD_INIT"])
def test_rfdetr_weights_refuse_payload(tmp_path, key):
    pytest.importorskip("rfdetr")
    from mdkd_det.engine.defaults import build_model
    from test_rfdetr import _cfg as rfdetr_cfg

    marker = tmp_path / "pwned"
    evil = _evil_pth(tmp_path / "rf.pth", marker)
    cfg = rfdetr_cfg(**{key: str(evil)})
    with pytest.raises(CheckpointError) as e:
        build_model(cfg)
    _check_refused(e.value, marker, evil)
