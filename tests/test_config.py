"""Config: defaults, _BASE_ inheritance, CLI overrides, strict keys with file-naming errors."""

import pytest

from mdkd_det.config import get_cfg
from mdkd_det.utils.errors import ConfigError


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_defaults_documented_values():
    cfg = get_cfg()
    assert cfg.MODEL.BACKBONE.NAME == "resnet18_fpn"
    assert cfg.SOLVER.CLIP_GRADIENTS.MAX_NORM == 5.0
    assert cfg.KD.W_CON == 0.005 and cfg.KD.W_FALGN == 0.03 and cfg.KD.W_COS == 0.03
    assert cfg.KD.W_ATT == 0.01 and cfg.KD.W_CLSKD == 1.0 and cfg.KD.W_ROIKD == 0.10
    assert cfg.KD.TEMPERATURE == 2.0
    assert tuple(cfg.INPUT.WINDOW) == (-600.0, 1500.0)
    # a fresh copy each call
    cfg.SOLVER.BASE_LR = 1.0
    assert get_cfg().SOLVER.BASE_LR == 1e-4


def test_base_inheritance_and_overrides(tmp_path):
    base = _write(tmp_path / "base.yaml", "SOLVER:\n  BASE_LR: 0.01\n  MAX_ITER: 7\n")
    child = _write(tmp_path / "child.yaml", '_BASE_: "base.yaml"\nSOLVER:\n  MAX_ITER: 9\n')
    cfg = get_cfg()
    cfg.merge_from_file(child)
    assert cfg.SOLVER.BASE_LR == 0.01 and cfg.SOLVER.MAX_ITER == 9
    cfg.merge_from_list(["SOLVER.MAX_ITER", "11", "DATASETS.TRAIN", "('a','b')"])
    assert cfg.SOLVER.MAX_ITER == 11 and tuple(cfg.DATASETS.TRAIN) == ("a", "b")
    assert base


def test_unknown_key_names_key_and_file(tmp_path):
    _write(tmp_path / "base.yaml", "SOLVER:\n  BASE_LRR: 0.01\n")
    child = _write(tmp_path / "child.yaml", '_BASE_: "base.yaml"\nSOLVER:\n  MAX_ITER: 9\n')
    with pytest.raises(ConfigError) as e:
        get_cfg().merge_from_file(child)
    msg = str(e.value)
    assert "SOLVER.BASE_LRR" in msg and "base.yaml" in msg


def test_unknown_key_on_command_line():
    with pytest.raises(ConfigError, match="MODEL.NOPE.*command line"):
        get_cfg().merge_from_list(["MODEL.NOPE", "1"])


def test_bad_value_type_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        get_cfg().merge_from_file(str(tmp_path / "missing.yaml"))
    bad = _write(tmp_path / "bad.yaml", "SOLVER:\n  MAX_ITER: [1, 2]\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        get_cfg().merge_from_file(bad)
    with pytest.raises(ConfigError, match="pairs"):
        get_cfg().merge_from_list(["SOLVER.MAX_ITER"])


def test_repo_configs_load():
    import glob

    # configs/Detectron2/ holds detectron2 configs (loaded in tests/test_d2_data.py)
    files = sorted(f for f in glob.glob("configs/**/*.yaml", recursive=True)
                   if not f.startswith("configs/Detectron2/"))
    assert files
    for f in files:
        get_cfg().merge_from_file(f)
