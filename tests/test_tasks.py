"""Task registry: detection defaults, unknown names, and task-driven results tables."""

import pytest

from mdkd_det.config import get_cfg
from mdkd_det.pipeline.runner import PipelineRunner
from mdkd_det.tasks import TASK_REGISTRY, Task, get_task
from mdkd_det.tasks.base import row_values


def test_detection_is_default():
    cfg = get_cfg()
    task = get_task(cfg)
    assert task.name == "detection" and task.best_metric == "bbox/AP"
    assert row_values(task, {"AP": 1.5, "AP50": 3.0, "AR100": 9.0}) == {"AP": 1.5, "AP50": 3.0}


def test_unknown_task_lists_registered():
    with pytest.raises(Exception, match="detection"):
        get_task("no_such_task")


@TASK_REGISTRY.register("_test_seg_like")
class _SegLike(Task):
    name = "_test_seg_like"
    result_key = "segm"
    primary_metric = "DSC"
    row_metrics = ("DSC", "HD95")
    metric_titles = {"DSC": "DSC (%)", "HD95": "HD95 (px)"}


def test_results_table_follows_task_metrics(tmp_path):
    cfg = get_cfg()
    cfg.MODEL.TASK = "_test_seg_like"
    cfg.OUTPUT_DIR = str(tmp_path)
    runner = PipelineRunner(cfg, stages=["student"])
    runner.rows = {"student": {"DSC": 71.234, "HD95": 3.5, "checkpoint": "x.pth"}}
    runner.wall = {"student": 1.0}
    res = runner.write_results()
    assert res["task"] == "_test_seg_like" and res["metrics"] == ["DSC", "HD95"]
    assert res["rows"]["student"] == {"DSC": 71.234, "HD95": 3.5, "checkpoint": "x.pth"}
    md = (tmp_path / "results.md").read_text()
    assert "| Model | DSC (%) | HD95 (px) |" in md
    assert "| Student | 71.23 | 3.50 |" in md
    assert "| Dataset-specific | n/a | n/a |" in md


def test_default_metrics_table_prints_task_group():
    table = _SegLike().metrics_table({"segm": {"DSC": 64.657, "HD95": 6.99, "per_patch": [1, 2]}})
    assert "| DSC | 64.66 |" in table and "| HD95 | 6.99 |" in table and "per_patch" not in table
    assert "AP50" in get_task("detection").metrics_table({"bbox": {"AP": 1.0}})
