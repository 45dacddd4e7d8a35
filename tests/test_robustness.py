"""Issue 13: bad values give one line (status 2) naming the key or file, before anything is
built; no hang on SOLVER.IMS_PER_BATCH 0; bad keys under --num-gpus 2 fail in the launcher."""

import json

import pytest
import torch

from mdkd_det.config import get_cfg
from mdkd_det.config.validate import DOMAINS, validate_config
from mdkd_det.engine.cli import main
from mdkd_det.utils.errors import ConfigError

from _tiny import tiny_cfg


def _cfg_file(tmp_path, cfg, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(cfg.dump())
    return str(p)


def test_defaults_are_valid_and_every_domain_key_exists():
    cfg = get_cfg()
    validate_config(cfg)
    for key in DOMAINS:
        node = cfg
        for part in key.split("."):
            node = node[part]  # KeyError -> the table names a key defaults.py lacks


@pytest.mark.parametrize("key,value,expected", [
    ("SOLVER.IMS_PER_BATCH", 0, "SOLVER.IMS_PER_BATCH = 0: must be an integer >= 1"),
    ("SOLVER.BASE_LR", -1.0, "SOLVER.BASE_LR = -1.0: must be a finite number > 0"),
    ("SOLVER.BASE_LR", float("nan"), "SOLVER.BASE_LR = nan: must be a finite number > 0"),
    ("SOLVER.MAX_ITER", -5, "SOLVER.MAX_ITER = -5: must be an integer >= 0"),
    ("MODEL.ROI_HEADS.NUM_CLASSES", 0, "MODEL.ROI_HEADS.NUM_CLASSES = 0: must be an integer >= 1"),
    ("INPUT.WINDOW", [-600.0, 0.0], "INPUT.WINDOW = [-600.0, 0.0]: must be [level, width] in HU with width > 0"),
    ("INPUT.AUG.HFLIP_PROB", 1.5, "INPUT.AUG.HFLIP_PROB = 1.5: must be a number in [0, 1]"),
    ("TEST.FROC_FPS", [1.0, 0.5], "TEST.FROC_FPS = [1.0, 0.5]: must be a list of at least 1 values, "
                                  "each a finite number > 0, in increasing order"),
    ("SEED", -1, "SEED = -1: must be an integer >= 0"),
    ("INPUT.MIN_SIZE_TEST", 1024, "INPUT.MIN_SIZE_TEST = 1024 exceeds INPUT.MAX_SIZE_TEST = 512"),
])
def test_domain_errors_name_the_key(key, value, expected):
    cfg = get_cfg()
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert str(e.value) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line(tmp_path, capsys):
    assert main(["MODEL.DEVICE", "cuda", "OUTPUT_DIR", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == ("error: MODEL.DEVICE = 'cuda': CUDA is not available on this machine; "
                   "use MODEL.DEVICE cpu\n")
    assert not (tmp_path / "o").exists()  # refused before anything was built or written


def test_zero_batch_fails_fast_instead_of_hanging(tmp_path, capsys):
    assert main(["SOLVER.IMS_PER_BATCH", "0", "OUTPUT_DIR", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "error: SOLVER.IMS_PER_BATCH = 0: must be an integer >= 1\n"
    from mdkd_det.data.samplers import GroupedBatchSampler, TrainingSampler

    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        GroupedBatchSampler(TrainingSampler(4, seed=0), [0] * 4, 0)


def test_bad_key_under_two_processes_fails_in_the_launcher(tmp_path, capsys, monkeypatch):
    import importlib

    launch_mod = importlib.import_module("mdkd_det.engine.launch")

    def no_spawn(*a, **k):
        raise AssertionError("workers were spawned")

    monkeypatch.setattr(launch_mod.mp, "spawn", no_spawn)
    p = tmp_path / "bad.yaml"
    p.write_text("SOLVER:\n  MAX_ITERS: 3\n")
    assert main(["--config-file", str(p), "--num-gpus", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SOLVER.MAX_ITERS" in err and "bad.yaml" in err
    assert main(["--num-gpus", "2", "SOLVER.IMS_PER_BATCH", "3"]) == 2
    assert capsys.readouterr().err == ("error: SOLVER.IMS_PER_BATCH = 3: must be divisible by the 2 "
                                       "processes (--num-gpus x --num-machines)\n")


def test_more_categories_than_num_classes_fails_before_training(tmp_path, data_root, capsys):
    """A 2-category training set with MODEL.ROI_HEADS.NUM_CLASSES 1 (was an IndexError mid-step)."""
    src = data_root / "lungct_roboflow" / "valid"
    coco = json.loads((src / "_annotations.coco.json").read_text())
    coco["images"] = coco["images"][:4]
    keep = {im["id"] for im in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    cats = sorted({a["category_id"] for a in coco["annotations"]})
    coco["categories"] = [{"id": 100, "name": "other"}] + [c for c in coco["categories"] if c["id"] in cats]
    coco["annotations"][0]["category_id"] = 100
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    cfg = tiny_cfg(tmp_path / "r")
    rc = main(["--config-file", _cfg_file(tmp_path, cfg), "DATASETS.TRAIN", f"('coco:{ann}:{src}',)",
               "DATASETS.TEST", "()"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MODEL.ROI_HEADS.NUM_CLASSES" in err and "not in [0, 1)" in err
    assert not (tmp_path / "r" / "model_final.pth").exists()
