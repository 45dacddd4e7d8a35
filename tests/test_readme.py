"""The README cannot go stale (issue 12): every command of its ```bash blocks is parsed by the
real CLI (configs merged, keys and flags checked) or run with tiny overrides, its ```python
block runs on a tiny model, its ```toml entry-point groups are the ones the code reads, and its
links and config names exist."""

import importlib.util
import re
import shlex
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
#: docs written by other issues' branches (linked from the README, merged by the lead)
OTHER_DOCS = {"docs/benchmarks.md", "docs/statistics.md", "docs/robustness.md", "docs/fidelity.md"}


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands():
    """Each shell command of the bash blocks as an argv list (continuations joined, comments dropped)."""
    cmds = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                cmds.append(argv)
    return cmds


def _tool(argv):
    """(tool name, its argv) for a tools/ or console-script command, else (None, None)."""
    if argv[0] == "python" and len(argv) > 1 and argv[1].startswith("tools/"):
        return Path(argv[1]).stem, argv[2:]
    if argv[0].startswith("tools/"):
        return Path(argv[0]).stem, argv[1:]
    if argv[0] in ("mdkd-predict", "mdkd-train"):
        return {"mdkd-predict": "predict", "mdkd-train": "train_net"}[argv[0]], argv[1:]
    return None, None


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"readme_tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _help(name, capsys):
    mod = _load_tool(name)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_every_bash_command(tmp_path, monkeypatch, capsys, data_root):
    from mdkd_det.engine.defaults import default_argument_parser, setup_cfg
    from mdkd_det.engine.predict_cli import argument_parser
    from mdkd_det.model_zoo import list_configs, load_config

    monkeypatch.chdir(REPO)
    makefile = (REPO / "Makefile").read_text()
    extras = (REPO / "pyproject.toml").read_text()
    seen = set()
    for argv in _commands():
        if argv[0] == "make":
            for target in argv[1:]:
                if "=" in target:  # VAR=value: the value must exist when it is a config
                    var, val = target.split("=", 1)
                    assert var in makefile and (not val.endswith(".yaml") or (REPO / val).is_file()), target
                else:
                    assert re.search(rf"^{target}:", makefile, flags=re.M), target
            continue
        if argv[:2] == ["pip", "install"]:
            for extra in re.findall(r"\[([a-z,]+)\]", " ".join(argv)):
                for e in extra.split(","):
                    assert re.search(rf"^{e} = \[", extras, flags=re.M), e
            continue
        name, args = _tool(argv)
        assert name and (REPO / "tools" / f"{name}.py").is_file(), argv
        seen.add(name)
        if name == "train_net":  # the real parser, the config merged with the overrides
            parsed = default_argument_parser().parse_args(args)
            setup_cfg(parsed)
        elif name == "predict":
            parsed = argument_parser().parse_args(args)
            cfg_name = parsed.config_file
            if cfg_name.startswith("output/"):  # written by a README training command
                assert cfg_name.endswith("/config.yaml")
            else:
                assert cfg_name in list_configs() or (REPO / cfg_name).is_file(), cfg_name
                load_config(cfg_name).merge_from_list(parsed.opts)
        elif name == "convert_to_coco":  # run for real, output redirected
            args = [str(tmp_path / "out.json") if prev == "--output" else a
                    for prev, a in zip([""] + args[:-1], args)]
            assert _load_tool(name).main(args + ["--root", str(data_root)]) == 0, args
        elif name == "d2_train_net":
            assert args == ["--help"]  # its --help is tested without detectron2 in test_user_api
        else:  # flags must be options of the tool
            text = _help(name, capsys)
            for a in args:
                if a.startswith("--"):
                    assert a in text, (name, a)
    assert {"train_net", "predict", "convert_to_coco"} <= seen


def test_python_block_runs_on_a_tiny_model(tmp_path, monkeypatch, data_root):
    """The README's Python API block, verbatim, with the model-zoo config shrunk (tests/_tiny.py)."""
    from _tiny import tiny_cfg

    import mdkd_det.model_zoo as zoo

    (block,) = _blocks("python")
    monkeypatch.chdir(REPO)
    tiny = tiny_cfg(tmp_path / "unused", max_iter=2, **{"DATASETS.TEST_LIMIT": 2, "TEST.VIS_NUM": 0})
    real = zoo.get_config

    def get_config(name, weights=None):
        assert real(name, weights) is not None  # the README's name exists
        return tiny.clone()

    monkeypatch.setattr(zoo, "get_config", get_config)
    monkeypatch.chdir(tmp_path)
    dcm = next((data_root / "lung_pet_ct_dx_sample").rglob("*.dcm"))
    shutil.copy(dcm, tmp_path / "ct_slice.dcm")
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert (tmp_path / "output" / "r18" / "model_final.pth").is_file()
    assert scope["det"]["boxes"].shape[1] == 4 and "AP" in scope["results"]["lungct_disjoint_test"]["bbox"]


def test_toml_groups_and_links():
    from mdkd_det.config.config import CONFIG_ENTRY_POINT_GROUP
    from mdkd_det.distill.kd_terms import KD_LOSS_REGISTRY
    from mdkd_det.modeling.registry import BACKBONE_REGISTRY

    (toml,) = _blocks("toml")
    groups = re.findall(r'entry-points\."([^"]+)"', toml)
    assert groups == [
        BACKBONE_REGISTRY._entry_point_group,
        CONFIG_ENTRY_POINT_GROUP,
        KD_LOSS_REGISTRY._entry_point_group,
    ]
    for group in re.findall(r"`(mdkd_det\.[a-z_]+)`", README):
        if group.split(".")[1] in ("detectors", "fusion_ops", "kd_adapters"):
            src = "\n".join(p.read_text() for p in (REPO / "mdkd_det").rglob("*.py"))
            assert f'"{group}"' in src, group
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        if not link.startswith("http") and link not in OTHER_DOCS:
            assert (REPO / link).exists(), link
    from mdkd_det.model_zoo import list_configs

    for name in re.findall(r"\b((?:LungCT|LungPet|DeepLesion|MSD-Lung|LesionPatch)/[\w.-]+\.yaml)", README):
        assert name in list_configs(), name


def test_readme_is_a_short_guide():
    assert len(README.splitlines()) < 300
