"""Config-driven training/evaluation glue (detectron2's ``engine/defaults.py`` counterpart).

- :func:`default_argument_parser` / :func:`default_setup`: the ``tools/train_net.py`` CLI.
- :func:`build_model`: ``MODEL.META_ARCHITECTURE`` from ``META_ARCH_REGISTRY``.
- :class:`DefaultTrainer`: builds model, optimizer, LR schedule, resumable loader, checkpointer
  and hooks from ``cfg``; ``trainer_class`` is the override point for mixins (KD).
- :func:`do_test`: the task's evaluation (detection: COCO + FROC) of every ``DATASETS.TEST`` name.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import sys
from typing import Dict, Optional

import numpy as np
import torch

from ..config import CfgNode, get_cfg
from ..config.validate import validate_config
from ..data.build import build_detection_train_loader, get_dataset_records
from ..modeling.build import build_model  # noqa: F401  (re-exported: engine.defaults.build_model)
from ..modeling.teacher_cache import log_cache_stats
from ..solver import build_lr_scheduler, build_optimizer
from ..tasks import get_task
from ..utils.errors import ConfigError
from ..utils import comm
from . import hooks
from .checkpointer import Checkpointer
from .events import JSONWriter, ProgressWriter, TensorboardWriter
from .launch import create_ddp_model
from .trainer import SimpleTrainer

logger = logging.getLogger("mdkd_det")


TRAIN_NET_EXAMPLES = """examples:
  # train one detector (a model-zoo config), then evaluate it on DATASETS.TEST
  tools/train_net.py --config-file configs/LungCT/faster_rcnn_R18_FPN_demo.yaml SOLVER.MAX_ITER 2000
  # the MDKD pipeline, every stage; or one stage
  tools/train_net.py --config-file configs/LungCT/mdkd_faster_rcnn_R18_demo.yaml
  tools/train_net.py --config-file configs/LungCT/mdkd_faster_rcnn_R18_demo.yaml --stage student
  # resume an interrupted run exactly
  tools/train_net.py --config-file CFG --resume
  # evaluate a checkpoint (or, with --resume instead of MODEL.WEIGHTS, OUTPUT_DIR's last one)
  tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/x/model_final.pth
  tools/train_net.py --config-file CFG --eval-only --coco-json ANN.json --coco-images DIR MODEL.WEIGHTS W
"""


def default_argument_parser(description: str = "mdkd_det training",
                            epilog: str = TRAIN_NET_EXAMPLES) -> argparse.ArgumentParser:
    """detectron2-compatible CLI: --config-file, --resume, --eval-only, --num-gpus,
    --num-machines, --machine-rank, --dist-url, trailing ``KEY VALUE`` overrides, plus
    --coco-json/--coco-images to evaluate/train on any COCO dataset given by path; ``--help``
    ends with ``epilog`` (examples)."""
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    p.add_argument("--resume", action="store_true",
                   help="resume from OUTPUT_DIR/last_checkpoint (model, optimizer, LR, iteration, RNG)")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate MODEL.WEIGHTS only (with --resume: OUTPUT_DIR's last checkpoint)")
    p.add_argument("--coco-json", default="", help="COCO annotation JSON to evaluate on")
    p.add_argument("--coco-images", default="", help="image folder of --coco-json")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="processes per machine (GPUs; on a CPU-only machine: CPU processes, gloo)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto",
                   help="init URL, e.g. tcp://host:port; 'auto' picks a free local port")
    p.add_argument("--trust-checkpoints", action="store_true",
                   help="allow checkpoints to unpickle arbitrary Python objects (can run code; only "
                        "for files you trust); sets MODEL.TRUST_CHECKPOINTS True")
    p.add_argument("--stage", action="append", default=[], metavar="STAGE",
                   help="pipeline configs: run only this stage (repeatable): multi_head, "
                        "dataset_specific, target_teacher, source_teachers, joint_teacher, student")
    p.add_argument("--rerun", action="append", default=[], metavar="STAGE",
                   help="pipeline configs: retrain this stage even if its checkpoint exists")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="pipeline configs: train the per-seed rows (dataset_specific, student) once "
                        "per seed, sharing the teacher chain; sets PIPELINE.SEEDS (with trailing KEY VALUE "
                        "overrides write the override PIPELINE.SEEDS \"(0, 1, 2)\" instead)")
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                   help="KEY VALUE config overrides, e.g. SOLVER.MAX_ITER 100")
    return p


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "dataset"


def coco_dataset_name(json_file: str, image_dir: str) -> str:
    """Catalog name for a COCO dataset given by path: ``coco:<json>:<image_dir>``."""
    return f"coco:{os.path.abspath(json_file)}:{os.path.abspath(image_dir)}"


def dataset_output_name(name: str) -> str:
    """Folder name under ``OUTPUT_DIR/inference/`` for dataset ``name`` (path-free)."""
    if name.startswith("coco:") and ".json:" in name:
        json_file, image_dir = name[5:].split(".json:", 1)
        return _safe_name(os.path.basename(os.path.normpath(image_dir)) or os.path.basename(json_file))
    return _safe_name(name)


def setup_cfg(args) -> CfgNode:
    """Defaults <- ``--config-file`` (with ``_BASE_``) <- ``KEY VALUE`` overrides; frozen.

    ``--coco-json``/``--coco-images`` set ``DATASETS.TEST`` to that dataset; ``--seeds`` sets
    ``PIPELINE.SEEDS``.

    Every numeric value is then checked against its domain and ``MODEL.DEVICE`` against the
    machine (:func:`~mdkd_det.config.validate.validate_config`), before anything is built.

    Raises:
        ConfigError: unknown key (naming key and file), missing file, only one of
            --coco-json/--coco-images, a value outside its domain (naming the key), or
            ``SOLVER.IMS_PER_BATCH`` not divisible by the number of processes.
    """
    cfg = get_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    if args.opts:
        cfg.merge_from_list(args.opts)
    if bool(args.coco_json) != bool(args.coco_images):
        raise ConfigError("--coco-json and --coco-images must be given together")
    if args.coco_json:
        for path in (args.coco_json, args.coco_images):
            if not os.path.exists(path):
                raise ConfigError(f"{path}: not found")
        cfg.DATASETS.TEST = (coco_dataset_name(args.coco_json, args.coco_images),)
    if getattr(args, "trust_checkpoints", False):
        cfg.MODEL.TRUST_CHECKPOINTS = True
    if getattr(args, "seeds", None):
        cfg.PIPELINE.SEEDS = tuple(int(s) for s in args.seeds)
    validate_config(cfg)
    world = int(getattr(args, "num_gpus", 1) or 1) * int(getattr(args, "num_machines", 1) or 1)
    if world > 1 and int(cfg.SOLVER.IMS_PER_BATCH) % world:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH = {cfg.SOLVER.IMS_PER_BATCH}: must be divisible by the "
                          f"{world} processes (--num-gpus x --num-machines)")
    cfg.freeze()
    return cfg


class _StdoutHandler(logging.StreamHandler):
    """A ``StreamHandler`` that writes to whatever ``sys.stdout`` is at emit time, so a
    replaced and closed stdout (pytest's capture, notebooks) is never written to."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__/setStream assign it; ignored
        pass


def default_setup(cfg: CfgNode, args=None) -> None:
    """Create ``OUTPUT_DIR``, set up logging, seed RNGs, save the merged config (rank 0).

    Logging: one stdout handler for the process, and (rank 0) one ``OUTPUT_DIR/log.txt`` file
    handler for the current run; a later call in the same process with another ``OUTPUT_DIR``
    moves the file handler there."""
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    rank = comm.get_rank()
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%m/%d %H:%M:%S")
    root = logging.getLogger()
    if not any(isinstance(h, _StdoutHandler) for h in root.handlers):
        h = _StdoutHandler()
        h.setFormatter(fmt)
        root.addHandler(h)
    log_file = os.path.abspath(os.path.join(cfg.OUTPUT_DIR, "log.txt"))
    for h in [h for h in root.handlers if getattr(h, "_mdkd", False)]:
        if h.baseFilename != log_file or rank != 0:
            root.removeHandler(h)
            h.close()
    if rank == 0 and not any(getattr(h, "_mdkd", False) for h in root.handlers):
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        fh._mdkd = True
        root.addHandler(fh)
    root.setLevel(level)
    seed_all_rng(int(cfg.SEED) + rank)
    if rank == 0:
        with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
            f.write(cfg.dump())
        if args is not None:
            logger.info("command line: %s", " ".join(sys.argv))


def seed_all_rng(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and CUDA) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def do_test(cfg: CfgNode, model: torch.nn.Module, output_dir: Optional[str] = None) -> Dict[str, dict]:
    """Evaluate ``model`` on every ``DATASETS.TEST`` dataset with the task's evaluation
    (:meth:`~mdkd_det.tasks.Task.evaluate`; detection: COCO bbox via faster-coco-eval + FROC),
    writing under ``<output_dir>/inference/<name>/``.

    Returns:
        ``{dataset_name: {result_key: {...}, ...}}`` (detection: ``{"bbox": {...}, "froc": {...}}``,
        AP in percent).

    Raises:
        ConfigError: a test dataset does not fit the model (e.g. class count).
    """
    output_dir = output_dir or cfg.OUTPUT_DIR
    task = get_task(cfg)
    results = {}
    for name in cfg.DATASETS.TEST:
        records = get_dataset_records(cfg, [name], cfg.DATASETS.TEST_LIMIT)
        task.check_dataset(cfg, name)
        out = os.path.join(output_dir, "inference", dataset_output_name(name))
        res = task.evaluate(cfg, model, name, records, out)
        results[name] = res
        if comm.is_main_process():
            logger.info("Evaluation on %s:\n%s", name, task.metrics_table(res))
    return results


class DefaultTrainer:
    """Train a detector from ``cfg`` with hooks (detectron2 ``DefaultTrainer`` counterpart).

    Subclass and override ``trainer_class`` (a :class:`SimpleTrainer` subclass, e.g. with a KD
    mixin), :meth:`build_model`, :meth:`build_optimizer` or :meth:`build_train_loader`.

    Construction seeds every RNG with ``SEED`` (+ rank) first, so two trainers built from one
    config start from identical weights.

    Resume contract: :meth:`resume_or_load` restores model/optimizer/scheduler/iteration/RNG and
    the train loader is built *after* it, at ``start_iter``, so the sample stream and seeded
    augmentations continue exactly where the interrupted run stopped.
    """

    trainer_class = SimpleTrainer

    def __init__(self, cfg: CfgNode, model: Optional[torch.nn.Module] = None) -> None:
        self.cfg = cfg
        # Same cfg -> same initial weights and sample stream, whatever ran before in this process.
        seed_all_rng(int(cfg.SEED) + comm.get_rank())
        self.model = model if model is not None else self.build_model(cfg)
        self.optimizer = self.build_optimizer(cfg, self.model)
        self.scheduler = build_lr_scheduler(cfg, self.optimizer)
        # CUDA AMP: the grad scaler is created before resume so its state is restored too.
        self.grad_scaler = (torch.amp.GradScaler("cuda") if cfg.SOLVER.AMP.ENABLED
                            and torch.device(cfg.MODEL.DEVICE).type == "cuda" else None)
        self.checkpointer = Checkpointer(self.model, cfg.OUTPUT_DIR, trust_checkpoints=cfg.MODEL.TRUST_CHECKPOINTS,
                                         **self.checkpointables())
        self.start_iter = 0
        self.max_iter = int(cfg.SOLVER.MAX_ITER)
        self.best_metric: Optional[float] = None
        self._trainer: Optional[SimpleTrainer] = None

    # --- builders (override points) -------------------------------------------------------
    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        """The detector to train (default :func:`build_model`)."""
        return build_model(cfg)

    def build_optimizer(self, cfg: CfgNode, model: torch.nn.Module):
        """Optimizer over the trainable parameters (override to add e.g. connectors)."""
        return build_optimizer(cfg, model)

    def checkpointables(self) -> dict:
        """Objects saved beside the model in every checkpoint (override to add more)."""
        extra = {"grad_scaler": self.grad_scaler} if self.grad_scaler is not None else {}
        return {"optimizer": self.optimizer, "scheduler": self.scheduler, **extra}

    def build_train_loader(self, start_iter: int):
        """Infinite train loader positioned at ``start_iter`` (resume-exact), with the task's
        mapper."""
        return build_detection_train_loader(self.cfg, start_iter=start_iter,
                                            mapper=get_task(self.cfg).build_mapper(self.cfg, is_train=True))

    def build_trainer(self, model, data_loader) -> SimpleTrainer:
        """``trainer_class`` with clipping (``SOLVER.CLIP_GRADIENTS``) and AMP (``SOLVER.AMP``)."""
        cfg = self.cfg
        clip = float(cfg.SOLVER.CLIP_GRADIENTS.MAX_NORM) if cfg.SOLVER.CLIP_GRADIENTS.ENABLED else None
        return self.trainer_class(model, data_loader, self.optimizer, grad_clip=clip,
                                  amp=bool(cfg.SOLVER.AMP.ENABLED), grad_scaler=self.grad_scaler)

    def test(self, model=None) -> Dict[str, dict]:
        """:func:`do_test` on ``model`` (default: the trained model)."""
        return do_test(self.cfg, model or self.model)

    # --- run ------------------------------------------------------------------------------
    def resume_or_load(self, resume: bool = True) -> int:
        """Load ``MODEL.WEIGHTS`` or, with ``resume``, the last checkpoint; return start_iter."""
        extra = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        self.start_iter = int(extra.get("iteration", -1)) + 1 if resume and "iteration" in extra else 0
        return self.start_iter

    def build_hooks(self) -> list:
        """Timer, LR schedule, checkpoints, evaluation (best by the task's metric, e.g. bbox/AP) and writers
        (metrics.json, TensorBoard, progress); the LR hook precedes the checkpointer."""
        cfg = self.cfg
        hs = [hooks.IterationTimer(), hooks.LRScheduler(self.scheduler)]
        if comm.is_main_process():
            hs.append(hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD,
                                                 max_iter=self.max_iter))

        def eval_fn():
            res = self.test(self.model)
            return {k: v for name, r in res.items() for k, v in r.items()} if len(res) == 1 else \
                {f"{name}/{k}": v for name, r in res.items() for k, v in r.items()}

        if cfg.DATASETS.TEST:
            hs.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, eval_fn, metric=get_task(cfg).best_metric,
                                     checkpointer=self.checkpointer if comm.is_main_process() else None,
                                     eval_at_start=cfg.TEST.EVAL_AT_START))
        if comm.is_main_process():
            writers = [JSONWriter(os.path.join(cfg.OUTPUT_DIR, "metrics.json")),
                       TensorboardWriter(cfg.OUTPUT_DIR), ProgressWriter(self.max_iter)]
            hs.append(hooks.PeriodicWriter(writers, period=int(cfg.LOG_PERIOD)))
        return hs

    def train(self) -> Dict[str, dict]:
        """Run ``start_iter .. SOLVER.MAX_ITER`` and return the last evaluation results."""
        model = create_ddp_model(self.model)
        loader = self.build_train_loader(self.start_iter)
        self._trainer = self.build_trainer(model, loader)
        self._trainer.register_hooks(self.build_hooks())
        self._trainer.train(self.start_iter, self.max_iter)
        log_cache_stats()  # FROZEN_TEACHER.CACHE_DIR hit rate, when a cache is in use
        return getattr(self._trainer, "last_eval_results", {}) or {}
