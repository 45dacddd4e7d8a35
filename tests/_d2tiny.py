"""Tiny detectron2 configs and teacher checkpoints for tests/test_d2_*.py (needs detectron2;
import it only after ``pytest.importorskip("detectron2")``)."""

import os

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model as build_d2_model

from mdkd_det.d2 import add_mdkd_config
from mdkd_det.engine.defaults import build_model as build_mdkd_model

from _tiny import tiny_cfg

BASE = "configs/Detectron2/Base-RCNN-R18-FPN-LungCT.yaml"
TINY = [
    "INPUT.MIN_SIZE_TRAIN", (128,), "INPUT.MAX_SIZE_TRAIN", 128,
    "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 128,
    "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16, "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 32,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 100, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 100, "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
    "SOLVER.IMS_PER_BATCH", 2, "SOLVER.WARMUP_ITERS", 1, "DATALOADER.NUM_WORKERS", 0,
]
TINY_MDKD = ["FUSION.OUT_CHANNELS", 32, "KD.EPOCH_ITERS", 1]


def tiny_d2_cfg(out_dir, *opts):
    """detectron2 Faster R-CNN R18-FPN on LungCT at 128 px with small heads (+ ``opts``)."""
    cfg = add_mdkd_config(get_cfg())
    cfg.merge_from_file(BASE)
    cfg.merge_from_list(TINY + TINY_MDKD + ["OUTPUT_DIR", str(out_dir)] + list(opts))
    return cfg


def save(model, path):
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def write_teachers(tmp):
    """One teacher of each kind: our torchvision R18-FPN ("mdkd") and a detectron2 R18-FPN
    ("d2"), each saved as a whole-detector checkpoint with its config file.

    Returns:
        ``(formats, config files, checkpoints)``, target (mdkd) teacher first.
    """
    os.makedirs(tmp, exist_ok=True)
    torch.manual_seed(0)
    mcfg = tiny_cfg(tmp / "mdkd_teacher")
    m_yaml = tmp / "mdkd_teacher.yaml"
    m_yaml.write_text(mcfg.dump())
    m_ckpt = save(build_mdkd_model(mcfg), tmp / "mdkd_teacher.pth")
    dcfg = tiny_d2_cfg(tmp / "d2_teacher")
    d_yaml = tmp / "d2_teacher.yaml"
    d_yaml.write_text(dcfg.dump())
    d_ckpt = save(build_d2_model(dcfg), tmp / "d2_teacher.pth")
    return ("mdkd", "d2"), (str(m_yaml), str(d_yaml)), (m_ckpt, d_ckpt)


def joint_opts(teachers):
    fmts, cfgs, ckpts = teachers
    return ["MODEL.BACKBONE.NAME", "build_fusion_backbone", "FUSION.TEACHER_FORMATS", fmts,
            "FUSION.TEACHER_CONFIGS", cfgs, "FUSION.TEACHERS", ckpts]


def write_joint_teacher(tmp, teachers):
    """A joint teacher (FusionBackbone over ``teachers``) config file and checkpoint; its maps
    have 48 channels (the student's 32), so the distiller has real 1x1 connectors (A3)."""
    cfg = tiny_d2_cfg(tmp / "joint", *joint_opts(teachers), "FUSION.OUT_CHANNELS", 48)
    path = tmp / "joint.yaml"
    path.write_text(cfg.dump())
    return str(path), save(build_d2_model(cfg), tmp / "joint.pth")
