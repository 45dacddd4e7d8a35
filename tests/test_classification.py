"""Classification task (issue 5): Eq. 14 weighted CE, early/late-k mapping, FA blocks, the cls KD
adapter on the shared Distiller/KDTrainerMixin, patches from the real data, backbones."""

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from mdkd_det.config import get_cfg
from mdkd_det.distill.cls_adapter import ImageClassifierAdapter, select_layers
from mdkd_det.modeling.backbone.base import Backbone
from mdkd_det.modeling.fusion import FusionAttentionFusion, FusionBackbone
from mdkd_det.modeling.meta_arch.classifier import frequency_class_weights, weighted_cross_entropy


# --- Eq. 14 ---------------------------------------------------------------------------------
def test_weighted_ce_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    w = frequency_class_weights([0, 1, 1], 2)  # f = (1/3, 2/3) -> w ~ (3, 1.5), sum w f = 2 -> (1.5, 0.75)
    assert torch.allclose(w, torch.tensor([1.5, 0.75]), atol=1e-5)
    ce = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1)), math.log(2)]
    expected = (1.5 * ce[0] + 0.75 * ce[1] + 0.75 * ce[2]) / 3
    assert weighted_cross_entropy(logits, labels, w).item() == pytest.approx(expected, rel=1e-5)
    assert weighted_cross_entropy(logits, labels).item() == pytest.approx(sum(ce) / 3, rel=1e-5)
    assert float((w * torch.tensor([1 / 3, 2 / 3])).sum()) == pytest.approx(1.0, rel=1e-5)  # A15 scaling
    with pytest.raises(ValueError, match="outside"):
        frequency_class_weights([0, 2], 2)


# --- C26 / A16 ------------------------------------------------------------------------------
def test_early_late_k_mapping():
    assert select_layers(5, 3, 1, "late") == [(4, 2)]
    assert select_layers(5, 3, 1, "early") == [(4, 0)]
    assert select_layers(5, 3, 2, "early") == [(3, 0), (4, 1)]
    assert select_layers(5, 3, 2, "late") == [(3, 1), (4, 2)]
    assert select_layers(5, 3, 3, "early") == select_layers(5, 3, 3, "late") == [(2, 0), (3, 1), (4, 2)]
    with pytest.raises(ValueError, match="KD.CLS.K"):
        select_layers(5, 3, 4, "late")
    with pytest.raises(ValueError, match="LAYER_SELECTION"):
        select_layers(5, 3, 1, "middle")


# --- C10 / A6 -------------------------------------------------------------------------------
class _TinyBackbone(Backbone):
    """Two levels (stride 4: 8 ch, stride 8: C ch) from strided convs."""

    def __init__(self, c=12):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.b = nn.Conv2d(8, c, 3, stride=2, padding=1)
        self._out_feature_channels = {"s4": 8, "last": c}
        self._out_feature_strides = {"s4": 4, "last": 8}
        self.out_channels = c

    def forward(self, x):
        a = self.a(x)
        return OrderedDict(s4=a, last=self.b(a))


def test_fa_block_shapes():
    op = FusionAttentionFusion([12, 20, 20], 64, num_blocks=3)
    outs = op([torch.randn(2, 12, 4, 4), torch.randn(2, 20, 4, 4), torch.randn(2, 20, 2, 2)])
    assert [tuple(o.shape) for o in outs] == [(2, 64, 4, 4)] * 3
    assert op.output_names == ("fa1", "fa2", "fa3")
    assert op.blocks[0].reduce.in_channels == 3 * 64 and op.blocks[0].reduce.out_channels == 64  # (m+1)*joint_ch -> joint_ch
    assert all(isinstance(b.reduce, nn.Identity) for b in op.blocks[1:])
    assert op.blocks[0].attn.num_heads == 1  # joint_ch / 64
    # as the joint teacher's FusionBackbone: only the last level fused, FA blocks become its levels
    fb = FusionBackbone([_TinyBackbone(), _TinyBackbone()], fusion_op="fa_blocks", out_channels=64,
                        fusion_kwargs={"num_blocks": 2}, levels=["last"])
    out = fb(torch.randn(2, 3, 32, 32))
    assert list(out) == ["fa1", "fa2"] and tuple(out["fa2"].shape) == (2, 64, 4, 4)
    assert {k: (v.channels, v.stride) for k, v in fb.output_shape().items()} == {"fa1": (64, 8), "fa2": (64, 8)}
    assert not any(p.requires_grad for p in fb.teachers.parameters())
    with pytest.raises(ValueError, match="not teacher levels"):
        FusionBackbone([_TinyBackbone()], fusion_op="fa_blocks", out_channels=64, levels=["p9"])


# --- real data ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def patch_dir(tmp_path_factory, data_root):
    """The lesion-patch set built once from the real shared data (1 negative per slice)."""
    from mdkd_det.data.datasets.lesion_patch import build_lesion_patches

    out = tmp_path_factory.mktemp("lesion_patches") / "lp"
    cfg = get_cfg()
    cfg.DATASETS.LESION_PATCH.NEG_PER_IMAGE = 1
    cfg.DATASETS.LESION_PATCH.MAX_SLICES = 400
    build_lesion_patches(cfg, str(out))
    return out


def cls_cfg(out_dir, patch_dir, **over):
    cfg = get_cfg()
    cfg.merge_from_file("configs/LesionPatch/mdkd_effnet_demo.yaml")
    cfg.merge_from_list([
        "DATASETS.LESION_PATCH.DIR", str(patch_dir), "DATASETS.LESION_PATCH.NEG_PER_IMAGE", 1,
        "DATASETS.LESION_PATCH.MAX_SLICES", 400,
        "MODEL.CLASSIFIER.INPUT_SIZE", 32, "SOLVER.IMS_PER_BATCH", 4, "SOLVER.WARMUP_ITERS", 1,
        "ADVERSARIAL.SOURCE_IMS_PER_BATCH", 2, "ADVERSARIAL.TARGET_IMS_PER_BATCH", 2,
        "FUSION.OUT_CHANNELS", 64, "DATASETS.TEST_LIMIT", 24, "LOG_PERIOD", 1, "OUTPUT_DIR", str(out_dir),
    ])
    for k, v in over.items():
        cfg.merge_from_list([k, v])
    return cfg


def test_patches_manifest_and_patient_split(patch_dir):
    import json

    from mdkd_det.data.datasets.lesion_patch import load_lesion_patches

    m = json.loads((patch_dir / "manifest.json").read_text())
    assert m["classes"] == ["no_lesion", "lesion"] and m["params"]["seed"] == 0
    for domain in ("lungct", "lung_pet_ct_dx", "deeplesion"):
        recs = {s: load_lesion_patches(str(patch_dir), domain, s) for s in ("train", "val", "test", "all")}
        assert {r["label"] for r in recs["all"]} == {0, 1}
        assert len(recs["all"]) == sum(len(recs[s]) for s in ("train", "val", "test"))
        pats = {s: {r["patient_id"] for r in recs[s]} for s in ("train", "val", "test")}
        assert not (pats["train"] & pats["test"]) and not (pats["train"] & pats["val"])  # patient-level
    with np.load(patch_dir / "patches.npz") as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape[1:] == (64, 64)
        lab = z["labels"]
    pos = [i for i, p in enumerate(m["patches"]) if p["domain"] == "lungct"]
    assert lab[pos].sum() > 0 and (lab[pos] == 0).sum() > 0


def test_cls_adapter_feeds_shared_distiller_and_mixin(tmp_path, patch_dir):
    from mdkd_det.data.build import build_detection_train_loader
    from mdkd_det.tasks import get_task
    from mdkd_det.distill.distiller import Distiller
    from mdkd_det.distill.mixin import KDTrainerMixin
    from mdkd_det.distill.trainer import KDSimpleTrainer, KDTrainer
    from mdkd_det.engine.defaults import build_model

    tcfg = cls_cfg(tmp_path / "t", patch_dir, **{"MODEL.BACKBONE.NAME": "fusion",
                                                  "FUSION.TEACHER_BACKBONES": "('efficientnet_b0',)",
                                                  "FUSION.TEACHERS": "('', '')"})
    teacher = build_model(tcfg)
    assert list(teacher.backbone.output_shape()) == ["fa1", "fa2", "fa3"]
    scfg = cls_cfg(tmp_path / "s", patch_dir, **{"KD.ENABLED": True, "SOLVER.MAX_ITER": 1})
    kd = KDTrainer(scfg, teacher=teacher)
    assert KDTrainer.trainer_class is KDSimpleTrainer and issubclass(KDSimpleTrainer, KDTrainerMixin)
    assert type(kd.distiller) is Distiller and isinstance(kd.distiller.adapter, ImageClassifierAdapter)
    # late-k, k=2: student's last two levels <- teacher's last two FA blocks
    assert kd.distiller.level_pairs == {"blocks6": "fa2", "head": "fa3"}
    loader = build_detection_train_loader(scfg, mapper=get_task(scfg).build_mapper(scfg, is_train=True))
    batch = next(iter(loader))
    trainer = kd.build_trainer(kd.model, loader)
    losses = trainer.compute_losses(batch)
    assert set(losses) == {"loss_cls", "loss_FAlgn", "loss_CosSim", "loss_KLD"}
    sum(losses.values()).backward()
    assert all(c.weight.grad is not None for c in kd.distiller.connectors.values())  # 1x1 to joint_ch
    assert not any(p.grad is not None for p in teacher.parameters())


def test_source_teacher_uses_plain_ce_target_stages_keep_their_weights(tmp_path, patch_dir):
    """Stage-1 source teachers train with plain CE (Eq. 7): the target's Eq. 14 weights are not
    applied to source batches. Target-only stages keep the target's own weights."""
    import torch.nn.functional as F

    from mdkd_det.engine.defaults import build_model
    from mdkd_det.pipeline.runner import PipelineRunner

    cfg = cls_cfg(tmp_path, patch_dir, **{"MODEL.CLASSIFIER.INPUT_SIZE": 32})
    runner = PipelineRunner(cfg)
    src = cfg.PIPELINE.SOURCES[0]
    scfg = runner.stage_cfg("source_teacher", src)
    assert scfg.MODEL.CLASSIFIER.CLASS_WEIGHTS == "none" and cfg.MODEL.CLASSIFIER.CLASS_WEIGHTS == "frequency"
    for stage in ("target_teacher", "joint_teacher", "student", "dataset_specific"):
        assert runner.stage_cfg(stage).MODEL.CLASSIFIER.CLASS_WEIGHTS == "frequency", stage
    tt = build_model(runner.stage_cfg("target_teacher"))
    assert tt.class_weights is not None  # Eq. 14 weights of the target's own labels
    torch.manual_seed(0)
    teacher = build_model(scfg)
    assert teacher.class_weights is None
    teacher.eval()  # no dropout / BN batch statistics: the loss is a function of the logits
    imgs = [torch.rand(3, 32, 32) for _ in range(3)]
    labels = torch.tensor([1, 1, 0])
    logits = torch.stack([o["logits"] for o in teacher(imgs)])
    teacher.training = True  # loss branch with the same (eval) layers
    loss = teacher(imgs, [{"labels": y.reshape(1)} for y in labels])["loss_cls"]
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_medvit_backbone_classifier_train_eval(patch_dir):
    from mdkd_det.engine.defaults import build_model

    cfg = cls_cfg("/tmp/unused", patch_dir, **{"MODEL.BACKBONE.NAME": "medvit", "MODEL.CLASSIFIER.INPUT_SIZE": 64,
                                               "MODEL.CLASSIFIER.CLASS_WEIGHTS": "none"})
    model = build_model(cfg)
    shapes = model.backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "stages1": (256, 8), "stages2": (512, 16), "head": (1024, 32)}
    imgs = [torch.rand(3, 64, 64) for _ in range(2)]
    loss = model(imgs, [{"labels": torch.tensor([0])}, {"labels": torch.tensor([1])}])["loss_cls"]
    loss.backward()
    model.eval()
    out = model(imgs)
    assert out[0]["scores"].shape == (2,) and torch.allclose(out[0]["scores"].sum(), torch.tensor(1.0))


# --- pipeline on real data + t-SNE tool -----------------------------------------------------
@pytest.mark.timeout(600)
def test_cls_pipeline_writes_all_rows_and_tsne(tmp_path, patch_dir):
    import json

    from mdkd_det.engine.cli import main

    out = tmp_path / "mdkd_cls"
    cfg = cls_cfg(out, patch_dir, **{"SOLVER.MAX_ITER": 1, "PIPELINE.ITERS.MULTI_HEAD": 1,
                                     "PIPELINE.ITERS.DATASET_SPECIFIC": 2, "PIPELINE.ITERS.TARGET_TEACHER": 2,
                                     "PIPELINE.ITERS.SOURCE_TEACHER": 1, "PIPELINE.ITERS.JOINT_TEACHER": 1,
                                     "PIPELINE.ITERS.STUDENT": 2, "SOLVER.CHECKPOINT_PERIOD": 2})
    cfg_file = tmp_path / "cls.yaml"
    cfg_file.write_text(cfg.dump())
    assert main(["--config-file", str(cfg_file)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "classification" and res["metrics"] == ["accuracy"]
    assert set(res["rows"]) == {"multi_head", "dataset_specific", "joint_teacher", "student"}
    md = (out / "results.md").read_text()
    assert "| Model | Accuracy (%) |" in md and "paper Table 11" in md
    ev = out / "student" / "inference" / "lesion_patch_lungct_test"
    cm = np.asarray(json.loads((ev / "confusion_matrix.json").read_text())["rows_true_cols_pred"])
    assert cm.sum() == 24  # TEST_LIMIT
    metrics = json.loads((ev / "metrics.json").read_text())["cls"]
    assert {"accuracy", "recall/no_lesion", "recall/lesion"} <= set(metrics)
    # accuracy (percent) recomputed from the confusion matrix, whose rows are the per-image labels
    # of predictions.json; the student row of results.json is that evaluation's value
    preds = json.loads((ev / "predictions.json").read_text())
    labels = np.array([p["label"] for p in preds])
    assert len(preds) == 24 and cm[0].sum() == (labels == 0).sum() and cm[1].sum() == (labels == 1).sum()
    assert metrics["accuracy"] == pytest.approx(100.0 * np.trace(cm) / 24, abs=1e-9)
    assert res["rows"]["student"]["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)
    assert metrics["recall/lesion"] == pytest.approx(100.0 * cm[1, 1] / cm[1].sum(), abs=1e-9)
    jcfg = (out / "joint_teacher" / "config.yaml").read_text()
    assert "fa_blocks" in jcfg and "source_teacher_lesion_patch_deeplesion_all" in jcfg
    # t-SNE tool: baseline (dataset-specific = target teacher) vs student
    import importlib.util

    spec = importlib.util.spec_from_file_location("visualize_embeddings", "tools/visualize_embeddings.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    png = tmp_path / "tsne.png"
    assert tool.main(["--task", "classification", "--baseline-config", str(out / "target_teacher" / "config.yaml"),
                      "--student-config", str(out / "student" / "config.yaml"),
                      "--student-weights", str(out / "student" / "model_student.pth"),
                      "--max-images", "30", "--out", str(png)]) == 0
    scores = json.loads(png.with_suffix(".json").read_text())["scores"]
    assert png.stat().st_size > 1000 and set(scores) == {"Baseline", "Student"}
    # the student's silhouette recomputed with scikit-learn on its embeddings of the same 30
    # seeded images (per-class cap 500 > class sizes: every point is kept)
    import argparse

    from sklearn.metrics import silhouette_score

    s_cfg, s_model = tool._load(str(out / "student" / "config.yaml"), str(out / "student" / "model_student.pth"))
    (emb, y), names = tool._embeddings("classification", s_cfg, s_model,
                                       argparse.Namespace(dataset="", max_images=30, seed=0))
    assert names == ["no_lesion", "lesion"] and len(y) == 30
    st = scores["Student"]
    assert st["n_points"] == 30 and st["n_no_lesion"] == int((y == 0).sum()) and st["n_lesion"] == int((y == 1).sum())
    expected = silhouette_score(emb.reshape(len(emb), -1).astype(np.float64), y, metric="cosine")
    assert st["silhouette"] == pytest.approx(float(expected), abs=1e-9)


def test_tsne_segmentation_standin_and_separation(tmp_path):
    from mdkd_det.evaluation.embeddings import segmentation_embeddings, tsne_compare

    torch.manual_seed(0)

    class _Seg(nn.Module):  # the generic contract: model.backbone(x) -> OrderedDict, last = bottleneck
        def __init__(self):
            super().__init__()
            self.backbone = _TinyBackbone(c=6)

    images = torch.rand(4, 3, 32, 32)
    masks = torch.zeros(4, 1, 32, 32)
    masks[:, :, 8:24, 8:24] = 1
    masks[:, :, 0:8, 24:32] = 1  # half of the bottleneck cell (0, 3) ... its 8x8 cell is full
    emb, y = segmentation_embeddings(_Seg(), images, masks, resolution="bottleneck")
    assert emb.shape == (4 * 4 * 4, 6) and set(np.unique(y)) == {0, 1}
    assert y.reshape(4, 4, 4)[0, 1, 1] == 1 and y.reshape(4, 4, 4)[0, 0, 0] == 0
    masks[:, :, 0:8, 24:28] = 0  # cell (0, 3) now half mask: dropped at fg_fraction 0.6
    emb, y = segmentation_embeddings(_Seg(), images, masks, resolution="bottleneck", fg_fraction=0.6)
    assert len(y) == 4 * 15
    emb, y = segmentation_embeddings(_Seg(), images, masks, resolution="image", pixels_per_image=16)
    assert emb.shape[1] == 6 and (y == 1).sum() == 4 * 8 and (y == 0).sum() == 4 * 8
    rng = np.random.default_rng(0)
    yy = np.repeat([0, 1], 40)
    separated = rng.normal(size=(80, 8))
    separated[:, 0] += np.where(yy == 1, 6.0, -6.0)
    mixed = rng.normal(size=(80, 8))
    scores = tsne_compare({"baseline": (mixed, yy), "student": (separated, yy)}, ["bg", "fg"],
                          str(tmp_path / "t.png"), per_class=40)
    assert (tmp_path / "t.png").stat().st_size > 1000 and (tmp_path / "t.json").is_file()
    assert scores["student"]["silhouette"] > 0.5 > scores["baseline"]["silhouette"]
    assert scores["student"]["silhouette_tsne"] > scores["baseline"]["silhouette_tsne"]


def test_tsne_detection_roi_embeddings(tmp_path, data_root):
    from _tiny import tiny_cfg

    from mdkd_det.data.build import get_dataset_records
    from mdkd_det.data.mapper import DatasetMapper
    from mdkd_det.engine.defaults import build_model
    from mdkd_det.evaluation.embeddings import detection_embeddings

    cfg = tiny_cfg(tmp_path)
    model = build_model(cfg)
    mapper = DatasetMapper(cfg, is_train=False)
    items = [mapper(r) for r in get_dataset_records(cfg, ["lungct_valid"], 2)]
    gts = [d["target"]["boxes"] for d in items]
    gts[0] = torch.tensor([[0.0, 0.0, 512.0, 512.0]])  # whole image: every proposal is fg (IoU scaled)
    emb, y = detection_embeddings(model, [d["image"] for d in items], gts, fg_iou=0.0001, bg_iou=0.0)
    assert emb.ndim == 2 and emb.shape[1] == cfg.MODEL.ROI_HEADS.MLP_HEAD_DIM and len(y) == len(emb)
    assert y.sum() > 0 and set(np.unique(y)) <= {0, 1}
