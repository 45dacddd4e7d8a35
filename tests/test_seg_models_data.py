"""Segmentation models (UNet, TResUNet, joint teacher on FusionBackbone incl. a CT detection
backbone) and the MSD lung / box-mask datasets on the real shared data."""

import pytest
import torch

from mdkd_det.config import get_cfg
from mdkd_det.engine.checkpointer import export_model
from mdkd_det.engine.defaults import build_model
from mdkd_det.modeling.fusion import FusionBackbone


def seg_cfg(**over):
    cfg = get_cfg()
    cfg.merge_from_file("configs/MSD-Lung/Base-UNet.yaml")
    cfg.MODEL.SEG.BASE_CHANNELS = 4
    for k, v in over.items():
        cfg.merge_from_list([k, v])
    return cfg


def _batch(b=2, size=48):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(b)]
    targets = [{"masks": (torch.rand(1, size, size, generator=g) > 0.7).float()} for _ in range(b)]
    return images, targets


@pytest.mark.parametrize("arch,bb", [("unet", "unet_encoder"), ("tresunet", "tresunet_encoder")])
def test_segmenter_train_eval_contract(arch, bb):
    cfg = seg_cfg(**{"MODEL.META_ARCHITECTURE": arch, "MODEL.BACKBONE.NAME": bb,
                     "MODEL.SEG.TRANSFORMER_DIM": 32, "MODEL.SEG.TRANSFORMER_HEADS": 2})
    model = build_model(cfg)
    shapes = model.backbone.output_shape()
    assert list(shapes)[-1] == "bottleneck" and shapes["bottleneck"].stride == 16
    images, targets = _batch()
    feats = model.backbone_features(images)
    assert list(feats) == list(shapes)
    for k, f in feats.items():
        assert f.shape[1] == shapes[k].channels and f.shape[-1] == 48 // shapes[k].stride
    losses = model(images, targets)
    assert set(losses) == {"loss_dice", "loss_bce"}
    sum(losses.values()).backward()
    assert model.backbone.out_channels == shapes["bottleneck"].channels
    model.eval()
    out = model(images)
    assert out[0]["sem_seg"].shape == (1, 48, 48) and 0 <= float(out[0]["sem_seg"].min())


def test_segmenter_rejects_wrong_backbone():
    from mdkd_det.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="unet_encoder"):
        build_model(seg_cfg(**{"MODEL.BACKBONE.NAME": "resnet18_fpn"}))


def test_joint_teacher_fuses_seg_and_ct_detection_backbones(tmp_path):
    """FusionBackbone (the detection registry entry "fusion") over a UNet teacher checkpoint and a
    Faster R-CNN resnet18_fpn checkpoint, levels paired by nearest stride, cross-attention."""
    seg_ckpt = export_model(build_model(seg_cfg()), str(tmp_path / "seg.pth"))
    det_cfg = get_cfg()
    det_cfg.MODEL.FPN.OUT_CHANNELS = 16
    det_ckpt = export_model(build_model(det_cfg), str(tmp_path / "det.pth"))
    cfg = seg_cfg(**{"MODEL.BACKBONE.NAME": "fusion", "FUSION.OP": "cross_attention",
                     "FUSION.OUT_CHANNELS": 0, "FUSION.LEVEL_MATCH": "stride",
                     "MODEL.FPN.OUT_CHANNELS": 16})
    cfg.FUSION.TEACHERS = (seg_ckpt,)
    cfg.FUSION.TEACHER_BACKBONES = ("unet_encoder",)
    cfg.FUSION.EXTRA_TEACHERS = (det_ckpt,)
    cfg.FUSION.EXTRA_TEACHER_BACKBONES = ("resnet18_fpn",)
    joint = build_model(cfg)
    fb = joint.backbone
    assert isinstance(fb, FusionBackbone) and fb.num_teachers == 2
    # the seg teacher's levels are kept; the detection FPN contributes the nearest stride
    assert fb.level_maps[1] == {"enc1": "0", "enc2": "0", "enc3": "0", "enc4": "1", "bottleneck": "2"}
    assert {k: v.channels for k, v in fb.output_shape().items()} == {
        "enc1": 4, "enc2": 8, "enc3": 16, "enc4": 32, "bottleneck": 64}
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in joint.named_parameters() if p.requires_grad}
    assert trainable == {"backbone.fusion", "decoder.blocks", "decoder.head"}
    images, targets = _batch()
    sum(joint(images, targets).values()).backward()
    # keys mode still refuses teachers with different levels
    cfg.FUSION.LEVEL_MATCH = "keys"
    with pytest.raises(ValueError, match="share key sets"):
        build_model(cfg)


@pytest.mark.real_data
def test_msd_and_boxmask_datasets(data_root):
    from mdkd_det.data.build import get_dataset_records
    from mdkd_det.data.seg_mapper import SegDatasetMapper

    cfg = seg_cfg()
    train = get_dataset_records(cfg, ["msd_lung_train"])
    val = get_dataset_records(cfg, ["msd_lung_val"])
    test = get_dataset_records(cfg, ["msd_lung_test"])
    assert (len(train), len(val), len(test)) == (110, 20, 130)
    # the hold-out is whole 10-patch blocks, disjoint from training
    assert not {r["patient_id"] for r in train} & {r["patient_id"] for r in val}
    assert {r["h5_index"] for r in train} | {r["h5_index"] for r in val} == set(range(130))
    assert sum(r["file_name"].endswith("test_patches.h5") for r in test) == 130
    mapper = SegDatasetMapper(cfg, is_train=False)
    d = mapper(test[0])
    assert d["image"].shape == (3, 48, 48) and d["target"]["masks"].shape == (1, 48, 48)
    fg = sum(float(mapper(r)["target"]["masks"].sum()) > 0 for r in test)
    assert fg == 117  # data README: 117 test patches contain tumour
    box = get_dataset_records(cfg, ["lung_pet_ct_dx_all_boxmask"])
    assert len(box) == 38
    b = mapper(box[0])
    m = b["target"]["masks"][0].numpy()
    assert m[24, 24] == 1 and 0 < m.mean() < 0.5  # ellipse centred in the patch
    assert 0 <= float(b["image"].min()) and float(b["image"].max()) <= 1
    # seeded training augmentation moves image and mask together
    aug = SegDatasetMapper(seg_cfg(**{"INPUT.AUG.HFLIP_PROB": 1.0, "INPUT.AUG.VFLIP_PROB": 0.0,
                                      "INPUT.AUG.AFFINE_PROB": 0.0}), is_train=True)
    a = aug(train[0], seed=1)
    plain = mapper(train[0])
    assert torch.equal(a["target"]["masks"], plain["target"]["masks"].flip(-1))
    assert torch.allclose(a["image"], plain["image"].flip(-1))


@pytest.mark.parametrize("r", [1.0, 0.0])
def test_domain_adversarial_step_on_a_segmenter(r):
    """Stage 1 (Eqs. 1-2 with Dice): the shared DATrainer + DomainAdversarialHead on the
    bottleneck of an unmodified segmenter; r = 0 sends the target through the encoder only."""
    from mdkd_det.engine.adversarial import DATrainer, build_domain_adversarial_head
    from mdkd_det.solver import build_optimizer

    cfg = seg_cfg(**{"MODEL.SEG.LOSS": "dice"})
    model = build_model(cfg)
    head = build_domain_adversarial_head(cfg, model)
    assert head.discriminator.in_channels == model.backbone.output_shape()["bottleneck"].channels
    images, targets = _batch(4)
    batch = {"source": [{"image": i, "target": t} for i, t in zip(images[:2], targets[:2])],
             "target": [{"image": i, "target": t} for i, t in zip(images[2:], targets[2:])]}
    opt = build_optimizer(cfg, list(model.parameters()) + list(head.parameters()))
    trainer = DATrainer(model, [batch], opt, da_head=head, r=r, total_iters=10)
    trainer.iter = 5  # lambda(0.5) > 0
    losses = trainer.compute_losses(batch)
    expected = {"loss_dice", "loss_domain"} | ({"tgt_loss_dice"} if r else set())
    assert set(losses) == expected
    sum(losses.values()).backward()
    assert head.discriminator.fc.weight.grad is not None
    assert model.backbone.blocks[0][0].weight.grad is not None
