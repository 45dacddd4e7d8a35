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


def _error_line(err: str) -> str:
    """The single ``error: ...`` line of the CLI's stderr (in-process runs may add logging noise
    from handlers bound to an earlier test's captured stdout)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


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
    err = _error_line(capsys.readouterr().err)
    assert err == ("error: MODEL.DEVICE = 'cuda': CUDA is not available on this machine; "
                   "use MODEL.DEVICE cpu")
    assert not (tmp_path / "o").exists()  # refused before anything was built or written


def test_zero_batch_fails_fast_instead_of_hanging(tmp_path, capsys):
    assert main(["SOLVER.IMS_PER_BATCH", "0", "OUTPUT_DIR", str(tmp_path / "o")]) == 2
    assert _error_line(capsys.readouterr().err) == "error: SOLVER.IMS_PER_BATCH = 0: must be an integer >= 1"
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
    err = _error_line(capsys.readouterr().err)
    assert "SOLVER.MAX_ITERS" in err and "bad.yaml" in err
    assert main(["--num-gpus", "2", "SOLVER.IMS_PER_BATCH", "3"]) == 2
    assert _error_line(capsys.readouterr().err) == (
        "error: SOLVER.IMS_PER_BATCH = 3: must be divisible by the 2 processes (--num-gpus x --num-machines)")


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
    err = _error_line(capsys.readouterr().err)
    assert "MODEL.ROI_HEADS.NUM_CLASSES" in err and "not in [0, 1)" in err
    assert not (tmp_path / "r" / "model_final.pth").exists()


def _coco_with_broken_image(tmp_path, data_root, content: bytes):
    """4 LungCT valid images copied to tmp_path/img, the second one replaced by ``content``."""
    import shutil

    src = data_root / "lungct_roboflow" / "valid"
    coco = json.loads((src / "_annotations.coco.json").read_text())
    coco["images"] = coco["images"][:4]
    keep = {im["id"] for im in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    img = tmp_path / "img"
    img.mkdir()
    for im in coco["images"]:
        shutil.copy(src / im["file_name"], img / im["file_name"])
    bad = img / coco["images"][1]["file_name"]
    bad.write_bytes(content)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    return f"coco:{ann}:{img}", bad.name


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0 not really a jpeg"], ids=["zero_byte", "garbage"])
@pytest.mark.parametrize("mode", ["train", "eval_only"])
def test_broken_image_is_one_line_naming_the_file(tmp_path, data_root, capsys, content, mode):
    spec, bad_name = _coco_with_broken_image(tmp_path, data_root, content)
    cfg = tiny_cfg(tmp_path / "r", max_iter=4, **{"DATALOADER.NUM_WORKERS": 1, "SOLVER.IMS_PER_BATCH": 4})
    args = ["--config-file", _cfg_file(tmp_path, cfg)]
    if mode == "train":
        args += ["DATASETS.TRAIN", f"('{spec}',)", "DATASETS.TEST", "()"]
    else:  # --eval-only refuses a random model, so give it weights
        import torch

        from mdkd_det.modeling import build_model

        weights = tmp_path / "w.pth"
        torch.save({"model": build_model(cfg).state_dict()}, weights)
        args += ["--eval-only", "DATASETS.TEST", f"('{spec}',)", "MODEL.WEIGHTS", str(weights)]
    assert main(args) == 2
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("error: cannot decode image ") and bad_name in err


def test_user_message_of_a_dataloader_worker_error():
    """torch re-raises a worker's DatasetError with the worker traceback in its message."""
    from mdkd_det.utils.errors import DatasetError, user_message

    e = DatasetError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                     "call last):\n  File \"x.py\", line 1, in f\nmdkd_det.utils.errors.DatasetError: "
                     "cannot decode image /d/a.jpg: empty (0-byte) file\n")
    assert user_message(e) == "cannot decode image /d/a.jpg: empty (0-byte) file"
    assert user_message(DatasetError("plain\n message")) == "plain message"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_image_under_two_processes_is_one_line(tmp_path, data_root, capfd):
    """An error found inside a DDP worker (not by the launcher's config check): the worker prints
    one line and exits 2; the launcher adds nothing (was a ProcessRaisedException traceback)."""
    spec, bad_name = _coco_with_broken_image(tmp_path, data_root, b"")
    cfg = tiny_cfg(tmp_path / "r", max_iter=2, **{"SOLVER.IMS_PER_BATCH": 4, "DATASETS.TEST": "()"})
    rc = main(["--config-file", _cfg_file(tmp_path, cfg), "--num-gpus", "2", "DATASETS.TRAIN", f"('{spec}',)"])
    err = capfd.readouterr().err
    assert rc == 2, err
    lines = {ln for ln in err.splitlines() if ln.startswith("error: ")}
    assert len(lines) == 1 and bad_name in lines.pop() and "Traceback" not in err, err


# ---- no stale or orphaned work ------------------------------------------------------------------
def test_stray_checkpoint_temp_files_removed_on_next_start(tmp_path):
    import os

    from mdkd_det.engine.checkpointer import Checkpointer

    dead = tmp_path / ".model_0000009.pth.999999999.0123abcd.tmp"  # pid beyond pid_max: dead
    alive = tmp_path / f".model_final.pth.{os.getppid()}.89abcdef.tmp"  # a running process's
    other = tmp_path / "notes.tmp"
    for p in (dead, alive, other):
        p.write_bytes(b"partial")
    Checkpointer(torch.nn.Linear(2, 2), str(tmp_path))
    assert not dead.exists() and alive.exists() and other.exists()


def test_metrics_json_has_no_duplicate_iterations_after_resume(tmp_path):
    from mdkd_det.engine.events import EventStorage, JSONWriter

    f = tmp_path / "metrics.json"

    def session(start, stop):
        w = JSONWriter(str(f))
        with EventStorage(start) as st:
            for it in range(start, stop):
                st.iter = it
                st.put_scalar("loss", float(it), smoothing_hint=False)
                w.write()
        w.close()

    session(0, 5)  # crashed after logging iteration 4; last checkpoint: iteration 2
    session(3, 6)  # resumed at 3
    its = [json.loads(ln)["iteration"] for ln in f.read_text().splitlines()]
    assert its == [0, 1, 2, 3, 4, 5]


def _pipe_cfg(out, iters):
    return tiny_cfg(out, max_iter=1, **{
        "PIPELINE.ENABLED": True, "PIPELINE.ITERS.DATASET_SPECIFIC": iters,
        "DATASETS.TRAIN_LIMIT": 6, "DATASETS.TEST_LIMIT": 2, "TEST.VIS_NUM": 0})


def test_pipeline_stage_skipped_only_with_the_same_config_and_rerun_never_taken_as_done(
        tmp_path, data_root, caplog, monkeypatch):
    import logging

    import mdkd_det.pipeline.runner as runner_mod
    from mdkd_det.engine.hooks import HookBase, PeriodicCheckpointer
    from mdkd_det.pipeline import PipelineRunner

    caplog.set_level(logging.INFO, logger="mdkd_det.pipeline")
    out = tmp_path / "p"
    stage = out / "dataset_specific"

    def run(iters, rerun=()):
        caplog.clear()
        PipelineRunner(_pipe_cfg(out, iters), stages=["dataset_specific"], rerun=rerun).run()
        return json.loads((stage / "stage_result.json").read_text())

    def final_iter():
        return torch.load(stage / "model_final.pth", weights_only=True)["iteration"]

    res2 = run(2)
    assert final_iter() == 1 and res2["config"]["SOLVER.MAX_ITER"] == 2
    mtime = (stage / "model_final.pth").stat().st_mtime_ns
    assert run(2)["fingerprint"] == res2["fingerprint"]  # same config: skipped
    assert (stage / "model_final.pth").stat().st_mtime_ns == mtime and "skipped" in caplog.text
    res3 = run(3)  # PIPELINE.ITERS 3 after a 2-iteration run: retrained, not silently kept
    assert final_iter() == 2 and res3["fingerprint"] != res2["fingerprint"]
    assert "SOLVER.MAX_ITER: 2 -> 3" in caplog.text
    # a key added to mdkd_det after the stage ran, at its default: still the same stage
    rec = json.loads((stage / "stage_result.json").read_text())
    new_key = "DATASETS.LABEL_FRACTION"
    rec["config"].pop(new_key)
    rec["fingerprint"] = "from an older mdkd_det"
    (stage / "stage_result.json").write_text(json.dumps(rec))
    run(3)
    assert final_iter() == 2 and "skipped" in caplog.text
    rec["config"][new_key + "_REMOVED"] = 1  # a key the code no longer has: retrained
    (stage / "stage_result.json").write_text(json.dumps(rec))
    run(3)
    assert "retraining" in caplog.text
    # a stage finished before fingerprints were recorded: compared through its config.yaml
    rec = json.loads((stage / "stage_result.json").read_text())
    mtime = (stage / "model_final.pth").stat().st_mtime_ns
    (stage / "stage_result.json").write_text(json.dumps(
        {k: v for k, v in rec.items() if k not in ("config", "fingerprint")}))
    run(3)
    assert "skipped" in caplog.text and (stage / "model_final.pth").stat().st_mtime_ns == mtime

    # an interrupted --rerun (killed after the iteration-1 checkpoint) is not "finished"
    class Crash(Exception):
        pass

    class CrashAfter1(HookBase):
        def after_step(self):
            if self.trainer.iter == 1:
                raise Crash()

    class CrashingTrainer(runner_mod.DefaultTrainer):
        def build_hooks(self):
            hs = super().build_hooks()
            at = 1 + next(i for i, h in enumerate(hs) if isinstance(h, PeriodicCheckpointer))
            return hs[:at] + [CrashAfter1()] + hs[at:]

    monkeypatch.setattr(runner_mod, "DefaultTrainer", CrashingTrainer)
    with pytest.raises(Crash):
        run(3, rerun=("dataset_specific",))
    assert not (stage / "stage_result.json").exists() and not (stage / "model_final.pth").exists()
    assert (stage / "last_checkpoint").read_text() == "model_0000001.pth"
    monkeypatch.undo()
    prior = json.loads((stage / "stage_progress.json").read_text())
    res = run(3)  # resumes the interrupted rerun
    assert "(resuming)" in caplog.text and final_iter() == 2
    progress = json.loads((stage / "stage_progress.json").read_text())
    assert progress["wall_time_s"] > 0 and res["wall_time_s"] > progress["wall_time_s"]
    assert progress["wall_time_s"] >= 0 and prior["session_start"] < progress["session_start"]
    its = [json.loads(ln)["iteration"] for ln in (stage / "metrics.json").read_text().splitlines()]
    assert len(its) == len(set(its)), its
