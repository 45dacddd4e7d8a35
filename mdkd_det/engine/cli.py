"""``tools/train_net.py`` / ``mdkd-train`` entry point.

Dispatch: ``--eval-only`` evaluates ``MODEL.WEIGHTS`` (with ``--resume``: the checkpoint named
by ``OUTPUT_DIR/last_checkpoint``, as detectron2; with neither it refuses rather than evaluate a
random model); otherwise trains with
:class:`DefaultTrainer` (or, when the config has a ``PIPELINE`` section with stages, runs the MDKD
pipeline). Errors of the project's families (bad config, bad data, bad checkpoint) are printed as
one clear line and exit with status 2, before training starts where possible.
"""

from __future__ import annotations

import logging
import sys

from ..utils.errors import CheckpointError, ConfigError, MdkdError, user_message
from .checkpointer import Checkpointer
from .defaults import DefaultTrainer, build_model, default_argument_parser, default_setup, do_test, setup_cfg
from .launch import launch

logger = logging.getLogger("mdkd_det")


def run(args) -> dict:
    """Main function of one process: returns the evaluation results dict."""
    cfg = setup_cfg(args)
    if args.eval_only:
        weights = eval_only_weights(cfg, args.resume)
    default_setup(cfg, args)
    if args.eval_only:
        model = build_model(cfg)
        trust = cfg.MODEL.TRUST_CHECKPOINTS
        Checkpointer(model, cfg.OUTPUT_DIR, trust_checkpoints=trust).load(weights, checkpointables=[])
        return do_test(cfg, model)
    if cfg.PIPELINE.ENABLED:
        from ..pipeline import run_pipeline

        return run_pipeline(cfg, stages=args.stage or None, rerun=args.rerun or ())
    trainer = trainer_class_for(cfg)(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def eval_only_weights(cfg, resume: bool) -> str:
    """The checkpoint ``--eval-only`` evaluates: with ``resume`` the one named by
    ``OUTPUT_DIR/last_checkpoint`` if present, else ``MODEL.WEIGHTS``.

    Raises:
        ConfigError: neither (``MODEL.WEIGHTS`` empty and no ``--resume``): evaluating a
            randomly initialised model is refused.
        CheckpointError: ``--resume`` but no ``last_checkpoint`` and no ``MODEL.WEIGHTS``, or a
            ``last_checkpoint`` naming a missing file.
    """
    ckpt = Checkpointer(None, cfg.OUTPUT_DIR, save_to_disk=False)
    if resume and ckpt.has_checkpoint():
        return ckpt.get_checkpoint_file()
    if cfg.MODEL.WEIGHTS:
        return cfg.MODEL.WEIGHTS
    if resume:
        raise CheckpointError(f"--eval-only --resume: no {cfg.OUTPUT_DIR}/last_checkpoint and MODEL.WEIGHTS "
                              "is empty: nothing to evaluate")
    raise ConfigError("--eval-only needs MODEL.WEIGHTS (the checkpoint to evaluate) or --resume (evaluate "
                      "OUTPUT_DIR's last checkpoint); refusing to evaluate a randomly initialised model")


def trainer_class_for(cfg):
    """The trainer of a single (non-pipeline) run: KD (Stage 3), domain-adversarial (Stage 1)
    or plain supervised training."""
    if cfg.KD.ENABLED:
        from ..distill.trainer import KDTrainer

        return KDTrainer
    if cfg.ADVERSARIAL.ENABLED:
        from .adversarial import DomainAdversarialTrainer

        return DomainAdversarialTrainer
    return DefaultTrainer


def main(argv=None) -> int:
    """Parse the CLI, launch (possibly distributed) and return the exit status (2 = bad input)."""
    args = default_argument_parser().parse_args(argv)
    try:
        # Merge and validate the config here, in the launcher: a bad key or value is one line
        # (status 2) before any worker process is spawned (issue 13).
        setup_cfg(args)
        launch(run, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except MdkdError as e:
        if not getattr(e, "reported", False):  # a worker process printed it already
            print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    return 0
