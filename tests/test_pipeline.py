"""The MDKD pipeline end to end on the real shared data (tiny sizes, 1-2 iterations a stage)."""

import json

import pytest

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
