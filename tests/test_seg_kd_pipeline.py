"""The segmentation adapter feeds the SAME Distiller / KDTrainerMixin / KDSimpleTrainer the
detectors use, and a few-iteration MDKD segmentation pipeline on the real data writes all rows."""

import json

import pytest
import torch

from mdkd_det.config import get_cfg
from mdkd_det.distill import trainer as kd_trainer
from mdkd_det.distill.adapters import EncoderFeaturesAdapter, TorchvisionFasterRCNNAdapter
from mdkd_det.distill.distiller import Distiller
from mdkd_det.distill.mixin import KDTrainerMixin
from mdkd_det.distill.trainer import KDSimpleTrainer, KDTrainer, build_distiller
from mdkd_det.engine.defaults import build_model
from mdkd_det.solver import build_optimizer


def _kd_cfg():
    cfg = get_cfg()
    cfg.merge_from_file("configs/MSD-Lung/mdkd_unet_demo.yaml")
    cfg.MODEL.SEG.BASE_CHANNELS = 4
    return cfg


def _teacher(cfg):
    t = cfg.clone()
    t.MODEL.BACKBONE.NAME = "fusion"
    t.FUSION.TEACHERS = ("", "")  # two random UNet teachers (smoke test only)
    t.FUSION.TEACHER_BACKBONES = ("unet_encoder",)
    t.MODEL.SEG.BASE_CHANNELS = 8  # joint teacher wider than the student: connectors needed
    return build_model(t)


def _batch(b=4):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(3, 48, 48, generator=g),
             "target": {"masks": (torch.rand(1, 48, 48, generator=g) > 0.8).float()}} for _ in range(b)]


def test_seg_adapter_feeds_the_shared_kd_classes():
    cfg = _kd_cfg()
    student, teacher = build_model(cfg), _teacher(cfg)
    distiller = build_distiller(cfg, student, teacher)
    # the same classes as detection: Distiller, KDTrainerMixin via KDSimpleTrainer, KDTrainer
    assert type(distiller) is Distiller and isinstance(distiller.adapter, EncoderFeaturesAdapter)
    assert KDTrainer.trainer_class is KDSimpleTrainer and issubclass(KDSimpleTrainer, KDTrainerMixin)
    assert kd_trainer.ADAPTER_FOR_ARCH["faster_rcnn"] == "torchvision_faster_rcnn"
    assert TorchvisionFasterRCNNAdapter is not EncoderFeaturesAdapter
    # every encoder level and the bottleneck are distilled (C15), channel connectors on each
    assert list(distiller.level_pairs) == ["enc1", "enc2", "enc3", "enc4", "bottleneck"]
    assert all(isinstance(c, torch.nn.Conv2d) for c in distiller.connectors.values())

    batch = _batch()
    opt = build_optimizer(cfg, list(student.parameters()) + list(distiller.parameters()))
    trainer = KDSimpleTrainer(student, [batch], opt)
    trainer.distiller, trainer.epoch_iters, trainer.task_weight = distiller, 1, cfg.KD.W_TASK
    trainer.iter = 0  # epoch 0: cf = 0 -> task loss only, teacher not run
    warm = trainer.compute_losses(batch)
    assert set(warm) == {"loss_dice", "loss_bce"}
    trainer.iter = 20  # epoch 20 > warm-up + ramp: cf = 1, beta = 0.5, t = max(.5, 2*.9^4)
    losses = trainer.compute_losses(batch)
    assert set(losses) == {"loss_dice", "loss_bce", "loss_Con", "loss_FAlgn", "loss_CosSim"}
    plain = student(*trainer.detector_inputs(batch))
    assert float(losses["loss_dice"]) == pytest.approx(0.5 * float(plain["loss_dice"]), rel=1e-5)
    before = [p.detach().clone() for p in student.parameters()]
    trainer.train(20, 21)
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.real_data
@pytest.mark.timeout(600)
def test_seg_pipeline_few_iterations_writes_all_rows(tmp_path, data_root):
    from mdkd_det.engine.cli import main

    out = tmp_path / "seg"
    cfg = _kd_cfg()
    cfg.merge_from_list([
        "OUTPUT_DIR", str(out), "SOLVER.IMS_PER_BATCH", 4, "SOLVER.WARMUP_ITERS", 1,
        "ADVERSARIAL.SOURCE_IMS_PER_BATCH", 2, "ADVERSARIAL.TARGET_IMS_PER_BATCH", 2,
        "DATASETS.TRAIN_LIMIT", 16, "DATASETS.TEST_LIMIT", 12, "KD.EPOCH_ITERS", 1,
        "KD.CF.WARMUP", 1.0, "KD.CF.RAMP", 1.0, "LOG_PERIOD", 1,
        "PIPELINE.ITERS.MULTI_HEAD", 1, "PIPELINE.ITERS.DATASET_SPECIFIC", 2,
        "PIPELINE.ITERS.TARGET_TEACHER", 1, "PIPELINE.ITERS.SOURCE_TEACHER", 1,
        "PIPELINE.ITERS.JOINT_TEACHER", 1, "PIPELINE.ITERS.STUDENT", 3, "PIPELINE.VAL_PERIOD", 2,
    ])
    f = tmp_path / "seg.yaml"
    f.write_text(cfg.dump())
    assert main(["--config-file", str(f)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "segmentation" and res["eval_dataset"] == "msd_lung_test"
    assert res["metrics"] == ["IoU", "DSC", "precision", "recall", "HD95"]
    assert set(res["rows"]) == {"multi_head", "dataset_specific", "joint_teacher", "student"}
    for key, row in res["rows"].items():
        assert all(row[m] is not None for m in res["metrics"])
        # selected on the hold-out (msd_lung_val) by DSC, reported on msd_lung_test
        assert row["selected_by"]["dataset"] == "msd_lung_val", key
        assert row["selected_by"]["metric"] == "sem_seg/DSC"
    assert res["rows"]["dataset_specific"]["checkpoint"].endswith("dataset_specific/model_best.pth")
    assert (out / "dataset_specific" / "inference" / "msd_lung_test" / "seg_metrics.json").is_file()
    assert (out / "dataset_specific" / "inference" / "msd_lung_val" / "seg_metrics.json").is_file()
    for stage in ("source_teacher_lungct_train_boxmask", "source_teacher_lung_pet_ct_dx_all_boxmask"):
        assert stage in res["wall_time_s"]
    md = (out / "results.md").read_text()
    assert "HD95 (px)" in md and "paper Table 4, Lung MSD" in md
    # teachers trained with Dice (Eq. 1), the student with DiceBCE (Eq. 10) + KD terms (Eq. 9)
    assert 'LOSS: dice\n' in (out / "target_teacher" / "config.yaml").read_text()
    jt = (out / "joint_teacher" / "config.yaml").read_text()
    assert "source_teacher_lungct_train_boxmask/model_final.pth" in jt and "cross_attention" in jt
    assert "target_teacher/model_best.pth" in jt  # the selected Stage-1 target teacher
    metrics = [json.loads(line) for line in (out / "student" / "metrics.json").read_text().splitlines()]
    assert any("loss_FAlgn" in m for m in metrics) and any("loss_domain" in json.loads(line) for line in
               (out / "source_teacher_lungct_train_boxmask" / "metrics.json").read_text().splitlines())


def test_tresunet_teachers_for_a_unet_student(tmp_path):
    """Table 5 setting: teacher stages become TResUNet; the UNet student distils the fused
    TResUNet teachers on the strides they share."""
    from mdkd_det.pipeline import PipelineRunner

    cfg = _kd_cfg()
    cfg.merge_from_list(["OUTPUT_DIR", str(tmp_path), "PIPELINE.TEACHER_BACKBONE", "tresunet_encoder",
                         "MODEL.SEG.TRANSFORMER_DIM", 32, "MODEL.SEG.TRANSFORMER_HEADS", 2,
                         "PIPELINE.VAL_DATASET", ""])
    runner = PipelineRunner(cfg)
    tt = runner.stage_cfg("target_teacher")
    assert (tt.MODEL.META_ARCHITECTURE, tt.MODEL.BACKBONE.NAME, tt.MODEL.SEG.LOSS) == \
        ("tresunet", "tresunet_encoder", "dice")
    ds = runner.stage_cfg("dataset_specific")
    assert (ds.MODEL.META_ARCHITECTURE, ds.MODEL.SEG.LOSS) == ("unet", "dice_bce")
    jt = runner.stage_cfg("joint_teacher").clone()
    jt.defrost()
    jt.FUSION.TEACHERS = ("",)  # one random TResUNet teacher (no Stage-1 run here)
    teacher = build_model(jt)
    assert teacher.decoder.blocks[0].__class__.__name__ == "ResidualBlock"
    distiller = build_distiller(cfg, build_model(cfg), teacher)
    assert distiller.level_pairs == {"enc2": "enc1", "enc3": "enc2", "enc4": "enc3", "bottleneck": "bottleneck"}
    caption, rows = runner.task.paper_reference(cfg, "msd_lung_train")
    assert "Table 5" in caption and rows["student"][1] == 91.43
