#!/usr/bin/env python
"""Magnitude of every registered KD term, unweighted (weight 1, cf = 1), on real training
batches: the numbers behind the "on" weights of docs/kd_terms.md (issue 15).

    python tools/kd_term_magnitudes.py --config-file /work/runs/cpu_s0/student/config.yaml \
        --batches 3 [KEY VALUE ...]

The config is a Stage-3 student config (``KD.TEACHER_CONFIG`` / ``KD.TEACHER_WEIGHTS`` name the
trained joint teacher); the student is built fresh (``build_model``: the start of Stage 3). Prints
one JSON line per batch and the mean (task losses included, for scale).
"""

import argparse
import json

import torch

from mdkd_det.config import get_cfg
from mdkd_det.data.build import build_detection_train_loader
from mdkd_det.distill.kd_terms import registered_terms
from mdkd_det.distill.taps import TapRecorder
from mdkd_det.distill.trainer import build_distiller, build_teacher
from mdkd_det.engine.defaults import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["DATALOADER.NUM_WORKERS", 0, "KD.CF.SCHEDULE", "constant", "KD.CF.MAX", 1.0] + args.opts)
    for _, term in registered_terms():
        cfg.KD[term.weight_key] = 1.0
    torch.manual_seed(int(cfg.SEED))
    student = build_model(cfg)
    d = build_distiller(cfg, student, build_teacher(cfg))
    loader = iter(build_detection_train_loader(cfg, start_iter=0))
    student.train()
    sums = {}
    for i in range(args.batches):
        batch = next(loader)
        with TapRecorder(student, d.adapter.student_taps()) as rec:
            task = student([x["image"] for x in batch], [x["target"] for x in batch])
        row = {k: float(v.detach()) for k, v in {**d(d.adapter.student_inputs(rec), d.teacher_inputs(rec), 0.0),
                                                  **task}.items()}
        print(i, json.dumps(row), flush=True)
        for k, v in row.items():
            sums[k] = sums.get(k, 0.0) + v / args.batches
    print("mean", json.dumps(sums))


if __name__ == "__main__":
    main()
