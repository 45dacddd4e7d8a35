"""End to end through tools/train_net.py's entry point on real LungCT data (tiny sizes)."""

import json

import pytest
import torch

from mdkd_det.engine.cli import main
from mdkd_det.engine.defaults import DefaultTrainer

from _tiny import tiny_cfg


def _cfg_file(tmp_path, cfg, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(cfg.dump())
    return str(p)


def test_train_then_eval_writes_outputs(tmp_path, data_root):
    out = tmp_path / "run"
    cfg = tiny_cfg(out, max_iter=2)
    assert main(["--config-file", _cfg_file(tmp_path, cfg)]) == 0
    assert (out / "model_final.pth").is_file() and (out / "last_checkpoint").is_file()
    lines = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    assert any("loss_classifier" in x for x in lines)
    assert list(out.glob("events.out.tfevents.*"))
    inf = out / "inference" / "lungct_disjoint_test"
    res = json.loads((inf / "coco_instances_results.json").read_text())
    metrics = json.loads((inf / "metrics.json").read_text())
    assert "AP" in metrics["bbox"] and "CPM" in metrics["froc"]
    assert all(r["category_id"] == 1 for r in res)  # LungCT's own "nodule" id
    assert list((inf / "vis").glob("*.png"))


def test_eval_only_on_coco_json_matches_pycocotools(tmp_path, data_root):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = tmp_path / "run"
    cfg = tiny_cfg(out, max_iter=2)
    cfg_file = _cfg_file(tmp_path, cfg)
    assert main(["--config-file", cfg_file]) == 0
    # A "held-out" COCO split given by path: 6 LungCT valid images, annotation ids from 1.
    src = data_root / "lungct_roboflow" / "valid"
    coco = json.loads((src / "_annotations.coco.json").read_text())
    keep = {im["id"] for im in coco["images"][:6]}
    coco["images"] = [im for im in coco["images"] if im["id"] in keep]
    coco["annotations"] = [dict(a, id=i + 1) for i, a in
                           enumerate(a for a in coco["annotations"] if a["image_id"] in keep)]
    ann = tmp_path / "heldout.json"
    ann.write_text(json.dumps(coco))
    ev = tmp_path / "ev"
    rc = main(["--config-file", cfg_file, "--eval-only", "--coco-json", str(ann), "--coco-images",
               str(src), "MODEL.WEIGHTS", str(out / "model_final.pth"), "OUTPUT_DIR", str(ev),
               "DATASETS.TEST_LIMIT", "0",
               # keep every scored box: a 2-iteration model has low scores, and the comparison
               # below must not pass vacuously on an empty result file
               "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    assert rc == 0
    inf = ev / "inference" / "valid"
    dets = json.loads((inf / "coco_instances_results.json").read_text())
    ours = json.loads((inf / "metrics.json").read_text())["bbox"]
    assert dets, "no detections at score threshold 0: the pycocotools comparison would be vacuous"
    assert {d["image_id"] for d in dets} <= keep
    gt = COCO(str(ann))
    e = COCOeval(gt, gt.loadRes(str(inf / "coco_instances_results.json")), "bbox")
    e.evaluate(), e.accumulate(), e.summarize()
    assert ours["AP"] == pytest.approx(100 * max(e.stats[0], 0), abs=1e-6)
    assert ours["AP50"] == pytest.approx(100 * max(e.stats[1], 0), abs=1e-6)


@pytest.mark.parametrize("eval_period", [0, 2])
def test_resume_is_exact(tmp_path, data_root, eval_period):
    """4 iterations straight == 2 iterations, interrupted, then --resume to 4.

    With ``TEST.EVAL_PERIOD 2`` the periodic evaluation (test loader, visualiser) runs right
    after the iteration-1 checkpoint is written; it must not move the global RNGs (issue 13).
    """

    class Crash(Exception):
        pass

    over = {"TEST.EVAL_PERIOD": eval_period}
    straight = DefaultTrainer(tiny_cfg(tmp_path / "a", max_iter=4, **over))
    straight.resume_or_load(resume=False)
    straight.train()

    cfg_b = tiny_cfg(tmp_path / "b", max_iter=4, **{"SOLVER.CHECKPOINT_PERIOD": 2}, **over)
    from mdkd_det.engine.hooks import HookBase, PeriodicCheckpointer

    class CrashAfter2(HookBase):
        def after_step(self):
            if self.trainer.iter == 1:  # iterations 0 and 1 done, checkpoint written
                raise Crash()

    t = DefaultTrainer(cfg_b)
    t.resume_or_load(resume=False)
    orig = t.build_hooks

    def hooks_with_crash():
        # killed right after the iteration-1 checkpoint, before/while evaluating (so no
        # model_best.pth, whose RNG state is the post-evaluation one, becomes last_checkpoint)
        hs = orig()
        at = 1 + next(i for i, h in enumerate(hs) if isinstance(h, PeriodicCheckpointer))
        return hs[:at] + [CrashAfter2()] + hs[at:]

    t.build_hooks = hooks_with_crash
    with pytest.raises(Crash):
        t.train()
    assert not (tmp_path / "b" / "model_final.pth").exists()
    resumed = DefaultTrainer(cfg_b)
    assert resumed.resume_or_load(resume=True) == 2
    resumed.train()
    a = torch.load(tmp_path / "a" / "model_final.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "model_final.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_config_key_exits_with_clear_error(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("SOLVER:\n  MAX_ITERS: 3\n")
    assert main(["--config-file", str(p)]) == 2
    err = capsys.readouterr().err
    assert "SOLVER.MAX_ITERS" in err and "bad.yaml" in err


def test_unknown_backbone_exits_with_clear_error(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path / "r")
    cfg.MODEL.BACKBONE.NAME = "resnet7_fpn"
    assert main(["--config-file", _cfg_file(tmp_path, cfg)]) == 2
    err = capsys.readouterr().err
    assert "resnet7_fpn" in err and "resnet18_fpn" in err


def test_missing_image_fails_before_training(tmp_path, data_root, capsys):
    src = data_root / "lungct_roboflow" / "valid"
    coco = json.loads((src / "_annotations.coco.json").read_text())
    coco["images"] = coco["images"][:3]
    coco["images"][1]["file_name"] = "no_such_slice.jpg"
    keep = {im["id"] for im in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    cfg = tiny_cfg(tmp_path / "r")
    spec = f"coco:{ann}:{src}"
    rc = main(["--config-file", _cfg_file(tmp_path, cfg), "DATASETS.TRAIN", f"('{spec}',)"])
    assert rc == 2
    assert "no_such_slice.jpg" in capsys.readouterr().err
    assert not (tmp_path / "r" / "model_final.pth").exists()


@pytest.mark.timeout(300)
def test_two_process_gloo_training_via_cli(tmp_path, data_root):
    """--num-gpus 2 on a CPU machine: 2 gloo processes train the real detector; rank 0 writes."""
    out = tmp_path / "ddp"
    cfg = tiny_cfg(out, max_iter=2, **{"DATASETS.TEST": "()"})
    assert main(["--config-file", _cfg_file(tmp_path, cfg), "--num-gpus", "2"]) == 0
    ckpt = torch.load(out / "model_final.pth", weights_only=True)
    assert ckpt["iteration"] == 1 and "model" in ckpt
    assert (out / "metrics.json").is_file()
