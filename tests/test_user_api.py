"""The rough edges a new user hits (issue 12): public imports, built-in datasets on first use,
one-line errors (unknown timm name, PRETRAINED offline, d2 tool without detectron2, --eval-only
without weights), --eval-only --resume, examples in every tool's --help."""

import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

from mdkd_det.config import get_cfg
from mdkd_det.utils.errors import ConfigError

from _tiny import tiny_cfg

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("train_net", "predict", "convert_to_coco", "benchmark", "make_lesion_patches",
         "visualize_embeddings", "d2_train_net")


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + extra.pop("PYTHONPATH", ""), **extra}


def test_public_imports():
    from mdkd_det.engine import DefaultPredictor, DefaultTrainer, build_model as b1
    from mdkd_det.engine.defaults import DefaultTrainer as T2
    from mdkd_det.modeling import build_model

    assert build_model is b1 and DefaultTrainer is T2 and callable(DefaultPredictor)


def test_builtin_datasets_registered_on_first_use(data_root):
    code = ("from mdkd_det.data import DatasetCatalog; print(len(DatasetCatalog.get('lungct_valid')));"
            "print('lung_pet_ct_dx_all' in DatasetCatalog.list())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(MDKD_DATASETS=str(data_root)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["117", "True"]


def test_unknown_timm_name_close_matches():
    from mdkd_det.modeling.backbone import build_backbone

    cfg = get_cfg()
    cfg.MODEL.BACKBONE.TIMM_NAME = "resnet5"
    with pytest.raises(ConfigError) as e:
        build_backbone(cfg, "timm_fpn")
    msg = str(e.value)
    assert msg.startswith("MODEL.BACKBONE.TIMM_NAME: unknown timm model 'resnet5'; close matches: ")
    assert "resnet50" in msg and "\n" not in msg


def test_pretrained_offline_one_line(monkeypatch):
    import torch.hub

    from mdkd_det.modeling.backbone import build_backbone

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.PRETRAINED = True
    with pytest.raises(ConfigError, match=r"^MODEL.BACKBONE.PRETRAINED True: could not load the pretrained "
                                          r"torchvision resnet18 weights \(URLError"):
        build_backbone(cfg, "resnet18_fpn")
    cfg.MODEL.BACKBONE.TIMM_NAME = "resnet10t"  # timm: HF_HUB_OFFLINE=1 (conftest), not cached
    with pytest.raises(ConfigError, match="^MODEL.BACKBONE.PRETRAINED True: could not load the pretrained timm 'resnet10t'"):
        build_backbone(cfg, "timm_fpn")


def test_d2_tool_without_detectron2(tmp_path):
    fake = tmp_path / "fake" / "detectron2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'detectron2' (simulated)\")\n")
    env = _env(PYTHONPATH=str(tmp_path / "fake"))
    tool = str(REPO / "tools" / "d2_train_net.py")
    r = subprocess.run([sys.executable, tool, "--config-file", "x.yaml"], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.startswith("d2_train_net: error: detectron2 is not importable") and "\n" not in err


def test_help_of_every_tool_has_examples(tmp_path):
    fake = tmp_path / "fake" / "detectron2"  # the d2 tool's help must work without detectron2 too
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated')\n")
    procs = {t: subprocess.Popen([sys.executable, str(REPO / "tools" / f"{t}.py"), "--help"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=str(tmp_path),
                                 env=_env(PYTHONPATH=str(tmp_path / "fake")))
             for t in TOOLS}
    for t, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (t, err[-1000:])
        assert "examples" in out.lower(), t


@pytest.fixture
def restore_root_logging():
    """default_setup (called by the CLI) adds root handlers bound to pytest's captured streams;
    remove them afterwards so later tests do not write to closed files."""
    import logging

    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for h in list(root.handlers):
        if h not in before:
            root.removeHandler(h)
            h.close()


def test_eval_only_refuses_without_weights_and_resume_evaluates_last(tmp_path, data_root, capsys,
                                                                     restore_root_logging):
    from mdkd_det.engine.cli import main, run
    from mdkd_det.engine.defaults import default_argument_parser

    out = tmp_path / "run"
    cfg = tiny_cfg(out, max_iter=2, **{"DATASETS.TEST_LIMIT": 2, "TEST.VIS_NUM": 0})
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(cfg.dump())
    assert main(["--config-file", str(cfg_file), "--eval-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert "refusing to evaluate a randomly initialised model" in err and "\n" not in err
    assert main(["--config-file", str(cfg_file), "--eval-only", "--resume"]) == 2
    assert "no " + str(out) + "/last_checkpoint" in capsys.readouterr().err
    trained = run(default_argument_parser().parse_args(["--config-file", str(cfg_file)]))
    again = run(default_argument_parser().parse_args(["--config-file", str(cfg_file), "--eval-only", "--resume"]))
    assert again["lungct_disjoint_test"]["bbox"]["AP"] == pytest.approx(trained["bbox"]["AP"], abs=1e-9)
    assert again["lungct_disjoint_test"]["bbox"]["AR100"] == pytest.approx(trained["bbox"]["AR100"], abs=1e-9)
