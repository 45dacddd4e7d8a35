"""The MDKD pipeline end to end on the real shared data (tiny sizes, 1-2 iterations a stage)."""

import json
import logging

import pytest
import torch

from mdkd_det.engine.cli import main
from mdkd_det.pipeline import PipelineRunner
from mdkd_det.utils.errors import ConfigError

from _tiny import tiny_cfg


def _pipeline_cfg(out):
    return tiny_cfg(out, max_iter=1, **{
        "PIPELINE.ENABLED": True,
        "PIPELINE.SOURCES": "('lung_pet_ct_dx_all', 'deeplesion_sample_train')",
        "PIPELINE.ITERS.DATASET_SPECIFIC": 2, "PIPELINE.ITERS.STUDENT": 2,
        "ADVERSARIAL.SOURCE_IMS_PER_BATCH": 1, "ADVERSARIAL.TARGET_IMS_PER_BATCH": 1,
        "DATASETS.TRAIN_LIMIT": 6, "DATASETS.TEST_LIMIT": 3, "TEST.VIS_NUM": 0,
        "KD.CF.SCHEDULE": "constant",
    })


@pytest.mark.timeout(600)
def test_pipeline_writes_four_rows_then_skips(tmp_path, data_root):
    out = tmp_path / "mdkd"
    cfg_file = tmp_path / "mdkd.yaml"
    cfg_file.write_text(_pipeline_cfg(out).dump())
    assert main(["--config-file", str(cfg_file)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["target"] == "lungct_disjoint_train" and res["eval_dataset"] == "lungct_disjoint_test"
    assert set(res["rows"]) == {"multi_head", "dataset_specific", "joint_teacher", "student"}
    for row in res["rows"].values():
        assert row["AP"] is not None and row["AP50"] is not None
        assert (out / row["checkpoint"].split(str(out) + "/")[1]).is_file()
    assert res["rows"]["student"]["checkpoint"].endswith("student/model_student.pth")
    for stage in ("multi_head", "dataset_specific", "target_teacher",
                  "source_teacher_lung_pet_ct_dx_all", "source_teacher_deeplesion_sample_train",
                  "joint_teacher", "student"):
        assert stage in res["wall_time_s"], stage
    md = (out / "results.md").read_text()
    assert "Joint teacher" in md and "paper Table 16" in md
    # joint teacher: fused Stage-1 teachers, only fusion + heads trained
    jcfg = (out / "joint_teacher" / "config.yaml").read_text()
    assert "target_teacher/model_final.pth" in jcfg and "source_teacher_lung_pet_ct_dx_all" in jcfg
    # second run: every stage is finished -> skipped, same rows
    mtime = (out / "student" / "model_final.pth").stat().st_mtime
    assert main(["--config-file", str(cfg_file)]) == 0
    assert (out / "student" / "model_final.pth").stat().st_mtime == mtime
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]
    # one stage on request
    assert main(["--config-file", str(cfg_file), "--stage", "student", "--rerun", "student"]) == 0
    assert (out / "student" / "model_final.pth").stat().st_mtime != mtime


def test_pipeline_config_errors(tmp_path):
    cfg = _pipeline_cfg(tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown pipeline stage"):
        PipelineRunner(cfg, stages=["teachers"])
    cfg.defrost()
    cfg.PIPELINE.REUSE_TARGET_TEACHER_AS_BASELINE = True
    cfg.PIPELINE.TEACHER_BACKBONE = "resnet34_fpn"
    with pytest.raises(ConfigError, match="REUSE_TARGET_TEACHER_AS_BASELINE"):
        PipelineRunner(cfg, stages=["dataset_specific"]).run()


def test_backbone_init_goes_where_the_meta_architecture_says(tmp_path):
    from mdkd_det.modeling import backbone_init_key

    assert backbone_init_key("rfdetr") == "MODEL.RFDETR.BACKBONE_INIT" and backbone_init_key("faster_rcnn") == ""
    cfg = _pipeline_cfg(tmp_path / "x")
    cfg.defrost()
    cfg.PIPELINE.ITERS.BACKBONE_INIT = 1
    cfg.PIPELINE.BACKBONE_INIT_ARCH = "rfdetr"  # a Faster R-CNN pipeline takes no backbone init
    with pytest.raises(ConfigError, match="'faster_rcnn' takes no backbone initialisation"):
        PipelineRunner(cfg).stage_cfg("student")


def test_first_seed_stage_cfg_equals_single_seed_run(tmp_path):
    single = PipelineRunner(_pipeline_cfg(tmp_path / "x"))
    cfg = _pipeline_cfg(tmp_path / "x")
    cfg.PIPELINE.SEEDS = (0, 3)
    multi = PipelineRunner(cfg)
    for stage in ("multi_head", "dataset_specific", "target_teacher", "joint_teacher", "student"):
        assert multi.stage_cfg(stage).dump() == single.stage_cfg(stage).dump(), stage
    s3 = multi.stage_cfg("student", seed=3)
    assert s3.SEED == 3 and s3.OUTPUT_DIR == str(tmp_path / "x" / "seed_3" / "student")
    assert s3.KD.TEACHER_WEIGHTS == str(tmp_path / "x" / "joint_teacher" / "model_final.pth")
    with pytest.raises(ConfigError, match="trained once"):
        multi.stage_cfg("joint_teacher", seed=3)
    cfg.PIPELINE.SEEDS = (1, 1)
    with pytest.raises(ConfigError, match="repeats a seed"):
        PipelineRunner(cfg)


@pytest.mark.slow  # ~45 s on the shared 2-core machine
@pytest.mark.timeout(600)
def test_pipeline_over_seeds(tmp_path, data_root):
    out = tmp_path / "mdkd"
    cfg = _pipeline_cfg(out)
    cfg.PIPELINE.BOOTSTRAP_RESAMPLES = 20
    cfg.PIPELINE.SOURCES = ("lung_pet_ct_dx_all",)  # keep it short: one source, no multi-head
    cfg.PIPELINE.STAGES = ("dataset_specific", "target_teacher", "source_teachers", "joint_teacher", "student")
    cfg_file = tmp_path / "mdkd.yaml"
    cfg_file.write_text(cfg.dump())
    assert main(["--config-file", str(cfg_file), "--seeds", "0", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1]
    # teacher chain once, per-seed rows in OUTPUT_DIR/<stage> (seed 0) and seed_1/<stage>
    assert not (out / "seed_1" / "joint_teacher").exists() and not (out / "seed_0").exists()
    for stage in ("dataset_specific", "student"):
        assert (out / "seed_1" / stage / "model_final.pth").is_file()
        assert "SEED: 1" in (out / "seed_1" / stage / "config.yaml").read_text()
        assert "SEED: 0" in (out / stage / "config.yaml").read_text()
    assert str(out / "joint_teacher" / "model_final.pth") in (out / "seed_1" / "student" / "config.yaml").read_text()
    w0 = torch.load(out / "dataset_specific" / "model_final.pth", weights_only=True)["model"]
    w1 = torch.load(out / "seed_1" / "dataset_specific" / "model_final.pth", weights_only=True)["model"]
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # another seed, another run
    assert set(res["per_seed"]["student"]) == {"0", "1"} and set(res["per_seed"]["joint_teacher"]) == {"0"}
    assert {m: res["per_seed"]["student"]["0"][m] for m in ("AP", "AP50")} == \
        {m: res["rows"]["student"][m] for m in ("AP", "AP50")}
    froc = json.loads((out / "seed_1" / "student" / "inference" / "lungct_valid" / "metrics.json").read_text())["froc"]
    assert res["per_seed"]["student"]["1"]["CPM"] == pytest.approx(froc["CPM"], abs=1e-4)
    assert res["summary"]["student"]["CPM"]["n"] == 2
    for m in ("AP", "AP50"):
        vals = [res["per_seed"]["dataset_specific"][s][m] for s in ("0", "1")]
        summ = res["summary"]["dataset_specific"][m]
        assert summ["n"] == 2 and summ["mean"] == pytest.approx(sum(vals) / 2, abs=1e-3)
        assert summ["sd"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5, abs=1e-3)
        assert res["summary"]["joint_teacher"][m]["n"] == 1 and res["summary"]["joint_teacher"][m]["sd"] is None
        d = res["paired"]["student_minus_dataset_specific"][m]
        assert d["seeds"] == [0, 1] and d["num_images"] == 3
        assert d["method"] == "paired bootstrap over test images, 20 resamples"
        diffs = [res["per_seed"]["student"][s][m] - res["per_seed"]["dataset_specific"][s][m] for s in ("0", "1")]
        assert d["per_seed"] == pytest.approx(diffs, abs=2e-3)
        assert d["significant"] is (d["ci95"][0] > 0 or d["ci95"][1] < 0)
    md = (out / "results.md").read_text()
    assert "seeds 0, 1" in md and "paper Table 16" in md and "| 2 |" in md
    assert "| Multi-head | n/a | n/a | n/a | 0 |" in md and "CPM per image" in md
    verdict = "no significant difference" if not d["significant"] else "significant"
    assert verdict in md
    assert "seed_1/student" in res["wall_time_s"]


def test_schedule_parity_warning(tmp_path, caplog):
    cfg = _pipeline_cfg(tmp_path / "x")  # dataset_specific/student 2 iterations, the others 1
    with caplog.at_level(logging.WARNING, logger="mdkd_det.pipeline"):
        msg = PipelineRunner(cfg).check_schedule_parity()
    assert [r.getMessage() for r in caplog.records if "schedule parity" in r.getMessage()] == [msg]
    assert "iterations / LR schedules" in msg
    assert "dataset_specific 2 it, 4 target images" in msg and "joint_teacher 1 it, 2 target images" in msg
    assert "multi_head 1 it, 2 target images" in msg and "source_teacher_lung_pet_ct_dx_all 1 it" in msg
    assert "target images of the multi-head and dataset-specific baselines" in msg
    assert "lr AdamW 0.0005 WarmupCosineLR warmup 1 x0.01;" in msg
    # equal schedules: silent; the multi-head baseline then sees as many target images
    cfg.PIPELINE.ITERS.DATASET_SPECIFIC = cfg.PIPELINE.ITERS.STUDENT = 0
    caplog.clear()
    runner = PipelineRunner(cfg)
    with caplog.at_level(logging.WARNING, logger="mdkd_det.pipeline"):
        assert runner.check_schedule_parity() is None
    assert not caplog.records
    sched = runner.schedules()
    assert sched["multi_head"]["target_images"] == sched["dataset_specific"]["target_images"] == 2
    # another LR for one stage -> warned; ALLOW_UNEQUAL_SCHEDULES silences it
    cfg.PIPELINE.JOINT_TEACHER_BASE_LR = 1e-3
    msg = PipelineRunner(cfg).check_schedule_parity()
    assert "joint_teacher 1 it, 2 target images, lr AdamW 0.001" in msg
    assert "target images of the multi-head" not in msg
    cfg.PIPELINE.ALLOW_UNEQUAL_SCHEDULES = True
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mdkd_det.pipeline"):
        assert PipelineRunner(cfg).check_schedule_parity() is None
    assert not caplog.records
