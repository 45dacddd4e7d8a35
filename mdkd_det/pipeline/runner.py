"""The MDKD pipeline: baselines -> Stage 1 -> Stage 2 -> Stage 3 -> results table.

This is the only module that knows the paper's stage order (Algorithm 1; §3, §4.3, §6.2):

=================  =============================================================  ===========
stage              what                                                           trainer
=================  =============================================================  ===========
backbone_init      optional (``PIPELINE.ITERS.BACKBONE_INIT`` > 0; RF-DETR CPU         DefaultTrainer
                   protocol): a ``PIPELINE.BACKBONE_INIT_ARCH`` detector on the target
                   whose backbone initialises every non-fusion stage
                   (the family's ``backbone_init_key``, RF-DETR:
                   ``MODEL.RFDETR.BACKBONE_INIT``); not a table row
multi_head         shared backbone, one RPN+RoI head per dataset (C38)            MultiHeadTrainer
dataset_specific   student architecture on the target alone (C37)                 DefaultTrainer
target_teacher     teacher architecture on the target alone (C1, Eq. 8)           DefaultTrainer
source_teachers    one per source, paired batches + GRL discriminator (Eqs. 2-6)  DomainAdversarialTrainer
joint_teacher      FusionBackbone over the frozen teachers + new heads (§3.2)     DefaultTrainer
student            student distilled from the joint teacher (Eq. 24)              KDTrainer
=================  =============================================================  ===========

Each stage is an ordinary trainer run on a config delta, in ``OUTPUT_DIR/<stage>/`` (source
teachers in ``OUTPUT_DIR/source_teacher_<name>/``). A stage whose ``model_final.pth`` and
``stage_result.json`` exist is skipped (unless in ``PIPELINE.RERUN`` / ``--rerun``) only if the
:func:`stage_fingerprint` recorded in its ``stage_result.json`` equals the current one (same
iterations, schedule, data, seed, input checkpoints...) or differs only by config keys that did not
exist when it ran and now hold their default (:func:`same_stage`: an upgrade of mdkd_det that adds
an option does not retrain finished stages; a stage finished before fingerprints were recorded
is compared through its ``config.yaml``, :func:`legacy_record`); otherwise it is retrained from scratch
and the log names the keys that changed. A stage with only a ``last_checkpoint`` resumes exactly
if ``stage_progress.json`` (written when the stage starts) holds the same fingerprint, else it
restarts. Starting a stage afresh (also ``--rerun``) first removes its old results, so an
interrupted rerun is resumed or restarted, never taken as finished. A resumed stage's
``wall_time_s`` adds up every session (an interrupted session counts until the last file it
wrote). ``OUTPUT_DIR/results.json`` and ``results.md``
collect the target-evaluation rows (the task's ``row_metrics``, e.g. AP/AP50 in percent for
detection) and each stage's wall time.

Seeds (``PIPELINE.SEEDS`` / ``--seeds``): the teacher chain (``backbone_init``, ``multi_head``,
``target_teacher``, source teachers, ``joint_teacher``) is trained once with the first seed, in
the folders above; the :data:`PER_SEED_STAGES` (``dataset_specific``, ``student``) are trained
for every seed, the first in ``OUTPUT_DIR/<stage>/`` and seed ``s`` in
``OUTPUT_DIR/seed_<s>/<stage>/`` with ``SEED = s``, every student distilled from the shared joint
teacher. ``results.json`` adds per-seed values, mean ± SD and the student-minus-baseline
difference paired by seed with a paired-bootstrap 95% interval over the test images
(docs/statistics.md).

Extra student rows (``PIPELINE.EXTRA_STUDENTS``, issue 15): each ``"<row name>: KEY VALUE ..."``
is the student stage's config plus those overrides (:func:`parse_extra_students`,
:meth:`PipelineRunner.extra_student_cfg`), trained per seed like the student, from the same
joint teacher, in ``OUTPUT_DIR/[seed_<s>/]student_<slug>/``; it is fingerprinted, resumed and
skipped like every stage, covered by the schedule parity check, and reported as its own row with
its own paired difference to the dataset-specific row. A bad override is a ConfigError naming the
row, raised when the runner is built, before any stage trains.

Model selection: by default a row is the stage's final model. With ``PIPELINE.VAL_DATASET``
(e.g. the MSD lung hold-out ``msd_lung_val``) every evaluated stage validates on that dataset
every ``PIPELINE.VAL_PERIOD`` iterations, keeps ``model_best.pth`` by the task's primary metric
(:class:`~mdkd_det.engine.hooks.EvalHook`), and its row is that best model evaluated on
``DATASETS.TEST[0]``; later stages load the selected teachers (``model_best.pth``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shlex
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from ..config import CfgNode, get_cfg
from ..engine.checkpointer import atomic_write_text
from ..engine.defaults import DefaultTrainer, dataset_output_name
from ..modeling.build import backbone_init_key
from ..tasks import get_task
from ..tasks.base import row_values
from ..utils import comm
from ..utils.errors import ConfigError

logger = logging.getLogger("mdkd_det.pipeline")

STAGES = ("backbone_init", "multi_head", "dataset_specific", "target_teacher", "source_teachers", "joint_teacher", "student")
#: results.json row of each stage that produces one.
ROW_OF_STAGE = {"multi_head": "multi_head", "dataset_specific": "dataset_specific",
                "joint_teacher": "joint_teacher", "student": "student"}
ROW_TITLES = {"multi_head": "Multi-head", "dataset_specific": "Dataset-specific",
              "joint_teacher": "Joint teacher", "student": "Student"}
#: Stages trained once per seed of ``PIPELINE.SEEDS``; every other stage is the teacher chain,
#: trained once with the first seed and shared.
PER_SEED_STAGES = ("dataset_specific", "student")


class ExtraStudent(NamedTuple):
    """One ``PIPELINE.EXTRA_STUDENTS`` row: its ``title`` (the name given), ``key`` (results row
    and stage folder, ``student_<slug>``) and ``opts`` (``KEY VALUE`` overrides)."""

    title: str
    key: str
    opts: Tuple[str, ...]


def parse_extra_students(entries: Sequence[str]) -> List[ExtraStudent]:
    """Parse ``PIPELINE.EXTRA_STUDENTS`` entries ``"<row name>: KEY VALUE [KEY VALUE ...]"``
    (the overrides are ``shlex``-split, so a value with spaces is quoted). The slug is the name
    lower-cased with every run of other characters than ``[a-z0-9]`` turned into ``_``.

    Raises:
        ConfigError: no ``:``, an empty name or slug, no override or an odd count, an override
            of ``PIPELINE.*``/``OUTPUT_DIR``/``SEED`` (the runner sets them), two rows with one
            slug.
    """
    out: List[ExtraStudent] = []
    for entry in entries:
        title, sep, rest = str(entry).partition(":")
        title = title.strip()
        slug = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")
        where = f"PIPELINE.EXTRA_STUDENTS entry {str(entry)!r}"
        if not sep or not slug:
            raise ConfigError(f"{where}: must be '<row name>: KEY VALUE [KEY VALUE ...]'")
        try:
            opts = tuple(shlex.split(rest))
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if not opts or len(opts) % 2:
            raise ConfigError(f"{where}: needs KEY VALUE pairs, got {list(opts)}")
        fixed = [k for k in opts[::2] if k.startswith("PIPELINE.") or k in ("OUTPUT_DIR", "SEED")]
        if fixed:
            raise ConfigError(f"{where}: {fixed} are set by the pipeline for every row")
        key = f"student_{slug}"
        if any(r.key == key for r in out):
            raise ConfigError(f"{where}: another row has the folder name '{key}'")
        out.append(ExtraStudent(title, key, opts))
    return out


class PipelineRunner:
    """Run the MDKD stages for ``cfg`` (``PIPELINE.*``, ``DATASETS.TRAIN`` = target).

    Args:
        cfg: frozen pipeline config.
        stages: subset of :data:`STAGES` to run (default ``PIPELINE.STAGES``); stages not run
            but already finished still contribute their rows to the results.
        rerun: stages to retrain even when finished.

    Raises:
        ConfigError: unknown stage name, no sources for Stage 1, or a reuse flag that cannot be
            exact.
    """

    def __init__(self, cfg: CfgNode, stages: Optional[Sequence[str]] = None,
                 rerun: Sequence[str] = ()) -> None:
        self.cfg = cfg
        self.stages = list(stages or cfg.PIPELINE.STAGES)
        bad = [s for s in self.stages + list(rerun) + list(cfg.PIPELINE.RERUN) if s not in STAGES]
        if bad:
            raise ConfigError(f"unknown pipeline stage(s) {bad}; stages: {list(STAGES)}")
        self.rerun = set(rerun) | set(cfg.PIPELINE.RERUN)
        if not cfg.DATASETS.TEST:
            raise ConfigError("the pipeline evaluates on DATASETS.TEST; it is empty")
        self.target = list(cfg.DATASETS.TRAIN)
        self.eval_dataset = cfg.DATASETS.TEST[0]
        self.sources = list(cfg.PIPELINE.SOURCES)
        self.root = cfg.OUTPUT_DIR
        self.task = get_task(cfg)
        self.val_dataset = str(cfg.PIPELINE.VAL_DATASET)
        self.seeds = [int(x) for x in cfg.PIPELINE.SEEDS] or [int(cfg.SEED)]
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"PIPELINE.SEEDS {list(cfg.PIPELINE.SEEDS)} repeats a seed")
        self.wall: Dict[str, float] = {}
        self.rows: Dict[str, dict] = {}  # rows of the first seed (and the shared teacher rows)
        self.seed_rows: Dict[int, Dict[str, dict]] = {s: {} for s in self.seeds[1:]}
        self.extra_students = parse_extra_students(cfg.PIPELINE.EXTRA_STUDENTS)
        for row in self.extra_students:  # every override is checked before any stage trains
            for seed in self.seeds:
                self.extra_student_cfg(row, seed)

    # --- config deltas --------------------------------------------------------------------
    def _iters(self, key: str) -> int:
        return int(getattr(self.cfg.PIPELINE.ITERS, key)) or int(self.cfg.SOLVER.MAX_ITER)

    def stage_cfg(self, stage: str, source: Optional[str] = None, seed: Optional[int] = None) -> CfgNode:
        """The config of one stage: the pipeline config plus that stage's delta.

        ``seed`` (default: the first of :attr:`seeds`) sets ``SEED``; a seed other than the first
        is only allowed for :data:`PER_SEED_STAGES` and writes to ``OUTPUT_DIR/seed_<seed>/``.
        The first seed's config does not depend on the other seeds (``PIPELINE.SEEDS`` is
        cleared), so a single-seed run and the first seed of a multi-seed run are the same run.

        Raises:
            ConfigError: a non-first seed for a teacher-chain stage, or a bad stage delta.
        """
        seed = self.seeds[0] if seed is None else int(seed)
        if seed != self.seeds[0] and stage not in PER_SEED_STAGES:
            raise ConfigError(f"stage '{stage}' is trained once (first seed {self.seeds[0]}); "
                              f"only {list(PER_SEED_STAGES)} run per seed")
        c = self.cfg.clone()
        c.defrost()
        c.PIPELINE.ENABLED = False
        c.PIPELINE.SEEDS = ()
        c.SEED = seed
        c.DATASETS.TEST = (self.eval_dataset,)
        teacher_bb = c.PIPELINE.TEACHER_BACKBONE
        if self._backbone_init_iters() and stage != "backbone_init":  # the family says where (RF-DETR)
            _set_key(c, backbone_init_key(c.MODEL.META_ARCHITECTURE),
                     os.path.join(self.stage_dir("backbone_init"), "model_final.pth"))
        if stage == "backbone_init":
            c.MODEL.META_ARCHITECTURE = c.PIPELINE.BACKBONE_INIT_ARCH
            c.SOLVER.MAX_ITER = self._backbone_init_iters()
            c.DATASETS.TEST = ()  # not a table row: skip its evaluation
        elif stage == "multi_head":
            c.SOLVER.MAX_ITER = self._iters("MULTI_HEAD")
        elif stage == "dataset_specific":
            c.SOLVER.MAX_ITER = self._iters("DATASET_SPECIFIC")
        elif stage == "target_teacher":
            c.MODEL.BACKBONE.NAME = teacher_bb
            c.SOLVER.MAX_ITER = self._iters("TARGET_TEACHER")
        elif stage == "source_teacher":
            c.MODEL.BACKBONE.NAME = teacher_bb
            c.SOLVER.MAX_ITER = self._iters("SOURCE_TEACHER")
            c.ADVERSARIAL.ENABLED = True
            c.ADVERSARIAL.SOURCE = (source,)
            c.DATASETS.TEST = ()  # not a table row: skip its evaluation
        elif stage == "joint_teacher":
            c.SOLVER.MAX_ITER = self._iters("JOINT_TEACHER")
            if c.PIPELINE.JOINT_TEACHER_BASE_LR > 0:
                c.SOLVER.BASE_LR = c.PIPELINE.JOINT_TEACHER_BASE_LR
            c.MODEL.BACKBONE.NAME = "fusion"
            head_init = str(c.PIPELINE.JOINT_TEACHER_HEAD_INIT)
            if head_init == "target_teacher":  # every family: MODEL.HEAD_INIT (build_model)
                c.MODEL.HEAD_INIT = self.teacher_checkpoints()[0]
                if self.val_dataset:  # selection may keep the (= target teacher) start
                    c.TEST.EVAL_AT_START = True
            elif head_init != "scratch":
                raise ConfigError(f"PIPELINE.JOINT_TEACHER_HEAD_INIT '{head_init}': 'scratch' or 'target_teacher'")
            c.FUSION.TEACHERS = tuple(self.teacher_checkpoints())
            c.FUSION.TEACHER_BACKBONES = tuple([teacher_bb] * len(c.FUSION.TEACHERS))
        elif stage == "student":
            c.SOLVER.MAX_ITER = self._iters("STUDENT")
            c.KD.ENABLED = True
            c.KD.TEACHER_CONFIG = os.path.join(self.stage_dir("joint_teacher"), "config.yaml")
            c.KD.TEACHER_WEIGHTS = self.selected_checkpoint(self.stage_dir("joint_teacher"))
        else:
            raise ConfigError(f"unknown stage '{stage}'")
        if self.val_dataset and stage != "source_teacher":  # validate, keep model_best.pth
            c.DATASETS.TEST = (self.val_dataset,)
            c.TEST.EVAL_PERIOD = int(c.PIPELINE.VAL_PERIOD) or int(c.TEST.EVAL_PERIOD)
        self.task.configure_stage(c, stage, source)
        c.SOLVER.CHECKPOINT_PERIOD = min(int(c.SOLVER.CHECKPOINT_PERIOD), int(c.SOLVER.MAX_ITER))
        c.OUTPUT_DIR = self.stage_dir(stage, source, seed)
        c.freeze()
        return c

    def extra_student_cfg(self, row: ExtraStudent, seed: Optional[int] = None) -> CfgNode:
        """The config of an extra student row: the student stage's config (:meth:`stage_cfg`)
        plus ``row.opts``, validated (:func:`~mdkd_det.config.validate.validate_config`, the
        ``KD.UNLABELED`` checks), in ``OUTPUT_DIR/[seed_<s>/]<row.key>/``.

        Raises:
            ConfigError: unknown key or bad value, naming the row.
        """
        from ..config.validate import validate_config
        from ..distill.unlabeled import check_unlabeled_config

        c = self.stage_cfg("student", seed=seed)
        c.defrost()
        try:
            c.merge_from_list(list(row.opts))
            validate_config(c)
            check_unlabeled_config(c)
        except ConfigError as e:
            raise ConfigError(f"PIPELINE.EXTRA_STUDENTS row '{row.title}': {e}") from None
        c.SOLVER.CHECKPOINT_PERIOD = min(int(c.SOLVER.CHECKPOINT_PERIOD), int(c.SOLVER.MAX_ITER))
        c.OUTPUT_DIR = self.stage_dir(row.key, seed=seed)
        c.freeze()
        return c

    def _backbone_init_iters(self) -> int:
        """``PIPELINE.ITERS.BACKBONE_INIT``.

        Raises:
            ConfigError: > 0 while ``PIPELINE.BACKBONE_INIT_ARCH`` equals ``MODEL.META_ARCHITECTURE``
                or while that family takes no backbone initialisation
                (:func:`~mdkd_det.modeling.build.backbone_init_key`).
        """
        n = int(self.cfg.PIPELINE.ITERS.BACKBONE_INIT)
        arch = self.cfg.MODEL.META_ARCHITECTURE
        if n and self.cfg.PIPELINE.BACKBONE_INIT_ARCH == arch:
            raise ConfigError("PIPELINE.ITERS.BACKBONE_INIT > 0 trains a PIPELINE.BACKBONE_INIT_ARCH "
                              "detector to initialise another family's backbone; it equals "
                              f"MODEL.META_ARCHITECTURE ('{arch}')")
        if n and not backbone_init_key(arch):
            raise ConfigError(f"PIPELINE.ITERS.BACKBONE_INIT > 0: MODEL.META_ARCHITECTURE '{arch}' takes no "
                              "backbone initialisation (its builder declares no backbone_init_key)")
        return n

    def stage_dir(self, stage: str, source: Optional[str] = None, seed: Optional[int] = None) -> str:
        """``OUTPUT_DIR/<stage>`` (``source_teacher_<dataset>`` for a source teacher);
        ``OUTPUT_DIR/seed_<seed>/<stage>`` for a seed other than the first."""
        name = f"source_teacher_{dataset_output_name(source)}" if stage == "source_teacher" else stage
        if seed is not None and int(seed) != self.seeds[0]:
            return os.path.join(self.root, f"seed_{int(seed)}", name)
        return os.path.join(self.root, name)

    def teacher_checkpoints(self) -> List[str]:
        """Stage-1 checkpoints, target teacher first (the query of cross-attention fusion)."""
        paths = [self.selected_checkpoint(self.stage_dir("target_teacher"))]
        paths += [os.path.join(self.stage_dir("source_teacher", s), "model_final.pth") for s in self.sources]
        return paths

    def selected_checkpoint(self, out_dir: str) -> str:
        """``out_dir/model_best.pth`` when validating (``PIPELINE.VAL_DATASET``) and it exists,
        else ``out_dir/model_final.pth``."""
        best = os.path.join(out_dir, "model_best.pth")
        return best if self.val_dataset and os.path.isfile(best) else os.path.join(out_dir, "model_final.pth")

    # --- schedule parity (A18) -----------------------------------------------------------
    def schedules(self) -> Dict[str, dict]:
        """``{stage: {"iters", "target_images", "lr"}}`` of every trained stage but
        ``backbone_init`` (an initialisation, not a compared model): iterations, target images
        seen (iterations x target images per step) and the LR schedule
        ``optimizer base_lr scheduler [steps x gamma] warmup``.

        Target images per step: ``SOLVER.IMS_PER_BATCH`` for the single-dataset stages and for
        the multi-head baseline (its round-robin loader draws ``SOLVER.IMS_PER_BATCH`` images of
        *every* dataset per step, so with equal iterations it sees as many target images as the
        dataset-specific baseline, plus the sources'); ``ADVERSARIAL.TARGET_IMS_PER_BATCH``
        (unlabelled, for the discriminator) for a source teacher."""
        out: Dict[str, dict] = {}
        stages = [("multi_head", None), ("dataset_specific", None), ("target_teacher", None)]
        stages += [("source_teacher", src) for src in self.sources]
        stages += [("joint_teacher", None), ("student", None)]
        reuse = bool(self.cfg.PIPELINE.REUSE_TARGET_TEACHER_AS_BASELINE)
        for stage, src in stages:
            if stage == "multi_head" and stage not in self.cfg.PIPELINE.STAGES:
                continue
            if stage == "source_teacher" and "source_teachers" not in self.cfg.PIPELINE.STAGES:
                continue
            if stage == "dataset_specific" and reuse:
                continue  # it is the target teacher's run (A24)
            c = self.stage_cfg(stage, src)
            so = c.SOLVER
            lr = _lr_text(so)
            per_step = int(c.ADVERSARIAL.TARGET_IMS_PER_BATCH) if stage == "source_teacher" \
                else int(so.IMS_PER_BATCH)
            name = f"source_teacher_{dataset_output_name(src)}" if src else stage
            out[name] = {"iters": int(so.MAX_ITER), "target_images": int(so.MAX_ITER) * per_step, "lr": lr}
        for row in self.extra_students:  # labelled target images per step, as the student
            so = self.extra_student_cfg(row).SOLVER
            out[row.key] = {"iters": int(so.MAX_ITER), "target_images": int(so.MAX_ITER) * int(so.IMS_PER_BATCH),
                            "lr": _lr_text(so)}
        return out

    def check_schedule_parity(self) -> Optional[str]:
        """Warn (one ``logger.warning`` naming every stage's iterations, target images and LR
        schedule) when the baseline(s), teachers and student are not trained alike: different
        iteration counts, LR schedules, or target images between the multi-head and the
        dataset-specific baseline (paper_notes A18). ``PIPELINE.ALLOW_UNEQUAL_SCHEDULES``
        silences it. Returns the message (None when equal or allowed)."""
        if self.cfg.PIPELINE.ALLOW_UNEQUAL_SCHEDULES:
            return None
        sched = self.schedules()
        differ = []
        if len({(v["iters"], v["lr"]) for v in sched.values()}) > 1:
            differ.append("iterations / LR schedules")
        base = [sched[k]["target_images"] for k in ("multi_head", "dataset_specific", "target_teacher")
                if k in sched and (k != "target_teacher" or "dataset_specific" not in sched)]
        if len(set(base)) > 1:
            differ.append("target images of the multi-head and dataset-specific baselines")
        if not differ:
            return None
        msg = ("[pipeline] schedule parity (A18): the stages differ in " + " and ".join(differ) + ": "
               + "; ".join(f"{k} {v['iters']} it, {v['target_images']} target images, lr {v['lr']}"
                           for k, v in sched.items())
               + ". Rows trained for different lengths are not comparable; set "
                 "PIPELINE.ALLOW_UNEQUAL_SCHEDULES True to run anyway without this warning.")
        logger.warning(msg)
        return msg

    # --- running --------------------------------------------------------------------------
    def _done(self, out_dir: str) -> bool:
        return (os.path.isfile(os.path.join(out_dir, "model_final.pth"))
                and os.path.isfile(os.path.join(out_dir, "stage_result.json")))

    def _run_one(self, name: str, cfg: CfgNode, make_trainer, checkpoint: str = "model_final.pth",
                 after_train=None) -> dict:
        """Train (or skip/resume) one stage and evaluate it on the target; returns its result."""
        out = cfg.OUTPUT_DIR
        result_file = os.path.join(out, "stage_result.json")
        progress_file = os.path.join(out, "stage_progress.json")
        fingerprint, fp_config = stage_fingerprint(cfg)
        stage = name.rsplit("/", 1)[-1]  # "seed_<s>/student" -> "student"
        rerun = (stage in self.rerun or (stage.startswith("source_teacher") and "source_teachers" in self.rerun)
                 or (stage.startswith("student_") and "student" in self.rerun))  # extra student rows
        if self._done(out) and not rerun:
            res = _read_json(result_file)
            if same_stage(res if "config" in res else legacy_record(out), fingerprint, fp_config):
                logger.info("[pipeline] %s: finished earlier (%s); skipped", name, out)
                return res
            logger.info("[pipeline] %s: finished earlier with another config (%s); retraining",
                        name, _config_changes(res.get("config"), fp_config))
        progress = _read_json(progress_file)
        resume = (not rerun and not self._done(out) and os.path.isfile(os.path.join(out, "last_checkpoint"))
                  and same_stage(progress, fingerprint, fp_config))
        prior_wall = 0.0
        if resume:  # earlier sessions: each counts until the last file it wrote
            prior_wall = float(progress.get("wall_time_s", 0.0)) + max(
                0.0, _last_write(out) - float(progress.get("session_start", time.time())))
        else:
            if os.path.isfile(os.path.join(out, "last_checkpoint")) and not rerun and not self._done(out):
                logger.info("[pipeline] %s: interrupted run had another config (%s); restarting", name,
                            _config_changes(progress.get("config"), fp_config))
            if comm.is_main_process():
                _clear_stage(out)
        comm.synchronize()
        os.makedirs(out, exist_ok=True)
        if comm.is_main_process():
            with open(os.path.join(out, "config.yaml"), "w") as f:
                f.write(cfg.dump())
            atomic_write_text(progress_file, json.dumps({
                "fingerprint": fingerprint, "wall_time_s": prior_wall, "session_start": time.time(),
                "config": fp_config}, indent=1))
        logger.info("[pipeline] %s: training %d iterations -> %s%s", name, cfg.SOLVER.MAX_ITER,
                    out, " (resuming)" if resume else "")
        t0 = time.perf_counter()
        trainer = make_trainer(cfg)
        trainer.resume_or_load(resume=resume)
        results = trainer.train()
        key = self.task.result_key
        selected = self._load_best(trainer, out) if self.val_dataset and cfg.DATASETS.TEST else None
        if after_train is not None:
            after_train(trainer)
        if self.val_dataset and cfg.DATASETS.TEST:  # the selected model on the report dataset
            metrics = self._test_on(trainer, cfg, self.eval_dataset)[key]
            if selected and checkpoint == "model_final.pth":
                checkpoint = "model_best.pth"
        else:
            metrics = results.get(key) if results else None
            if not metrics and cfg.DATASETS.TEST:  # no eval hook ran (resumed at the end): evaluate
                metrics = trainer.test()[self.eval_dataset][key]
        wall = prior_wall + time.perf_counter() - t0
        res = {**row_values(self.task, metrics),
               "checkpoint": os.path.abspath(os.path.join(out, checkpoint)), "wall_time_s": wall,
               "fingerprint": fingerprint, "config": fp_config}
        if selected:
            res["selected_by"] = selected
        if comm.is_main_process():
            atomic_write_text(result_file, json.dumps(res, indent=2))
        return res

    def _load_best(self, trainer, out: str) -> Optional[dict]:
        """Load ``out/model_best.pth`` (model weights only) into the trained model; return
        ``{"dataset", "metric", "value", "iteration"}`` of the selection, or None if absent."""
        from ..engine.checkpointer import Checkpointer, unwrap_model

        best, side = os.path.join(out, "model_best.pth"), os.path.join(out, "model_best.json")
        if not os.path.isfile(best):
            logger.warning("[pipeline] %s: no model_best.pth (validation metric missing); "
                           "reporting the final model", out)
            return None
        Checkpointer(unwrap_model(trainer.model), out,
                     trust_checkpoints=self.cfg.MODEL.TRUST_CHECKPOINTS).load(best, checkpointables=[])
        info = {}
        if os.path.isfile(side):
            with open(side) as f:
                info = json.load(f)
        return {"dataset": self.val_dataset, **info}

    @staticmethod
    def _test_on(trainer, cfg: CfgNode, dataset: str) -> dict:
        """``trainer.test()`` on ``dataset`` alone (the trainer's own test, e.g. the multi-head
        target head), returning that dataset's result."""
        tcfg = cfg.clone()
        tcfg.defrost()
        tcfg.DATASETS.TEST = (dataset,)
        tcfg.freeze()
        saved, trainer.cfg = trainer.cfg, tcfg
        try:
            return trainer.test()[dataset]
        finally:
            trainer.cfg = saved

    def run(self) -> dict:
        """Run the selected stages in order and write ``results.json`` / ``results.md``."""
        from ..distill.trainer import KDTrainer
        from ..engine.adversarial import DomainAdversarialTrainer
        from ..engine.multi_head import MultiHeadTrainer

        os.makedirs(self.root, exist_ok=True)
        cfg = self.cfg
        self.check_schedule_parity()
        for stage in STAGES:
            if stage == "backbone_init":
                if self._backbone_init_iters():
                    scfg = self.stage_cfg(stage)
                    if stage in self.stages:
                        self.wall[stage] = self._run_one(stage, scfg, DefaultTrainer)["wall_time_s"]
                    else:
                        self._collect(stage, scfg)
                continue
            if stage == "source_teachers":
                if stage in self.stages and not self.sources:
                    raise ConfigError("source_teachers needs PIPELINE.SOURCES")
                for src in self.sources:
                    key = f"source_teacher_{dataset_output_name(src)}"
                    scfg = self.stage_cfg("source_teacher", src)
                    if stage in self.stages:
                        self.wall[key] = self._run_one(key, scfg, DomainAdversarialTrainer)["wall_time_s"]
                    else:
                        self._collect(key, scfg)
                continue
            scfg = self.stage_cfg(stage)
            if stage not in self.stages:
                self._collect(stage, scfg)
                continue
            if stage == "dataset_specific" and cfg.PIPELINE.REUSE_TARGET_TEACHER_AS_BASELINE:
                self._check_reuse()
                continue  # filled from the target teacher below
            if stage == "multi_head":
                names = self.target + self.sources
                head_ckpt = os.path.join(scfg.OUTPUT_DIR, "model_target_head.pth")
                res = self._run_one(stage, scfg, lambda c: MultiHeadTrainer(c, names),
                                    checkpoint="model_target_head.pth",
                                    after_train=lambda t: t.export_head(names[0], head_ckpt))
            elif stage == "student":
                res = self._run_one(stage, scfg, KDTrainer, checkpoint="model_student.pth",
                                    after_train=self._export_student if self.val_dataset else None)
            else:
                res = self._run_one(stage, scfg, DefaultTrainer)
            self.wall[stage] = res["wall_time_s"]
            if stage in ROW_OF_STAGE:
                self.rows[ROW_OF_STAGE[stage]] = res
            if stage == "target_teacher" and cfg.PIPELINE.REUSE_TARGET_TEACHER_AS_BASELINE:
                self.rows["dataset_specific"] = dict(res, reused_from="target_teacher")
        for row in self.extra_students:
            self._run_extra(row, KDTrainer, self.seeds[0], self.rows)
        for seed in self.seeds[1:]:
            self._run_seed(seed, KDTrainer)
        return self.write_results()

    def _run_extra(self, row: ExtraStudent, kd_trainer, seed: int, rows: Dict[str, dict]) -> None:
        """Train (with ``student`` among the run stages) or collect the extra student ``row`` of
        ``seed`` into ``rows[row.key]``."""
        scfg = self.extra_student_cfg(row, seed)
        name = row.key if seed == self.seeds[0] else f"seed_{seed}/{row.key}"
        if "student" not in self.stages:
            res = _read_json(os.path.join(scfg.OUTPUT_DIR, "stage_result.json"))
            if res:
                rows.setdefault(row.key, res)
                self.wall.setdefault(name, res.get("wall_time_s", float("nan")))
            return
        res = self._run_one(name, scfg, kd_trainer, checkpoint="model_student.pth",
                            after_train=self._export_student if self.val_dataset else None)
        rows[row.key] = res
        self.wall[name] = res["wall_time_s"]

    def _run_seed(self, seed: int, kd_trainer) -> None:
        """Train (or collect) the :data:`PER_SEED_STAGES` of a non-first ``seed`` in
        ``OUTPUT_DIR/seed_<seed>/``; the student distils from the shared joint teacher. With
        ``PIPELINE.REUSE_TARGET_TEACHER_AS_BASELINE`` the dataset-specific run of this seed is
        trained here (it is the target teacher's run with this seed)."""
        rows = self.seed_rows[seed]
        for stage in PER_SEED_STAGES:
            scfg = self.stage_cfg(stage, seed=seed)
            name = f"seed_{seed}/{stage}"
            if stage not in self.stages:
                f = os.path.join(scfg.OUTPUT_DIR, "stage_result.json")
                if os.path.isfile(f):
                    with open(f) as fh:
                        rows[stage] = json.load(fh)
                    self.wall.setdefault(name, rows[stage].get("wall_time_s", float("nan")))
                continue
            if stage == "dataset_specific" and self.cfg.PIPELINE.REUSE_TARGET_TEACHER_AS_BASELINE:
                self._check_reuse()
            if stage == "student":
                res = self._run_one(name, scfg, kd_trainer, checkpoint="model_student.pth",
                                    after_train=self._export_student if self.val_dataset else None)
            else:
                res = self._run_one(name, scfg, DefaultTrainer)
            rows[stage] = res
            self.wall[name] = res["wall_time_s"]
        for row in self.extra_students:
            self._run_extra(row, kd_trainer, seed, rows)

    @staticmethod
    def _export_student(trainer) -> None:
        """Re-export ``model_student.pth`` from the selected (best-on-validation) student."""
        from ..engine.checkpointer import export_model

        export_model(trainer.model, os.path.join(trainer.cfg.OUTPUT_DIR, "model_student.pth"))

    def _collect(self, stage: str, scfg: CfgNode) -> None:
        """Pick up the row of a stage finished in an earlier run (not run now)."""
        f = os.path.join(scfg.OUTPUT_DIR, "stage_result.json")
        if os.path.isfile(f):
            with open(f) as fh:
                res = json.load(fh)
            self.wall.setdefault(stage, res.get("wall_time_s", float("nan")))
            if stage in ROW_OF_STAGE:
                self.rows.setdefault(ROW_OF_STAGE[stage], res)
            if stage == "target_teacher" and self.cfg.PIPELINE.REUSE_TARGET_TEACHER_AS_BASELINE:
                self.rows.setdefault("dataset_specific", dict(res, reused_from="target_teacher"))

    def _check_reuse(self) -> None:
        c = self.cfg
        if c.PIPELINE.TEACHER_BACKBONE != c.MODEL.BACKBONE.NAME or \
                self._iters("TARGET_TEACHER") != self._iters("DATASET_SPECIFIC"):
            raise ConfigError(
                "PIPELINE.REUSE_TARGET_TEACHER_AS_BASELINE needs PIPELINE.TEACHER_BACKBONE == "
                "MODEL.BACKBONE.NAME and equal PIPELINE.ITERS.TARGET_TEACHER / DATASET_SPECIFIC "
                "(then the two runs are the same run)"
            )

    # --- results --------------------------------------------------------------------------
    def write_results(self) -> dict:
        """Write ``results.json`` and ``results.md``; return the dict.

        Schema: ``target``, ``eval_dataset``, ``task``, ``metrics``; ``rows`` (the first seed's
        row values, as in a single-seed run); ``seeds``; ``per_seed`` ``{row: {seed: {metric:
        value}}}`` (teacher-chain rows have the first seed only; detection rows add the FROC
        ``CPM`` of their evaluation, per scan with ``TEST.FROC_PER_SCAN``); ``summary`` ``{row: {metric:
        {"mean", "sd", "n"}}}`` (sample SD, None for n < 2); ``paired`` (see
        :meth:`paired_difference`); ``wall_time_s``.
        """
        metrics = list(self.task.row_metrics)
        per_seed: Dict[str, Dict[str, dict]] = {}
        for seed in self.seeds:
            rows = self.rows if seed == self.seeds[0] else self.seed_rows.get(seed, {})
            for key, v in rows.items():
                per_seed.setdefault(key, {})[str(seed)] = {**{m: _num(v.get(m)) for m in metrics},
                                                          **self._froc_cpm(v)}
        results = {
            "target": "+".join(self.target),
            "eval_dataset": self.eval_dataset,
            "task": self.task.name,
            "metrics": metrics,
            "rows": {k: {**{m: _num(v.get(m)) for m in metrics},
                         "checkpoint": v.get("checkpoint"),
                         **({"reused_from": v["reused_from"]} if v.get("reused_from") else {}),
                         **({"selected_by": v["selected_by"]} if v.get("selected_by") else {})}
                     for k, v in self.rows.items()},
            "seeds": list(self.seeds),
            "per_seed": per_seed,
            "summary": {k: {m: _mean_sd([r.get(m) for r in by_seed.values()])
                            for m in metrics + (["CPM"] if any("CPM" in r for r in by_seed.values()) else [])}
                        for k, by_seed in per_seed.items()},
            "paired": self.paired_difference(),
            "wall_time_s": {k: round(float(v), 1) for k, v in self.wall.items()},
        }
        if comm.is_main_process():
            atomic_write_text(os.path.join(self.root, "results.json"), json.dumps(results, indent=2))
            md = self.results_markdown(results)
            atomic_write_text(os.path.join(self.root, "results.md"), md)
            logger.info("MDKD results (%s):\n%s", self.eval_dataset, md)
        return results

    def _froc_cpm(self, row: dict) -> dict:
        """``{"CPM": value}`` of a detection row's model (the FROC CPM, a fraction; per scan with
        ``TEST.FROC_PER_SCAN``) from the ``metrics.json`` beside its predictions, else ``{}``."""
        f = os.path.join(os.path.dirname(self.predictions_file(row)), "metrics.json")
        if self.task.result_key != "bbox" or not os.path.isfile(f):
            return {}
        with open(f) as fh:
            cpm = (json.load(fh).get("froc") or {}).get("CPM")
        return {"CPM": _num(cpm, 4)}

    def predictions_file(self, row: dict) -> str:
        """``coco_instances_results.json`` of a row's model on the report dataset:
        ``<dir of its checkpoint>/inference/<eval dataset>/`` (written by its evaluation)."""
        return os.path.join(os.path.dirname(row.get("checkpoint") or ""), "inference",
                            dataset_output_name(self.eval_dataset), "coco_instances_results.json")

    def paired_difference(self) -> dict:
        """``{"<student row>_minus_dataset_specific": {metric: {"per_seed", "mean", "ci95",
        "significant", "method", "seeds", "num_images", ...}}}`` for the student row and every
        ``PIPELINE.EXTRA_STUDENTS`` row (``student_<slug>_minus_dataset_specific``): the
        row-minus-baseline difference paired by seed, with a paired-bootstrap 95% interval over
        the test images (:func:`~mdkd_det.evaluation.paired_bootstrap.paired_bootstrap`,
        ``PIPELINE.BOOTSTRAP_RESAMPLES`` / ``BOOTSTRAP_SEED``). A row is absent when the task has
        no COCO metrics, ``BOOTSTRAP_RESAMPLES`` is 0, or no seed has both models' predictions."""
        out = {}
        for key in ["student"] + [r.key for r in self.extra_students]:
            d = self._paired_with_baseline(key)
            if d:
                out[f"{key}_minus_dataset_specific"] = d
        return out

    def _paired_with_baseline(self, key: str) -> dict:
        """:meth:`paired_difference` of the row ``key`` against ``dataset_specific``."""
        from ..evaluation import to_json_safe
        from ..evaluation.paired_bootstrap import METRICS, paired_bootstrap

        metrics = list(self.task.row_metrics)
        n_boot = int(self.cfg.PIPELINE.BOOTSTRAP_RESAMPLES)
        if n_boot <= 0 or self.task.result_key != "bbox" or any(m not in METRICS for m in metrics):
            return {}
        pairs, seeds = [], []
        for seed in self.seeds:
            rows = self.rows if seed == self.seeds[0] else self.seed_rows.get(seed, {})
            if "dataset_specific" not in rows or key not in rows:
                continue
            files = [self.predictions_file(rows[k]) for k in ("dataset_specific", key)]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                logger.warning("[pipeline] seed %d: no predictions %s; left out of the paired difference",
                               seed, missing)
                continue
            loaded = []
            for f in files:
                with open(f) as fh:
                    loaded.append(json.load(fh))
            pairs.append(tuple(loaded))
            seeds.append(seed)
        if not pairs:
            return {}
        gt = self._eval_ground_truth()
        t0 = time.perf_counter()
        out = paired_bootstrap(gt, pairs, metrics, num_resamples=n_boot,
                               seed=int(self.cfg.PIPELINE.BOOTSTRAP_SEED))
        logger.info("[pipeline] paired bootstrap (%d seeds, %d images, %d resamples): %.1f s",
                    len(pairs), len(gt["images"]), n_boot, time.perf_counter() - t0)
        for v in out.values():
            v.update(seeds=seeds, num_images=len(gt["images"]))
        return to_json_safe(out)

    def _eval_ground_truth(self) -> dict:
        """COCO ground truth of the report dataset, with the image/category ids the saved
        predictions use (the evaluator's own)."""
        from ..data.build import get_dataset_records
        from ..data.catalog import MetadataCatalog
        from ..evaluation import COCOEvaluator

        c = self.stage_cfg("dataset_specific")
        records = get_dataset_records(c, [self.eval_dataset], c.DATASETS.TEST_LIMIT)
        return COCOEvaluator(self.eval_dataset, records, MetadataCatalog.get(self.eval_dataset)).gt_dict

    def results_markdown(self, results: dict) -> str:
        """The paper-table-style markdown of ``results``: one column per task metric (mean ± SD
        over seeds), the number of seeds, the paper's numbers beside ours when the task knows them
        (:meth:`Task.paper_reference`), the FROC CPM when the rows have one, and the paired
        student-minus-baseline difference with its interval; an interval that contains 0 reads
        "no significant difference"."""
        metrics = list(self.task.row_metrics)
        caption, paper = self.task.paper_reference(self.cfg, self.target[0])
        titles = [self.task.metric_titles.get(m, m) for m in metrics]
        if any("CPM" in v for v in results["summary"].values()):  # detection: FROC CPM (fraction)
            metrics.append("CPM")
            titles.append("CPM per " + ("scan" if self.cfg.TEST.FROC_PER_SCAN else "image"))
        head = "| Model | " + " | ".join(titles) + " | seeds |"
        sep = "|---|" + "---|" * len(metrics) + "---|"
        if paper:
            head += f" {caption} |"
            sep += "---|"
        lines = [f"Target {results['target']}, evaluated on {results['eval_dataset']} "
                 f"({self.task.name}, {self.cfg.MODEL.META_ARCHITECTURE}); mean ± SD over seeds "
                 f"{', '.join(str(s) for s in results['seeds'])}", "", head, sep]
        titles_of = dict(ROW_TITLES, **{r.key: _extra_title(r) for r in self.extra_students})
        for key in ("multi_head", "dataset_specific", "joint_teacher", "student",
                    *[r.key for r in self.extra_students]):
            row = results["rows"].get(key) or {}
            summ = results["summary"].get(key) or {}
            vals = [_fmt_mean_sd(summ.get(m), 4 if m == "CPM" else 2) for m in metrics]
            n = max((summ[m]["n"] for m in metrics if m in summ), default=0)
            title = titles_of[key] + (" (= target teacher, A24)" if row.get("reused_from") else "")
            line = f"| {title} | " + " | ".join(vals) + f" | {n} |"
            if paper:
                line += " " + (" / ".join(f"{v:.2f}" for v in paper[key]) if key in paper else "n/a") + " |"
            lines.append(line)
        if len(results["seeds"]) > 1:
            lines += ["", f"The teacher chain (multi-head, target/source teachers, joint teacher) is trained "
                          f"once with seed {results['seeds'][0]} and shared; every student distils from "
                          "that joint teacher."]
        if self.val_dataset:
            lines += ["", f"Each row: the checkpoint with the best {self.task.best_metric} on "
                          f"{self.val_dataset} (PIPELINE.VAL_DATASET), evaluated on {results['eval_dataset']}."]
        for key in ("student", *[r.key for r in self.extra_students]):
            paired = results["paired"].get(f"{key}_minus_dataset_specific")
            if not paired:
                continue
            first = next(iter(paired.values()))
            lines += ["", f"{titles_of[key]} − dataset-specific, paired by seed (seeds "
                          f"{', '.join(str(s) for s in first['seeds'])}); 95% interval: {first['method']} "
                          f"({first['num_images']} images, the same resample for both models and every seed):",
                      "", "| Metric | per seed | mean | 95% interval | verdict |", "|---|---|---|---|---|"]
            for m, d in paired.items():
                ci = d["ci95"]
                lines.append(f"| {self.task.metric_titles.get(m, m)} | "
                             + ", ".join(_signed(v) for v in d["per_seed"])
                             + f" | {_signed(d['mean'])} | "
                             + ("n/a" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]")
                             + f" | {_verdict(d)} |")
        lines += ["", "| Stage | wall time (s) |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in results["wall_time_s"].items()]
        return "\n".join(lines) + "\n"


#: Config keys that do not change a stage's result (logging, workers, paths of the run itself);
#: ``PIPELINE.*`` is left out too, since :meth:`PipelineRunner.stage_cfg` turns it into the
#: stage's own keys (``SOLVER.MAX_ITER``, ``FUSION.TEACHERS``, ...).
FINGERPRINT_IGNORED = ("OUTPUT_DIR", "LOG_PERIOD", "DATALOADER.NUM_WORKERS", "SOLVER.CHECKPOINT_PERIOD",
                       "TEST.VIS_NUM", "TEST.VIS_SCORE_THRESH", "MODEL.TRUST_CHECKPOINTS", "PIPELINE")
#: Keys holding input checkpoint paths: the file's size and mtime join the fingerprint, so a stage
#: reruns when an upstream stage was retrained.
FINGERPRINT_FILES = ("MODEL.WEIGHTS", "KD.TEACHER_WEIGHTS", "FUSION.TEACHERS", "FUSION.EXTRA_TEACHERS",
                     "MODEL.RFDETR.PRETRAIN_WEIGHTS", "MODEL.RFDETR.BACKBONE_INIT", "MODEL.HEAD_INIT")


def _set_key(cfg: CfgNode, dotted_key: str, value) -> None:
    """``cfg.<dotted_key> = value`` (an existing key of the unfrozen ``cfg``)."""
    *parents, last = dotted_key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[last] = value


def _flatten(node, prefix: str = "") -> Dict[str, object]:
    out: Dict[str, object] = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        if hasattr(v, "items"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def stage_fingerprint(cfg: CfgNode):
    """``(sha256 hex, flat config)`` identifying what a stage computes: every config value
    (iterations, LR schedule, datasets and limits, seeds, model, KD weights...) except
    :data:`FINGERPRINT_IGNORED`, plus ``size:mtime_ns`` of each input checkpoint named by
    :data:`FINGERPRINT_FILES` (``"missing"`` if absent)."""
    flat = {k: v for k, v in _flatten(cfg).items()
            if not any(k == i or k.startswith(i + ".") for i in FINGERPRINT_IGNORED)}
    for key in FINGERPRINT_FILES:
        paths = flat.get(key)
        for p in ([paths] if isinstance(paths, str) else paths or []):
            if p:
                st = os.stat(p) if os.path.isfile(p) else None
                flat[f"file:{p}"] = f"{st.st_size}:{st.st_mtime_ns}" if st else "missing"
    text = json.dumps(flat, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), json.loads(text)


def same_stage(record: dict, fingerprint: str, config: dict) -> bool:
    """True if a stage recorded as ``record`` (its ``stage_result.json`` / ``stage_progress.json``:
    ``fingerprint`` and flat ``config``) computes what ``config`` asks for.

    Either the fingerprints are equal, or every differing key is absent from the recorded config
    and now holds its default value (:func:`~mdkd_det.config.get_cfg`): a key added to mdkd_det
    after the stage ran, at a default that keeps the old behaviour (the project's rule for new
    keys). A key that was removed, or any changed value or input checkpoint, makes it False.
    """
    if record.get("fingerprint") == fingerprint:
        return True
    old = record.get("config")
    if not isinstance(old, dict) or set(old) - set(config):
        return False
    _, defaults = stage_fingerprint(get_cfg())
    return all(old[k] == v if k in old else (k in defaults and defaults[k] == v)
               for k, v in config.items())


def legacy_record(out: str) -> dict:
    """``{"fingerprint", "config"}`` of a stage finished by an mdkd_det that did not record them
    in ``stage_result.json``, rebuilt from the ``config.yaml`` the stage wrote when it started.

    Its input checkpoints (:data:`FINGERPRINT_FILES`) must be older than its
    ``stage_result.json``; otherwise an upstream stage was retrained after it and ``{}`` is
    returned (the stage retrains). Also ``{}`` if ``config.yaml`` is missing or unreadable.
    """
    path, result = os.path.join(out, "config.yaml"), os.path.join(out, "stage_result.json")
    try:
        cfg = get_cfg()
        cfg.merge_from_file(path)
        fingerprint, flat = stage_fingerprint(cfg)
        done = os.path.getmtime(result)
    except Exception:  # noqa: BLE001 - an unreadable old record: retrain
        return {}
    for key in FINGERPRINT_FILES:
        paths = flat.get(key)
        for p in ([paths] if isinstance(paths, str) else paths or []):
            if p and (not os.path.isfile(p) or os.path.getmtime(p) > done):
                return {}
    return {"fingerprint": fingerprint, "config": flat}


def _config_changes(old: Optional[dict], new: dict, limit: int = 6) -> str:
    """``"SOLVER.MAX_ITER: 4 -> 6, ..."`` (for the log)."""
    if not old:
        return "no recorded config"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    parts = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:limit]]
    return ", ".join(parts + ([f"... {len(keys) - limit} more"] if len(keys) > limit else [])) or "same values"


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _last_write(out: str) -> float:
    """Latest mtime (s since the epoch) of the files in ``out`` (0 if none)."""
    times = [e.stat().st_mtime for e in os.scandir(out) if e.is_file()] if os.path.isdir(out) else []
    return max(times, default=0.0)


#: Outputs of an earlier run of a stage, removed before it is trained afresh (stale results must
#: never be read as this run's: ``model_best`` of another config, appended metrics...).
_STAGE_OUTPUTS = ("last_checkpoint", "stage_result.json", "stage_progress.json", "model_best.json",
                  "metrics.json")


def _clear_stage(out: str) -> None:
    if not os.path.isdir(out):
        return
    for e in os.scandir(out):
        if e.is_file() and (e.name in _STAGE_OUTPUTS or e.name.endswith(".pth")):
            os.remove(e.path)


def _mean_sd(values) -> dict:
    """``{"mean", "sd", "n"}`` of the non-missing ``values`` (sample SD, ddof 1; None if n < 2)."""
    v = [float(x) for x in values if x is not None]
    n = len(v)
    mean = sum(v) / n if n else None
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else None
    return {"mean": _num(mean, 4), "sd": _num(sd, 4), "n": n}


def _lr_text(so) -> str:
    """``optimizer base_lr scheduler [steps x gamma] warmup`` of a ``SOLVER`` node (parity check)."""
    lr = f"{so.OPTIMIZER} {float(so.BASE_LR):g} {so.LR_SCHEDULER_NAME}"
    if "MultiStep" in so.LR_SCHEDULER_NAME:
        lr += f" steps {list(so.STEPS)} x{float(so.GAMMA):g}"
    return lr + f" warmup {int(so.WARMUP_ITERS)} x{float(so.WARMUP_FACTOR):g}"


def _extra_title(row: ExtraStudent) -> str:
    """results.md title of an extra student row: ``"Student +KMM"`` for a name starting with
    ``+``, else the name as given."""
    return f"Student {row.title}" if row.title.startswith("+") else row.title


def _signed(x) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def _fmt_mean_sd(s: Optional[dict], digits: int = 2) -> str:
    if not s or s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.{digits}f}" + (f" ± {s['sd']:.{digits}f}" if s["sd"] is not None else "")


def _verdict(d: dict) -> str:
    """"significant gain" / "significant loss" only when the interval excludes 0."""
    if not d.get("significant") or d.get("ci95") is None:
        return "no significant difference"
    return "significant gain" if d["ci95"][0] > 0 else "significant loss"


def _num(x, digits: int = 3) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), digits)


def run_pipeline(cfg: CfgNode, stages: Optional[Sequence[str]] = None, rerun: Sequence[str] = ()) -> dict:
    """Convenience wrapper: ``PipelineRunner(cfg, stages, rerun).run()``."""
    return PipelineRunner(cfg, stages, rerun).run()
