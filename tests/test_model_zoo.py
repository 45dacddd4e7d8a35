"""Model zoo (issue 12): configs ship in the package, get_config_file/get_config work from any
directory and from a built wheel; every config path used by tests, tools and the Makefile exists."""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mdkd_det import model_zoo
from mdkd_det.utils.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
D2_PREFIX = "Detectron2/"  # detectron2 configs: read by detectron2's get_cfg, not ours


def test_list_matches_repo_configs():
    repo = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml"))
    assert model_zoo.list_configs() == repo
    assert "LungCT/mdkd_faster_rcnn_R18_cpu.yaml" in repo


def test_get_config_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = model_zoo.get_config_file("LungCT/mdkd_faster_rcnn_R18_cpu.yaml")
    assert os.path.isabs(path) and os.path.isfile(path)
    assert model_zoo.get_config_file("configs/LungCT/mdkd_faster_rcnn_R18_cpu.yaml") == path
    cfg = model_zoo.get_config("LungCT/mdkd_faster_rcnn_R18_cpu.yaml", weights="w.pth")
    # the _BASE_ chain resolved relative to the shipped file: demo (PIPELINE) <- FRCNN demo (INPUT)
    assert cfg.PIPELINE.ENABLED and cfg.PIPELINE.ITERS.STUDENT == 500 and cfg.INPUT.MIN_SIZE_TEST == 256
    assert cfg.MODEL.WEIGHTS == "w.pth"
    for name in model_zoo.list_configs():
        if not name.startswith(D2_PREFIX):
            model_zoo.get_config(name)  # every shipped config loads with the defaults
    with pytest.raises(ConfigError, match="did you mean LungCT/faster_rcnn_R18_FPN_demo.yaml"):
        model_zoo.get_config_file("LungCT/faster_rcnn_R18_FPN_dem.yaml")


def test_config_paths_in_repo_exist():
    """Every configs/... path named by tests, tools, the Makefile and the README exists."""
    pat = re.compile(r"configs/[A-Za-z0-9_\-/]+\.yaml")
    files = list((REPO / "tests").glob("*.py")) + list((REPO / "tools").glob("*.py"))
    files += [REPO / "Makefile", REPO / "README.md"]
    missing = {(f.name, m) for f in files for m in pat.findall(f.read_text()) if not (REPO / m).is_file()}
    assert not missing


def _copy_source(dst: Path) -> None:
    """The files a wheel is built from (a clean copy: no stale build/ folder)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dst / name)
    shutil.copytree(REPO / "configs", dst / "configs", ignore=ignore)
    shutil.copytree(REPO / "mdkd_det", dst / "mdkd_det", symlinks=True, ignore=ignore)


def test_wheel_ships_configs_and_scripts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _copy_source(src)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    whl = next((tmp_path / "dist").glob("mdkd_det-*.whl"))
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = z.read(entry).decode()
        z.extractall(tmp_path / "site")
    shipped = sorted(n[len("mdkd_det/model_zoo/configs/"):] for n in names
                     if n.startswith("mdkd_det/model_zoo/configs/") and n.endswith(".yaml"))
    assert shipped == model_zoo.list_configs()
    assert "mdkd-predict = mdkd_det.engine.predict_cli:main" in scripts
    assert "mdkd-train = mdkd_det.engine.cli:main" in scripts
    # the unpacked wheel, imported from another directory, finds its own configs
    code = ("import mdkd_det, mdkd_det.model_zoo as z; p = z.get_config_file('LungCT/mdkd_faster_rcnn_R18_cpu.yaml');"
            "c = z.get_config('LungCT/mdkd_faster_rcnn_R18_cpu.yaml'); print(mdkd_det.__file__); print(p);"
            "print(c.PIPELINE.ITERS.STUDENT)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    pkg, cfg_path, iters = r.stdout.split()
    site = str(tmp_path / "site")
    assert pkg.startswith(site) and cfg_path.startswith(site) and iters == "500"
