#!/usr/bin/env python
"""Speed, memory and roofline ratios of mdkd_det, from one run (the machines are shared and
noisy, so only ratios of steps timed side by side are reported; no timed assertions live in
the tests). Figures and commands: docs/benchmarks.md.

Each measurement group runs in its own spawned process (so its peak RSS is its own) with
``--threads`` torch threads, on the same model architecture and the same real batch of LungCT
slices (``--config-file``, default the MDKD CPU protocol config, whose student is the R18-FPN-128
demo detector and whose joint teacher is the protocol's: residual 1x1 fusion at the teachers'
128 channels). Inside a group the compared steps are
interleaved, A B C, C B A, A B C, ... (order reversed every round), and every ratio is the median over rounds of the per-round ratio
(both steps timed within seconds of each other, so machine load mostly cancels), printed with
its interquartile range ``<key>_iqr`` = [q1, q3].

``--detector rfdetr`` measures the same keys on the RF-DETR demo config (plugin head; the joint
teacher and KD groups use the RF-DETR fusion teacher and KD adapter); Faster R-CNN is the default.

Keys printed with ``--json`` (one JSON object). ONE plain step, the student's dataset-specific
training step timed in the ``steps`` group, is the denominator of every step ratio:

- ``kd_step_ratio``: Stage-3 KD step / plain step (goal <= 1.4).
- ``kd_floor_ratio``: KD step / (plain step + one frozen joint-teacher forward) (goal <= 1.05).
- ``joint_teacher_step_ratio``: Stage-2 joint-teacher step over 3 frozen teachers / plain step
  (goal <= 1.3).
- ``kd_step_cached_ratio``, ``joint_teacher_step_cached_ratio``: the same steps with
  ``FROZEN_TEACHER.CACHE_DIR`` set and the teachers' maps of the batch already on disk (every
  image seen before: the second epoch on); ``kd_step_cache_miss_ratio``: KD step with the cache
  on and nothing stored (every image new: its cost is hashing and writing the maps, D11.2).
- ``kd_step_ratio_switches_off``, ``joint_teacher_step_ratio_switches_off``,
  ``teacher_forward_speedup``: the same steps with every ``FROZEN_TEACHER`` switch off (the
  code before issue 11), timed in the same rounds.
- ``student_latency_ratio``: inference latency of a student after KD training / a plain model
  with the same weights (goal <= 1.02: KD leaves nothing behind in the student).
- ``student_variants``: plain step with ``SOLVER.AMP.ENABLED`` (bf16), with channels_last and
  with both / the fp32 plain step (group ``student``).
- ``peak_gflops_fp32``, ``peak_gflops_bf16``: best of repeated 2048^2 matmuls, same process.
- ``step_fraction_of_peak``: ``{"plain", "kd", "joint_teacher"}`` FLOPs
  (``torch.utils.flop_counter.FlopCounterMode``, forward + backward) / median time / fp32 peak.
- ``teacher_fraction_of_peak``: teacher-forward FLOPs / time / the peak of its precision.
- ``trainer_overhead_ratio``: our ``SimpleTrainer`` step / a bare torchvision loop (<= 1.05).
- ``loader_headroom``: images/s the train loader delivers / images/s the step consumes (>= 3).
- ``eval_speed_ratio``: faster-coco-eval time / pycocotools time (<= 0.4).
- ``peak_mem_mb``: peak RSS (MB) of each group's process.
- ``scaling`` (``--scaling``): one row per (teachers, px): plain, joint-teacher and KD step
  times, one teacher forward, their ratios and the peak RSS of the joint and KD processes;
  table on stdout (without ``--json``) and a PNG (``--plot``).
- ``profile`` (``--groups profile``, not in the default run): ``torch.profiler`` of one plain
  and one KD step: top operators by self CPU time, and the KD step's ``mdkd::teacher`` and
  ``mdkd::kd_terms`` ranges (seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

#: the protocol's models: before 2026-12-05 the default was faster_rcnn_R18_FPN_demo.yaml, whose
#: FUSION defaults (concat1x1 to 256 channels) made the benchmark's joint teacher heavier than
#: the one the pipeline trains (heads at 256 channels; docs/benchmarks.md, "in-run")
DEFAULT_CONFIG = "configs/LungCT/mdkd_faster_rcnn_R18_cpu.yaml"
#: ``--detector`` -> its default config (same keys and goals for every detector family).
DETECTOR_CONFIGS = {"faster_rcnn": DEFAULT_CONFIG, "rfdetr": "configs/LungCT/mdkd_rfdetr_nano_demo.yaml"}
#: every FROZEN_TEACHER speed switch on (FOLD_BN, CHANNELS_LAST and BF16 are off by default
#: because they are not bitwise; BF16's AP effect on the LungCT teachers was measured below
#: 0.2 points, docs/benchmarks.md "bf16 teacher AP"). BF16 takes effect only on a CPU with
#: native bf16 (TeacherRuntime.from_config; the JSON's ``teacher_bf16`` says whether it ran).
SWITCHES_ON = ["FROZEN_TEACHER.FOLD_BN", True, "FROZEN_TEACHER.CHANNELS_LAST", True,
               "FROZEN_TEACHER.INFERENCE_MODE", True, "FROZEN_TEACHER.BF16", True]
#: every FROZEN_TEACHER switch off: the teacher as it ran before issue 11.
SWITCHES_OFF = ["FROZEN_TEACHER.FOLD_BN", False, "FROZEN_TEACHER.CHANNELS_LAST", False,
                "FROZEN_TEACHER.INFERENCE_MODE", False, "FROZEN_TEACHER.BF16", False]
SCALING_TEACHERS = (1, 2, 3, 5, 8)
SCALING_SIZES = (256, 512)


# -- statistics ------------------------------------------------------------------------------
def quartiles(values) -> tuple:
    """``(q1, median, q3)`` of a non-empty sequence (``statistics.quantiles``, inclusive)."""
    v = sorted(values)
    if len(v) == 1:
        return v[0], v[0], v[0]
    q1, q2, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return q1, q2, q3


def ratio_stats(num, den) -> tuple:
    """Median and ``[q1, q3]`` of the per-round ratios ``num[i] / den[i]`` (rounds interleaved,
    so round i of both steps ran under the same machine load)."""
    q1, med, q3 = quartiles([a / b for a, b in zip(num, den)])
    return med, [q1, q3]


def _cfg(args, extra=()):
    from mdkd_det.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(args["config_file"])
    cfg.merge_from_list(list(args["opts"]) + list(extra))
    cfg.DATALOADER.NUM_WORKERS = args["workers"]
    return cfg


def _setup(args):
    import logging

    import torch

    torch.set_num_threads(int(args["threads"]))
    logging.getLogger("mdkd_det.modeling.fusion").setLevel(logging.ERROR)
    torch.manual_seed(0)


def _batch(cfg, n):
    from mdkd_det.data.build import get_dataset_records
    from mdkd_det.data.mapper import DatasetMapper

    recs = get_dataset_records(cfg, list(cfg.DATASETS.TRAIN))[:n]
    mapper = DatasetMapper(cfg, is_train=True)
    return [mapper(r, seed=i) for i, r in enumerate(recs)]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _interleave(fns: dict, iters: int, warmup: int) -> dict:
    """Per-round wall times ``{name: [s, ...]}`` of the callables run A B C, C B A, A B C, ...
    (the order reverses every round, so no callable always runs first or after the same one)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for i in range(iters):
        for k in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return times


def _med(v) -> float:
    return statistics.median(v)


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
    amp = bool(cfg.SOLVER.AMP.ENABLED)
    if kd_distiller is not None:
        from mdkd_det.distill.trainer import KDSimpleTrainer

        t = KDSimpleTrainer(model, _repeat(batch), opt, grad_clip=5.0, amp=amp)
        t.distiller, t.epoch_iters, t.task_weight = kd_distiller, epoch_iters, 1.0
    else:
        t = SimpleTrainer(model, _repeat(batch), opt, grad_clip=5.0, amp=amp)
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


def _flops(fn) -> float:
    """FLOPs of one call of ``fn`` (``torch.utils.flop_counter.FlopCounterMode``: matmuls and
    convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def peak_gflops(dtype_name: str, n: int = 2048, repeats: int = 8, budget_s: float = 10.0) -> float:
    """Best GFLOP/s of ``repeats`` ``n x n`` matmuls in ``dtype_name`` ("float32"/"bfloat16"):
    the machine's attainable peak for dense compute, measured in this process. A first 256^2
    matmul estimates the rate; where the full size would take longer than ``budget_s`` in all
    (bf16 emulated on an AVX2 CPU runs at ~0.2 GFLOP/s) ``n`` halves until it fits."""
    import torch

    dtype = getattr(torch, dtype_name)

    def best(m: int, reps: int) -> float:
        a, b = torch.randn(m, m).to(dtype), torch.randn(m, m).to(dtype)
        a @ b  # warm-up (oneDNN / MKL kernel selection)
        top = 0.0
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            top = max(top, 2.0 * m ** 3 / max(time.perf_counter() - t, 1e-9) / 1e9)
        return top

    est = best(256, 1)
    while n > 256 and repeats * 2.0 * n ** 3 / (est * 1e9) > budget_s:
        n //= 2
    return max(est, best(n, repeats))


def machine() -> dict:
    """What the ratios depend on: torch's CPU capability (``AVX2``, ``AVX512``...), whether bf16
    is native (:func:`mdkd_det.utils.device.cpu_has_native_bf16`) and the CPU model name."""
    import platform

    import torch

    from mdkd_det.utils.device import cpu_has_native_bf16

    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return {"model": name, "capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads()}


def group_dataset_specific(args) -> dict:
    """Bare torchvision loop vs our trainer step; loader throughput."""
    import torch

    _setup(args)
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
    from mdkd_det.data.build import build_detection_train_loader
    from mdkd_det.tasks import get_task

    it = iter(build_detection_train_loader(cfg, mapper=get_task(cfg).build_mapper(cfg, is_train=True)))
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args["loader_seconds"]:
        n += len(next(it))
    loader_ips = n / (time.perf_counter() - t0)
    return {"bare_step_s": t["bare"], "trainer_step_s": t["ours"], "loader_images_per_s": loader_ips,
            "batch_size": bs, "peak_mem_mb": _peak_mb()}


def _joint_teacher(cfg, n_teachers=3):
    from mdkd_det.engine.defaults import build_model

    jcfg = cfg.clone()
    jcfg.defrost()
    jcfg.MODEL.BACKBONE.NAME = "fusion"
    jcfg.FUSION.TEACHERS = ()
    jcfg.FUSION.TEACHER_BACKBONES = (cfg.MODEL.BACKBONE.NAME,) * n_teachers
    return jcfg, build_model(jcfg)


def _kd_parts(cfg, cfg_off, batch, n_teachers):
    """(kd_step, kd_step_off, teacher_fwd, teacher_fwd_off, student): the same random joint
    teacher prepared with ``cfg``'s FROZEN_TEACHER switches and (unless ``cfg_off`` is None,
    then the ``*_off`` entries are None) with ``cfg_off``'s."""
    import torch

    from mdkd_det.distill.taps import TapRecorder
    from mdkd_det.distill.trainer import build_distiller
    from mdkd_det.engine.defaults import build_model
    from mdkd_det.modeling.frozen_teacher import freeze_teacher

    _, teacher = _joint_teacher(cfg, n_teachers)
    freeze_teacher(teacher)
    torch.manual_seed(1)
    student = build_model(cfg)
    probe = copy.deepcopy(student).train()
    kd_off = tfwd_off = None
    if cfg_off is not None:
        _, teacher_off = _joint_teacher(cfg_off, n_teachers)
        teacher_off.load_state_dict(teacher.state_dict())
        student_off = copy.deepcopy(student)
        d_off = build_distiller(cfg_off, student_off, freeze_teacher(teacher_off))
        kd_off = _trainer(student_off, batch, cfg_off, kd_distiller=d_off)
    d_on = build_distiller(cfg, student, teacher)
    kd = _trainer(student, batch, cfg, kd_distiller=d_on)
    imgs, tgts = [d["image"] for d in batch], [d["target"] for d in batch]
    with TapRecorder(probe, d_on.adapter.student_taps()) as rec:
        probe(imgs, tgts)
    if cfg_off is not None:
        def tfwd_off():
            return d_off.teacher_inputs(rec)
    return kd, kd_off, (lambda: d_on.teacher_inputs(rec)), tfwd_off, student


def group_steps(args) -> dict:
    """THE step comparison: plain step (the one denominator), KD step, joint-teacher step (3
    teachers) and one joint-teacher forward, each with the FROZEN_TEACHER speed switches on
    (:data:`SWITCHES_ON`) and all off, interleaved in one process; FLOPs and the matmul peak in the same process;
    inference latency of the KD student vs a plain model."""
    import torch

    _setup(args)
    from mdkd_det.engine.defaults import build_model

    from mdkd_det.modeling.frozen_teacher import TeacherRuntime

    cfg = _cfg(args, SWITCHES_ON)
    cfg_off = _cfg(args, SWITCHES_OFF)
    batch = _batch(cfg, int(cfg.SOLVER.IMS_PER_BATCH))
    plain_model, baseline = build_model(cfg), build_model(cfg)
    plain = _trainer(plain_model, batch, cfg)
    kd, kd_off, tfwd, tfwd_off, student = _kd_parts(cfg, cfg_off, batch, 3)
    jcfg, joint_model = _joint_teacher(cfg, 3)
    jcfg_off, joint_off_model = _joint_teacher(cfg_off, 3)
    joint_off_model.load_state_dict(joint_model.state_dict())
    joint, joint_off = _trainer(joint_model, batch, jcfg), _trainer(joint_off_model, batch, jcfg_off)
    # FROZEN_TEACHER.CACHE_DIR: warm (filled by the warm-up rounds) and always missing
    cache_dir = tempfile.mkdtemp(prefix="mdkd_bench_cache_")
    cfg_hit = _cfg(args, SWITCHES_ON + ["FROZEN_TEACHER.CACHE_DIR", os.path.join(cache_dir, "hit")])
    cfg_miss = _cfg(args, SWITCHES_ON + ["FROZEN_TEACHER.CACHE_DIR", os.path.join(cache_dir, "miss"),
                                         "FROZEN_TEACHER.CACHE_MAX_GB", 1e-9])
    kd_cached = _kd_parts(cfg_hit, None, batch, 3)[0]
    kd_miss = _kd_parts(cfg_miss, None, batch, 3)[0]
    jcfg_hit, joint_hit_model = _joint_teacher(cfg_hit, 3)
    joint_cached = _trainer(joint_hit_model, batch, jcfg_hit)
    fns = {"plain": plain, "kd": kd, "kd_off": kd_off, "teacher": tfwd, "teacher_off": tfwd_off,
           "joint": joint, "joint_off": joint_off, "kd_cached": kd_cached, "kd_cache_miss": kd_miss,
           "joint_cached": joint_cached}
    try:
        t = _interleave(fns, args["iters"], args["warmup"])
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    flops = {k: _flops(fns[k]) for k in ("plain", "kd", "joint", "teacher")}
    peak = {d: peak_gflops(d) for d in ("float32", "bfloat16")}
    # inference latency: the KD-trained student (taps gone) vs a plain model with the SAME
    # weights (otherwise the two keep different numbers of boxes for NMS and post-processing,
    # which is a property of the weights, not of KD), 1 image
    baseline.load_state_dict(student.state_dict())
    student.eval(), baseline.eval()  # eval mode = test size (TrainTestResizeTransform)
    img = [batch[0]["image"]]
    with torch.inference_mode():
        lat = _interleave({"student": lambda: student(img), "baseline": lambda: baseline(img)},
                          args["iters"] * 2, args["warmup"])
    return {"times": t, "latency": lat, "flops": flops, "peak_gflops": peak,
            "teacher_bf16": TeacherRuntime.from_config(cfg).bf16, "peak_mem_mb": _peak_mb()}


def group_student(args) -> dict:
    """Plain step in fp32, with SOLVER.AMP.ENABLED (CPU bf16 autocast), with the student in
    channels_last, and with both; interleaved (same initial weights)."""
    import torch

    _setup(args)
    from mdkd_det.engine.defaults import build_model

    cfg = _cfg(args)
    amp_cfg = _cfg(args, ["SOLVER.AMP.ENABLED", True])
    batch = _batch(cfg, int(cfg.SOLVER.IMS_PER_BATCH))
    base = build_model(cfg)
    models = {k: copy.deepcopy(base) for k in ("fp32", "amp", "channels_last", "amp_channels_last")}
    for k in ("channels_last", "amp_channels_last"):
        models[k].to(memory_format=torch.channels_last)
    fns = {k: _trainer(m, batch, amp_cfg if k.startswith("amp") else cfg) for k, m in models.items()}
    return {"times": _interleave(fns, args["iters"], args["warmup"]), "peak_mem_mb": _peak_mb()}


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


def _size_opts(size: int, batch: int) -> list:
    return ["INPUT.MIN_SIZE_TRAIN", size, "INPUT.MAX_SIZE_TRAIN", size, "INPUT.MIN_SIZE_TEST", size,
            "INPUT.MAX_SIZE_TEST", size, "SOLVER.IMS_PER_BATCH", batch]


def group_scaling_joint(args) -> dict:
    """One scaling row, joint side: plain step vs joint-teacher step with ``n`` teachers."""
    _setup(args)
    from mdkd_det.engine.defaults import build_model

    cfg = _cfg(args, _size_opts(args["size"], args["scaling_batch"]))
    batch = _batch(cfg, int(cfg.SOLVER.IMS_PER_BATCH))
    base_mb = _peak_mb()
    jcfg, joint = _joint_teacher(cfg, args["teachers"])
    fns = {"plain": _trainer(build_model(cfg), batch, cfg), "joint": _trainer(joint, batch, jcfg)}
    return {"times": _interleave(fns, args["iters"], args["warmup"]), "peak_mem_mb": _peak_mb(),
            "base_mem_mb": base_mb}


def group_scaling_kd(args) -> dict:
    """One scaling row, KD side: plain step vs KD step vs one teacher forward (``n`` teachers)."""
    _setup(args)
    from mdkd_det.engine.defaults import build_model

    cfg = _cfg(args, _size_opts(args["size"], args["scaling_batch"]))
    batch = _batch(cfg, int(cfg.SOLVER.IMS_PER_BATCH))
    base_mb = _peak_mb()
    plain = _trainer(build_model(cfg), batch, cfg)
    kd, _, tfwd, _, _ = _kd_parts(cfg, None, batch, args["teachers"])
    fns = {"plain": plain, "kd": kd, "teacher": tfwd}
    return {"times": _interleave(fns, args["iters"], args["warmup"]), "peak_mem_mb": _peak_mb(),
            "base_mem_mb": base_mb}


def group_profile(args) -> dict:
    """``torch.profiler`` of one plain step and one KD step (after warm-up): the top operators by
    self CPU time of each, and the KD step's time split into the student's step, the frozen
    teacher (``Distiller.teacher_inputs``) and the KD terms (``Distiller.forward``), each a
    ``record_function`` range."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    _setup(args)
    from mdkd_det.distill.distiller import Distiller
    from mdkd_det.engine.defaults import build_model

    cfg = _cfg(args, SWITCHES_ON)
    batch = _batch(cfg, int(cfg.SOLVER.IMS_PER_BATCH))
    plain = _trainer(build_model(cfg), batch, cfg)
    kd, _, _, _, _ = _kd_parts(cfg, None, batch, 3)
    wrapped = {}
    for name in ("teacher_inputs", "forward"):  # label the KD parts without touching the package
        orig = getattr(Distiller, name)

        def labelled(self, *a, _orig=orig, _name=name, **k):
            with record_function("mdkd::" + ("teacher" if _name == "teacher_inputs" else "kd_terms")):
                return _orig(self, *a, **k)
        wrapped[name] = orig
        setattr(Distiller, name, labelled)
    out = {}
    try:
        for key, fn in (("plain", plain), ("kd", kd)):
            for _ in range(max(1, args["warmup"])):
                fn()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                with record_function("mdkd::step"):
                    fn()
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events) / 1e6
            top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args["profile_top"]]
            out[key] = {
                "total_self_cpu_s": total,
                "ranges_s": {e.key: e.cpu_time_total / 1e6 for e in events if e.key.startswith("mdkd::")},
                "top_ops": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count,
                             "share": e.self_cpu_time_total / 1e6 / total} for e in top]}
    finally:
        for name, orig in wrapped.items():
            setattr(Distiller, name, orig)
    return out


GROUPS = {"dataset_specific": group_dataset_specific, "steps": group_steps, "student": group_student,
          "eval": group_eval, "profile": group_profile}
DEFAULT_GROUPS = [g for g in GROUPS if g != "profile"]
INTERNAL_GROUPS = {"scaling_joint": group_scaling_joint, "scaling_kd": group_scaling_kd}


def _child(name: str, args: dict, queue) -> None:
    try:
        queue.put(("ok", {**GROUPS, **INTERNAL_GROUPS}[name](args)))
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
  tools/benchmark.py --json                              # Faster R-CNN CPU protocol config, every group
  tools/benchmark.py --detector rfdetr --json            # the same keys for RF-DETR
  tools/benchmark.py --groups dataset_specific,eval --iters 4  # two groups, fewer iterations
"""


def summarize(raw: dict) -> dict:
    """The JSON keys (module docstring) from the groups' raw per-round times."""
    out = {}

    def put(key, num, den):
        out[key], out[key + "_iqr"] = ratio_stats(num, den)

    if "steps" in raw:
        s = raw["steps"]
        t = s["times"]
        plain = t["plain"]
        put("kd_step_ratio", t["kd"], plain)
        put("kd_floor_ratio", t["kd"], [a + b for a, b in zip(plain, t["teacher"])])
        put("joint_teacher_step_ratio", t["joint"], plain)
        if "kd_cached" in t:  # FROZEN_TEACHER.CACHE_DIR (D11.2)
            put("kd_step_cached_ratio", t["kd_cached"], plain)
            put("kd_step_cache_miss_ratio", t["kd_cache_miss"], plain)
            put("joint_teacher_step_cached_ratio", t["joint_cached"], plain)
        put("kd_step_ratio_switches_off", t["kd_off"], plain)
        put("kd_floor_ratio_switches_off", t["kd_off"], [a + b for a, b in zip(plain, t["teacher_off"])])
        put("joint_teacher_step_ratio_switches_off", t["joint_off"], plain)
        put("teacher_forward_speedup", t["teacher_off"], t["teacher"])
        put("teacher_forward_ratio", t["teacher"], plain)
        put("student_latency_ratio", s["latency"]["student"], s["latency"]["baseline"])
        out["plain_step_s"] = _med(plain)
        out["plain_step_s_iqr"] = [quartiles(plain)[0], quartiles(plain)[2]]
        peak = s["peak_gflops"]
        out["peak_gflops_fp32"], out["peak_gflops_bf16"] = peak["float32"], peak["bfloat16"]
        f = s["flops"]
        out["step_gflop"] = {k: f[k] / 1e9 for k in ("plain", "kd", "joint", "teacher")}
        out["step_fraction_of_peak"] = {
            "plain": f["plain"] / _med(plain) / 1e9 / peak["float32"],
            "kd": f["kd"] / _med(t["kd"]) / 1e9 / peak["float32"],
            "joint_teacher": f["joint"] / _med(t["joint"]) / 1e9 / peak["float32"]}
        out["teacher_fraction_of_peak"] = f["teacher"] / _med(t["teacher"]) / 1e9 / \
            peak["bfloat16" if s["teacher_bf16"] else "float32"]
        out["teacher_bf16"] = s["teacher_bf16"]
    if "student" in raw:
        t = raw["student"]["times"]
        out["student_variants"] = {}
        for k in ("amp", "channels_last", "amp_channels_last"):
            med, iqr = ratio_stats(t[k], t["fp32"])
            out["student_variants"][k] = {"ratio": med, "iqr": iqr}
    if "dataset_specific" in raw:
        d = raw["dataset_specific"]
        put("trainer_overhead_ratio", d["trainer_step_s"], d["bare_step_s"])
        out["loader_headroom"] = d["loader_images_per_s"] / (d["batch_size"] / _med(d["trainer_step_s"]))
    if "profile" in raw:
        out["profile"] = raw["profile"]
    if "eval" in raw:
        e = raw["eval"]
        out["eval_speed_ratio"] = e["faster_coco_eval_s"] / e["pycocotools_s"]
    out["peak_mem_mb"] = {g: r["peak_mem_mb"] for g, r in raw.items() if "peak_mem_mb" in r}
    out["cpu"] = machine()
    return out


def scaling_row(n: int, size: int, joint: dict, kd: dict) -> dict:
    """One ``scaling`` row from the two processes' raw times (medians, per-round ratios)."""
    tj, tk = joint["times"], kd["times"]
    row = {"teachers": n, "px": size,
           "plain_step_s": _med(tk["plain"]), "joint_step_s": _med(tj["joint"]),
           "kd_step_s": _med(tk["kd"]), "teacher_forward_s": _med(tk["teacher"])}
    row["joint_ratio"], row["joint_ratio_iqr"] = ratio_stats(tj["joint"], tj["plain"])
    row["kd_ratio"], row["kd_ratio_iqr"] = ratio_stats(tk["kd"], tk["plain"])
    row["teacher_forward_ratio"], _ = ratio_stats(tk["teacher"], tk["plain"])
    row["joint_peak_mem_mb"], row["kd_peak_mem_mb"] = joint["peak_mem_mb"], kd["peak_mem_mb"]
    row["joint_step_mem_mb"] = joint["peak_mem_mb"] - joint["base_mem_mb"]
    row["kd_step_mem_mb"] = kd["peak_mem_mb"] - kd["base_mem_mb"]
    return row


def scaling_table(rows) -> str:
    """Markdown table of the scaling rows."""
    cols = ["teachers", "px", "plain_step_s", "joint_step_s", "joint_ratio", "kd_step_s", "kd_ratio",
            "teacher_forward_s", "teacher_forward_ratio", "joint_peak_mem_mb", "kd_peak_mem_mb"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                                       for c in cols) + " |")
    return "\n".join(lines)


def scaling_plot(rows, path: str) -> None:
    """PNG: step / plain ratio (left) and peak RSS (right) against the number of teachers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for size in sorted({r["px"] for r in rows}):
        rs = sorted((r for r in rows if r["px"] == size), key=lambda r: r["teachers"])
        n = [r["teachers"] for r in rs]
        ax1.plot(n, [r["joint_ratio"] for r in rs], "o-", label=f"joint-teacher step {size} px")
        ax1.plot(n, [r["kd_ratio"] for r in rs], "s-", label=f"KD step {size} px")
        ax1.plot(n, [1 + r["teacher_forward_ratio"] for r in rs], ":", label=f"plain + teacher fwd {size} px")
        ax2.plot(n, [r["joint_peak_mem_mb"] for r in rs], "o-", label=f"joint {size} px")
        ax2.plot(n, [r["kd_peak_mem_mb"] for r in rs], "s-", label=f"KD {size} px")
    ax1.set_xlabel("frozen teachers"), ax1.set_ylabel("step time / plain step")
    ax2.set_xlabel("frozen teachers"), ax2.set_ylabel("peak RSS (MB)")
    ax1.legend(fontsize=7), ax2.legend(fontsize=7)
    ax1.grid(alpha=0.3), ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _round(obj):
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    return obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=BENCHMARK_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detector", choices=sorted(DETECTOR_CONFIGS), default="faster_rcnn",
                   help="detector family; picks its MDKD config unless --config-file is given")
    p.add_argument("--config-file", default=None, help="default: the --detector's MDKD config")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--iters", type=int, default=8, help="timed rounds of the interleaved steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads of every group")
    p.add_argument("--workers", type=int, default=2, help="train loader workers")
    p.add_argument("--loader-seconds", type=float, default=8.0)
    p.add_argument("--groups", default=",".join(DEFAULT_GROUPS),
                   help="comma-separated subset of " + ",".join(GROUPS) + " (default: all but profile)")
    p.add_argument("--scaling", action="store_true",
                   help="only the scaling rows (teachers x px), each side in its own process")
    p.add_argument("--scaling-teachers", default=",".join(map(str, SCALING_TEACHERS)))
    p.add_argument("--scaling-sizes", default=",".join(map(str, SCALING_SIZES)))
    p.add_argument("--scaling-batch", type=int, default=2, help="images per step in the scaling rows")
    p.add_argument("--plot", default="", help="scaling PNG path (default: none)")
    p.add_argument("--raw", action="store_true", help="include every per-round time in the JSON")
    p.add_argument("--profile-top", type=int, default=15, help="operators listed per step by the profile group")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    a = p.parse_args(argv)
    args = {"config_file": a.config_file or DETECTOR_CONFIGS[a.detector], "opts": a.opts, "iters": a.iters,
            "warmup": a.warmup, "workers": a.workers, "loader_seconds": a.loader_seconds,
            "threads": a.threads, "scaling_batch": a.scaling_batch, "profile_top": a.profile_top}
    if a.scaling:
        rows, raw = [], {}
        for size in map(int, a.scaling_sizes.split(",")):
            for n in map(int, a.scaling_teachers.split(",")):
                row_args = {**args, "teachers": n, "size": size}
                j, k = _run_group("scaling_joint", row_args), _run_group("scaling_kd", row_args)
                rows.append(scaling_row(n, size, j, k))
                raw[f"{n}x{size}"] = {"joint": j, "kd": k}
                print(f"# scaling {n} teachers {size} px done", file=sys.stderr, flush=True)
        out = {"scaling": rows}
        if a.plot:
            scaling_plot(rows, a.plot)
            out["plot"] = a.plot
    else:
        raw = {g: _run_group(g, args) for g in a.groups.split(",") if g}
        out = summarize(raw)
    if a.raw:
        out["raw"] = raw
    out = _round(out)
    if a.json:
        print(json.dumps(out))
    elif a.scaling:
        print(scaling_table(out["scaling"]))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
