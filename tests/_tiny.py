"""Tiny real-data configs shared by integration tests (not collected by pytest)."""

from mdkd_det.config import get_cfg


def tiny_cfg(out_dir, max_iter=2, **over):
    """Faster R-CNN R18-FPN on LungCT at 128 px with minimal sampling: a step takes well under 1 s."""
    cfg = get_cfg()
    cfg.merge_from_file("configs/LungCT/faster_rcnn_R18_FPN_demo.yaml")
    cfg.merge_from_list([
        "INPUT.MIN_SIZE_TRAIN", 128, "INPUT.MAX_SIZE_TRAIN", 128,
        "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 128,
        "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_HEADS.MLP_HEAD_DIM", 64,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16, "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 32,
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 100, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50,
        "MODEL.RPN.PRE_NMS_TOPK_TEST", 100, "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
        "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", max_iter, "SOLVER.WARMUP_ITERS", 1,
        "SOLVER.CHECKPOINT_PERIOD", max_iter, "DATASETS.TRAIN_LIMIT", 16,
        "DATASETS.TEST_LIMIT", 4, "DATALOADER.NUM_WORKERS", 0, "TEST.VIS_NUM", 1,
        "LOG_PERIOD", 1, "OUTPUT_DIR", str(out_dir),
    ])
    for k, v in over.items():
        cfg.merge_from_list([k, v])
    return cfg


def tiny_kd_cfg(tmp_path, max_iter=2, **over):
    """A saved tiny teacher under ``tmp_path/teacher`` and a KD student config distilling from it
    into ``tmp_path/student`` (constant cf, no evaluation); ``over`` adds config overrides."""
    from mdkd_det.engine.checkpointer import Checkpointer
    from mdkd_det.engine.defaults import build_model

    tdir = tmp_path / "teacher"
    tcfg = tiny_cfg(tdir, max_iter=1)
    Checkpointer(build_model(tcfg), str(tdir)).save("model_final")
    (tdir / "config.yaml").write_text(tcfg.dump())
    return tiny_cfg(tmp_path / "student", max_iter=max_iter, **{
        "KD.ENABLED": True, "KD.TEACHER_CONFIG": str(tdir / "config.yaml"),
        "KD.TEACHER_WEIGHTS": str(tdir / "model_final.pth"), "KD.CF.SCHEDULE": "constant",
        "DATASETS.TEST": "()", **over})


def crashing_kd_trainer(at_iter):
    """A ``KDTrainer`` subclass whose run raises ``RuntimeError("simulated crash")`` before
    iteration ``at_iter`` (resume tests)."""
    from mdkd_det.distill.trainer import KDTrainer
    from mdkd_det.engine import hooks

    class Crash(hooks.HookBase):
        def before_step(self):
            if self.trainer.iter == at_iter:
                raise RuntimeError("simulated crash")

    class Crashing(KDTrainer):
        def build_hooks(self):
            return super().build_hooks() + [Crash()]

    return Crashing
