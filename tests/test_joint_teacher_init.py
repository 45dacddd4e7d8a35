"""Issue 10, item 1: a joint teacher that *is* the target teacher at iteration 0.

Residual fusion (``concat1x1_residual``, zero-initialised branch) + heads from the target teacher
(``MODEL.HEAD_INIT``) must give the target teacher's detections exactly, through the evaluator,
on real LungCT slices.
"""

import json

import pytest
import torch

from mdkd_det.engine.defaults import build_model, do_test
from mdkd_det.modeling.fusion.ops import build_fusion_op
from mdkd_det.utils.errors import CheckpointError

from _tiny import tiny_cfg


def test_residual_fusion_is_identity_at_init_and_learns():
    torch.manual_seed(0)
    op = build_fusion_op("concat1x1_residual", [8, 8, 4], 8)
    maps = [torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6), torch.randn(2, 4, 3, 3)]
    out = op(maps)
    assert torch.equal(out, maps[0])  # exactly the target teacher's map, signs kept
    out.pow(2).sum().backward()
    assert op.norm.weight.grad.abs().sum() > 0  # the branch can learn away from identity
    with pytest.raises(ValueError, match="out_channels must equal the target teacher's 8"):
        build_fusion_op("concat1x1_residual", [8, 8], 16)


def _save(model, path):
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def test_joint_teacher_equals_target_teacher_at_iteration_0(tmp_path, data_root):
    over = {"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0, "DATASETS.TEST_LIMIT": 3,
            "DATASETS.TEST": "('lungct_valid',)", "TEST.VIS_NUM": 0}
    torch.manual_seed(1)
    tcfg = tiny_cfg(tmp_path / "target", **over)
    target = build_model(tcfg)
    with torch.no_grad():  # a non-trivial target teacher (random BN statistics, biases)
        for m in target.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    target_ckpt = _save(target, tmp_path / "target.pth")
    torch.manual_seed(2)
    source_ckpt = _save(build_model(tiny_cfg(tmp_path / "src")), tmp_path / "source.pth")

    jcfg = tiny_cfg(tmp_path / "joint", **over)
    jcfg.merge_from_list([
        "MODEL.BACKBONE.NAME", "fusion", "FUSION.OP", "concat1x1_residual", "FUSION.OUT_CHANNELS", 0,
        "FUSION.TEACHERS", f"('{target_ckpt}', '{source_ckpt}')",
        "FUSION.TEACHER_BACKBONES", f"('{tcfg.MODEL.BACKBONE.NAME}',)",
        "MODEL.HEAD_INIT", target_ckpt])
    joint = build_model(jcfg)

    target.eval(), joint.eval()
    do_test(tcfg, target, str(tmp_path / "target"))
    do_test(jcfg, joint, str(tmp_path / "joint"))
    res = [json.loads((tmp_path / d / "inference" / "lungct_valid" / "coco_instances_results.json")
                      .read_text()) for d in ("target", "joint")]
    assert len(res[0]) > 10  # real detections to compare, not an empty list
    assert res[0] == res[1]  # same boxes, scores, labels, image ids: bit-identical


def test_head_init_mismatch_names_file(tmp_path):
    cfg = tiny_cfg(tmp_path)
    bad = tmp_path / "other.pth"
    torch.save({"model": {"rpn.head.conv.0.0.weight": torch.zeros(1)}}, bad)
    cfg.MODEL.HEAD_INIT = str(bad)
    with pytest.raises(CheckpointError, match=r"other\.pth.*does not match this model's heads"):
        build_model(cfg)
