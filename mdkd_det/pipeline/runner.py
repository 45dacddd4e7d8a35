"""The MDKD pipeline: baselines -> Stage 1 -> Stage 2 -> Stage 3 -> results table.

This is the only module that knows the paper's stage order (Algorithm 1; §3, §4.3, §6.2):

=================  =============================================================  ===========
stage              what                                                           trainer
=================  =============================================================  ===========
backbone_init      optional (``PIPELINE.ITERS.BACKBONE_INIT`` > 0; RF-DETR CPU         DefaultTrainer
                   protocol): a ``PIPELINE.BACKBONE_INIT_ARCH`` detector on the target
                   whose backbone initialises every non-fusion stage
                   (``MODEL.RFDETR.BACKBONE_INIT``); not a table row
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
iterations, schedule, data, seed, input checkpoints...); otherwise it is retrained from scratch
and the log names the keys that changed. A stage with only a ``last_checkpoint`` resumes exactly
if ``stage_progress.json`` (written when the stage starts) holds the same fingerprint, else it
restarts. Starting a stage afresh (also ``--rerun``) first removes its old results, so an
interrupted rerun is resumed or restarted, never taken as finished. A resumed stage's
``wall_time_s`` adds up every session (an interrupted session counts until the last file it
wrote). ``OUTPUT_DIR/results.json`` and ``results.md``
collect the target-evaluation rows (the task's ``row_metrics``, e.g. AP/AP50 in percent for
detection) and each stage's wall time.

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
import time
from typing import Dict, List, Optional, Sequence

from ..config import CfgNode
from ..engine import comm
from ..engine.checkpointer import atomic_write_text
from ..engine.defaults import DefaultTrainer, dataset_output_name
from ..tasks import get_task
from ..tasks.base import row_values
from ..utils.errors import ConfigError

logger = logging.getLogger("mdkd_det.pipeline")

STAGES = ("backbone_init", "multi_head", "dataset_specific", "target_teacher", "source_teachers", "joint_teacher", "student")
#: results.json row of each stage that produces one.
ROW_OF_STAGE = {"multi_head": "multi_head", "dataset_specific": "dataset_specific",
                "joint_teacher": "joint_teacher", "student": "student"}
ROW_TITLES = {"multi_head": "Multi-head", "dataset_specific": "Dataset-specific",
              "joint_teacher": "Joint teacher", "student": "Student"}
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
        self.wall: Dict[str, float] = {}
        self.rows: Dict[str, dict] = {}

    # --- config deltas --------------------------------------------------------------------
    def _iters(self, key: str) -> int:
        return int(getattr(self.cfg.PIPELINE.ITERS, key)) or int(self.cfg.SOLVER.MAX_ITER)

    def stage_cfg(self, stage: str, source: Optional[str] = None) -> CfgNode:
        """The config of one stage: the pipeline config plus that stage's delta."""
        c = self.cfg.clone()
        c.defrost()
        c.PIPELINE.ENABLED = False
        c.DATASETS.TEST = (self.eval_dataset,)
        teacher_bb = c.PIPELINE.TEACHER_BACKBONE
        if self._backbone_init_iters() and stage != "backbone_init":
            c.MODEL.RFDETR.BACKBONE_INIT = os.path.join(self.stage_dir("backbone_init"), "model_final.pth")
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
            if head_init == "target_teacher":
                if c.MODEL.META_ARCHITECTURE != "rfdetr":
                    raise ConfigError("PIPELINE.JOINT_TEACHER_HEAD_INIT 'target_teacher' is implemented "
                                      "for MODEL.META_ARCHITECTURE 'rfdetr' only")
                c.MODEL.RFDETR.HEAD_INIT = self.teacher_checkpoints()[0]
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
        c.OUTPUT_DIR = self.stage_dir(stage, source)
        c.freeze()
        return c

    def _backbone_init_iters(self) -> int:
        n = int(self.cfg.PIPELINE.ITERS.BACKBONE_INIT)
        if n and self.cfg.PIPELINE.BACKBONE_INIT_ARCH == self.cfg.MODEL.META_ARCHITECTURE:
            raise ConfigError("PIPELINE.ITERS.BACKBONE_INIT > 0 trains a PIPELINE.BACKBONE_INIT_ARCH "
                              "detector to initialise another family's backbone; it equals "
                              f"MODEL.META_ARCHITECTURE ('{self.cfg.MODEL.META_ARCHITECTURE}')")
        return n

    def stage_dir(self, stage: str, source: Optional[str] = None) -> str:
        """``OUTPUT_DIR/<stage>`` (``source_teacher_<dataset>`` for a source teacher)."""
        name = f"source_teacher_{dataset_output_name(source)}" if stage == "source_teacher" else stage
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
        rerun = name in self.rerun or (name.startswith("source_teacher") and "source_teachers" in self.rerun)
        if self._done(out) and not rerun:
            res = _read_json(result_file)
            if res.get("fingerprint") == fingerprint:
                logger.info("[pipeline] %s: finished earlier (%s); skipped", name, out)
                return res
            logger.info("[pipeline] %s: finished earlier with another config (%s); retraining",
                        name, _config_changes(res.get("config"), fp_config))
        progress = _read_json(progress_file)
        resume = (not rerun and not self._done(out) and os.path.isfile(os.path.join(out, "last_checkpoint"))
                  and progress.get("fingerprint") == fingerprint)
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
        return self.write_results()

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
        """Write ``results.json`` (schema in the issue) and ``results.md``; return the dict."""
        results = {
            "target": "+".join(self.target),
            "eval_dataset": self.eval_dataset,
            "task": self.task.name,
            "metrics": list(self.task.row_metrics),
            "rows": {k: {**{m: _num(v.get(m)) for m in self.task.row_metrics},
                         "checkpoint": v.get("checkpoint"),
                         **({"reused_from": v["reused_from"]} if v.get("reused_from") else {}),
                         **({"selected_by": v["selected_by"]} if v.get("selected_by") else {})}
                     for k, v in self.rows.items()},
            "wall_time_s": {k: round(float(v), 1) for k, v in self.wall.items()},
        }
        if comm.is_main_process():
            atomic_write_text(os.path.join(self.root, "results.json"), json.dumps(results, indent=2))
            md = self.results_markdown(results)
            atomic_write_text(os.path.join(self.root, "results.md"), md)
            logger.info("MDKD results (%s):\n%s", self.eval_dataset, md)
        return results

    def results_markdown(self, results: dict) -> str:
        """The paper-table-style markdown of ``results``: one column per task metric, and the
        paper's numbers beside ours when the task knows them (:meth:`Task.paper_reference`)."""
        metrics = list(self.task.row_metrics)
        caption, paper = self.task.paper_reference(self.cfg, self.target[0])
        titles = [self.task.metric_titles.get(m, m) for m in metrics]
        head = "| Model | " + " | ".join(titles) + " |"
        sep = "|---|" + "---|" * len(metrics)
        if paper:
            head += f" {caption} |"
            sep += "---|"
        lines = [f"Target {results['target']}, evaluated on {results['eval_dataset']} "
                 f"({self.task.name}, {self.cfg.MODEL.META_ARCHITECTURE})", "", head, sep]
        for key in ("multi_head", "dataset_specific", "joint_teacher", "student"):
            row = results["rows"].get(key) or {}
            vals = ["n/a" if row.get(m) is None else f"{row[m]:.2f}" for m in metrics]
            title = ROW_TITLES[key] + (" (= target teacher, A24)" if row.get("reused_from") else "")
            line = f"| {title} | " + " | ".join(vals) + " |"
            if paper:
                line += " " + (" / ".join(f"{v:.2f}" for v in paper[key]) if key in paper else "n/a") + " |"
            lines.append(line)
        if self.val_dataset:
            lines += ["", f"Each row: the checkpoint with the best {self.task.best_metric} on "
                          f"{self.val_dataset} (PIPELINE.VAL_DATASET), evaluated on {results['eval_dataset']}."]
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
                     "MODEL.RFDETR.PRETRAIN_WEIGHTS", "MODEL.RFDETR.BACKBONE_INIT", "MODEL.RFDETR.HEAD_INIT")


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


def _num(x) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 3)


def run_pipeline(cfg: CfgNode, stages: Optional[Sequence[str]] = None, rerun: Sequence[str] = ()) -> dict:
    """Convenience wrapper: ``PipelineRunner(cfg, stages, rerun).run()``."""
    return PipelineRunner(cfg, stages, rerun).run()
