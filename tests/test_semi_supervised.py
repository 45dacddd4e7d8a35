"""Issue 15 / paper 003: semi-supervised KD on unlabelled target images (KD.UNLABELED)."""

import json

import pytest
import torch

from mdkd_det.data.build import build_detection_train_loader, get_dataset_records
from mdkd_det.data.catalog import DatasetCatalog, MetadataCatalog
from mdkd_det.distill import losses as L
from mdkd_det.distill.distiller import freeze_teacher
from mdkd_det.distill.schedules import ConstantCurriculum
from mdkd_det.distill.taps import teacher_roi_outputs
from mdkd_det.distill.trainer import KDSimpleTrainer, KDTrainer, build_distiller
from mdkd_det.distill.unlabeled import check_unlabeled_config, load_unlabeled_records
from mdkd_det.engine import hooks
from mdkd_det.engine.checkpointer import Checkpointer
from mdkd_det.engine.defaults import build_model
from mdkd_det.utils.errors import ConfigError

from _tiny import tiny_cfg

UNLAB = "lungct_disjoint_train_unlabeled"
LAB = "lungct_disjoint_train_labeled"


def _images(n=2, size=96):
    g = torch.Generator().manual_seed(3)
    return [torch.rand(3, size, size, generator=g) for _ in range(n)]


def _pair(tmp_path):
    cfg = tiny_cfg(tmp_path / "s")
    tcfg = tiny_cfg(tmp_path / "t", **{"MODEL.FPN.OUT_CHANNELS": 48, "MODEL.ROI_HEADS.MLP_HEAD_DIM": 96})
    torch.manual_seed(0)
    return cfg, build_model(cfg), freeze_teacher(build_model(tcfg))


def test_unlabeled_kd_equals_terms_computed_by_hand(tmp_path):
    cfg, student, teacher = _pair(tmp_path)
    d = build_distiller(cfg, student, teacher)
    d.cf = ConstantCurriculum(0.5)
    t = KDSimpleTrainer(student, iter([]), torch.optim.SGD(student.parameters(), lr=0.1))
    t.distiller, t.unlabeled_weight = d, 0.25
    t.unlabeled_terms = ("loss_FAlgn", "loss_Att", "loss_ClsKD", "loss_ROIKD")
    imgs = _images()
    garbage = {"boxes": torch.tensor([[float("nan"), -1e9, 5.0, 1e9]]), "labels": torch.tensor([77])}
    out = t.unlabeled_kd(student, [{"image": i, "target": garbage} for i in imgs], epoch=3.0)
    assert set(out) == {"loss_unlabeled_FAlgn", "loss_unlabeled_Att", "loss_unlabeled_ClsKD",
                        "loss_unlabeled_ROIKD"}  # no task loss, no Con/CosSim
    # the same batch without any target gives the same losses: targets are never read
    again = t.unlabeled_kd(student, [{"image": i} for i in imgs], epoch=3.0)
    assert all(torch.equal(out[k], again[k]) for k in out)

    # independently: student pieces with the RPN at inference, every proposal through the box head
    with torch.no_grad():
        il, _ = student.transform(imgs)
        s_feats = student.backbone(il.tensors)
        student.rpn.eval()
        props, _ = student.rpn(il, s_feats)
        student.rpn.train()
        rh = student.roi_heads
        s_emb = rh.box_head(rh.box_roi_pool(s_feats, props, il.image_sizes))
        s_logits, _ = rh.box_predictor(s_emb)
        t_feats = teacher.backbone(il.tensors)
        t_emb, t_logits = teacher_roi_outputs(teacher, t_feats, props, il.image_sizes)
        assert s_logits.shape[0] == sum(len(p) for p in props) == t_logits.shape[0] > 0
        pairs = d.level_pairs
        s_raw = [s_feats[k] for k in pairs]
        t_f = [t_feats[v] for v in pairs.values()]
        s_f = [d.connectors[k](s_feats[k]) for k in pairs]
        w = 0.25 * 0.5
        expect = {
            "loss_unlabeled_FAlgn": w * cfg.KD.W_FALGN * L.falgn(s_f, t_f),
            "loss_unlabeled_Att": w * cfg.KD.W_ATT * L.att(s_raw, t_f),
            "loss_unlabeled_ClsKD": w * cfg.KD.W_CLSKD * L.cls_kd(s_logits, t_logits, T=2.0),
            "loss_unlabeled_ROIKD": w * cfg.KD.W_ROIKD * L.roi_kd(d.roi_connector(s_emb), t_emb),
        }
    for k, v in expect.items():
        assert out[k].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-9), k
        assert out[k].item() != 0.0, k
    # the unlabelled terms train the student (backbone and RoI head), not the RPN losses' heads
    sum(out.values()).backward()
    assert student.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert any(p.grad is not None for p in student.backbone.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert student.rpn.training and student.roi_heads.training  # modes restored
    assert "select_training_samples" not in vars(student.roi_heads)
    assert sum(len(m._forward_hooks) for m in student.modules()) == 0


@pytest.fixture
def garbage_unlabeled(data_root):
    """A copy of 6 unlabelled LungCT records whose annotations hold garbage boxes."""
    cfg = tiny_cfg("/tmp/unused")
    recs = get_dataset_records(cfg, [UNLAB], limit=6, drop_labels=True)
    bad = [dict(r, annotations=[{"bbox": [float("nan"), -5.0, 1e9, "x"], "category_id": 99}]) for r in recs]
    names = []
    for name, rr in (("test_unlab_clean", recs), ("test_unlab_garbage", bad)):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        DatasetCatalog.register(name, lambda rr=rr: [dict(r) for r in rr])
        MetadataCatalog.get(name).set(thing_classes=["lesion"], unlabeled=True)
        names.append(name)
    yield names
    for name in names:
        DatasetCatalog.remove(name)


def test_unlabeled_boxes_are_never_read(tmp_path, garbage_unlabeled):
    clean, garbage = garbage_unlabeled
    cfg = tiny_cfg(tmp_path)
    a = get_dataset_records(cfg, [clean], drop_labels=True)
    b = get_dataset_records(cfg, [garbage], drop_labels=True)
    assert a == b and all(r["annotations"] == [] for r in b)
    ba = next(iter(build_detection_train_loader(cfg, records=a, seed=7)))
    bb = next(iter(build_detection_train_loader(cfg, records=b, seed=7)))
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(ba, bb))


def _teacher(tmp_path):
    tdir = tmp_path / "teacher"
    tcfg = tiny_cfg(tdir, max_iter=1)
    torch.manual_seed(5)
    Checkpointer(build_model(tcfg), str(tdir)).save("model_final")
    (tdir / "config.yaml").write_text(tcfg.dump())
    return tdir


def _semi_cfg(out, tdir, **over):
    return tiny_cfg(out, max_iter=2, **{
        "KD.ENABLED": True, "KD.TEACHER_CONFIG": str(tdir / "config.yaml"),
        "KD.TEACHER_WEIGHTS": str(tdir / "model_final.pth"), "KD.CF.SCHEDULE": "constant",
        "KD.UNLABELED.ENABLED": True, "KD.UNLABELED.IMS_PER_BATCH": 1,
        "DATASETS.TRAIN": f"('{LAB}',)", "DATASETS.TRAIN_UNLABELED": f"('{UNLAB}',)",
        "DATASETS.TRAIN_LIMIT": 6, "DATASETS.TEST": "()", "SOLVER.CHECKPOINT_PERIOD": 1, **over})


class _Crash(hooks.HookBase):
    def before_step(self):
        if self.trainer.iter == 1:
            raise RuntimeError("simulated crash")


def test_exact_resume_with_the_unlabeled_stream(tmp_path, data_root):
    tdir = _teacher(tmp_path)

    def state(trainer):
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    straight = KDTrainer(_semi_cfg(tmp_path / "straight", tdir))
    straight.resume_or_load(resume=False)
    straight.train()
    lines = (tmp_path / "straight" / "metrics.json").read_text()
    assert "loss_unlabeled_ClsKD" in lines and "loss_unlabeled_FAlgn" in lines

    class Crashing(KDTrainer):
        def build_hooks(self):
            return super().build_hooks() + [_Crash()]

    crash = Crashing(_semi_cfg(tmp_path / "crash", tdir))
    crash.resume_or_load(resume=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crash.train()
    torch.manual_seed(999)  # a new process: other RNG state, restored by the checkpoint
    resumed = KDTrainer(_semi_cfg(tmp_path / "crash", tdir))
    assert resumed.resume_or_load(resume=True) == 1
    resumed.train()
    a, b = state(straight), state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("over, match", [
    ({"KD.ENABLED": False}, "KD.UNLABELED.ENABLED needs KD.ENABLED"),
    ({"DATASETS.TRAIN_UNLABELED": "()"}, "needs DATASETS.TRAIN_UNLABELED"),
    ({"DATASETS.TRAIN_UNLABELED": f"('{LAB}',)"}, "also in DATASETS.TRAIN"),
    ({"KD.UNLABELED.TERMS": "('ClsKD', 'Hint')"}, r"KD.UNLABELED.TERMS \['Hint'\]"),
    ({"KD.UNLABELED.TERMS": "()"}, "KD.UNLABELED.TERMS is empty"),
])
def test_config_errors_without_data(tmp_path, over, match):
    cfg = _semi_cfg(tmp_path, tmp_path, **over)
    with pytest.raises(ConfigError, match=match) as e:
        check_unlabeled_config(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("over, match", [
    ({"DATASETS.TRAIN_UNLABELED": "('lungct_disjoint_train',)"}, "dataset 'lungct_disjoint_train' is labelled"),
    ({"DATASETS.TRAIN": "('lungct_disjoint_train',)"}, "share .* image"),
])
def test_config_errors_with_data(tmp_path, data_root, over, match):
    cfg = _semi_cfg(tmp_path, tmp_path, **over)
    with pytest.raises(ConfigError, match=match) as e:
        load_unlabeled_records(cfg)
    assert "\n" not in str(e.value)


def test_kd_trainer_refuses_bad_config_before_building(tmp_path):
    cfg = _semi_cfg(tmp_path, tmp_path / "missing", **{"DATASETS.TRAIN_UNLABELED": "()"})
    with pytest.raises(ConfigError, match="needs DATASETS.TRAIN_UNLABELED"):
        KDTrainer(cfg)  # the teacher files do not exist: the check runs first


def test_family_without_unlabeled_forward_is_a_config_error(tmp_path, data_root, monkeypatch):
    from mdkd_det.distill.adapters import TorchvisionFasterRCNNAdapter

    tdir = _teacher(tmp_path)
    monkeypatch.delattr(TorchvisionFasterRCNNAdapter, "student_forward_unlabeled")
    with pytest.raises(ConfigError, match="KD.UNLABELED.ENABLED: MODEL.META_ARCHITECTURE 'faster_rcnn'"):
        KDTrainer(_semi_cfg(tmp_path / "s", tdir))


# ---- PIPELINE.EXTRA_STUDENTS ---------------------------------------------------------------
SEMI_ROW = f"+unlabelled: KD.UNLABELED.ENABLED True DATASETS.TRAIN_UNLABELED \"('{UNLAB}',)\""


def _pipe_cfg(out, extra=(SEMI_ROW,)):
    return tiny_cfg(out, max_iter=1, **{
        "PIPELINE.ENABLED": True, "PIPELINE.SOURCES": "()",
        "PIPELINE.STAGES": "('dataset_specific', 'target_teacher', 'joint_teacher', 'student')",
        "PIPELINE.EXTRA_STUDENTS": repr(tuple(extra)), "PIPELINE.BOOTSTRAP_RESAMPLES": 20,
        "DATASETS.TRAIN": f"('{LAB}',)", "DATASETS.TRAIN_LIMIT": 4, "DATASETS.TEST_LIMIT": 2,
        "TEST.VIS_NUM": 0, "KD.CF.SCHEDULE": "constant", "KD.UNLABELED.IMS_PER_BATCH": 1})


def test_parse_extra_students():
    from mdkd_det.pipeline.runner import ExtraStudent, parse_extra_students

    rows = parse_extra_students(["+KMM: KD.W_CON 0.1", SEMI_ROW, "No Att (ablation): KD.W_ATT 0.0"])
    assert rows[0] == ExtraStudent("+KMM", "student_kmm", ("KD.W_CON", "0.1"))
    assert rows[1].key == "student_unlabelled" and rows[1].opts == (
        "KD.UNLABELED.ENABLED", "True", "DATASETS.TRAIN_UNLABELED", f"('{UNLAB}',)")
    assert rows[2].key == "student_no_att_ablation"
    for bad, match in [("KD.W_CON 0.1", "must be '<row name>: KEY VALUE"),
                       ("x: KD.W_CON", "needs KEY VALUE pairs"), ("x:", "needs KEY VALUE pairs"),
                       ("x: SEED 3", "set by the pipeline"), ("x: KD.W_CON \"0.1", "quotation")]:
        with pytest.raises(ConfigError, match=match):
            parse_extra_students([bad])
    with pytest.raises(ConfigError, match="folder name 'student_a_b'"):
        parse_extra_students(["a b: KD.W_CON 0.1", "A-B: KD.W_CON 0.2"])


def test_extra_student_cfg_and_errors_before_training(tmp_path, capsys):
    from mdkd_det.pipeline import PipelineRunner

    cfg = _pipe_cfg(tmp_path / "p", extra=(SEMI_ROW, "+KMM: KD.W_CON 0.5"))
    cfg.PIPELINE.SEEDS = (0, 4)
    r = PipelineRunner(cfg)
    student = r.stage_cfg("student")
    semi = r.extra_student_cfg(r.extra_students[0])
    assert semi.OUTPUT_DIR == str(tmp_path / "p" / "student_unlabelled")
    assert semi.KD.UNLABELED.ENABLED and list(semi.DATASETS.TRAIN_UNLABELED) == [UNLAB]
    assert not student.KD.UNLABELED.ENABLED and list(student.DATASETS.TRAIN_UNLABELED) == []
    assert semi.KD.TEACHER_WEIGHTS == student.KD.TEACHER_WEIGHTS and semi.SOLVER.dump() == student.SOLVER.dump()
    s4 = r.extra_student_cfg(r.extra_students[1], seed=4)
    assert s4.SEED == 4 and s4.KD.W_CON == 0.5 and s4.OUTPUT_DIR == str(tmp_path / "p" / "seed_4" / "student_kmm")
    assert {"student", "student_unlabelled", "student_kmm"} <= set(r.schedules())
    for extra, match in [("+bad: KD.NOPE 1", "row '\\+bad': unknown config key 'KD.NOPE'"),
                         ("+bad: KD.W_CON -1.0", "row '\\+bad': KD.W_CON = -1.0"),
                         ("+bad: KD.W_CON abc", "row '\\+bad': command line"),
                         ("+bad: KD.UNLABELED.ENABLED True", "row '\\+bad': KD.UNLABELED.ENABLED needs DATASETS")]:
        with pytest.raises(ConfigError, match=match) as e:
            PipelineRunner(_pipe_cfg(tmp_path / "q", extra=(extra,)))
        assert "\n" not in str(e.value)
    assert not (tmp_path / "q").exists()  # nothing was trained or written
    from mdkd_det.engine.cli import main

    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(_pipe_cfg(tmp_path / "q", extra=("+bad: KD.NOPE 1",)).dump())
    capsys.readouterr()
    assert main(["--config-file", str(cfg_file)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "PIPELINE.EXTRA_STUDENTS row '+bad'" in err[0]
    assert not (tmp_path / "q" / "dataset_specific").exists()  # no stage started
    # a longer schedule in a row breaks schedule parity: the check names it
    cfg = _pipe_cfg(tmp_path / "p", extra=("+long: SOLVER.MAX_ITER 7",))
    cfg.PIPELINE.ITERS.DATASET_SPECIFIC = cfg.PIPELINE.ITERS.STUDENT = 0
    assert "student_long 7 it" in PipelineRunner(cfg).check_schedule_parity()


@pytest.mark.timeout(900)
def test_pipeline_with_a_semi_supervised_row(tmp_path, data_root):
    from mdkd_det.engine.cli import main

    out = tmp_path / "mdkd"
    cfg_file = tmp_path / "mdkd.yaml"
    cfg_file.write_text(_pipe_cfg(out).dump())
    run = ["--config-file", str(cfg_file), "--seeds", "0", "1"]
    assert main(run) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["rows"]) == {"dataset_specific", "joint_teacher", "student", "student_unlabelled"}
    assert res["rows"]["student_unlabelled"]["checkpoint"] == str(out / "student_unlabelled" / "model_student.pth")
    for d in (out / "student_unlabelled", out / "seed_1" / "student_unlabelled"):
        assert "loss_unlabeled_ClsKD" in (d / "metrics.json").read_text()
    assert "SEED: 1" in (out / "seed_1" / "student_unlabelled" / "config.yaml").read_text()
    assert "loss_unlabeled" not in (out / "student" / "metrics.json").read_text()
    assert set(res["per_seed"]["student_unlabelled"]) == {"0", "1"}
    assert res["summary"]["student_unlabelled"]["AP"]["n"] == 2
    paired = res["paired"]["student_unlabelled_minus_dataset_specific"]["AP"]
    assert set(res["paired"]) == {"student_minus_dataset_specific", "student_unlabelled_minus_dataset_specific"}
    diffs = [res["per_seed"]["student_unlabelled"][s]["AP"] - res["per_seed"]["dataset_specific"][s]["AP"]
             for s in ("0", "1")]
    assert paired["seeds"] == [0, 1] and paired["per_seed"] == pytest.approx(diffs, abs=2e-3)
    md = (out / "results.md").read_text()
    assert "| Student +unlabelled |" in md and "Student +unlabelled − dataset-specific" in md
    assert "seed_1/student_unlabelled" in res["wall_time_s"]
    # second run: finished rows are skipped; --rerun student retrains the extra rows too
    mtime = (out / "student_unlabelled" / "model_final.pth").stat().st_mtime
    assert main(run) == 0
    assert (out / "student_unlabelled" / "model_final.pth").stat().st_mtime == mtime
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]
    assert main(["--config-file", str(cfg_file), "--stage", "student", "--rerun", "student"]) == 0
    assert (out / "student_unlabelled" / "model_final.pth").stat().st_mtime != mtime
