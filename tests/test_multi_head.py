"""Tests for the multi-head multi-dataset baseline (paper C38):
mdkd_det.modeling.meta_arch.multi_head and mdkd_det.engine.multi_head, on real data
(LungCT target + Lung-PET-CT-Dx)."""

import os

import pytest
import torch

from mdkd_det.data.multi import build_round_robin_train_loader
from mdkd_det.engine.checkpointer import Checkpointer
from mdkd_det.engine.defaults import build_model
from mdkd_det.engine.multi_head import MultiHeadSimpleTrainer, MultiHeadTrainer
from mdkd_det.modeling.meta_arch.multi_head import MultiHeadModel, head_key
from mdkd_det.solver import build_optimizer
from mdkd_det.utils.errors import ConfigError

from _tiny import tiny_cfg

TARGET, SOURCE = "lungct_train", "lung_pet_ct_dx_train"
NAMES = [TARGET, SOURCE]
DET_KEYS = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def _cfg(data_root=None, out_dir="./output"):
    over = {"DATASETS.TRAIN": str(tuple(NAMES)), "DATASETS.TEST": "()", "DATASETS.TRAIN_LIMIT": 8,
            "MODEL.FPN.OUT_CHANNELS": 64, "SOLVER.BASE_LR": 1e-3, "SOLVER.CHECKPOINT_PERIOD": 0,
            "TEST.VIS_NUM": 0}
    if data_root is not None:
        over["DATASETS.ROOT"] = str(data_root)
    return tiny_cfg(out_dir, max_iter=2, **over)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MultiHeadModel(_cfg(), NAMES)


def test_backbone_shared_heads_distinct(model):
    a, b = model.head(TARGET), model.head(SOURCE)
    assert a is not b and a.backbone is b.backbone is model.backbone
    assert [id(p) for p in a.backbone.parameters()] == [id(p) for p in b.backbone.parameters()]
    for part in ("rpn", "roi_heads"):
        ids_a = {id(p) for p in getattr(a, part).parameters()}
        ids_b = {id(p) for p in getattr(b, part).parameters()}
        assert ids_a and not ids_a & ids_b
    n_bb = sum(p.numel() for p in model.backbone.parameters())
    n_heads = sum(p.numel() for n in NAMES for m in (model.head(n).rpn, model.head(n).roi_heads)
                  for p in m.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_bb + n_heads  # backbone counted once
    assert model.head() is a and model.target_name == TARGET


def test_forward_routes_to_named_head(model):
    model.eval()
    x = [torch.rand(3, 96, 96)]
    with torch.no_grad():
        out_b = model(x, dataset=SOURCE)[0]
        ref_b = model.head(SOURCE)(x)[0]
        out_a = model(x)[0]  # default: target head
        ref_a = model.head(TARGET)(x)[0]
    model.train()
    assert torch.equal(out_b["scores"], ref_b["scores"]) and torch.equal(out_a["scores"], ref_a["scores"])
    with pytest.raises(ConfigError, match="no head for dataset 'nope'"):
        model(x, dataset="nope")


def test_name_validation():
    cfg = _cfg()
    cfg.MODEL.BACKBONE.NAME = "no_such_backbone_needed"  # errors come before any build
    with pytest.raises(ConfigError, match="empty"):
        MultiHeadModel(cfg, [])
    with pytest.raises(ConfigError, match="more than once"):
        MultiHeadModel(cfg, ["a", "a"])
    with pytest.raises(ConfigError, match="same module key"):
        MultiHeadModel(cfg, ["a.b", "a:b"])
    assert head_key("coco:/x/ann.json:/x/img") == "coco__x_ann_json__x_img"
    assert head_key("3d") == "d_3d"


def test_loss_is_mean_of_per_dataset_sums(data_root, model):
    cfg = _cfg(data_root)
    batch = next(iter(build_round_robin_train_loader(cfg, NAMES)))
    trainer = MultiHeadSimpleTrainer(model, [batch], build_optimizer(cfg, model))
    torch.manual_seed(3)
    losses = trainer.compute_losses(batch)
    assert set(losses) == {f"{k}/{n}" for k in DET_KEYS for n in NAMES}
    total = sum(losses.values())
    torch.manual_seed(3)  # the same RNG draws (proposal sampling) in the same order
    sums = []
    for name in NAMES:
        ld = model.head(name)([d["image"] for d in batch[name]], [d["target"] for d in batch[name]])
        sums.append(sum(ld.values()))
        for k, v in ld.items():
            assert losses[f"{k}/{name}"].item() == pytest.approx(v.item() / 2, rel=1e-5)
    assert total.item() == pytest.approx(((sums[0] + sums[1]) / 2).item(), rel=1e-5)
    assert torch.isfinite(total)
    # one backward reaches the shared backbone and both heads
    model.zero_grad(set_to_none=True)
    total.backward()
    for name in NAMES:
        assert model.head(name).roi_heads.box_predictor.cls_score.weight.grad is not None
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)


def test_trainer_trains_evaluates_target_and_exports_head(data_root, tmp_path):
    cfg = _cfg(data_root, tmp_path)
    cfg.DATASETS.TEST = ("lungct_valid",)
    cfg.DATASETS.TEST_LIMIT = 2
    torch.manual_seed(0)
    trainer = MultiHeadTrainer(cfg)
    assert trainer.dataset_names == NAMES and trainer.target_name == TARGET
    before = {n: trainer.model.head(n).roi_heads.box_predictor.cls_score.weight.clone() for n in NAMES}
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert "AP" in results["bbox"]  # the target head was evaluated on DATASETS.TEST
    assert trainer.model.training  # back in train mode after the evaluation
    assert os.path.isdir(tmp_path / "inference" / "lungct_valid")
    hist = trainer._trainer.storage.histories()
    for n in NAMES:
        assert f"loss_classifier/{n}" in hist
        assert not torch.equal(before[n], trainer.model.head(n).roi_heads.box_predictor.cls_score.weight)

    path = trainer.export_head(SOURCE, str(tmp_path / "source_head.pth"))
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state) == {"model"}
    plain = build_model(cfg)
    plain.load_state_dict(state["model"], strict=True)
    head_state = trainer.model.head(SOURCE).state_dict()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in head_state.items())
    Checkpointer(build_model(cfg)).load(path, strict=True)  # the project's loader agrees
    with pytest.raises(ConfigError):
        trainer.export_head("nope", str(tmp_path / "x.pth"))


def test_trainer_rejects_mismatched_model(tmp_path):
    cfg = _cfg(None, tmp_path)
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="differ"):
        MultiHeadTrainer(cfg, dataset_names=[SOURCE, TARGET], model=MultiHeadModel(cfg, NAMES))
