"""Tests for mdkd_det.engine.adversarial: Stage-1 domain-adversarial source teacher
(paper Eqs. 2-6, C2-C5, A11, A12) on real LungCT (target) + Lung-PET-CT-Dx (source) data."""

import math
import os

import pytest
import torch

from mdkd_det.data.multi import build_paired_train_loader
from mdkd_det.distill.schedules import AdversarialLambda
from mdkd_det.engine.adversarial import (DATrainer, DomainAdversarialTrainer,
                                         build_domain_adversarial_head)
from mdkd_det.engine.defaults import build_model
from mdkd_det.modeling.domain_adversarial import DomainAdversarialHead, MultiLevelDomainAdversarial
from mdkd_det.solver import build_optimizer
from mdkd_det.utils.errors import ConfigError

from _tiny import tiny_cfg

DET_KEYS = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def _cfg(data_root, out_dir, max_iter=2):
    return tiny_cfg(out_dir, max_iter=max_iter, **{
        "DATASETS.ROOT": str(data_root), "DATASETS.TEST": "()", "DATASETS.TRAIN_LIMIT": 8,
        "ADVERSARIAL.SOURCE": "('lung_pet_ct_dx_train',)",
        "ADVERSARIAL.SOURCE_IMS_PER_BATCH": 2, "ADVERSARIAL.TARGET_IMS_PER_BATCH": 2,
        "MODEL.FPN.OUT_CHANNELS": 64, "SOLVER.BASE_LR": 1e-3,
        "SOLVER.WEIGHT_DECAY": 0.0,  # parameters only move through gradients
        "SOLVER.CHECKPOINT_PERIOD": 1, "TEST.VIS_NUM": 0,
    })


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """2 iterations of DomainAdversarialTrainer with r=1, levels="last"."""
    out = tmp_path_factory.mktemp("da")
    cfg = _cfg(data_root, out)
    torch.manual_seed(0)
    trainer = DomainAdversarialTrainer(cfg)
    head_before = {k: v.clone() for k, v in trainer.da_head.state_dict().items()}
    trainer.resume_or_load(resume=False)
    trainer.train()
    return cfg, trainer, head_before


def test_losses_for_both_domains_and_domain_term(trained):
    _, trainer, _ = trained
    hist = trainer._trainer.storage.histories()
    expected = DET_KEYS | {f"tgt_{k}" for k in DET_KEYS} | {"loss_domain"}
    assert expected <= set(hist)
    for k in expected | {"total_loss", "da_bce_source", "da_bce_target"}:
        vals = [v for v, _ in hist[k].values()]
        assert len(vals) == 2 and all(math.isfinite(v) for v in vals), k
    # lambda(0) = 0 in "paper" mode: the first step's domain term is exactly 0, the second is not
    dom = [v for v, _ in hist["loss_domain"].values()]
    assert dom[0] == 0.0 and dom[1] > 0.0
    # loss_domain = lam * (bce_src + bce_tgt)
    lam1 = AdversarialLambda(10.0)(0.5)
    bce = hist["da_bce_source"].values()[1][0] + hist["da_bce_target"].values()[1][0]
    assert dom[1] == pytest.approx(lam1 * bce, rel=1e-5)


def test_lambda_follows_schedule(trained):
    _, trainer, _ = trained
    lams = [v for v, _ in trainer._trainer.storage.history("da_lambda").values()]
    assert lams == pytest.approx([AdversarialLambda(10.0)(i / 2) for i in range(2)], abs=1e-12)
    assert lams[1] == pytest.approx(0.9866, abs=1e-4)  # paper_notes C4 reference value


def test_discriminator_is_optimized(trained):
    _, trainer, head_before = trained
    head = trainer.da_head
    assert isinstance(head, DomainAdversarialHead)
    head_ids = {id(p) for p in head.parameters()}
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2 and {id(p) for p in groups[1]["params"]} == head_ids
    assert not head_ids & {id(p) for p in trainer.model.parameters()}  # not inside the detector
    changed = [k for k, v in head.state_dict().items() if not torch.equal(v, head_before[k])]
    assert changed and all(k.startswith("discriminator.") for k in changed)


def test_checkpoint_model_is_plain_detector(trained):
    cfg, trainer, _ = trained
    ckpt = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), map_location="cpu", weights_only=True)
    plain = build_model(cfg)
    assert set(ckpt["model"]) == set(plain.state_dict())
    plain.load_state_dict(ckpt["model"], strict=True)
    assert set(ckpt["da_head"]) == set(trainer.da_head.state_dict())
    for k, v in trainer.da_head.state_dict().items():
        assert torch.equal(ckpt["da_head"][k], v)


def test_resume_restores_da_head(trained):
    cfg, trainer, _ = trained
    torch.manual_seed(123)  # a differently initialised fresh trainer
    fresh = DomainAdversarialTrainer(cfg)
    assert not torch.equal(fresh.da_head.discriminator.fc.weight, trainer.da_head.discriminator.fc.weight)
    assert fresh.resume_or_load(resume=True) == 2
    for k, v in trainer.da_head.state_dict().items():
        assert torch.equal(fresh.da_head.state_dict()[k], v), k
    assert fresh.optimizer.state_dict()["state"]  # optimizer state (both groups) restored


def test_resume_is_exact(trained, tmp_path):
    """Interrupted after iteration 0 and resumed == uninterrupted (detector and discriminator)."""
    cfg, trainer, _ = trained
    import shutil

    shutil.copy(os.path.join(cfg.OUTPUT_DIR, "model_0000000.pth"), tmp_path / "model_0000000.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000000.pth")
    cfg2 = cfg.clone()
    cfg2.OUTPUT_DIR = str(tmp_path)
    torch.manual_seed(5)
    resumed = DomainAdversarialTrainer(cfg2)
    assert resumed.resume_or_load(resume=True) == 1
    resumed.train()
    for a, b in ((resumed.model, trainer.model), (resumed.da_head, trainer.da_head)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb)


def _manual_da_trainer(cfg, **kw):
    torch.manual_seed(0)
    model = build_model(cfg)
    head = build_domain_adversarial_head(cfg, model)
    opt = build_optimizer(cfg, model)  # head params missing: the mixin adds them
    batch = next(iter(build_paired_train_loader(cfg, cfg.ADVERSARIAL.SOURCE)))
    trainer = DATrainer(model, [batch], opt, da_head=head, levels=cfg.ADVERSARIAL.LEVELS, **kw)
    return trainer, head, batch


def test_r0_all_levels_has_no_target_detection_loss(data_root, tmp_path):
    cfg = _cfg(data_root, tmp_path)
    cfg.ADVERSARIAL.LEVELS = "all"
    trainer, head, batch = _manual_da_trainer(cfg, r=0.0)
    assert isinstance(head, MultiLevelDomainAdversarial) and len(head.heads) == 4  # FPN '0'..'3'
    assert len(trainer.optimizer.param_groups) == 2
    trainer.iter, trainer.max_iter = 1, 2  # lambda(0.5) > 0
    losses = trainer.compute_losses(batch)
    assert set(losses) == DET_KEYS | {"loss_domain"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss_domain"].backward()
    # every level's discriminator and the backbone get gradients from the target-only path
    for h in head.heads:
        assert h.discriminator.fc.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.backbone.parameters())
    assert all(p.grad is None for p in trainer.model.roi_heads.parameters())  # no detection loss
    stats = trainer.last_domain_stats
    assert stats["da_lambda"] == pytest.approx(AdversarialLambda()(0.5))
    assert losses["loss_domain"].item() == pytest.approx(
        stats["da_lambda"] * (stats["da_bce_source"] + stats["da_bce_target"]), rel=1e-5)


def test_r_weights_target_losses(data_root, tmp_path):
    cfg = _cfg(data_root, tmp_path)
    trainer, _, batch = _manual_da_trainer(cfg, r=0.5)
    torch.manual_seed(1)
    half = trainer.compute_losses(batch)
    trainer.r = 1.0
    torch.manual_seed(1)
    full = trainer.compute_losses(batch)
    for k in DET_KEYS:
        assert half[f"tgt_{k}"].item() == pytest.approx(0.5 * full[f"tgt_{k}"].item(), rel=1e-4)
        assert half[k].item() == pytest.approx(full[k].item(), rel=1e-4)


def test_config_errors(data_root, tmp_path):
    cfg = _cfg(data_root, tmp_path)
    cfg.ADVERSARIAL.SOURCE = ()
    with pytest.raises(ConfigError, match="ADVERSARIAL.SOURCE"):
        DomainAdversarialTrainer(cfg)
    cfg = _cfg(data_root, tmp_path)
    cfg.ADVERSARIAL.SOURCE = tuple(cfg.DATASETS.TRAIN)
    with pytest.raises(ConfigError, match="share"):
        DomainAdversarialTrainer(cfg)
    for key, value in (("LEVELS", "middle"), ("GRAD_SCALING", "x"), ("R", -1)):
        cfg = _cfg(data_root, tmp_path)
        setattr(cfg.ADVERSARIAL, key, value)
        with pytest.raises(ConfigError, match=f"ADVERSARIAL.{key}"):
            DomainAdversarialTrainer(cfg)


def test_mixin_rejects_unpaired_batch(data_root, tmp_path):
    cfg = _cfg(data_root, tmp_path)
    trainer, _, batch = _manual_da_trainer(cfg)
    from mdkd_det.utils.errors import DatasetError

    with pytest.raises(DatasetError, match="paired batch"):
        trainer.compute_losses(batch["source"])


def _configured_da_trainer(cfg):
    """The Stage-1 DATrainer exactly as DomainAdversarialTrainer builds it from ``cfg``."""
    torch.manual_seed(0)
    top = DomainAdversarialTrainer(cfg)
    loader = top.build_train_loader(0)
    trainer = top.build_trainer(top.model, loader)
    return top, trainer, next(iter(loader))


def test_grl_reverses_the_domain_gradient_at_the_backbone(data_root, tmp_path):
    """One adversarial step of the configured trainer: the gradient the backbone's deepest map
    receives from loss_domain alone is exactly minus the gradient of the discriminator-side loss
    lambda * BCE(D(f), d) with respect to that map (Eqs. 5-6): the encoder ascends the
    domain loss while the discriminator descends it."""
    import torch.nn.functional as F

    top, trainer, batch = _configured_da_trainer(_cfg(data_root, tmp_path))
    feats, grads = [], {}

    def capture(_module, _inputs, out):
        f, i = out["3"], len(feats)  # the deepest non-pool FPN map, the head's input (A11)
        feats.append(f)
        f.register_hook(lambda g: grads.__setitem__(i, g))

    handle = trainer.model.backbone.register_forward_hook(capture)
    trainer.iter, trainer.max_iter = 1, 2
    try:
        losses = trainer.compute_losses(batch)
    finally:
        handle.remove()
    lam = trainer.last_domain_stats["da_lambda"]
    assert lam == pytest.approx(AdversarialLambda(10.0)(0.5)) and len(feats) == 2  # source, target (r=1)
    losses["loss_domain"].backward()
    head = top.da_head
    for i, label in enumerate((1.0, 0.0)):  # source = 1, target = 0
        x = feats[i].detach().clone().requires_grad_(True)
        logits = head.discriminator(x).reshape(-1)
        bce = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))
        (g_disc,) = torch.autograd.grad(lam * bce, x)
        g_enc = grads[i]
        assert g_disc.abs().sum() > 0
        assert torch.allclose(g_enc, -g_disc, rtol=1e-4, atol=1e-12)
        assert float((g_enc * g_disc).sum()) < 0  # opposite directions
    # the reversed gradient reaches the backbone's parameters; the detection heads get none
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.backbone.parameters())
    assert all(p.grad is None for p in trainer.model.roi_heads.parameters())


def test_discriminator_accuracy_per_domain_logged(data_root, tmp_path):
    """da_acc_source / da_acc_target = fraction of that domain's images on the right side of
    logit 0 (source > 0, target <= 0), recomputed from the discriminator's logits."""
    top, trainer, batch = _configured_da_trainer(_cfg(data_root, tmp_path))
    logits = {}

    def capture(_module, inputs, out):
        logits[len(logits)] = out.detach().reshape(-1)

    handle = top.da_head.discriminator.register_forward_hook(capture)
    trainer.iter, trainer.max_iter = 1, 2
    try:
        trainer.compute_losses(batch)
    finally:
        handle.remove()
    stats = trainer.last_domain_stats
    assert len(logits) == 2 and logits[0].numel() == logits[1].numel() == 2
    assert stats["da_acc_source"] == float((logits[0] > 0).float().mean())
    assert stats["da_acc_target"] == float((logits[1] <= 0).float().mean())
    assert stats["da_acc_source"] in (0.0, 0.5, 1.0) and stats["da_acc_target"] in (0.0, 0.5, 1.0)


def test_logged_in_storage_and_metrics(trained):
    _, trainer, _ = trained
    hist = trainer._trainer.storage.histories()
    for k in ("da_acc_source", "da_acc_target", "da_grad_norm_disc", "da_grad_norm_detector"):
        vals = [v for v, _ in hist[k].values()]
        assert len(vals) == 2 and all(math.isfinite(v) for v in vals), k
    # global clipping (paper default): grad_norm is the norm over detector + discriminator
    gn = [v for v, _ in hist["grad_norm"].values()]
    for i in range(2):
        d, h = hist["da_grad_norm_detector"].values()[i][0], hist["da_grad_norm_disc"].values()[i][0]
        assert gn[i] == pytest.approx(math.hypot(d, h), rel=1e-4)


def test_stabilisers_lambda_max_disc_lr_and_separate_clip(data_root, tmp_path):
    cfg = _cfg(data_root, tmp_path)
    cfg.ADVERSARIAL.LAMBDA_MAX, cfg.ADVERSARIAL.DISC_LR_MULT = 0.1, 10.0
    cfg.ADVERSARIAL.GRAD_CLIP = "separate"
    cfg.SOLVER.CLIP_GRADIENTS.MAX_NORM = 1e-3  # both groups are clipped in this step
    top, trainer, batch = _configured_da_trainer(cfg)
    lrs = [g["initial_lr"] for g in top.optimizer.param_groups]
    assert lrs == pytest.approx([1e-3, 1e-2])  # SOLVER.BASE_LR, x DISC_LR_MULT
    assert trainer.adversarial_lambda(1) == pytest.approx(0.1 * AdversarialLambda(10.0)(0.5))
    trainer.iter, trainer.max_iter = 1, 2
    losses = trainer.compute_losses(batch)
    sum(losses.values()).backward()
    det, disc = trainer._split_params()
    norm = lambda ps: float(torch.stack([p.grad.norm() for p in ps if p.grad is not None]).norm())
    n_det, n_disc = norm(det), norm(disc)
    grad_norm = trainer.clip_gradients()
    assert float(grad_norm) == pytest.approx(n_det, rel=1e-5)  # the detector's own norm
    # each group clipped to MAX_NORM on its own (global clipping would give a joint norm of 1e-3)
    assert norm(det) == pytest.approx(1e-3, rel=1e-3) and norm(disc) == pytest.approx(1e-3, rel=1e-3)
    assert n_disc > 1e-3
    cfg.ADVERSARIAL.GRAD_CLIP = "joint"
    with pytest.raises(ConfigError, match="ADVERSARIAL.GRAD_CLIP"):
        DomainAdversarialTrainer(cfg)
    cfg.ADVERSARIAL.GRAD_CLIP, cfg.ADVERSARIAL.DISC_LR_MULT = "global", 0.0
    with pytest.raises(ConfigError, match="ADVERSARIAL.DISC_LR_MULT"):
        DomainAdversarialTrainer(cfg)
