#!/usr/bin/env python
"""Magnitude of every registered KD term, unweighted (weight 1, cf = 1), on real training
batches, and the time of a KD step with extra terms: the numbers behind the "on" weights and
costs in docs/kd_terms.md (issue 15).

    python tools/kd_term_magnitudes.py --config-file /work/runs/cpu_s0/student/config.yaml \\
        --batches 3 [--time-rounds 5 --row "+KMM: KD.W_KMM 3.0" ...] [KEY VALUE ...]

The config is a Stage-3 student config (``KD.TEACHER_CONFIG`` / ``KD.TEACHER_WEIGHTS`` name the
trained joint teacher); the student is built fresh (``build_model``: the start of Stage 3).
Prints one JSON line per batch and the mean (task losses included, for scale). With
``--time-rounds``, each round times one KD step (student forward with taps, teacher, KD terms,
backward) with the config's own terms and then one per ``--row`` (``"<name>: KEY VALUE ..."``,
the PIPELINE.EXTRA_STUDENTS format) on the same batch, and prints the median per-round ratio
row / paper step (the machine is shared: only ratios of neighbouring steps are meaningful).
"""

import argparse
import json
import shlex
import statistics
import time

import torch

from mdkd_det.config import get_cfg
from mdkd_det.data.build import build_detection_train_loader
from mdkd_det.distill.kd_terms import registered_terms
from mdkd_det.distill.taps import TapRecorder
from mdkd_det.distill.trainer import build_distiller, build_teacher
from mdkd_det.engine.defaults import build_model
from mdkd_det.tasks import get_task


def _step(student, d, batch, backward=True):
    t0 = time.perf_counter()
    with TapRecorder(student, d.adapter.student_taps()) as rec:
        task = student([x["image"] for x in batch], [x["target"] for x in batch])
    kd = d(d.adapter.student_inputs(rec), d.teacher_inputs(rec), 0.0)
    if backward:
        (sum(task.values()) + sum(kd.values())).backward()
        student.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, task, kd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-rounds", type=int, default=0)
    p.add_argument("--row", action="append", default=[], help='"<name>: KEY VALUE ..." (timing)')
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["DATALOADER.NUM_WORKERS", 0, "KD.CF.SCHEDULE", "constant", "KD.CF.MAX", 1.0] + args.opts)
    torch.manual_seed(int(cfg.SEED))
    student, teacher = build_model(cfg), build_teacher(cfg)
    student.train()
    loader = iter(build_detection_train_loader(cfg, start_iter=0,
                                               mapper=get_task(cfg).build_mapper(cfg, is_train=True)))
    if args.batches:
        every = cfg.clone()
        for _, term in registered_terms():
            every.KD[term.weight_key] = 1.0
        d = build_distiller(every, student, teacher)
        sums = {}
        for i in range(args.batches):
            _, task, kd = _step(student, d, next(loader), backward=False)
            row = {k: float(v.detach()) for k, v in {**kd, **task}.items()}
            print(i, json.dumps(row), flush=True)
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + v / args.batches
        print("mean", json.dumps(sums), flush=True)
    if args.time_rounds:
        batch = next(loader)
        paper = build_distiller(cfg, student, teacher)
        rows = {}
        for entry in args.row:
            name, _, over = entry.partition(":")
            rcfg = cfg.clone()
            rcfg.merge_from_list(shlex.split(over))
            rows[name.strip()] = build_distiller(rcfg, student, teacher)
        _step(student, paper, batch)  # warm-up
        ratios = {n: [] for n in rows}
        for r in range(args.time_rounds):
            tp = _step(student, paper, batch)[0]
            for n, d in rows.items():
                ratios[n].append(_step(student, d, batch)[0] / tp)
            print("round", r, "paper s/step", round(tp, 3), {n: round(v[-1], 3) for n, v in ratios.items()}, flush=True)
        print("median step ratio to the paper's", json.dumps({n: round(statistics.median(v), 3) for n, v in ratios.items()}))


if __name__ == "__main__":
    main()
