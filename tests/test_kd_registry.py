"""KD_LOSS_REGISTRY (issue 15): the seven built-in terms run through the registry give
BIT-IDENTICAL results to the Distiller before the registry; config keys; third-party terms."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from mdkd_det.distill import losses as L
from mdkd_det.distill.adapters import KDInputs
from mdkd_det.distill.distiller import Distiller
from mdkd_det.distill.schedules import build_schedule
from mdkd_det.modeling.shape_spec import ShapeSpec

_OLD_KEYS = {"con": "loss_Con", "falgn": "loss_FAlgn", "cos": "loss_CosSim", "att": "loss_Att",
             "clskd": "loss_ClsKD", "roikd": "loss_ROIKD", "kld": "loss_KLD"}


def _reference_forward(d, s, t, epoch):
    """``Distiller.forward`` as it was before the registry (commit 31c1a39), kept verbatim as
    the reference the registry must reproduce bit for bit."""
    cf = float(d.cf(epoch))
    T = float(d.temperature_schedule(epoch)) if d.temperature_schedule else d.temperature
    w = {k: float(d.weights.get(k, 0.0)) for k in _OLD_KEYS}
    if d.beta_schedule is not None:
        w["con"] = float(d.beta_schedule(epoch))
    s_raw = [s.features[sl] for sl in d.level_pairs]
    t_feats = [t.features[tl] for tl in d.level_pairs.values()]
    s_feats = ([d.connectors[sl](f) for sl, f in zip(d.level_pairs, s_raw)]
               if w["falgn"] or w["cos"] else None)
    out = {}
    t_vec = [f.mean(dim=(2, 3)) for f in t_feats] if w["con"] or w["cos"] else None
    if w["con"]:
        out["loss_Con"] = L.con([f.mean(dim=(2, 3)) for f in s_raw], t_vec, T=T,
                                direction=d.kl_direction, mask_diag=d.con_mask_diag)
    if w["falgn"]:
        out["loss_FAlgn"] = L.falgn(s_feats, t_feats, reduction=d.reduction)
    if w["cos"]:
        out["loss_CosSim"] = L.cos_sim([f.mean(dim=(2, 3)) for f in s_feats], t_vec,
                                       reduction=d.reduction)
    if w["att"]:
        out["loss_Att"] = L.att(s_raw, t_feats)
    has_regions = s.region_logits is not None and t.region_logits is not None
    if w["clskd"] and has_regions:
        out["loss_ClsKD"] = L.cls_kd(s.region_logits, t.region_logits, T=T,
                                     kind=d.cls_kind, direction=d.kl_direction)
    if w["roikd"] and s.region_embeddings is not None and t.region_embeddings is not None:
        out["loss_ROIKD"] = L.roi_kd(d.roi_connector(s.region_embeddings),
                                     t.region_embeddings, reduction=d.reduction)
    if w["kld"] and s.logits is not None and t.logits is not None:
        out["loss_KLD"] = L.kld(s.logits, t.logits, T=T, direction=d.kl_direction)
    name_to_w = {v: w[k] for k, v in _OLD_KEYS.items()}
    return {k: (cf * name_to_w[k]) * v for k, v in out.items()}


class _Adapter:
    cls_kind = "softmax"


S_SHAPES = {"0": ShapeSpec(8, stride=4), "1": ShapeSpec(8, stride=8), "pool": ShapeSpec(8, stride=16)}
T_SHAPES = {"p2": ShapeSpec(12, stride=4), "p3": ShapeSpec(12, stride=8), "p4": ShapeSpec(12, stride=16)}


def _inputs(B=4, M=10, K=3, regions=True, logits=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    s = KDInputs(features=OrderedDict([("0", r(B, 8, 8, 8)), ("1", r(B, 8, 4, 4)), ("pool", r(B, 8, 2, 2))]),
                 region_embeddings=r(M, 6) if regions else None,
                 region_logits=r(M, K) if regions else None, logits=r(B, K) if logits else None)
    t = KDInputs(features=OrderedDict([("p2", r(B, 12, 8, 8)), ("p3", r(B, 12, 4, 4)), ("p4", r(B, 12, 3, 3))]),
                 region_embeddings=r(M, 10) if regions else None,
                 region_logits=r(M, K) if regions else None, logits=r(B, K) if logits else None)
    for f in s.features.values():
        f.requires_grad_(True)
    return s, t


WEIGHTS = {"con": 0.005, "falgn": 0.03, "cos": 0.03, "att": 0.01, "clskd": 1.0, "roikd": 0.1, "kld": 0.4}
CASES = {
    "defaults+kld": dict(weights=WEIGHTS),
    "paper reduction, s||t, mask diag": dict(weights=WEIGHTS, reduction="paper", kl_direction="s||t",
                                             con_mask_diag=True),
    "binary cls, T schedule, beta ramp": dict(
        weights=WEIGHTS, cls_kind="binary",
        temperature_schedule=build_schedule("temperature", t1=2.0, floor=0.5, decay=0.9, every=5.0),
        beta_schedule=build_schedule("beta", start=0.1, end=0.5, warmup=5.0, ramp=10.0)),
    "some zero weights": dict(weights={"con": 0.0, "falgn": 0.5, "cos": 0.0, "att": 0.2, "clskd": 0.0,
                                       "roikd": 1.0}),
    "only cos (pooled, connector)": dict(weights={"cos": 1.0}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("regions", [True, False])
def test_builtin_terms_bit_identical_to_pre_registry_forward(case, regions):
    kw = dict(CASES[case])
    torch.manual_seed(0)
    d = Distiller(nn.Linear(1, 1), _Adapter(), S_SHAPES, T_SHAPES, 6, 10,
                  cf=build_schedule("cosine", warmup=5.0, ramp=10.0, max_value=1.0), **kw)
    for epoch in (12.0, 30.0):
        s, t = _inputs(regions=regions)
        got = d(s, t, epoch)
        s2, t2 = _inputs(regions=regions)
        want = _reference_forward(d, s2, t2, epoch)
        assert list(got) == list(want)  # same terms, same order
        assert want, case
        for k in want:
            assert torch.equal(got[k], want[k]), (k, got[k].item(), want[k].item())
        # identical gradients to the student maps and the connectors
        g1 = torch.autograd.grad(sum(got.values()), list(s.features.values()), allow_unused=True)
        g2 = torch.autograd.grad(sum(want.values()), list(s2.features.values()), allow_unused=True)
        for a, b in zip(g1, g2):
            assert (a is None and b is None) or torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# config keys and the registry
# --------------------------------------------------------------------------------------------
def test_config_terms_and_weights_default_to_the_paper():
    from mdkd_det.config import get_cfg
    from mdkd_det.distill.kd_terms import DEFAULT_TERMS, resolve_terms, term_weights
    from mdkd_det.distill.trainer import distiller_options

    cfg = get_cfg()
    assert tuple(cfg.KD.TERMS) == DEFAULT_TERMS == ("con", "falgn", "cos", "att", "clskd", "roikd", "kld")
    w = term_weights(cfg.KD)
    assert {k: w[k] for k in DEFAULT_TERMS} == {"con": 0.005, "falgn": 0.03, "cos": 0.03, "att": 0.01,
                                                "clskd": 1.0, "roikd": 0.10, "kld": 0.0}
    assert all(w[k] == 0.0 for k in ("kmm", "dcgd", "msan", "hint", "ctx", "lm", "aam"))
    opts = distiller_options(cfg.KD)
    assert resolve_terms(opts["terms"], opts["weights"]) == DEFAULT_TERMS
    cfg.merge_from_list(["KD.W_KMM", 0.5])  # a related term is switched on by its weight alone
    opts = distiller_options(cfg.KD)
    assert resolve_terms(opts["terms"], opts["weights"]) == DEFAULT_TERMS + ("kmm",)


def test_unknown_term_name_is_a_registry_error():
    from mdkd_det.utils.errors import RegistryError

    with pytest.raises(RegistryError, match="unknown kd_loss 'nope'"):
        Distiller(nn.Linear(1, 1), _Adapter(), S_SHAPES, T_SHAPES, 6, 10, weights={}, cf=lambda e: 1.0,
                  terms=["con", "nope"])


def test_zero_weight_term_is_not_computed(monkeypatch):
    calls = []
    monkeypatch.setattr(L, "kmm", lambda *a, **k: calls.append(1) or torch.tensor(1.0))
    d = Distiller(nn.Linear(1, 1), _Adapter(), S_SHAPES, T_SHAPES, 6, 10, weights={"con": 1.0, "kmm": 0.0},
                  cf=lambda e: 1.0, terms=["con", "kmm"])
    s, t = _inputs()
    assert set(d(s, t, 0.0)) == {"loss_Con"} and calls == []
    d.weights["kmm"] = 2.0
    assert d(s, t, 0.0)["loss_KMM"].item() == 2.0 and calls == [1]


# --------------------------------------------------------------------------------------------
# a third-party term from an installed distribution (entry points), trained by KDTrainer
# --------------------------------------------------------------------------------------------
PLUGIN = '''
import torch
from mdkd_det.config import CfgNode
from mdkd_det.distill.kd_terms import KDTerm


def _loss(ctx):
    # mean squared difference of the pooled descriptors through the connectors, times KD.TOY.SCALE
    return ctx.cfg.TOY.SCALE * sum(
        (a - b.detach()).pow(2).mean() for a, b in zip(ctx.s_pooled, ctx.t_pooled))


TERM = KDTerm("loss_Toy", ("pooled",), "W_TOY", 0.0, "feature", _loss, "toy plugin")


def add_config(cfg):
    cfg.KD.W_TOY = 0.0       # off unless set
    cfg.KD.TOY = CfgNode()
    cfg.KD.TOY.SCALE = 1.0
'''


def _install_plugin(tmp_path, monkeypatch):
    from mdkd_det.distill.kd_terms import KD_LOSS_REGISTRY

    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "mdkd_toy_kd.py").write_text(PLUGIN)
    dist = pkg / "mdkd_toy_kd-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mdkd-toy-kd\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mdkd_det.kd_losses]\ntoy = mdkd_toy_kd:TERM\n\n"
                                           "[mdkd_det.config]\ntoy_kd = mdkd_toy_kd:add_config\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setattr(KD_LOSS_REGISTRY, "_plugins_loaded", False)


def test_installed_plugin_term_trains_in_kd_trainer(tmp_path, monkeypatch, data_root):
    """No change to mdkd_det: the distribution's two entry points add the term and its keys."""
    import json
    import sys

    from mdkd_det.distill.kd_terms import KD_LOSS_REGISTRY, get_term
    from mdkd_det.distill.trainer import KDTrainer

    from _tiny import tiny_cfg, tiny_kd_cfg

    _install_plugin(tmp_path, monkeypatch)
    try:
        tcfg = tiny_cfg(tmp_path / "plain", max_iter=1)
        assert tcfg.KD.W_TOY == 0.0 and tcfg.KD.TOY.SCALE == 1.0  # the plugin's keys, via get_cfg
        cfg = tiny_kd_cfg(tmp_path, max_iter=3, **{"KD.W_TOY": 2.0, "KD.TOY.SCALE": 3.0})
        trainer = KDTrainer(cfg)
        d = trainer.distiller
        assert d.terms[-1] == "toy" and d.weights["toy"] == 2.0 and get_term("toy").key == "loss_Toy"
        trainer.resume_or_load(resume=False)
        trainer.train()
        rows = [json.loads(x) for x in (tmp_path / "student" / "metrics.json").read_text().splitlines()]
        assert sum("loss_Toy" in r for r in rows) == 3 and all(r["loss_Toy"] > 0 for r in rows if "loss_Toy" in r)
        # weight (2) x KD.TOY.SCALE (3) x the plugin's formula, by hand on a fixed batch
        d2 = Distiller(nn.Linear(1, 1), _Adapter(), S_SHAPES, T_SHAPES, 6, 10, weights={"toy": 2.0},
                       cf=lambda e: 1.0, terms=["toy"], kd_options={"cfg": cfg.KD})
        s, t = _inputs()
        want = 6.0 * sum((d2.connectors[k](s.features[k]).mean(dim=(2, 3)) - t.features[v].mean(dim=(2, 3)))
                         .pow(2).mean() for k, v in d2.level_pairs.items())
        assert d2(s, t, 0.0)["loss_Toy"].item() == pytest.approx(want.item(), rel=1e-6)
    finally:
        KD_LOSS_REGISTRY._obj_map.pop("toy", None)
        sys.modules.pop("mdkd_toy_kd", None)


@pytest.mark.timeout(900)
def test_installed_plugin_term_trains_in_the_pipeline(tmp_path, monkeypatch, data_root):
    """Issue 15 "done means": a plugin's term, named only in a config (an extra student row),
    trains in ``tools/train_net.py``'s pipeline with no change to mdkd_det."""
    import json
    import sys

    from mdkd_det.distill.kd_terms import KD_LOSS_REGISTRY
    from mdkd_det.engine.cli import main

    from _tiny import tiny_cfg

    _install_plugin(tmp_path, monkeypatch)
    try:
        out = tmp_path / "mdkd"
        cfg = tiny_cfg(out, max_iter=2, **{
            "PIPELINE.ENABLED": True, "PIPELINE.SOURCES": "()",
            "PIPELINE.STAGES": "('dataset_specific', 'target_teacher', 'joint_teacher', 'student')",
            "PIPELINE.EXTRA_STUDENTS": repr(("+Toy: KD.W_TOY 2.0 KD.TOY.SCALE 3.0",)),
            "PIPELINE.BOOTSTRAP_RESAMPLES": 20, "DATASETS.TRAIN_LIMIT": 4, "DATASETS.TEST_LIMIT": 2,
            "TEST.VIS_NUM": 0, "KD.CF.SCHEDULE": "constant"})
        cfg_file = tmp_path / "mdkd.yaml"
        cfg_file.write_text(cfg.dump())
        assert main(["--config-file", str(cfg_file)]) == 0
        res = json.loads((out / "results.json").read_text())
        assert {"student", "student_toy"} <= set(res["rows"])
        rows = [json.loads(x) for x in (out / "student_toy" / "metrics.json").read_text().splitlines()]
        toy = [r["loss_Toy"] for r in rows if "loss_Toy" in r]
        assert len(toy) == 2 and all(v > 0 for v in toy)
        assert "loss_Toy" not in (out / "student" / "metrics.json").read_text()
        assert "| Student +Toy |" in (out / "results.md").read_text()
    finally:
        KD_LOSS_REGISTRY._obj_map.pop("toy", None)
        sys.modules.pop("mdkd_toy_kd", None)


def test_cmedl_preset_switches_on_hint_and_ctx_only():
    from mdkd_det.config import get_cfg
    from mdkd_det.distill.kd_terms import DEFAULT_TERMS, resolve_terms, term_weights

    base, cm = get_cfg(), get_cfg()
    base.merge_from_file("configs/LungCT/mdkd_faster_rcnn_R18_cpu.yaml")
    cm.merge_from_file("configs/LungCT/mdkd_faster_rcnn_R18_cpu_cmedl.yaml")
    wb, wc = term_weights(base.KD), term_weights(cm.KD)
    assert {k for k in wb if wb[k] != wc[k]} == {"hint", "ctx"}
    assert resolve_terms(list(cm.KD.TERMS), wc) == DEFAULT_TERMS + ("hint", "ctx")
    assert cm.KD.LATE_LEVELS == 2


#: the pipeline rows of docs/kd_terms.md, as PIPELINE.EXTRA_STUDENTS entries "<row>: KEY VALUE ..."
ROWS = {"+KMM: KD.W_KMM 3.0": ("kmm",), "+DCGD: KD.W_DCGD 3.0": ("dcgd",),
        "+DCGD+MSAN: KD.W_DCGD 3.0 KD.W_MSAN 0.1": ("dcgd", "msan"),
        "+CMEDL: KD.W_HINT 0.01 KD.W_CTX 0.1": ("hint", "ctx")}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_pipeline_row_overrides_add_exactly_their_terms(row):
    import shlex

    from mdkd_det.config import get_cfg
    from mdkd_det.distill.kd_terms import DEFAULT_TERMS, resolve_terms, term_weights

    cfg = get_cfg()
    cfg.merge_from_file("configs/LungCT/mdkd_faster_rcnn_R18_cpu.yaml")
    cfg.merge_from_list(shlex.split(row.partition(":")[2]))
    assert resolve_terms(list(cfg.KD.TERMS), term_weights(cfg.KD)) == DEFAULT_TERMS + ROWS[row]
