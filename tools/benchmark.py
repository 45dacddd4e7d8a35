#!/usr/bin/env python
"""Speed and memory ratios of mdkd_det, from one run (the machines are shared and noisy, so only
ratios measured side by side are reported; no timed assertions live in the tests).

Each measurement group runs in its own spawned process (so its peak RSS is its own), on the
same model architecture and the same real batch of LungCT slices (``--config-file``, default
the demo config). Inside a group the compared steps are interleaved, A B A B ..., and the
median is taken.

``--detector rfdetr`` measures the same keys on the RF-DETR demo config (plugin head; the joint
teacher and KD groups use the RF-DETR fusion teacher and KD adapter); Faster R-CNN is the default.

Keys printed with ``--json`` (one JSON object):

- ``trainer_overhead_ratio``: our ``SimpleTrainer`` step (hooks, logging, clipping) / a bare
  torchvision loop (forward, backward, clip, step) on the same model and batch (goal <= 1.05).
- ``loader_headroom``: images/s the train loader delivers / images/s the training step consumes
  (goal >= 3).
- ``eval_speed_ratio``: faster-coco-eval time / pycocotools time on the same detections (goal
  <= 0.4).
- ``kd_step_ratio``: Stage-3 KD step / dataset-specific step (the student's plain step).
- ``kd_floor_ratio``: KD step / (student step + one no-grad joint-teacher forward) (goal <= 1.10).
- ``joint_teacher_step_ratio``: joint-teacher step over 3 frozen teachers / dataset-specific
  step (paper: ~3x; goal <= 1.8).
- ``student_latency_ratio``: inference latency of a student after KD training / a plain
  dataset-specific model (goal <= 1.02).
- ``peak_mem_mb``: peak RSS (MB) of each group's process: ``dataset_specific``, ``kd``,
  ``joint_teacher``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEFAULT_CONFIG = "configs/LungCT/faster_rcnn_R18_FPN_demo.yaml"
#: ``--detector`` -> its default config (same keys and goals for every detector family).
DETECTOR_CONFIGS = {"faster_rcnn": DEFAULT_CONFIG, "rfdetr": "configs/LungCT/mdkd_rfdetr_nano_demo.yaml"}


def _cfg(args):
    from mdkd_det.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(args["config_file"])
    cfg.merge_from_list(args["opts"])
    cfg.DATALOADER.NUM_WORKERS = args["workers"]
    return cfg


def _batch(cfg, n):
    from mdkd_det.data.build import get_dataset_records
    from mdkd_det.data.mapper import DatasetMapper

    recs = get_dataset_records(cfg, list(cfg.DATASETS.TRAIN))[:n]
    mapper = DatasetMapper(cfg, is_train=True)
    return [mapper(r, seed=i) for i, r in enumerate(recs)]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _interleave(fns: dict, iters: int, warmup: int) -> dict:
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _repeat(batch):
    while True:
        yield batch


def _trainer(model, batch, cfg, kd_distiller=None, epoch_iters=1):
    from mdkd_det.engine import hooks
    from mdkd_det.engine.events import EventStorage, JSONWriter
    from mdkd_det.engine.trainer import SimpleTrainer
    from mdkd_det.solver import build_lr_scheduler, build_optimizer

    params = list(model.parameters()) + (list(kd_distiller.parameters()) if kd_distiller else [])
    opt = build_optimizer(cfg, params)
    if kd_distiller is not None:
        from mdkd_det.distill.trainer import KDSimpleTrainer

        t = KDSimpleTrainer(model, _repeat(batch), opt, grad_clip=5.0)
        t.distiller, t.epoch_iters, t.task_weight = kd_distiller, epoch_iters, 1.0
    else:
        t = SimpleTrainer(model, _repeat(batch), opt, grad_clip=5.0)
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mdkd_bench_{os.getpid()}")
    os.makedirs(out, exist_ok=True)
    t.register_hooks([hooks.IterationTimer(), hooks.LRScheduler(build_lr_scheduler(cfg, opt)),
                      hooks.PeriodicWriter([JSONWriter(os.path.join(out, "metrics.json"))], period=20)])
    t.storage = EventStorage(0)
    t.storage.__enter__()
    t.start_iter, t.max_iter, t.iter = 0, 10**9, 20 * epoch_iters  # KD fully on (cf = 1)

    def step():
        t.before_step()
        t.run_step()
        t.after_step()
        t.iter += 1
        t.storage.step()

    t.before_train()
    return step


def group_dataset_specific(args) -> dict:
    """Bare torchvision loop vs our trainer step; loader throughput; inference latency."""
    import torch

    torch.manual_seed(0)
    from mdkd_det.engine.defaults import build_model

    cfg = _cfg(args)
    bs = int(cfg.SOLVER.IMS_PER_BATCH)
    batch = _batch(cfg, bs)
    bare_model, ours_model = build_model(cfg), build_model(cfg)
    bare_model.train()
    opt = torch.optim.AdamW(bare_model.parameters(), lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    imgs, tgts = [d["image"] for d in batch], [d["target"] for d in batch]

    def bare():
        loss = sum(bare_model(imgs, tgts).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bare_model.parameters(), 5.0)
        opt.step()

    ours = _trainer(ours_model, batch, cfg)
    t = _interleave({"bare": bare, "ours": ours}, args["iters"], args["warmup"])
    # loader: images/s over N batches with the configured workers (after the first batch)
    from mdkd_det.data.build import build_detection_train_loader

    it = iter(build_detection_train_loader(cfg))
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args["loader_seconds"]:
        n += len(next(it))
    loader_ips = n / (time.perf_counter() - t0)
    return {"bare_step_s": t["bare"], "trainer_step_s": t["ours"], "loader_images_per_s": loader_ips,
            "step_images_per_s": bs / t["ours"], "peak_mem_mb": _peak_mb()}


def _joint_teacher(cfg, n_teachers=3):
    from mdkd_det.engine.defaults import build_model

    jcfg = cfg.clone()
    jcfg.defrost()
    jcfg.MODEL.BACKBONE.NAME = "fusion"
    jcfg.FUSION.TEACHERS = ()
    jcfg.FUSION.TEACHER_BACKBONES = (cfg.MODEL.BACKBONE.NAME,) * n_teachers
    return jcfg, build_model(jcfg)


def group_kd(args) -> dict:
    """Student step, no-grad joint-teacher forward and KD step, interleaved; latencies."""
    import logging

    import torch

    logging.getLogger("mdkd_det.modeling.fusion").setLevel(logging.ERROR)
    torch.manual_seed(0)
    from mdkd_det.distill.distiller import freeze_teacher
    from mdkd_det.distill.taps import TapRecorder
    from mdkd_det.distill.trainer import build_distiller
    from mdkd_det.engine.defaults import build_model

    cfg = _cfg(args)
    batch = _batch(cfg, int(cfg.SOLVER.IMS_PER_BATCH))
    _, teacher = _joint_teacher(cfg)
    freeze_teacher(teacher)
    student, plain_student, baseline = build_model(cfg), build_model(cfg), build_model(cfg)
    distiller = build_distiller(cfg, student, teacher)
    kd_step = _trainer(student, batch, cfg, kd_distiller=distiller)
    plain_step = _trainer(plain_student, batch, cfg)
    adapter = distiller.adapter
    imgs, tgts = [d["image"] for d in batch], [d["target"] for d in batch]
    with TapRecorder(plain_student, adapter.student_taps()) as rec:
        plain_student(imgs, tgts)

    def teacher_forward():
        adapter.teacher_inputs(teacher, rec)

    t = _interleave({"kd": kd_step, "student": plain_step, "teacher": teacher_forward},
                    args["iters"], args["warmup"])
    # inference latency: the KD-trained student (taps gone) vs a plain model, 1 image
    student.eval(), baseline.eval()  # eval mode = test size (TrainTestResizeTransform)
    img = [batch[0]["image"]]
    with torch.inference_mode():
        lat = _interleave({"student": lambda: student(img), "baseline": lambda: baseline(img)},
                          args["iters"] * 2, args["warmup"])
    return {"kd_step_s": t["kd"], "student_step_s": t["student"], "teacher_forward_s": t["teacher"],
            "student_latency_s": lat["student"], "baseline_latency_s": lat["baseline"],
            "peak_mem_mb": _peak_mb()}


def group_joint_teacher(args) -> dict:
    """Joint-teacher train step (3 frozen teachers + fusion + new heads) vs the plain step."""
    import logging

    import torch

    logging.getLogger("mdkd_det.modeling.fusion").setLevel(logging.ERROR)
    torch.manual_seed(0)
    from mdkd_det.engine.defaults import build_model

    cfg = _cfg(args)
    batch = _batch(cfg, int(cfg.SOLVER.IMS_PER_BATCH))
    jcfg, joint = _joint_teacher(cfg)
    joint_step = _trainer(joint, batch, jcfg)
    plain_step = _trainer(build_model(cfg), batch, cfg)
    t = _interleave({"joint": joint_step, "plain": plain_step}, args["iters"], args["warmup"])
    return {"joint_step_s": t["joint"], "plain_step_s": t["plain"], "peak_mem_mb": _peak_mb()}


def group_eval(args) -> dict:
    """faster-coco-eval vs pycocotools on LungCT valid with seeded synthetic detections."""
    import numpy as np

    from mdkd_det.data.build import get_dataset_records
    from mdkd_det.data.catalog import MetadataCatalog
    from mdkd_det.data.datasets.coco import records_to_coco_dict
    from mdkd_det.evaluation.benchmark_eval import time_coco_eval

    cfg = _cfg(args)
    name = cfg.DATASETS.TEST[0]
    recs = get_dataset_records(cfg, [name])
    gt = records_to_coco_dict(recs, MetadataCatalog.get(name))
    rng = np.random.default_rng(0)
    results = []
    for im in gt["images"]:
        for a in [a for a in gt["annotations"] if a["image_id"] == im["id"]]:
            x, y, w, h = a["bbox"]
            results.append({"image_id": im["id"], "category_id": a["category_id"], "score": float(rng.random()),
                            "bbox": [x + rng.normal(0, 2), y + rng.normal(0, 2), w, h]})
        for _ in range(50):  # background false positives
            x, y = rng.uniform(0, im["width"] - 30), rng.uniform(0, im["height"] - 30)
            results.append({"image_id": im["id"], "category_id": gt["categories"][0]["id"],
                            "score": float(rng.random() * 0.5), "bbox": [x, y, 20.0, 20.0]})
    t = time_coco_eval(gt, results, repeats=3)
    return {"faster_coco_eval_s": t["faster_coco_eval_s"], "pycocotools_s": t["pycocotools_s"],
            "num_detections": len(results)}


GROUPS = {"dataset_specific": group_dataset_specific, "kd": group_kd,
          "joint_teacher": group_joint_teacher, "eval": group_eval}


def _child(name: str, args: dict, queue) -> None:
    try:
        queue.put(("ok", GROUPS[name](args)))
    except BaseException as e:  # report, then let the parent raise
        import traceback

        queue.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _run_group(name: str, args: dict) -> dict:
    """Run one group in a fresh (non-daemonic, so it may start loader workers) process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, args, queue))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"benchmark group '{name}' failed: {value}")
    return value


BENCHMARK_EXAMPLES = """examples:
  tools/benchmark.py --json                              # Faster R-CNN demo config, every group
  tools/benchmark.py --detector rfdetr --json            # the same keys for RF-DETR
  tools/benchmark.py --groups dataset_specific,eval --iters 4  # two groups, fewer iterations
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=BENCHMARK_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detector", choices=sorted(DETECTOR_CONFIGS), default="faster_rcnn",
                   help="detector family; picks its demo config unless --config-file is given")
    p.add_argument("--config-file", default=None, help="default: the --detector's demo config")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--iters", type=int, default=8, help="timed iterations per compared step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="train loader workers")
    p.add_argument("--loader-seconds", type=float, default=8.0)
    p.add_argument("--groups", default=",".join(GROUPS), help="comma-separated subset of " + ",".join(GROUPS))
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    a = p.parse_args(argv)
    args = {"config_file": a.config_file or DETECTOR_CONFIGS[a.detector], "opts": a.opts, "iters": a.iters, "warmup": a.warmup,
            "workers": a.workers, "loader_seconds": a.loader_seconds}
    raw = {g: _run_group(g, args) for g in a.groups.split(",") if g}
    out = {}
    if "dataset_specific" in raw:
        d = raw["dataset_specific"]
        out["trainer_overhead_ratio"] = d["trainer_step_s"] / d["bare_step_s"]
        out["loader_headroom"] = d["loader_images_per_s"] / d["step_images_per_s"]
    if "eval" in raw:
        e = raw["eval"]
        out["eval_speed_ratio"] = e["faster_coco_eval_s"] / e["pycocotools_s"]
    if "kd" in raw:
        k = raw["kd"]
        out["kd_step_ratio"] = k["kd_step_s"] / k["student_step_s"]
        out["kd_floor_ratio"] = k["kd_step_s"] / (k["student_step_s"] + k["teacher_forward_s"])
        out["student_latency_ratio"] = k["student_latency_s"] / k["baseline_latency_s"]
    if "joint_teacher" in raw:
        j = raw["joint_teacher"]
        out["joint_teacher_step_ratio"] = j["joint_step_s"] / j["plain_step_s"]
    out["peak_mem_mb"] = {g: round(r["peak_mem_mb"], 1) for g, r in raw.items() if "peak_mem_mb" in r}
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}
    out["raw"] = {g: {k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for g, r in raw.items()}
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
